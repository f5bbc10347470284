"""Many prompts through one Session at once (``Llama.generate_batch``): offline work such as
evaluations or data generation.

Continuous batching: up to ``n_seq_max`` sequences (``Llama(parallel=N)``) decode together;
every loop steps all of them in one ``step_batch`` call (the MTP heads draft for all of them
in one decode per head and the target verifies all of them in one batch), and a sequence
that finishes frees its slot for the next prompt at once. A new prompt is prefilled whole
between steps. Each sequence's greedy output equals its output alone, bit for bit: the
batch-invariant kernels give every row the bits it gets alone.

``draft="auto"`` takes the length a BatchDraftPolicy picks for the number of sequences in
the step (0 where MTP does not pay at that batch size); a fixed draft is used as given.
"""
from __future__ import annotations

import sys
from collections import deque

from .sequence import Sequence, step_sequences

# A progress bar appears on stderr (when it is a terminal) for batches of at least this many prompts.
PROGRESS_MIN_PROMPTS = 8


def _progress_bar(total: int, progress: bool | None):
    show = progress if progress is not None else (total >= PROGRESS_MIN_PROMPTS and sys.stderr.isatty())
    if not show:
        return None
    from tqdm import tqdm
    return tqdm(total=total, file=sys.stderr, unit="prompt", desc="generate_batch")


def generate_batch(llm, calls: list, progress: bool | None = None) -> list:
    """Run every call (``Llama.prepare``'s PreparedCall) to its end through ``llm``'s
    session and slots; Completions in the order of ``calls``. Runs inside a turn of the
    Llama's gate."""
    session, gate, slots = llm.session, llm._gate, llm._slots
    pending = deque(enumerate(calls))
    running: dict[int, tuple[int, Sequence]] = {}     # slot -> (index in calls, its sequence)
    results: list = [None] * len(calls)
    policy = llm._policy if any(call.draft == "auto" for call in calls) else None
    bar = _progress_bar(len(calls), progress)

    def finish(index: int, s: Sequence) -> None:
        del running[s.seq]
        llm.release(s)
        results[index] = s.completion()
        if bar is not None:
            bar.update(1)

    def start(index: int, call) -> None:
        s = llm.open_sequence(call)
        running[s.seq] = (index, s)
        with gate.native():
            s.load(session)
            s.prefill(session)
            s.begin(session)
        if s.done:
            finish(index, s)

    try:
        while pending or running:
            while pending and slots.free:
                start(*pending.popleft())
            if running:
                order = sorted(running)
                with gate.native():
                    step_sequences(session, [running[seq][1] for seq in order], policy)
                for seq in order:
                    index, s = running[seq]
                    if s.done:
                        finish(index, s)
    finally:
        if bar is not None:
            bar.close()
        for index, s in list(running.values()):   # an error: the slots still running are free again
            del running[s.seq]
            llm.release(s)
    return results
