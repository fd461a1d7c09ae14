"""Result text as PostgreSQL stores it: every output kept exactly, including what `text` cannot hold.

PostgreSQL's text (and jsonb) cannot hold U+0000, and a lone surrogate (U+D800–U+DFFF, which a Python
string may hold) cannot be encoded as UTF-8 at all. A model can emit either: byte-level BPE vocabularies
have a token that decodes to "\\x00". So a result's text is escaped on its way in and restored by every
reader (export, the API's output files, the result cache):

    U+0000, U+D800–U+DFFF and U+FFFF  →  U+FFFF followed by the code point in four lowercase hex digits

U+FFFF is a Unicode noncharacter, reserved for a program's internal use, so model output (almost) never
holds it; when it does it is escaped too, which is what makes the escape reversible. Every other text —
all but a handful — is stored as it is, so SQL sees the output itself. The README's results section
documents the representation for SQL readers.

Error messages are diagnostics, not outputs: `storable_message` writes those characters as Python's
backslash escapes (`\\x00`, `\\ud800`) instead, readable wherever the message is shown.
"""

from __future__ import annotations

import re

ESCAPE = "\uffff"
# The characters escaped: those PostgreSQL's text refuses or UTF-8 cannot encode, and the escape itself.
UNSTORABLE = re.compile("[\x00\ud800-\udfff\uffff]")
ESCAPED = re.compile("\uffff(0000|d[89a-f][0-9a-f]{2}|ffff)")
REFUSED = re.compile("[\x00\ud800-\udfff]")  # by PostgreSQL's text or by UTF-8


def needs_escape(text: str) -> bool:
    if text.isascii():  # a flag of the string: no scan
        return "\x00" in text
    return UNSTORABLE.search(text) is not None


def to_stored(text: str) -> str:
    """`text` as the results table holds it (unchanged unless it holds a character PostgreSQL refuses)."""
    if text.isascii():  # no surrogate, no U+FFFF: only NUL can need escaping
        return text.replace("\x00", ESCAPE + "0000") if "\x00" in text else text
    if UNSTORABLE.search(text) is None:
        return text
    return UNSTORABLE.sub(lambda match: f"{ESCAPE}{ord(match.group()):04x}", text)


def from_stored(stored: str) -> str:
    """The output `to_stored` was given, exactly."""
    if ESCAPE not in stored:
        return stored
    return ESCAPED.sub(lambda match: chr(int(match.group(1), 16)), stored)


def storable_message(message: str) -> str:
    """An error message PostgreSQL can store: NUL and lone surrogates as Python's backslash escapes."""
    if not needs_escape(message):
        return message
    return REFUSED.sub(lambda match: ascii(match.group())[1:-1], message)
