"""pyllama-mtp: llama.cpp built from source, with exact and fast Multi-Token-Prediction
speculative decoding from Python.

    from pyllama_mtp import Llama
    llm = Llama("model.gguf", mtp=True, draft=3)   # or draft="auto"
    print(llm.generate("def quicksort(xs):", max_tokens=64).text)

The native library is loaded on first use of anything that needs it, so the
pure-Python parts (tiny models, chat templates, bench parsing) import without it.
"""
from __future__ import annotations

from .errors import (AbortedError, ClosedError, ConcurrentUseError, ContextFullError, DecodeError, InternalError,
                     InexactVerifyError, InvalidArgumentError, ModelLoadError, MtpError, OutOfMemoryError,
                     PmtpError, RpcError, SwaGuardError)

__version__ = "0.1.0"

_LAZY = {
    "Llama": ("llama", "Llama"),
    "Completion": ("llama", "Completion"),
    "Chunk": ("llama", "Chunk"),
    "PreparedCall": ("options", "PreparedCall"),
    "GenerationOptions": ("options", "GenerationOptions"),
    "Model": ("engine", "Model"),
    "Session": ("engine", "Session"),
    "build_info": ("engine", "build_info"),
    "SamplingParams": ("config", "SamplingParams"),
    "ModelConfig": ("config", "ModelConfig"),
    "ContextConfig": ("config", "ContextConfig"),
}

__all__ = ["__version__", "PmtpError", "ModelLoadError", "InvalidArgumentError", "ContextFullError",
           "DecodeError", "MtpError", "InexactVerifyError", "SwaGuardError", "OutOfMemoryError", "AbortedError",
           "ClosedError", "ConcurrentUseError", "RpcError", "InternalError", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pyllama_mtp' has no attribute {name!r}")
