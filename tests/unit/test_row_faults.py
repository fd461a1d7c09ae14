"""Which failed writes the recorder splits (a row at fault) and which it waits out (the database at fault)."""

from __future__ import annotations

import psycopg
from sqlalchemy.exc import DataError, IntegrityError, OperationalError

from worker.retries import is_row_fault


def test_values_postgres_refuses_are_row_faults() -> None:
    assert is_row_fault(DataError("INSERT", {}, psycopg.errors.UntranslatableCharacter("\\u0000")))
    assert is_row_fault(DataError("INSERT", {}, psycopg.errors.NumericValueOutOfRange("out of range")))
    assert is_row_fault(IntegrityError("INSERT", {}, psycopg.errors.UniqueViolation("duplicate")))
    assert is_row_fault(UnicodeEncodeError(
        "utf-8", "\ud800", 0, 1, "surrogates not allowed"))


def test_an_outage_is_not_a_row_fault() -> None:
    assert not is_row_fault(OperationalError("INSERT", {}, psycopg.OperationalError("connection refused")))
    assert not is_row_fault(RuntimeError("anything else"))
