"""Turning generated token bytes into text chunks.

The generation loop gets each token's bytes from the model and runs them through
``Utf8StreamDecoder`` (so a character whose bytes span several tokens is emitted
whole, never as replacement characters) and then ``StopMatcher`` (so a stop string
that spans chunks is found and never emitted).
"""
from __future__ import annotations

import codecs
from typing import Sequence


class Utf8StreamDecoder:
    """Incremental UTF-8 decoding: only complete characters come out; invalid bytes
    become U+FFFD exactly as a one-shot ``bytes.decode(errors="replace")`` would."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return self._decoder.decode(data, final=False)

    def flush(self) -> str:
        """What is left at the end of generation (an incomplete character becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Finds stop strings in a stream of text chunks.

    ``feed`` returns the text that is safe to emit and whether a stop string was
    found. Text that could still turn out to be the beginning of a stop string is
    held back until the next chunk decides; on a stop, everything from the stop
    string on is dropped."""

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError("stop strings must be non-empty strings")
        self._stops = tuple(stops)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self._stops:
            return text, False
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            self.stopped = True
            return buf[:cut], True
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """Held-back text, when generation ends without a stop."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best
