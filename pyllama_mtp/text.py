"""Turning generated token bytes into text chunks.

A token's piece is raw bytes, and one character's UTF-8 bytes may be split over
several tokens; a stop string may likewise be split over several chunks. The
generation loop therefore gets each step's token bytes from the model and runs them
through ``Utf8StreamDecoder`` (a split character is emitted whole, never as
replacement characters) and then ``StopMatcher`` (a stop string is found even
across chunks and is never emitted), and yields what comes out::

    decoder, matcher = Utf8StreamDecoder(), StopMatcher(stops)
    for piece in token_bytes:
        text, stopped = matcher.feed(decoder.feed(piece))
        yield text
        if stopped:
            return
    text, stopped = matcher.feed(decoder.flush())
    yield text if stopped else text + matcher.flush()
"""
from __future__ import annotations

import codecs
from typing import Sequence


class Utf8StreamDecoder:
    """Incremental UTF-8 decoding of token bytes.

    Only complete characters come out; the bytes of an unfinished character wait
    for the next piece. Invalid bytes become U+FFFD exactly as a one-shot
    ``data.decode("utf-8", errors="replace")`` of all the bytes would, however the
    bytes were split."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        """The text completed by ``data`` (possibly empty)."""
        return self._decoder.decode(data, final=False)

    def flush(self) -> str:
        """What is left at the end of generation: an unfinished character becomes U+FFFD."""
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Finds stop strings in a stream of text chunks.

    ``feed`` returns the text that is safe to emit and whether a stop string was
    found. The longest tail that could still be the beginning of a stop string is
    held back until later chunks decide; on a stop, the text before the stop string
    is returned and everything from it on is dropped. Where the stop happens does
    not depend on how the text was split into chunks."""

    def __init__(self, stops: Sequence[str]) -> None:
        if isinstance(stops, str):
            raise TypeError("stops must be a sequence of strings, not a single string")
        stops = tuple(stops)
        for stop in stops:
            if not isinstance(stop, str):
                raise TypeError(f"stop strings must be str, got {type(stop).__name__}")
            if not stop:
                raise ValueError("stop strings must be non-empty: an empty one would stop before any text")
        self._stops = stops
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was found). After a stop, emits nothing."""
        if self._stopped:
            return "", True
        buffered = self._held + text
        stop_at = self._earliest_stop(buffered)
        if stop_at is not None:
            self._held, self._stopped = "", True
            return buffered[:stop_at], True
        emit_up_to = len(buffered) - self._stop_prefix_suffix_length(buffered)
        self._held = buffered[emit_up_to:]
        return buffered[:emit_up_to], False

    def flush(self) -> str:
        """The held-back text, for when generation ends without a stop."""
        held, self._held = self._held, ""
        return held

    def _earliest_stop(self, text: str) -> int | None:
        """Where to cut ``text``, or None if it holds no stop string.

        Generation stops at the first position where some stop string is complete,
        so the cut must not depend on how the text happened to be chunked: among
        the stop strings completed first, the longest (earliest-starting) wins."""
        found = [(start + len(stop), -len(stop)) for stop in self._stops
                 if (start := text.find(stop)) >= 0]
        if not found:
            return None
        end, minus_length = min(found)
        return end + minus_length

    def _stop_prefix_suffix_length(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop
        string: the part that must wait because the next chunk may complete a stop."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
