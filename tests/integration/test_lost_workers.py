"""What a lost worker's requests become (worker/transitions.py: RECLAIM_EXPIRED, GIVE_BACK), on the real
PostgreSQL: lost together they come back as one isolation group, not charged; a group lost again is split
in two; a request lost alone is charged, and dead-lettered after its last attempt; a stale group message
claims nothing; an opened circuit gives back what its worker holds without charging it."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.orm import sessionmaker

from tests.integration.test_transitions import (  # noqa: F401 - `sessions` and `queue` are fixtures
    add_requests, events, expire_leases, queue, sessions, states, success, transitions,
)

pytestmark = pytest.mark.integration


def allowed_attempts(sessions: sessionmaker, request_ids: list[int]) -> list[int]:
    with sessions() as session:
        return list(session.scalars(text("SELECT max_attempts FROM requests WHERE id = ANY(:ids) ORDER BY id"),
                                    {"ids": request_ids}))


def lose(sessions: sessionmaker, queue: str, request_ids: list[int]) -> tuple[dict[int, list[int]], list]:
    expire_leases(sessions, request_ids)
    return transitions(sessions, queue, "survivor:1").reclaim_expired()


def test_requests_lost_together_come_back_as_one_group_uncharged_and_the_lost_worker_cannot_record(
    sessions: sessionmaker, queue: str
) -> None:
    ids = add_requests(sessions, 3, queue)  # max_attempts 2
    stale = transitions(sessions, queue, "hung:1").claim_next(2) + transitions(sessions, queue, "hung:1").claim_next(1)
    # One lease expired, the others due within a few seconds: the worker stopped renewing them all.
    with sessions.begin() as session:
        session.execute(text("UPDATE requests SET lease_expires_at = now() + interval '5 s' WHERE id = ANY(:ids)"),
                        {"ids": ids[1:]})
    groups, dead = lose(sessions, queue, ids[:1])
    assert ([sorted(group) for group in groups.values()], dead) == ([ids], [])
    assert allowed_attempts(sessions, ids) == [3, 3, 3]  # lost with others: the attempt is not counted
    assert transitions(sessions, queue, "survivor:1").claim_next(5) == []  # the group runs from its own message
    [(group, members)] = groups.items()
    fresh = transitions(sessions, queue, "survivor:1").claim_group(members, group)
    assert [(claim.id, claim.attempt) for claim in fresh] == [(i, 2) for i in ids]
    assert transitions(sessions, queue, "hung:1").record([success(stale[0])], [], "m") == set()  # it woke too late
    assert transitions(sessions, queue, "survivor:1").record([success(fresh[0])], [], "m") == {ids[0]}
    assert ("requeued", "running", "queued", 1) in events(sessions, ids[0])


def test_a_group_lost_again_is_split_and_a_stale_group_message_claims_nothing(
    sessions: sessionmaker, queue: str
) -> None:
    ids = add_requests(sessions, 5, queue)
    transitions(sessions, queue, "lost:1").claim_next(5)
    [(group, members)] = lose(sessions, queue, ids)[0].items()
    transitions(sessions, queue, "lost:2").claim_group(members, group)
    halves, dead = lose(sessions, queue, ids)
    assert sorted(sorted(half) for half in halves.values()) == [ids[:3], ids[3:]] and dead == []
    assert allowed_attempts(sessions, ids) == [4] * 5  # two losses with others, neither counted
    assert transitions(sessions, queue, "survivor:1").claim_group(members, group) == []  # the old group is gone
    [(first_group, first_half)] = [(g, half) for g, half in halves.items() if ids[0] in half]
    claimed = transitions(sessions, queue, "survivor:1").claim_group(ids, first_group)  # ids beyond it: ignored
    assert sorted(claim.id for claim in claimed) == first_half == ids[:3]


def test_a_request_lost_alone_is_charged_and_dead_lettered_after_its_last_attempt(
    sessions: sessionmaker, queue: str
) -> None:
    [request_id] = add_requests(sessions, 1, queue)  # max_attempts 2
    transitions(sessions, queue, "lost:1").claim_next(1)
    [(group, members)] = lose(sessions, queue, [request_id])[0].items()
    assert allowed_attempts(sessions, [request_id]) == [2]  # it ran alone: charged
    transitions(sessions, queue, "lost:2").claim_group(members, group)
    groups, dead = lose(sessions, queue, [request_id])
    assert groups == {} and [(letter.request_id, letter.attempts) for letter in dead] == [(request_id, 2)]
    assert "stopped during attempt 2" in dead[0].error
    with sessions() as session:
        letters = session.scalar(text("SELECT count(*) FROM dead_letters WHERE request_id = :r"), {"r": request_id})
    assert (states(sessions, [request_id]), letters) == (["dead"], 1)
    assert events(sessions, request_id)[-1] == ("dead_lettered", "running", "dead", 2)


def test_give_back_returns_held_requests_uncharged_and_remembers_where_they_failed(
    sessions: sessionmaker, queue: str
) -> None:
    ids = add_requests(sessions, 3, queue)
    broken = transitions(sessions, queue, "broken:1")
    held = broken.claim_next(3)
    with sessions.begin() as session:  # another worker holds the third now: not this worker's to give back
        session.execute(text("UPDATE requests SET worker = 'other:1', attempt = 2 WHERE id = :r"), {"r": ids[2]})
    ordinary, groups = broken.give_back(held, {held[0].id: "RuntimeError: CUDA error: an illegal memory access"})
    assert (ordinary, groups) == (ids[:2], {})
    assert states(sessions, ids) == ["queued", "queued", "running"]
    assert allowed_attempts(sessions, ids)[:2] == [3, 3]
    assert events(sessions, ids[0])[-1] == ("given_back", "running", "queued", 1)
    assert transitions(sessions, queue, "other:1").failed_elsewhere(ids) == {ids[0]}  # failed on broken:1
    assert broken.failed_elsewhere(ids) == set()  # ... which is not elsewhere for broken:1
    again = transitions(sessions, queue, "other:1").claim_next(5)
    assert [(claim.id, claim.attempt, claim.max_attempts) for claim in again] == [(ids[0], 2, 3), (ids[1], 2, 3)]


def test_give_back_keeps_an_error_text_postgresql_cannot_hold(sessions: sessionmaker, queue: str) -> None:
    """A NUL or a lone surrogate in the failure's text must not stop the give-back (the requests would wait
    for their leases): the audit event keeps the text with those characters escaped."""
    ids = add_requests(sessions, 2, queue)
    broken = transitions(sessions, queue, "broken:2")
    held = broken.claim_next(2)
    ordinary, _ = broken.give_back(held, {held[0].id: "CUDA error \x00 at \ud800 \\u0000 literal"})
    assert ordinary == ids and states(sessions, ids) == ["queued", "queued"]
    with sessions() as session:
        detail = session.scalar(text("SELECT detail FROM audit_events WHERE request_id = :r AND event = 'given_back'"),
                                {"r": ids[0]})
    assert "CUDA error \\x00 at \\ud800 \\u0000 literal;" in detail


def test_a_live_workers_one_expired_lease_is_taken_back_alone(sessions: sessionmaker, queue: str) -> None:
    """A worker that renews its leases but let one go (a result it could not record) keeps the rest."""
    ids = add_requests(sessions, 3, queue)
    transitions(sessions, queue, "live:1").claim_next(3)  # leases of 60 s, just renewed
    groups, dead = lose(sessions, queue, ids[:1])
    assert ([sorted(group) for group in groups.values()], dead) == ([ids[:1]], [])
    assert states(sessions, ids) == ["queued", "running", "running"]
