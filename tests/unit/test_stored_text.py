"""The escape of result text (schema/stored_text.py): exact round trips, storable output, plain text untouched."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from schema.stored_text import from_stored, storable_message, to_stored

# Every code point, surrogates included, weighted towards the ones the escape is about.
ANY_CHARACTER = st.one_of(st.characters(codec=None, exclude_categories=()),
                          st.sampled_from(["\x00", "\ud800", "\udfff", "\uffff", "\ufffd", "\\"]))
ODD_TEXT = st.text(ANY_CHARACTER, max_size=40)


def postgres_can_hold(value: str) -> bool:
    value.encode("utf-8")  # raises on a lone surrogate
    return "\x00" not in value


@given(ODD_TEXT)
def test_any_text_round_trips_exactly_and_is_storable(output: str) -> None:
    stored = to_stored(output)
    assert postgres_can_hold(stored)
    assert from_stored(stored) == output


@given(st.text(st.characters(exclude_characters="\x00\uffff", exclude_categories=("Cs",)), max_size=40))
def test_text_postgres_holds_is_stored_as_it_is(output: str) -> None:
    assert to_stored(output) == output and from_stored(output) == output


def test_the_documented_representation() -> None:
    assert to_stored("a\x00b") == "a\uffff0000b"
    assert to_stored("\ud800|\uffff") == "\uffffd800|\uffffffff"
    assert to_stored('{"k": "\\u0000"}') == '{"k": "\\u0000"}'  # JSON's own escapes are just text
    assert from_stored("\uffffzzzz") == "\uffffzzzz"  # what the escape never writes is left alone


@given(ODD_TEXT)
def test_error_messages_become_storable_and_readable(message: str) -> None:
    storable = storable_message(message)
    assert postgres_can_hold(storable)
    json.dumps(storable, ensure_ascii=False).encode("utf-8")


def test_error_messages_spell_refused_characters_as_python_does() -> None:
    assert storable_message("bad \x00 and \udc80") == "bad \\x00 and \\udc80"
