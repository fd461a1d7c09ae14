"""The one retry policy: what an error means for a request, how long a retry waits, and when to give up.

Permanent errors (the request itself is at fault: a prompt longer than the context, invalid sampling
parameters) fail the request at once. Anything else is transient (out of memory, a lost device, an
unexpected exception): the request is re-queued with exponential backoff and full jitter while attempts
remain, and dead-lettered after the last. A lost database connection is waited out, not counted; an
outcome PostgreSQL refuses to store (`unstorable_output`, found by the recorder alone in its statement)
is retried like a transient error.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DataError, DBAPIError, IntegrityError

from schema.settings import Settings
from schema.tables import RequestState
from worker.engine.types import PermanentEngineError, TransientEngineError
from worker.transitions import ClaimedRequest, Failure

log = logging.getLogger(__name__)
INTERNAL_ERROR = "internal_error"  # anything the engine did not classify: retried, as it may be transient
# PostgreSQL refused the row of one attempt's outcome. Retried: the fault is in what that attempt produced,
# not in the request — a sampled request gives another output, another worker may run a mended engine —
# and after the last attempt the request is dead-lettered, where `deepbatch dlq requeue` can run it again.
UNSTORABLE_OUTPUT = "unstorable_output"
T = TypeVar("T")


def backoff_seconds(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base × 2^(attempt-1))]."""
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))


def failure_for(claim: ClaimedRequest, error: BaseException, settings: Settings) -> Failure:
    """What becomes of `claim` after `error`: failed, queued again (with its backoff) or dead."""
    if isinstance(error, PermanentEngineError):
        return Failure(claim, RequestState.failed, error.code, f"line {claim.line_no}: {error}")
    code = error.code if isinstance(error, TransientEngineError) else INTERNAL_ERROR
    return retry_or_bury(claim, code, f"{type(error).__name__}: {error}", settings)


def is_row_fault(error: BaseException) -> bool:
    """Whether a failed write is the fault of the rows it carried rather than of the database: a value
    PostgreSQL refuses (DataError: untranslatable character, number out of range, string too long...), a
    constraint a row breaks, or a string the driver cannot encode. A lost connection is none of these."""
    return isinstance(error, (DataError, IntegrityError, UnicodeEncodeError))


def unstorable_failure(claim: ClaimedRequest, error: BaseException, settings: Settings) -> Failure:
    """The failure of an attempt whose outcome PostgreSQL refused to store, alone in its statement."""
    cause = error.orig if isinstance(error, DBAPIError) and error.orig is not None else error
    reason = str(cause).splitlines()[0] if str(cause) else ""
    message = (f"line {claim.line_no}: PostgreSQL refused to store this attempt's result "
               f"({type(cause).__name__}: {reason})")
    return retry_or_bury(claim, UNSTORABLE_OUTPUT, message, settings)


def retry_or_bury(claim: ClaimedRequest, code: str, message: str, settings: Settings) -> Failure:
    """Queued again after its backoff while attempts remain; dead after the last."""
    if claim.attempt >= claim.max_attempts:
        return Failure(claim, RequestState.dead, code, message)
    delay = backoff_seconds(claim.attempt, settings.retry_backoff_s, settings.retry_backoff_max_s)
    return Failure(claim, RequestState.queued, code, message, retry_after_s=delay)


def is_connection_loss(error: DBAPIError) -> bool:
    return error.connection_invalidated or "connection" in str(error.orig).lower()


def with_database_retry(operation: Callable[[], T], settings: Settings) -> T:
    """Run a database operation, waiting out a lost connection (a Postgres restart) with backoff."""
    deadline = time.monotonic() + settings.database_retry_s
    attempt = 0
    while True:
        try:
            return operation()
        except DBAPIError as error:
            attempt += 1
            if not is_connection_loss(error) or time.monotonic() > deadline:
                raise
            delay = backoff_seconds(attempt, 0.5, 10.0)
            log.warning("database unavailable (%s); retrying in %.1fs", type(error.orig).__name__, delay)
            time.sleep(delay)
