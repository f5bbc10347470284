"""The load-time check that MTP cannot change the output on this model and these devices.

Greedy MTP output equals plain greedy output only if a verify batch of k+1 rows computes,
for every row, the bits a one-token decode computes (and sequences decoded together the
bits each gets alone). The patches make that true for the CPU backend and CUDA as tested
here; other devices (Metal, Vulkan, GPUs of other architectures) and RPC workers that run
another build (upstream's ``rpc-server`` speaks the same protocol) may pick their kernels
by batch size and sum in another order. Such a difference is a few ulps in the logits, so
the output changes only where two tokens nearly tie: rare on test models, common enough on
real ones, and invisible until it happens.

``check_session`` runs the comparison on the session itself, before anything else uses it:
a short greedy continuation decoded one token at a time, then the same tokens given as
drafts to one verify batch of ``draft_max + 1`` rows, then (with several sequences) the
same prompt in up to eight sequences that draft and verify together, one batch of up to
``8 * (draft_max + 1)`` rows. Every row's token, logprob and top-20 logprobs (derived from
the whole logit row) must be bit-identical to the one-token decode's.

On the way, from the same prompt, two real MTP steps of ``draft_max`` drafts (the heads'
own drafts, verified and accepted as a generation's would be): their rows are compared
too, and they give ``draft="auto"`` a start (``StepSeed``): this session's measured cost
of a plain step and of a drafting step, with graphs built and caches warm, and whether
the heads' drafts were accepted. Without it the policy first decodes plainly, probes one
draft and climbs length by length, which costs a short generation several steps.

Whether drafts are accepted depends on the text, so one more MTP step runs from each of
two more short texts of other kinds (code, a list of numbers): how often the heads get one
text right says little of another (an oracle model whose heads agree with the trunk on
60% of tokens rejected every draft of two steps after the first sentence, and accepted
every draft after the code), and three texts make a prior that is less the first one's.

It costs five prefills of six tokens, ``draft_max + 1`` one-token decodes, one verify
batch and four MTP steps (and with several sequences a prefill each and one batched step),
and leaves the session empty.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from .config import SamplingParams
from .engine import Session, StepResult
from .errors import InexactVerifyError

# prose (its prompt is the one compared), code, numbers: what the heads' acceptance is
# sampled on for draft="auto"'s start
_PROBE_TEXTS = ("The quick brown fox jumps over the lazy dog", "def add(a, b):\n    return a + b",
                "1, 2, 3, 4, 5, 6, 7, 8")
_PROBE_PROMPT_TOKENS = 6
_TOP = 20                       # logprobs of the 20 likeliest tokens: a wide slice of each logit row
_MAX_SEQUENCES_CHECKED = 8       # with draft 3: a batch of 32 rows, where BLAS backends take over


@dataclass(frozen=True)
class StepSeed:
    """What the check measured of one sequence's steps near the start of a context, for
    ``draft="auto"`` (``BatchDraftPolicy.seed``)."""
    plain_s: tuple[float, ...]      # one-token decodes after the first (whose graphs were new)
    draft: int                      # drafts per MTP step
    draft_s: float                  # an MTP step after one of the same length: drafting, verify, accept
    accepted: tuple[int, ...]       # drafts accepted in each of the two MTP steps on the first text
    other_texts: tuple[int, ...] = ()   # drafts accepted in one MTP step on each other text


@dataclass(frozen=True)
class ExactnessCheck:
    """What the load-time check compared and found (``Llama.exactness``)."""
    verify_rows: int            # rows of the verify batch compared with one-token decodes
    sequences: int              # sequences verified together and compared with one alone (1: none)
    exact: bool
    difference: str | None      # where the first difference showed (None when exact)
    seed: StepSeed | None = None  # step costs and acceptance measured on the way (None: not exact)


def _probe_prompt(tokenize, text: str, n_ctx: int, draft_max: int) -> list[int]:
    """A few ordinary tokens to start the probe from (what the text gives with this vocab)."""
    tokens = list(tokenize(text))[:_PROBE_PROMPT_TOKENS]
    room = max(n_ctx - 2 * (draft_max + 1) - 1, 1)     # and two MTP steps after it
    return tokens[:room] or [0]


def _describe(row: int, plain: tuple, other: tuple) -> str:
    token_p, logprob_p, top_p = plain
    token_o, logprob_o, top_o = other
    if token_p != token_o:
        return f"row {row}: token {token_o} where one-token decoding gives {token_p}"
    if logprob_p != logprob_o:
        return f"row {row}: logprob {logprob_o!r} where one-token decoding gives {logprob_p!r}"
    other_top = dict(top_o)
    gap = max((abs(lp - other_top[t]) for t, lp in top_p if t in other_top), default=0.0)
    return f"row {row}: top-{_TOP} logprobs differ" + (f" (by up to {gap:.2g})" if gap else "")


def _rows(results: list[StepResult]) -> list[tuple]:
    out = []
    for r in results:
        for i, token in enumerate(r.tokens):
            out.append((token, r.logprobs[i], r.top_logprobs[i]))
    return out


def _first_difference(plain: list[tuple], other: list[tuple]) -> str | None:
    for row, (p, o) in enumerate(zip(plain, other)):
        if p != o:
            return _describe(row, p, o)
    if len(other) != len(plain):
        return f"{len(other)} rows where one-token decoding gives {len(plain)}"
    return None


def check_session(session: Session, prompt: list[int] | None = None) -> ExactnessCheck:
    """Compare the session's verify batch (and, with several sequences, a batch of sequences)
    with one-token decoding, bit for bit, from ``prompt`` (default: a few tokens of an
    English sentence, and the MTP steps for the seed from two more texts too; a prompt
    given: from it alone); the session is empty afterwards.

    It runs in a thread of its own that ends with it. The CPU backend's OpenMP runtime
    (libgomp) keeps a pool of worker threads for every thread that has run a decode, for as
    long as that thread lives, and once its pools hold more threads than there are cores
    its barriers sleep instead of spinning. A server loads its model on the main thread and
    decodes on another: a check run on the main thread left a second pool behind, and every
    later decode ran slower (plain steps of 8 sequences at a 2,048-token context on 2
    cores: 67 ms instead of 51). Vendor patch 0025 took the barriers between a graph's
    nodes out of libgomp's hands; those at the start and end of each graph remain."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(_check(session, prompt))
        except BaseException as e:          # (re-raised on the caller's thread)
            outcome.append(e)

    worker = threading.Thread(target=run, name="pyllama-mtp-exactness-check")
    worker.start()
    try:
        worker.join()
    except BaseException:       # (Ctrl-C): the session is in use until the check's thread ends
        worker.join()
        raise
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _check(session: Session, prompt: list[int] | None) -> ExactnessCheck:
    k = session.draft_max
    if prompt is None:
        prompts = [_probe_prompt(session.model.tokenize, text, session.n_ctx, k) for text in _PROBE_TEXTS]
    else:
        prompts = [prompt]
    prompt = prompts[0]
    n_seq = min(session.n_seq_max, _MAX_SEQUENCES_CHECKED)
    greedy = SamplingParams(temperature=0.0, n_logprobs=_TOP)
    for seq in range(n_seq):
        session.seq_set_sampling(seq, greedy)

    def start(seq: int, tokens: list[int] = prompt) -> None:     # a prompt, and its first token pending
        session.seq_reset(seq)
        session.seq_prefill(seq, tokens)
        session.seq_sample(seq)

    def timed(call):
        t0 = time.perf_counter()
        result = call()
        return result, time.perf_counter() - t0

    seed = None
    try:
        start(0)
        steps = [timed(lambda: session.step(0)) for _ in range(k + 1)]
        plain = _rows([r for r, _ in steps])                          # row i: what token i's decode gives
        start(0)
        verified = _rows([session.verify([token for token, _, _ in plain[:k]])])
        difference = _first_difference(plain, verified)
        if difference is not None:
            difference = f"verify of {k + 1} rows, {difference}"
        else:
            # two MTP steps with the heads' drafts; the second, after one of its length, is
            # timed as a steady step. The rows they return are rows of the plain decode.
            start(0)
            first, _ = timed(lambda: session.step(k))
            second, t_second = timed(lambda: session.step(k))
            rows = _rows([first, second])[:len(plain)]
            d = _first_difference(plain[:len(rows)], rows)
            if d is not None:
                difference = f"MTP steps of {k} drafts, {d}"
            else:
                others = []
                for other in prompts[1:]:            # acceptance on other kinds of text
                    start(0, other)
                    others.append(session.step(k).n_accepted)
                seed = StepSeed(plain_s=tuple(t for _, t in steps[1:]), draft=k, draft_s=t_second,
                                accepted=(first.n_accepted, second.n_accepted), other_texts=tuple(others))
        if difference is None and n_seq > 1:
            for seq in range(n_seq):
                start(seq)
            # every sequence drafts k: one target batch of n_seq * (k + 1) rows; whatever the
            # heads drafted, each token that comes back must carry the plain row's bits
            together = session.step_batch(range(n_seq), [k] * n_seq)
            for seq, result in enumerate(together):
                rows = _rows([result])
                d = _first_difference(plain[:len(rows)], rows)
                if d is not None:
                    difference = f"sequence {seq} of {n_seq} verified together ({n_seq * (k + 1)} rows), {d}"
                    break
    finally:
        for seq in range(n_seq):
            session.seq_reset(seq)
            session.seq_set_sampling(seq, SamplingParams())
        session.reset_stats()
    return ExactnessCheck(verify_rows=k + 1, sequences=n_seq, exact=difference is None, difference=difference,
                          seed=seed if difference is None else None)


def raise_if_inexact(check: ExactnessCheck, devices) -> None:
    """InexactVerifyError naming the devices, the difference and the ways on."""
    if check.exact:
        return
    names = ", ".join(f"{d.name} ({d.endpoint})" if d.endpoint else d.name for d in devices) or "?"
    raise InexactVerifyError(
        f"MTP is not exact on this model and these devices ({names}): {check.difference}. A verify "
        "batch does not compute what one-token decoding computes (a backend or RPC worker that picks "
        "its kernels by batch size), so MTP could change the greedy output where two tokens nearly "
        "tie. Use pyllama-mtp-rpc-worker (not another build's rpc-server) on RPC hosts, keep the "
        "layers on devices this build makes exact (the CPU; CUDA with an F16 KV cache), use "
        "mtp=False, or pass check_exact=False (pyllama-mtp-server: --no-check-exact) to draft "
        "anyway and accept output that may differ from plain decoding.")
