"""The audit key and the anchor file: errors name the setting or the line; an edited anchor fails its hmac."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from schema.audit_signing import (
    AnchorFileError,
    AuditKeyError,
    append_anchor,
    epoch_microseconds,
    load_key,
    read_anchor_file,
    signature_matches,
    signed_anchor,
)

KEY = b"0123456789abcdef" * 4
SEAL_HASH = "ab" * 32


def test_the_key_is_the_files_bytes_and_unset_means_none(tmp_path: Path) -> None:
    key_file = tmp_path / "audit.key"
    key_file.write_bytes(KEY + b"\n")
    assert load_key(key_file) == KEY and load_key(None) is None


@pytest.mark.parametrize("content, message", [
    (None, "cannot read the key (No such file or directory)"),
    (b"short\n", "the key holds 5 bytes, at least 32 are needed"),
])
def test_a_bad_key_file_names_the_setting_and_the_path(tmp_path: Path, content: bytes | None, message: str) -> None:
    key_file = tmp_path / "audit.key"
    if content is not None:
        key_file.write_bytes(content)
    with pytest.raises(AuditKeyError, match="^" + re.escape(f"DEEPBATCH_AUDIT_HMAC_KEY_FILE={key_file}: {message}")):
        load_key(key_file)


def test_an_anchor_round_trips_through_its_file_and_keeps_its_hmac(tmp_path: Path) -> None:
    anchors = tmp_path / "anchors.jsonl"
    first = signed_anchor(KEY, 7, SEAL_HASH, datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc))
    append_anchor(anchors, first)
    append_anchor(anchors, signed_anchor(None, 0, "", None))  # an empty chain, without the key
    read = read_anchor_file(anchors)
    assert [line_no for line_no, _ in read] == [1, 2] and read[0][1] == first
    assert signature_matches(read[0][1].expected_hmac(KEY), read[0][1].hmac)
    assert not signature_matches(read[0][1].expected_hmac(KEY[::-1]), read[0][1].hmac)
    assert read[1][1].hmac is None


def test_an_edited_anchor_no_longer_matches_its_hmac() -> None:
    anchor = signed_anchor(KEY, 7, SEAL_HASH, datetime.now(timezone.utc))
    for edit in ({"chain_seq": 6}, {"hash": "cd" * 32}, {"sealed_at": anchor.sealed_at - timedelta(microseconds=1)},
                 {"anchored_at": anchor.anchored_at + timedelta(days=1)}):
        edited = anchor.model_copy(update=edit)
        assert not signature_matches(edited.expected_hmac(KEY), edited.hmac), edit


@pytest.mark.parametrize("line, reason", [
    ("{not json", "Expecting property name enclosed in double quotes"),
    ('{"chain_seq": 3}', "hash: Field required"),
    ('{"chain_seq": 3, "hash": "xyz", "sealed_at": null, "anchored_at": "2026-01-01T00:00:00Z"}',
     "hash: String should match pattern"),
    ('{"chain_seq": 3, "hash": "", "sealed_at": null, "anchored_at": "2026-01-01T00:00:00Z"}',
     "seal 3 needs its hash"),
])
def test_a_line_that_is_not_an_anchor_is_named(tmp_path: Path, line: str, reason: str) -> None:
    anchors = tmp_path / "anchors.jsonl"
    append_anchor(anchors, signed_anchor(KEY, 1, SEAL_HASH, datetime.now(timezone.utc)))
    anchors.write_text(anchors.read_text() + "\n" + line + "\n")
    expected = rf"^{re.escape(str(anchors))} line 3: not an anchor \(.*{re.escape(reason)}"
    with pytest.raises(AnchorFileError, match=expected):
        read_anchor_file(anchors)


def test_times_are_signed_to_the_microsecond_whatever_their_zone() -> None:
    moment = datetime(2026, 11, 29, 18, 0, 0, 123457, tzinfo=timezone.utc)
    assert epoch_microseconds(moment) == 1795975200123457
    assert epoch_microseconds(moment.astimezone(timezone(timedelta(hours=5, minutes=45)))) == 1795975200123457
