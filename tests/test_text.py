"""Token bytes to text: UTF-8 characters split across tokens, and stop strings
split across chunks."""
from __future__ import annotations

import itertools

import pytest

from pyllama_mtp.text import StopMatcher, Utf8StreamDecoder


def partitions(data, max_pieces=None):
    """Every way to cut ``data`` into consecutive non-empty pieces (optionally at most
    ``max_pieces`` of them): stands in for every possible tokenization."""
    cut_points = range(1, len(data))
    most_cuts = len(data) - 1 if max_pieces is None else min(max_pieces - 1, len(data) - 1)
    for n_cuts in range(most_cuts + 1):
        for cuts in itertools.combinations(cut_points, n_cuts):
            bounds = (0, *cuts, len(data))
            yield [data[a:b] for a, b in zip(bounds, bounds[1:])]


def decode_pieces(pieces):
    decoder = Utf8StreamDecoder()
    emitted = [decoder.feed(piece) for piece in pieces]
    return emitted, decoder.flush()


# ------------------------------------------------------------------ UTF-8

VALID_TEXTS = ["é", "日本語", "🎉", "aé日🎉b", "naïve 日本 🎉!"]


@pytest.mark.parametrize("text", VALID_TEXTS)
def test_every_split_of_valid_utf8_decodes_without_replacement_characters(text):
    data = text.encode()
    max_pieces = None if len(data) <= 12 else 3
    for pieces in partitions(data, max_pieces):
        emitted, rest = decode_pieces(pieces)
        assert "".join(emitted) == text, pieces
        assert rest == ""
        assert all("\ufffd" not in chunk for chunk in emitted)


@pytest.mark.parametrize("text", VALID_TEXTS)
def test_byte_at_a_time_emits_each_character_as_soon_as_its_last_byte_arrives(text):
    decoder = Utf8StreamDecoder()
    for char in text:
        encoded = char.encode()
        for byte in encoded[:-1]:
            assert decoder.feed(bytes([byte])) == ""
        assert decoder.feed(encoded[-1:]) == char
    assert decoder.flush() == ""


def test_complete_characters_before_a_split_one_come_out_at_once():
    decoder = Utf8StreamDecoder()
    emoji = "🎉".encode()
    assert decoder.feed(b"ok " + emoji[:2]) == "ok "
    assert decoder.feed(emoji[2:] + b"!") == "🎉!"


INVALID_BYTES = [
    b"\xff",                      # never valid in UTF-8
    b"a\x80b",                    # stray continuation byte
    b"x\xe6\x97y",                # 3-byte character cut short mid-text
    b"\xc0\xaf",                  # overlong encoding of "/"
    b"\xed\xa0\x80",              # UTF-16 surrogate
    b"\xf4\x90\x80\x80",          # beyond U+10FFFF
    b"\xe6\x97\xa5\xff\xe6\x9c\xac",  # invalid byte between valid characters
]


@pytest.mark.parametrize("data", INVALID_BYTES)
def test_invalid_bytes_decode_like_one_shot_replace_for_every_split(data):
    expected = data.decode("utf-8", errors="replace")
    assert "\ufffd" in expected
    for pieces in partitions(data):
        emitted, rest = decode_pieces(pieces)
        assert "".join(emitted) + rest == expected, pieces


def test_invalid_byte_is_replaced_immediately_not_held_back():
    decoder = Utf8StreamDecoder()
    assert decoder.feed(b"a\xffb") == "a\ufffdb"


def test_character_unfinished_at_the_end_becomes_one_replacement_character_on_flush():
    decoder = Utf8StreamDecoder()
    assert decoder.feed(b"ok" + "日".encode()[:2]) == "ok"
    assert decoder.flush() == "\ufffd"
    assert decoder.flush() == ""


# ------------------------------------------------------------------ stops

def run_matcher(stops, chunks):
    """What a generation loop would emit for ``chunks``: the text, and whether it stopped.
    Checks on the way that nothing is emitted after a stop."""
    matcher = StopMatcher(stops)
    emitted = []
    for chunk in chunks:
        text, stopped = matcher.feed(chunk)
        emitted.append(text)
        if stopped:
            assert matcher.stopped
            assert matcher.feed("more text") == ("", True)
            assert matcher.flush() == ""
            return "".join(emitted), True
    return "".join(emitted) + matcher.flush(), False


def reference_stop(text, stops):
    """Stopping as a character-at-a-time loop would: at the first position where any
    stop string is complete, cut before the earliest-starting complete one."""
    for end in range(1, len(text) + 1):
        complete = [stop for stop in stops if text[:end].endswith(stop)]
        if complete:
            return text[:end - max(map(len, complete))], True
    return text, False


def test_stop_string_spanning_every_split_point_is_found_and_never_emitted():
    text = "Hello<|end|>world"
    for chunks in partitions(text, max_pieces=3):
        assert run_matcher(["<|end|>"], chunks) == ("Hello", True), chunks


def test_stop_string_at_the_very_start():
    for chunks in partitions("<|end|>tail", max_pieces=3):
        assert run_matcher(["<|end|>"], chunks) == ("", True), chunks


def test_no_stop_emits_everything_including_partial_stop_prefixes():
    text = "a <|en b <| c <|end"
    for chunks in partitions(text, max_pieces=3):
        assert run_matcher(["<|end|>"], chunks) == (text, False), chunks


def test_only_a_possible_stop_prefix_is_held_back_and_released_once_it_cannot_match():
    matcher = StopMatcher(["<|end|>"])
    assert matcher.feed("Hello<|") == ("Hello", False)
    assert matcher.feed("x") == ("<|x", False)
    assert matcher.feed("done") == ("done", False)
    assert matcher.flush() == ""


def test_the_longest_possible_prefix_is_held_back():
    # "aa" could be the start of "aab" from either "a": both are held
    matcher = StopMatcher(["aab"])
    assert matcher.feed("xaa") == ("x", False)
    assert matcher.feed("ab") == ("a", True)


def test_several_stops_stop_at_whichever_comes_first():
    stops = ["\n\n", "###", "</s>"]
    assert run_matcher(stops, ["a\n#b#", "##c\n\n"]) == ("a\n#b", True)
    assert run_matcher(stops, ["x</", "s>###"]) == ("x", True)
    assert run_matcher(stops, ["one\n", "\ntwo"]) == ("one", True)


def test_overlapping_stops_cut_before_the_earliest_one_whatever_their_order():
    for stops in (["abc", "bcd"], ["bcd", "abc"]):
        for chunks in partitions("xabcd", max_pieces=3):
            assert run_matcher(stops, chunks) == ("x", True), (stops, chunks)


def test_a_stop_that_is_a_prefix_of_another_stops_without_waiting_for_the_longer():
    assert run_matcher(["ab", "abc"], ["xab"]) == ("x", True)
    assert run_matcher(["abc", "ab"], ["x", "a", "b"]) == ("x", True)


def test_stopping_does_not_depend_on_where_the_chunks_split():
    """Brute force over all short texts and splits against a character-at-a-time
    reference, with stop sets that overlap, nest and repeat themselves."""
    stop_sets = [["ab"], ["aab", "ba"], ["abca", "bc"], ["cc", "acc", "cac"]]
    for stops in stop_sets:
        for length in range(1, 7):
            for letters in itertools.product("abc", repeat=length):
                text = "".join(letters)
                expected = reference_stop(text, stops)
                for chunks in partitions(text):
                    assert run_matcher(stops, chunks) == expected, (stops, chunks)


def test_without_stops_text_passes_straight_through():
    matcher = StopMatcher([])
    assert matcher.feed("<|end|>") == ("<|end|>", False)
    assert matcher.flush() == ""


def test_empty_chunks_are_harmless():
    assert run_matcher(["END"], ["", "a", "", "EN", "", "D", ""]) == ("a", True)


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        StopMatcher(["ok", ""])


def test_a_single_string_instead_of_a_list_is_rejected():
    # iterating "</s>" would silently make "<", "/", "s", ">" stop strings
    with pytest.raises(TypeError, match="not a single string"):
        StopMatcher("</s>")


def test_non_string_stop_is_rejected():
    with pytest.raises(TypeError, match="int"):
        StopMatcher(["ok", 5])


def test_decoder_and_matcher_together_on_split_multibyte_stop():
    """The module's intended pipeline: token bytes -> text -> stop-checked chunks,
    with a stop string whose own characters are split across tokens."""
    data = "日本語の文。終わり。続き".encode()
    for pieces in partitions(data, max_pieces=3):
        decoder, matcher = Utf8StreamDecoder(), StopMatcher(["終わり"])
        emitted, stopped = [], False
        for piece in pieces:
            text, stopped = matcher.feed(decoder.feed(piece))
            emitted.append(text)
            if stopped:
                break
        assert stopped and "".join(emitted) == "日本語の文。", pieces
