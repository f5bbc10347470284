"""What one generation call may set, with one set of defaults.

``GenerationOptions`` is built from the keyword arguments of ``Llama.generate``/``stream``/
``chat``/``generate_batch`` and from a server request (whose fields left out take these
defaults); ``Llama.prepare`` turns a prompt and its options into a ``PreparedCall``, which
every loop runs the same way (``sequence.Sequence``).
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import SamplingParams, _is_int
from .errors import InvalidArgumentError


_SAMPLER = SamplingParams()


def _stops(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise InvalidArgumentError("stop must be a non-empty string or a list of non-empty strings")
    return tuple(stop)


@dataclass(frozen=True)
class GenerationOptions:
    """One call's options. Sampling follows llama.cpp's chain (see ``SamplingParams``);
    ``seed``/``accept`` None take the Llama's; ``draft`` None takes the Llama's default,
    0 decodes plainly, ``"auto"`` lets the draft policy pick every step; ``mtp=False`` is
    draft 0; ``logprobs`` None off, 0 each token's logprob, k also the top k; ``stop``
    strings end the text (not included). Bad values raise InvalidArgumentError here, before
    anything runs; unknown names raise TypeError."""
    max_tokens: int | None = 256
    # the sampler's defaults are SamplingParams' own
    temperature: float = _SAMPLER.temperature
    top_k: int = _SAMPLER.top_k
    top_p: float = _SAMPLER.top_p
    min_p: float = _SAMPLER.min_p
    repeat_penalty: float = _SAMPLER.repeat_penalty
    presence_penalty: float = _SAMPLER.presence_penalty
    frequency_penalty: float = _SAMPLER.frequency_penalty
    stop: tuple[str, ...] = ()
    seed: int | None = None
    draft: int | str | None = None
    mtp: bool | None = None
    accept: str | None = None
    logprobs: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "stop", _stops(self.stop))
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise InvalidArgumentError(f"max_tokens must be an int >= 1 or None, got {self.max_tokens!r}")
        if self.mtp is not None and not isinstance(self.mtp, bool):
            raise InvalidArgumentError(f"mtp must be True or False per call, got {self.mtp!r}")
        if self.draft is not None and self.draft != "auto" and not _is_int(self.draft):
            raise InvalidArgumentError(f"draft must be an int or 'auto', got {self.draft!r}")
        if self.logprobs is not None and not _is_int(self.logprobs):
            raise InvalidArgumentError(f"logprobs must be an int or None, got {self.logprobs!r}")
        self.sampling(0xFFFFFFFF, None)    # the sampling values are checked now, not when the call runs

    @property
    def penalties(self) -> bool:
        return self.repeat_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def sampling(self, default_seed: int, default_accept: str | None) -> SamplingParams:
        """The sampler of this call. With penalties and no explicit ``accept``, drafts are
        accepted by matching (rejection sampling does not model penalties; matching stays
        exact with them)."""
        accept = self.accept if self.accept is not None else default_accept
        if accept is None and self.penalties:
            accept = "match"
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              repeat_penalty=self.repeat_penalty, presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty,
                              seed=default_seed if self.seed is None else self.seed, accept=accept,
                              n_logprobs=-1 if self.logprobs is None else self.logprobs)

    def draft_or(self, default: int | str) -> int | str:
        """The draft setting of this call, given the Llama's default."""
        if self.mtp is False:
            return 0
        return default if self.draft is None else self.draft


@dataclass(frozen=True)
class PreparedCall:
    """One call's prompt and options, checked before anything runs (``Llama.prepare``):
    what a sequence needs to run, whichever loop runs it (``generate``/``stream``,
    ``generate_batch``, the server's scheduler)."""
    tokens: list[int]               # the prompt's token ids
    max_tokens: int | None
    sampling: SamplingParams
    draft: int | str                # a checked draft length, or "auto"
    stops: tuple[str, ...]

    @property
    def with_logprobs(self) -> bool:
        return self.sampling.n_logprobs >= 0

    @property
    def rejection(self) -> bool:
        """Whether this call's drafts are accepted by rejection sampling (else by matching)."""
        return self.sampling.accept_id == 1 and self.sampling.temperature > 0
