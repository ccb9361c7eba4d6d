"""The gateway's durable queue: once per delivery id, oldest first, leases that run out, restarts."""

from __future__ import annotations

import json
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.gateway.queue import (
    ACKED_RETENTION_SECONDS,
    DB_FILENAME,
    DeliveryQueue,
    LeasedDelivery,
    QueueCounts,
)
from runner.store import StoreError


class Clock:
    """Wall-clock time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "gateway-state"


@pytest.fixture
def queue(state_dir: Path, clock: Clock) -> Iterator[DeliveryQueue]:
    with DeliveryQueue.open(state_dir, clock=clock) as opened:
        yield opened


def put(queue: DeliveryQueue, delivery_id: str, event: str = "pull_request") -> bool:
    body = json.dumps({"id": delivery_id}).encode()
    return queue.enqueue(event=event, delivery_id=delivery_id, body=body).new


def lease_d1(queue: DeliveryQueue) -> LeasedDelivery:
    """Queue delivery "d1" and lease it to agent "a" for 10 s."""
    put(queue, "d1")
    leased = queue.lease("a", 10)
    assert leased is not None
    return leased


def delivery_id_of(leased: LeasedDelivery | None) -> str | None:
    return None if leased is None else leased.delivery_id


def test_deliveries_are_handed_out_oldest_first_with_their_bytes(queue: DeliveryQueue, clock: Clock) -> None:
    for name in ("d1", "d2", "d3"):
        put(queue, name)
        clock.advance(1)
    first = queue.lease("a", 60)
    assert first is not None
    assert (first.delivery_id, first.event, first.attempt) == ("d1", "pull_request", 1)
    assert first.body == b'{"id": "d1"}'
    assert first.received_at == 1_800_000_000.0 and first.previous_agent is None
    assert first.lease_expires_at == clock.now + 60
    assert [delivery_id_of(queue.lease("b", 60)) for _ in range(2)] == ["d2", "d3"]
    assert queue.lease("b", 60) is None


def test_a_delivery_id_is_stored_once(queue: DeliveryQueue) -> None:
    assert put(queue, "same") is True
    assert put(queue, "same") is False
    assert queue.counts() == QueueCounts(waiting=1, leased=0, acknowledged=0)


def test_a_redelivery_after_acknowledgement_is_still_recognised(queue: DeliveryQueue) -> None:
    put(queue, "done")
    leased = queue.lease("a", 60)
    assert leased is not None and queue.acknowledge(leased.lease_id, "a") == "done"
    assert put(queue, "done") is False
    assert queue.lease("a", 60) is None


def test_a_leased_delivery_goes_to_nobody_else_until_its_lease_runs_out(queue: DeliveryQueue,
                                                                      clock: Clock) -> None:
    first = lease_d1(queue)
    clock.advance(9.9)
    assert queue.lease("b", 10) is None
    clock.advance(0.1)
    again = queue.lease("b", 10)
    assert again is not None and again.delivery_id == "d1"
    assert (again.attempt, again.previous_agent) == (2, "a")
    assert again.lease_id != first.lease_id


def test_extending_keeps_the_delivery_from_other_agents(queue: DeliveryQueue, clock: Clock) -> None:
    leased = lease_d1(queue)
    for _ in range(5):
        clock.advance(8)
        assert queue.extend(leased.lease_id, "a", 10) == clock.now + 10
        assert queue.lease("b", 10) is None
    assert queue.counts() == QueueCounts(waiting=0, leased=1, acknowledged=0)


def test_a_lease_that_ran_out_unnoticed_can_still_be_extended_by_its_holder(queue: DeliveryQueue,
                                                                          clock: Clock) -> None:
    leased = lease_d1(queue)
    clock.advance(15)
    assert queue.extend(leased.lease_id, "a", 10) == clock.now + 10
    assert queue.lease("b", 10) is None


def test_once_handed_to_another_agent_the_old_lease_is_worth_nothing(queue: DeliveryQueue,
                                                                   clock: Clock) -> None:
    old = lease_d1(queue)
    clock.advance(10)
    new = queue.lease("b", 10)
    assert new is not None
    assert queue.extend(old.lease_id, "a", 10) is None
    assert queue.acknowledge(old.lease_id, "a") is None
    assert queue.release(old.lease_id, "a") is None
    assert queue.acknowledge(new.lease_id, "b") == "d1"


def test_only_the_holder_can_use_a_lease(queue: DeliveryQueue) -> None:
    leased = lease_d1(queue)
    assert queue.extend(leased.lease_id, "b", 10) is None
    assert queue.acknowledge(leased.lease_id, "b") is None
    assert queue.release(leased.lease_id, "b") is None
    assert queue.counts() == QueueCounts(waiting=0, leased=1, acknowledged=0)


def test_acknowledging_is_final_and_may_be_repeated(queue: DeliveryQueue, clock: Clock) -> None:
    leased = lease_d1(queue)
    assert queue.acknowledge(leased.lease_id, "a") == "d1"
    assert queue.acknowledge(leased.lease_id, "a") == "d1"
    assert queue.extend(leased.lease_id, "a", 10) is None
    assert queue.release(leased.lease_id, "a") is None
    clock.advance(3600)
    assert queue.lease("b", 10) is None
    assert queue.counts() == QueueCounts(waiting=0, leased=0, acknowledged=1)


def test_acknowledging_drops_the_body(queue: DeliveryQueue, state_dir: Path) -> None:
    leased = lease_d1(queue)
    queue.acknowledge(leased.lease_id, "a")
    with sqlite3.connect(state_dir / DB_FILENAME) as conn:
        assert conn.execute("SELECT body FROM deliveries WHERE delivery_id = 'd1'").fetchone() == (None,)


def test_a_released_delivery_is_available_at_once_and_stays_first(queue: DeliveryQueue) -> None:
    put(queue, "d1")
    put(queue, "d2")
    leased = queue.lease("a", 600)
    assert leased is not None
    assert queue.release(leased.lease_id, "a") == "d1"
    again = queue.lease("b", 600)
    assert again is not None and (again.delivery_id, again.attempt, again.previous_agent) == ("d1", 2, None)


def test_next_expiry_is_the_earliest_current_lease(queue: DeliveryQueue, clock: Clock) -> None:
    assert queue.next_expiry() is None
    put(queue, "d1")
    put(queue, "d2")
    queue.lease("a", 30)
    queue.lease("b", 10)
    assert queue.next_expiry() == clock.now + 10


def test_acknowledged_ids_are_forgotten_after_the_retention(queue: DeliveryQueue, clock: Clock) -> None:
    put(queue, "old")
    put(queue, "waiting")
    leased = queue.lease("a", 10)
    assert leased is not None
    queue.acknowledge(leased.lease_id, "a")
    clock.advance(ACKED_RETENTION_SECONDS - 1)
    assert queue.prune_acknowledged() == 0
    clock.advance(2)
    assert queue.prune_acknowledged() == 1
    assert queue.counts() == QueueCounts(waiting=1, leased=0, acknowledged=0)
    assert put(queue, "old") is True  # forgotten: GitHub no longer redelivers anything this old


def test_queued_and_leased_deliveries_survive_reopening(state_dir: Path, clock: Clock) -> None:
    with DeliveryQueue.open(state_dir, clock=clock) as queue:
        for name in ("d1", "d2", "d3"):
            put(queue, name)
        leased = queue.lease("a", 30)
        done = queue.lease("a", 30)
        assert leased is not None and done is not None
        queue.acknowledge(done.lease_id, "a")
    with DeliveryQueue.open(state_dir, clock=clock) as queue:
        assert queue.counts() == QueueCounts(waiting=1, leased=1, acknowledged=1)
        assert queue.extend(leased.lease_id, "a", 30) is not None
        assert delivery_id_of(queue.lease("b", 30)) == "d3"
        clock.advance(31)
        back = queue.lease("b", 30)
        assert back is not None and (back.delivery_id, back.attempt) == ("d1", 2)


def test_the_state_is_private(queue: DeliveryQueue, state_dir: Path) -> None:
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((state_dir / DB_FILENAME).stat().st_mode) == 0o600
    assert queue.schema_version() == 1


def test_a_state_dir_open_to_others_is_refused(state_dir: Path) -> None:
    state_dir.mkdir(mode=0o755)
    state_dir.chmod(0o755)
    with pytest.raises(StoreError, match="chmod 700"):
        DeliveryQueue.open(state_dir)


def test_a_newer_schema_is_refused(state_dir: Path) -> None:
    DeliveryQueue.open(state_dir).close()
    with sqlite3.connect(state_dir / DB_FILENAME) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="upgrade hpc-runner"):
        DeliveryQueue.open(state_dir)


@pytest.mark.parametrize("seconds", [0, -1])
def test_a_lease_must_last(queue: DeliveryQueue, seconds: float) -> None:
    put(queue, "d1")
    with pytest.raises(StoreError, match="positive"):
        queue.lease("a", seconds)
