"""The exception family. Each also inherits the builtin a caller would expect,
so ``except OSError`` around a model load or ``except ValueError`` around bad
arguments keeps working."""
from __future__ import annotations


class PmtpError(Exception):
    """Base of every error raised by pyllama_mtp."""


class ModelLoadError(PmtpError, OSError):
    """The model file is missing, unreadable, not a GGUF, or llama.cpp rejected it."""


class InvalidArgumentError(PmtpError, ValueError):
    """A parameter is out of range or inconsistent with the model."""


class ContextFullError(PmtpError):
    """The tokens do not fit in the context window."""


class DecodeError(PmtpError, RuntimeError):
    """llama.cpp failed to evaluate a batch."""


class MtpError(PmtpError, ValueError):
    """The model (or MTP file) cannot do Multi-Token Prediction as asked."""


class InexactVerifyError(MtpError):
    """A verify batch on this model and these devices does not compute what one-token
    decoding computes (a backend or RPC worker whose kernels depend on the batch size), so
    MTP could change the greedy output. The message says where the first difference showed
    and what to do."""


class SwaGuardError(PmtpError, RuntimeError):
    """The sliding-window cache lost positions the next token still attends to."""


class OutOfMemoryError(PmtpError, MemoryError):
    """A buffer (KV cache, compute) could not be allocated."""


class AbortedError(PmtpError):
    """An operation was cancelled by a callback."""


class RpcError(PmtpError, ConnectionError):
    """An RPC worker is unreachable, speaks another protocol version, or was lost (killed,
    crashed, out of memory, no answer within the timeout). The message names the endpoint.
    A model that lost a worker cannot be used any more: close it and load it again."""


class ClosedError(PmtpError, ValueError):
    """The object was closed; create a new one."""


class InternalError(PmtpError, RuntimeError):
    """A bug: please report it with the message."""


class ConcurrentUseError(PmtpError, RuntimeError):
    """A call that would have to wait for the calling thread itself: this thread holds an
    open stream of the same Llama. Finish or close() that stream first."""
