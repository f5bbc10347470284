"""The x_pmtp stream extension: which characters of a stream came from accepted drafts."""
from __future__ import annotations

from types import SimpleNamespace

from pyllama_mtp.server.stream_extras import DraftSpans, message_stats
from pyllama_mtp.speculative import GenerationStats

PIECES = [b"ab", "é".encode(), b"\xf0\x9f", b"\x98\x80", b"", b"cd"]   # token 2 + 3 = one emoji


def test_each_character_belongs_to_the_token_its_bytes_start_in():
    spans = DraftSpans(PIECES)
    spans.add_tokens([0, 1], [False, True])
    assert spans.take_text("abé") == {"from_draft": [False, True], "spans": [[2, False], [1, True]]}
    # half an emoji: the text waits for the other half (held back by the UTF-8 decoder)
    spans.add_tokens([2], [True])
    assert spans.take_text("") == {"from_draft": [True], "spans": []}
    spans.add_tokens([3, 4, 5], [False, True, False])
    # the emoji counts 2 in UTF-16 and belongs to token 2 (drafted); token 4 has no bytes
    assert spans.take_text("😀cd") == {"from_draft": [False, True, False], "spans": [[2, True], [2, False]]}


def test_text_cut_by_a_stop_string_leaves_the_rest_unclaimed():
    spans = DraftSpans(PIECES)
    spans.add_tokens([0, 5], [True, True])
    assert spans.take_text("a")["spans"] == [[1, True]]
    assert spans.take_text("")["spans"] == []


def test_message_stats_from_a_stream_without_mtp():
    stats = GenerationStats(n_prompt_tokens=7, extra={"prompt_tokens_reused": 3})
    figures = message_stats(stats, n_generated=11, t_request=0.0, t_first=1.0, t_end=2.0, first_chunk_tokens=1)
    assert figures["tokens_per_second"] == 10.0 and figures["acceptance"] is None
    assert figures["prompt_tokens_reused"] == 3 and figures["mean_accepted"] is None
    assert message_stats(None, 0, 0.0, None, 1.0, 0)["completion_tokens"] == 0


def test_a_span_of_stats_keeps_the_per_position_counters_of_a_first_call():
    before = GenerationStats()
    after = GenerationStats(n_steps=2, drafted=6, accepted=4, drafted_per_position=(2, 2, 2),
                            accepted_per_position=(2, 1, 1))
    span = after.minus(before)
    assert span.acceptance_per_position == (1.0, 0.5, 0.5)
    assert SimpleNamespace(**span.as_dict()).acceptance_per_position == [1.0, 0.5, 0.5]
