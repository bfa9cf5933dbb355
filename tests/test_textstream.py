"""TextStream: token pieces (bytes) in, the text a client may see out, cut at the first stop string."""

from __future__ import annotations

import itertools

import pytest

from parrot_edge.engine.textstream import TextStream


def run(pieces: list[bytes], stop: tuple[str, ...] = ()) -> tuple[list[str], str, TextStream]:
    """What each push returned, what finish() returned, and the stream."""
    stream = TextStream(stop)
    shown = [stream.push(piece) for piece in pieces]
    return shown, stream.finish(), stream


def expected(text: bytes, stop: tuple[str, ...]) -> str:
    """What the whole answer shows: its text up to the earliest stop string."""
    decoded = text.decode("utf-8", errors="replace")
    cuts = [i for i in (decoded.find(s) for s in stop if s) if i >= 0]
    return decoded[:min(cuts)] if cuts else decoded


def test_plain_text_passes_straight_through():
    shown, rest, stream = run([b"Hello", b", ", b"world"])
    assert shown == ["Hello", ", ", "world"] and rest == "" and not stream.stopped


def test_a_character_split_over_pieces_appears_once_it_is_whole():
    shown, rest, _ = run([b"caf\xc3", b"\xa9 ", "🦜".encode()[:1], "🦜".encode()[1:3], "🦜".encode()[3:]])
    assert shown == ["caf", "é ", "", "", "🦜"] and rest == ""


def test_a_stop_string_over_several_pieces_ends_the_text_before_it():
    shown, rest, stream = run([b"Paris.", b"\nUs", b"er:", b" and more"], stop=("\nUser:",))
    assert shown == ["Paris.", "", "", ""] and rest == "" and stream.stopped


def test_the_text_before_a_stop_string_in_the_same_piece_is_kept():
    shown, _, stream = run([b"two STOP three"], stop=("STOP",))
    assert shown == ["two "] and stream.stopped


def test_a_stop_string_at_the_very_start_shows_nothing():
    shown, rest, stream = run([b"STOP", b"later"], stop=("STOP",))
    assert shown == ["", ""] and rest == "" and stream.stopped


def test_a_partial_stop_string_is_held_back_then_released_by_finish():
    shown, rest, stream = run([b"the EN"], stop=("END",))
    assert shown == ["the "] and rest == "EN" and not stream.stopped


def test_a_partial_stop_string_that_goes_another_way_is_released_at_once():
    shown, rest, stream = run([b"EN", b"ds well"], stop=("END",))
    assert shown == ["", "ENds well"] and rest == "" and not stream.stopped


def test_held_text_that_becomes_a_stop_only_further_on_is_cut_there():
    # "aa" could start "aab"; with "ab" it does, one character later than it first looked.
    shown, _, stream = run([b"aa", b"ab"], stop=("aab",))
    assert shown == ["", "a"] and stream.stopped


def test_the_earliest_of_several_stop_strings_wins():
    shown, _, stream = run([b"hello world"], stop=("world", "lo"))
    assert shown == ["hel"] and stream.stopped


def test_with_several_stop_strings_the_longest_possible_start_is_held():
    # "xy" may start "xyz", and "y" may start "yq": all of "xy" waits.
    shown, rest, _ = run([b"axy"], stop=("xyz", "yq"))
    assert shown == ["a"] and rest == "xy"


def test_a_held_start_of_one_stop_string_can_end_in_another():
    shown, _, stream = run([b"ab", b"d"], stop=("abc", "bd"))
    assert shown == ["", "a"] and stream.stopped


def test_empty_stop_strings_are_ignored():
    shown, rest, stream = run([b"abc", b"def"], stop=("",))
    assert shown == ["abc", "def"] and rest == "" and not stream.stopped
    shown, _, stream = run([b"abc", b"STOP"], stop=("", "STOP"))
    assert shown == ["abc", ""] and stream.stopped


def test_nothing_comes_out_once_stopped():
    stream = TextStream(("STOP",))
    assert stream.push(b"ok STOP after") == "ok "
    assert stream.push(b"more text") == "" and stream.push(b"STOP") == ""
    assert stream.finish() == "" and stream.stopped


def test_a_stop_string_with_a_multi_byte_character_split_over_pieces():
    shown, _, stream = run([b"a\xc3", b"\xb1!b"], stop=("ñ!",))
    assert shown == ["a", ""] and stream.stopped


def test_bytes_that_are_not_utf8_become_replacement_characters():
    shown, rest, _ = run([b"ok\xff", b" then \xe2\x82"])
    assert shown == ["ok\ufffd", " then "] and rest == "\ufffd"  # a character cut off at the end


@pytest.mark.parametrize(("text", "stop"), [
    ("Hola, ¿qué tal? 🦜 bien\nUser: más".encode(), ("\nUser:",)),
    ("ab aab aaab ñandú".encode(), ("aab", "ñ")),
    ("no stop here: añ🦜".encode(), ("zz", "🦜🦜")),
])
def test_every_way_of_cutting_the_bytes_into_pieces_shows_the_same_text(text, stop):
    want = expected(text, stop)
    for first, second in itertools.combinations(range(1, len(text)), 2):
        pieces = [text[:first], text[first:second], text[second:]]
        shown, rest, _ = run(pieces, stop)
        assert "".join(shown) + rest == want, pieces
