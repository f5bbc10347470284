"""Speculative-decoding bookkeeping that needs no native code: the draft-length
setting and the statistics users read (``llm.stats``, ``Completion.stats``).

Glossary: a *draft* is a token proposed by an MTP head; *accepted* drafts are the
ones the target model's own sampling agreed with; every verify step also yields one
token sampled by the target (a *correction* when a draft was rejected, a *bonus*
when all were accepted).
"""
from __future__ import annotations

import itertools

from dataclasses import dataclass, field

from .config import MAX_DRAFT
from .errors import InvalidArgumentError


FIXED_DEFAULT_DRAFT = 3


def default_draft(devices) -> int | str:
    """The draft length a Llama created without ``draft=`` uses: ``"auto"`` where the model
    runs on this host's CPU, where the policy was measured to meet its targets (within 3% of
    plain decoding where drafting does not pay, within 5% of the best fixed length where it
    does; README "draft=auto"); FIXED_DEFAULT_DRAFT where a GPU or an RPC worker holds
    layers, where it has not been shown to yet. ``devices``: the model's (engine.DeviceInfo)."""
    on_host = all(d.endpoint is None and d.type in ("cpu", "accel") for d in devices)
    return "auto" if on_host else FIXED_DEFAULT_DRAFT


def validate_draft(draft, draft_max: int) -> int | str:
    """A per-call draft length: an int in [0, draft_max] (0 = plain decoding), or
    "auto" (a draft_policy.DraftPolicy picks it every step)."""
    if draft == "auto":
        if draft_max < 1:
            raise InvalidArgumentError("draft='auto' needs a Llama created with mtp=")
        return draft
    if not isinstance(draft, int) or isinstance(draft, bool):
        raise InvalidArgumentError(f"draft must be an int or 'auto', got {draft!r}")
    if draft < 0 or draft > max(draft_max, 0):
        raise InvalidArgumentError(
            f"draft={draft} is outside [0, {draft_max}]: this Llama keeps {draft_max} MTP head(s) ready; "
            f"create it with a larger draft (at most {MAX_DRAFT}, and at most the number of chained heads)")
    return draft


@dataclass(frozen=True)
class GenerationStats:
    """Counters and timings of speculative decoding over some span of generation."""
    n_steps: int = 0              # verify steps (plain one-token decodes are not counted)
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0              # tokens that verify steps produced (accepted + sampled)
    drafted_per_position: tuple[int, ...] = ()
    accepted_per_position: tuple[int, ...] = ()
    drafted_per_position_rejection: tuple[int, ...] = ()   # the subset of steps that used rejection sampling
    accepted_per_position_rejection: tuple[int, ...] = ()
    swa_recoveries: int = 0
    t_draft_s: float = 0.0
    t_verify_s: float = 0.0
    t_catchup_s: float = 0.0
    t_prefill_s: float = 0.0
    t_decode_s: float = 0.0
    n_prompt_tokens: int = 0
    n_generated: int = 0
    t_prompt_s: float = 0.0       # wall time: prompt processing up to the first token
    t_generate_s: float = 0.0     # wall time: the rest of the generation
    n_timed: int | None = None    # tokens t_generate_s covers (None: all but the first)
    extra: dict = field(default_factory=dict)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def acceptance_per_position(self) -> tuple[float, ...]:
        """P(draft i accepted | draft i proposed), for i = 0, 1, ..."""
        return tuple(a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafted_per_position) if d)

    @property
    def acceptance_per_position_by_rule(self) -> dict[str, tuple[float, ...]]:
        """Acceptance per draft position for each acceptance rule ("match", "rejection")."""
        def rates(acc, dra):
            return tuple(a / d for a, d in zip(acc, dra) if d)
        match_acc = tuple(a - r for a, r in zip(self.accepted_per_position, self.accepted_per_position_rejection))
        match_dra = tuple(a - r for a, r in zip(self.drafted_per_position, self.drafted_per_position_rejection))
        return {"match": rates(match_acc, match_dra),
                "rejection": rates(self.accepted_per_position_rejection, self.drafted_per_position_rejection)}

    @property
    def mean_accepted_length(self) -> float:
        """Accepted drafts per verify step."""
        return self.accepted / self.n_steps if self.n_steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens after the first, over the time they took (decode speed)."""
        n = self.n_generated - 1 if self.n_timed is None else self.n_timed
        return n / self.t_generate_s if n > 0 and self.t_generate_s > 0 else 0.0

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.n_prompt_tokens / self.t_prompt_s if self.t_prompt_s > 0 else 0.0

    @classmethod
    def from_native(cls, raw: dict, **extra) -> "GenerationStats":
        return cls(n_steps=raw["n_steps"], drafted=raw["n_drafted"], accepted=raw["n_accepted"],
                   emitted=raw["n_emitted"], drafted_per_position=tuple(raw["drafted_at"]),
                   accepted_per_position=tuple(raw["accepted_at"]),
                   drafted_per_position_rejection=tuple(raw["drafted_at_rejection"]),
                   accepted_per_position_rejection=tuple(raw["accepted_at_rejection"]),
                   swa_recoveries=raw["swa_recoveries"],
                   t_draft_s=raw["t_draft_s"], t_verify_s=raw["t_verify_s"], t_catchup_s=raw["t_catchup_s"],
                   t_prefill_s=raw["t_prefill_s"], t_decode_s=raw["t_decode_s"], **extra)

    def minus(self, before: "GenerationStats") -> "GenerationStats":
        """The span between two snapshots of cumulative native counters."""
        def sub(a, b):   # a snapshot taken before any step may hold no per-position counters yet
            return tuple(x - y for x, y in itertools.zip_longest(a, b, fillvalue=0))
        return GenerationStats(
            n_steps=self.n_steps - before.n_steps, drafted=self.drafted - before.drafted,
            accepted=self.accepted - before.accepted, emitted=self.emitted - before.emitted,
            drafted_per_position=sub(self.drafted_per_position, before.drafted_per_position),
            accepted_per_position=sub(self.accepted_per_position, before.accepted_per_position),
            drafted_per_position_rejection=sub(self.drafted_per_position_rejection,
                                               before.drafted_per_position_rejection),
            accepted_per_position_rejection=sub(self.accepted_per_position_rejection,
                                                before.accepted_per_position_rejection),
            swa_recoveries=self.swa_recoveries - before.swa_recoveries,
            t_draft_s=self.t_draft_s - before.t_draft_s, t_verify_s=self.t_verify_s - before.t_verify_s,
            t_catchup_s=self.t_catchup_s - before.t_catchup_s, t_prefill_s=self.t_prefill_s - before.t_prefill_s,
            t_decode_s=self.t_decode_s - before.t_decode_s)

    def as_dict(self) -> dict:
        return {
            "n_steps": self.n_steps, "drafted": self.drafted, "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
            "acceptance_per_position": list(self.acceptance_per_position),
            "acceptance_per_position_by_rule": {k: list(v) for k, v in self.acceptance_per_position_by_rule.items()},
            "mean_accepted_length": self.mean_accepted_length,
            "swa_recoveries": self.swa_recoveries,
            "t_draft_s": self.t_draft_s, "t_verify_s": self.t_verify_s, "t_catchup_s": self.t_catchup_s,
            "n_prompt_tokens": self.n_prompt_tokens, "n_generated": self.n_generated,
            "t_prompt_s": self.t_prompt_s, "t_generate_s": self.t_generate_s,
            "tokens_per_second": self.tokens_per_second,
        }

    def __str__(self) -> str:
        d = self.as_dict()
        per_pos = ", ".join(f"{x:.2f}" for x in d["acceptance_per_position"]) or "-"
        return (f"drafted {self.drafted}, accepted {self.accepted} ({self.acceptance_rate:.1%}), "
                f"per position [{per_pos}], mean accepted {self.mean_accepted_length:.2f}/step, "
                f"{self.tokens_per_second:.1f} tok/s")


@dataclass
class SequenceCounters:
    """Draft counters of one sequence (the native counters are the whole session's):
    what ``Completion.stats`` and the server's per-request figures report for it.
    ``rejection``: the sequence's drafts are accepted by rejection sampling, so its
    positions count under that rule too (``acceptance_per_position_by_rule``)."""
    rejection: bool = False
    n_steps: int = 0
    drafted: int = 0
    accepted: int = 0
    drafted_at: list[int] = field(default_factory=lambda: [0] * MAX_DRAFT)
    accepted_at: list[int] = field(default_factory=lambda: [0] * MAX_DRAFT)

    def count(self, result) -> None:
        """Count one step's result (a plain decode drafts nothing and counts no step)."""
        if result.n_drafted:
            self.n_steps += 1
            self.drafted += result.n_drafted
            self.accepted += result.n_accepted
            for i in range(min(result.n_drafted, MAX_DRAFT)):
                self.drafted_at[i] += 1
                self.accepted_at[i] += i < result.n_accepted

    def stats(self, **wall) -> GenerationStats:
        """These counters plus the wall-clock fields given (n_generated, t_generate_s, ...)."""
        zero = (0,) * MAX_DRAFT
        return GenerationStats(n_steps=self.n_steps, drafted=self.drafted, accepted=self.accepted,
                               emitted=self.accepted + self.n_steps,
                               drafted_per_position=tuple(self.drafted_at),
                               accepted_per_position=tuple(self.accepted_at),
                               drafted_per_position_rejection=tuple(self.drafted_at) if self.rejection else zero,
                               accepted_per_position_rejection=tuple(self.accepted_at) if self.rejection else zero,
                               **wall)
