"""The completion-window parser the CLI (`--completion-window`) and the API (`completion_window`) share."""

from __future__ import annotations

from datetime import timedelta

import pytest

from producer.submit import parse_duration


@pytest.mark.parametrize(("text", "duration"), [("24h", timedelta(hours=24)), ("90m", timedelta(minutes=90)),
                                                 ("30s", timedelta(seconds=30)), ("2d", timedelta(days=2)),
                                                 ("365d", timedelta(days=365)), ("8760h", timedelta(days=365))])
def test_durations_up_to_a_year(text: str, duration: timedelta) -> None:
    assert parse_duration(text) == duration


@pytest.mark.parametrize("text", ["366d", "8761h", "999999999d", "99999999999999999999d", "9" * 5000 + "s"])
def test_longer_windows_are_refused_as_too_long_not_as_an_overflow(text: str) -> None:
    with pytest.raises(ValueError, match="longer than the longest completion window, 365d"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["", "h", "0h", "000d", "-1h", "1.5h", " 1h", "1h\n", "1w", "²h", "١h", "\x00h",
                                  "\ud800"])
def test_anything_else_is_not_a_duration(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration like 24h"):
        parse_duration(text)
