"""What the server's streams carry beyond OpenAI's fields, under the key ``x_pmtp``.

Per streamed chunk: ``from_draft`` (one bool per token since the previous chunk: an MTP
draft the target accepted) and ``spans``, runs ``[length, from_draft]`` that partition the
chunk's text, lengths in UTF-16 code units (what JavaScript's ``String.length`` counts), so
a client can tint the characters that came from accepted drafts. On the last chunk:
``stats`` of the whole message (see :func:`message_stats`).

The text of a stream is a prefix of the UTF-8 decoding of its tokens' bytes (text may be
held back while a stop string could be starting, and cut where one ends), so each
character is owned by the token whose bytes it starts with.
"""
from __future__ import annotations

from collections import deque


class DraftSpans:
    """Follows one stream: token bytes in, the draft/target runs of each chunk's text out."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces
        self.pending: deque[list] = deque()     # [bytes of this token not yet in the text, from_draft]
        self.flags: list[bool] = []             # per token since the last chunk sent

    def add_tokens(self, tokens, from_draft) -> None:
        for token, drafted in zip(tokens, from_draft):
            self.flags.append(bool(drafted))
            n = len(self.pieces[token])
            if n:
                self.pending.append([n, bool(drafted)])

    def take_text(self, text: str) -> dict:
        """The extension object of a chunk carrying ``text``: its runs, and the per-token
        flags gathered since the previous chunk."""
        runs: list[list] = []
        for ch in text:
            drafted = self._consume(len(ch.encode("utf-8", "surrogatepass")))
            units = 2 if ord(ch) > 0xFFFF else 1
            if runs and runs[-1][1] == drafted:
                runs[-1][0] += units
            else:
                runs.append([units, drafted])
        flags, self.flags = self.flags, []
        return {"from_draft": flags, "spans": runs}

    def _consume(self, n: int) -> bool:
        drafted = self.pending[0][1] if self.pending else False
        while n > 0 and self.pending:
            head = self.pending[0]
            k = min(n, head[0])
            head[0] -= k
            n -= k
            if head[0] == 0:
                self.pending.popleft()
        return drafted


def message_stats(stats, n_generated: int, t_request: float, t_first: float | None, t_end: float,
                  first_chunk_tokens: int) -> dict:
    """Speculative-decoding figures of one message, as the chat page shows them.

    ``tokens_per_second`` is the decode rate after the first chunk (prompt processing
    excluded); ``mean_accepted`` is the number of drafts accepted per verify step."""
    decode_tokens = n_generated - first_chunk_tokens
    decode_s = (t_end - t_first) if t_first is not None else 0.0
    if decode_tokens > 0 and decode_s > 0:
        tps = decode_tokens / decode_s
    else:
        tps = n_generated / (t_end - t_request) if t_end > t_request else 0.0
    drafted = stats.drafted if stats else 0
    accepted = stats.accepted if stats else 0
    steps = stats.n_steps if stats else 0
    return {
        "prompt_tokens": stats.n_prompt_tokens if stats else 0,
        "prompt_tokens_reused": int(stats.extra.get("prompt_tokens_reused", 0)) if stats else 0,
        "completion_tokens": n_generated,
        "tokens_per_second": round(tps, 2),
        "time_to_first_token_s": round(t_first - t_request, 4) if t_first is not None else None,
        "drafted": drafted,
        "accepted": accepted,
        "acceptance": round(accepted / drafted, 4) if drafted else None,
        "acceptance_per_position": [round(a, 4) for a in stats.acceptance_per_position] if stats else [],
        "verify_steps": steps,
        "mean_accepted": round(accepted / steps, 3) if steps else None,
    }
