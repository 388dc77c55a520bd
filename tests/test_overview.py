"""redis_batcher.overview: what ``redis-batcher ls``, ``dead ls`` and ``layout`` show, read as
typed results through a batcher that has none of the application's code (real server and
fakeredis)."""

from __future__ import annotations

from typing import Any

import pytest

import redis_batcher as rb
from redis_batcher import Batcher, Worker, overview
from redis_batcher.keys import LAYOUT, key_slot, layout_key, registry_key


def failing(flush: rb.Flush) -> None:
    raise RuntimeError(f"{flush.batch_id} rejected")


@pytest.fixture
def app(batcher: Batcher) -> tuple[rb.Processor, rb.Processor]:
    """ok (2 partitions): a::0 sealed and queued, a::1 and b::0 accumulating; bad: x and y
    dead-lettered (y the newer), z sealed and queued."""
    ok = batcher.processor(name="ok", max_batch_size=2, flush_interval=None, partitions=2)(lambda f: None)
    bad = batcher.processor(name="bad", max_batch_size=1, flush_interval=None, max_attempts=1)(failing)
    bad.add("x", 1)
    Worker(batcher, processors=["bad"]).run(burst=True)
    bad.add("y", 2)
    Worker(batcher, processors=["bad"]).run(burst=True)
    bad.add("z", 3)
    ok.add_many("a", [1, 2, 3])
    ok.add("b", 4)
    return ok, bad


def reader(client: Any) -> Batcher:
    """A batcher like the CLI's: no processors of its own, only the registry."""
    return Batcher(client, prefix="t")


def test_processors_count_ids_queued_sequences_and_dead_letters(
    app: tuple[rb.Processor, rb.Processor], client: Any
) -> None:
    ok, _ = app
    rows = overview.processors(reader(client))
    assert [(r.name, r.active_batch_ids, r.queued_sequences, r.dead_letters) for r in rows] == [
        ("bad", 1, 1, 2),
        ("ok", 2, 1, 0),
    ]
    assert rows[1].config == ok.config and rows[0].config.max_attempts == 1
    # a local processor, and a subset of names
    assert overview.processor_overview(ok).active_batch_ids == 2
    assert [r.name for r in overview.processors(reader(client), ["ok"])] == ["ok"]


def test_registry_reports_unreadable_entries(app: Any, client: Any) -> None:
    client.hset(registry_key("t"), "broken", "{not json")
    found = overview.registry(reader(client))
    assert found.key == registry_key("t") and set(found.configs) == {"bad", "ok"}
    [line] = found.skipped()
    assert line.startswith(f"skipped registry entry broken of {registry_key('t')}: not JSON")
    # the other functions skip it
    assert [r.name for r in overview.processors(reader(client))] == ["bad", "ok"]


def test_partitions_name_their_slot_node_and_queue(app: Any, client: Any) -> None:
    batcher = reader(client)
    parts = overview.partitions(batcher)
    assert [(p.processor, p.partition) for p in parts] == [("bad", 0), ("ok", 0), ("ok", 1)]
    for p in parts:
        assert p.slot == key_slot(p.key_prefix + "due")
        assert p.node == overview.node_of(batcher, p.key_prefix + "due") and p.node
    assert sum(p.queued_sequences for p in parts if p.processor == "ok") == 1
    assert overview.partitions_per_node(parts) == {parts[0].node: 3}


def test_partitions_on_a_real_server_name_it(real_client: Any) -> None:
    batcher = Batcher(real_client, prefix="t")
    batcher.processor(name="p", partitions=2)(lambda f: None).add("a", 1)
    port = real_client.connection_pool.connection_kwargs["port"]
    assert [p.node for p in overview.partitions(batcher)] == [f"127.0.0.1:{port}"] * 2


def test_dead_letters_of_every_processor_newest_first(app: Any, client: Any) -> None:
    batcher = reader(client)
    assert [d.batch_id for d in overview.dead_letters(batcher)] == ["y", "x"]
    assert [d.batch_id for d in overview.dead_letters(batcher, limit=1)] == ["y"]
    assert overview.dead_letters(batcher, names=["ok"]) == []


def test_replay_dead_letters_all_or_the_ones_named(app: tuple[rb.Processor, rb.Processor]) -> None:
    _, bad = app
    newest, oldest = bad.dead_letters()
    assert list(overview.replay_dead_letters(bad, [oldest.id])) == [(oldest.id, 1)]
    assert [dead_id for dead_id, _ in overview.replay_dead_letters(bad)] == [newest.id]
    assert bad.dead_letters() == []
    with pytest.raises(rb.DeadLetterNotFound):
        list(overview.replay_dead_letters(bad, ["no-such-id"]))


def test_layout_report(client: Any) -> None:
    batcher = reader(client)
    assert overview.layout_report(batcher) == overview.LayoutReport(None, False)
    assert overview.layout_report(batcher).matches
    batcher.processor(name="p")(lambda f: None).add("a", 1)
    assert overview.layout_report(batcher) == overview.LayoutReport(LAYOUT, False)
    client.delete(layout_key("t"))  # a registry without a stamp: layout 1's data
    report = overview.layout_report(batcher)
    assert report.legacy and not report.matches and report.current == LAYOUT
    client.set(layout_key("t"), "x")
    assert overview.layout_report(batcher) == overview.LayoutReport("x", False)
    assert not overview.layout_report(batcher).matches


def pending(batcher: Batcher, name: str) -> int:
    return overview.backlogs(batcher, [name])[name].pending_items


def test_pending_items_follow_seals_deliveries_retries_and_dead_letters(
    batcher: Batcher, client: Any
) -> None:
    """The partitions' pending-items count (the metrics' gauge): items enter when their sequence
    is sealed (by size, by hand, by a replay) and leave when delivered, partly delivered or
    dead-lettered; a drained processor leaves no count key behind."""
    outcome: dict[str, Any] = {}

    def handler(flush: rb.Flush) -> Any:
        return outcome.get(flush.batch_id)

    p = batcher.processor(
        name="pend", max_batch_size=3, flush_interval=None, max_attempts=1, partitions=2
    )(handler)
    p.add_many("a", [1, 2])
    p.add_many("b", [1, 2, 3, 4])  # b::0 sealed by size, b::1 accumulates
    assert pending(batcher, "pend") == 3
    p.flush("a")
    assert pending(batcher, "pend") == 5
    outcome["a"] = rb.PartialFailure([1], "one bad")  # one delivered, one dead
    Worker(batcher, processors=["pend"]).run(burst=True)
    assert pending(batcher, "pend") == 0
    [dead] = p.dead_letters()
    p.replay_dead(dead.id)
    assert pending(batcher, "pend") == 1
    outcome["a"] = None
    Worker(batcher, processors=["pend"]).run(burst=True)
    assert pending(batcher, "pend") == 0
    p.flush("b")
    assert pending(batcher, "pend") == 1
    Worker(batcher, processors=["pend"]).run(burst=True)
    assert pending(batcher, "pend") == 0
    assert not [k for k in client.scan_iter("t:{pend*") if k.endswith(b":pending")]
    # a count key holding something else reads as 0 and stops no seal or delivery
    for part in p.keys.parts:
        client.set(part.pfx + "pending", "garbage")
    for i in range(4):
        p.add_many(f"c{i}", [1, 2, 3])
    assert [s.status for s in p.sequences("c0")] == ["flushing"]
    assert pending(batcher, "pend") == 0
    Worker(batcher, processors=["pend"]).run(burst=True)
    assert {s.status for i in range(4) for s in p.sequences(f"c{i}")} == {"completed"}
    assert {client.get(part.pfx + "pending") for part in p.keys.parts} == {b"garbage"}
