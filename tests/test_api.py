"""The producer and inspection API, each case written once and run on the sync and the asyncio
client (the ``api`` fixture, tests/clients.py), each on a real redis-server and on fakeredis
with Lua (lupa). What only the asyncio client has is tested in tests/test_async_api.py."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

import redis_batcher as rb
from redis_batcher.keys import partition_of

from .clients import ClientApi, ProcessorApi
from .conftest import snapshot


def make(api: ClientApi, **kw: Any) -> tuple[ProcessorApi, list[rb.Flush]]:
    """Processor "events" (3 items a batch, no interval) whose handler records each flush."""
    got: list[rb.Flush] = []
    kw.setdefault("name", "events")
    kw.setdefault("max_batch_size", 3)
    kw.setdefault("flush_interval", None)
    proc = api.processor(**kw)(api.recorder(got))
    return proc, got


def test_add_one_item(api: ClientApi) -> None:
    proc, _ = make(api)
    r = proc.add("user:42", {"type": "click"})
    assert r == rb.AddResult("user:42", 0, 1, 1, False, "accumulating", 0)
    st = proc.status("user:42")
    assert st is not None
    assert st.batch_id == "user:42"
    assert [(b.sequence, b.status, b.item_count) for b in st.batches] == [(0, "accumulating", 1)]
    assert st.config.max_batch_size == 3
    b = st.batches[0]
    assert b.created_at is not None and b.created_at.tzinfo is timezone.utc
    assert abs((datetime.now(timezone.utc) - b.created_at).total_seconds()) < 60


def test_size_seals_and_next_add_starts_new_sequence(api: ClientApi) -> None:
    proc, _ = make(api)
    proc.add("b", 1)
    proc.add("b", 2)
    r = proc.add("b", 3)
    assert (r.sequence, r.pending, r.status, r.flushed, r.sealed) == (0, 3, "flushing", True, 1)
    r = proc.add("b", 4)
    assert (r.sequence, r.pending, r.status, r.flushed) == (1, 1, "accumulating", False)
    st = proc.status("b")
    assert st is not None
    assert [(x.sequence, x.status, x.item_count, x.reason) for x in st.batches] == [
        (0, "flushing", 3, "size"),
        (1, "accumulating", 1, None),
    ]


def test_add_many_spills_over_sequences_in_one_call(api: ClientApi) -> None:
    proc, got = make(api)
    proc.add("b", "first")
    r = proc.add_many("b", list(range(8)))
    # 1 + 8 items, size 3: seq 0 [first,0,1], seq 1 [2,3,4], seq 2 [5,6,7] sealed
    assert (r.sequence, r.pending, r.status, r.sealed, r.added) == (2, 3, "flushing", 3, 8)
    r = proc.add_many("b", ["x", "y"])
    assert (r.sequence, r.pending, r.status, r.sealed) == (3, 2, "accumulating", 0)
    api.burst()
    by_seq = {f.sequence: f.items for f in got}
    assert by_seq == {0: ["first", 0, 1], 1: [2, 3, 4], 2: [5, 6, 7]}
    assert all(len(f.items) <= 3 for f in got)


def stored_first_sequence(client: Any, pfx: str, base: str) -> tuple[dict[str, str], dict[str, str], bool]:
    """Sequence 0 of ``base`` as stored: its state hash and its head hash (times left out, and
    the flush_id's time and base id tag: "<us>-<tag>-0" becomes "-0"), and whether it is in
    the delay queue."""
    state = {k.decode(): v.decode() for k, v in client.hgetall(f"{pfx}s:{base}::0").items()}
    head = {k.decode(): v.decode() for k, v in client.hgetall(f"{pfx}b:{base}").items()}
    for fields in (state, head):
        for k in ("created_at", "updated_at", "sealed_at", "added_at"):
            fields.pop(k, None)
    if "flush_id" in state:
        state["flush_id"] = "-" + state["flush_id"].rsplit("-", 1)[1]
    return state, head, client.zscore(f"{pfx}due", f"{base}::0") is not None


def test_a_sequence_filled_at_once_is_stored_like_one_filled_item_by_item(api: ClientApi) -> None:
    # add.lua writes a sequence that one add opens and fills as sealed from the start
    proc, _ = make(api, max_batch_size=3, flush_interval=30.0)
    for i in range(3):
        proc.add("slow", i)
    proc.add_many("fast", [0, 1, 2])
    # "fast" (one add_many of 3) is stored like "slow" (3 adds), sealed, with no 'acc'
    client, pfx = api.client, proc.keys.for_base("slow").pfx
    assert stored_first_sequence(client, pfx, "fast") == stored_first_sequence(client, pfx, "slow")
    state, head, due = stored_first_sequence(client, pfx, "fast")
    assert state["flush_id"] == "-0"  # fixed at sealing, like the seal by single adds
    assert (state["status"], state["cutoff"], state["reason"], head["a:0"], due) == (
        "flushing", "3", "size", "flushing", True
    )
    assert "acc" not in head and client.llen(f"{pfx}i:fast::0") == 3


def test_add_many_into_thousands_of_tiny_sequences(api: ClientApi) -> None:
    proc, got = make(api, max_batch_size=1)
    r = proc.add_many("tiny", list(range(5_000)))  # 5,000 sequences opened and sealed in one call
    assert (r.sequence, r.sealed, r.added, r.status) == (4_999, 5_000, 5_000, "flushing")
    st = proc.status("tiny")
    assert st is not None and len(st.batches) == 5_000
    assert all(b.status == "flushing" and b.item_count == 1 for b in st.batches)
    api.burst(concurrency=4)
    assert sorted(i for f in got for i in f.items) == list(range(5_000))
    assert proc.status("tiny") is None


def test_add_many_large_call_never_exceeds_max(api: ClientApi) -> None:
    proc, got = make(api, max_batch_size=1000)
    r = proc.add_many("big", list(range(12_345)))
    assert r.sealed == 12 and r.pending == 345
    proc.flush("big")
    api.burst(concurrency=2)
    assert max(len(f.items) for f in got) == 1000
    assert [i for f in sorted(got, key=lambda f: f.sequence) for i in f.items] == list(range(12_345))


def test_add_many_empty_writes_nothing(api: ClientApi) -> None:
    proc, _ = make(api)
    before = snapshot(api.client)
    r = proc.add_many("b", [])
    assert (r.added, r.sequence, r.flushed) == (0, None, False)
    assert snapshot(api.client) == before


def test_sequence_suffix_is_stripped_on_add(api: ClientApi) -> None:
    proc, _ = make(api)
    assert proc.add("order::7", 1).batch_id == "order"
    st = proc.status("order::0")
    assert st is not None and st.batch_id == "order"


def test_manual_flush_semantics(api: ClientApi) -> None:
    proc, got = make(api, max_batch_size=100)
    with pytest.raises(rb.BatchNotFound):
        proc.flush("nobody")
    proc.add_many("b", [1, 2])
    res = proc.flush("b")
    assert (res.flushed, res.sequence, res.item_count, res.status) == (True, 0, 2, "flushing")
    again = proc.flush("b")
    assert (again.flushed, again.reason) == (False, "Batch is empty")
    with pytest.raises(rb.BatchNotAccumulating) as err:
        proc.flush("b::0")
    assert err.value.status == "flushing"
    with pytest.raises(rb.BatchNotFound):
        proc.flush("b::9")
    proc.add("b", 3)
    assert proc.flush("b::1").item_count == 1
    api.burst()
    assert sorted((f.sequence, tuple(f.items), f.reason) for f in got) == [
        (0, (1, 2), "manual"),
        (1, (3,), "manual"),
    ]
    with pytest.raises(rb.BatchNotAccumulating) as err:
        proc.flush("b::0")
    assert err.value.status == "completed"


def test_flush_delivery_fields(api: ClientApi) -> None:
    proc, got = make(api)
    proc.add_many("user:1", ["a", "b", "c"])
    api.burst()
    (f,) = got
    assert (f.processor, f.batch_id, f.sequence, f.items, f.attempt) == (
        "events",
        "user:1",
        0,
        ["a", "b", "c"],
        1,
    )
    assert f.flush_id and f.reason == "size" and len(f) == 3


def test_history_newest_first_and_capped(api: ClientApi) -> None:
    proc, _ = make(api, max_batch_size=2, history_limit=3)
    for i in range(5):
        proc.add_many("h", [i, i])
        api.burst()
    hist = proc.history("h", limit=20)
    assert [r.sequence for r in hist] == [4, 3, 2]
    assert all(r.success and r.error is None and r.item_count == 2 and r.attempt == 1 for r in hist)
    assert hist[0].started_at.tzinfo is timezone.utc and hist[0].duration_ms >= 0
    assert [r.sequence for r in proc.history("h", limit=1)] == [4]
    assert proc.history("unknown") == []
    with pytest.raises(rb.BatcherError):
        proc.history("h", limit=0)


def test_history_limit_none_returns_every_entry_kept(api: ClientApi) -> None:
    # the seed's getFlushHistory without a limit returns everything; here everything kept
    proc, _ = make(api, max_batch_size=1, history_limit=25)
    proc.add_many("h", list(range(30)))
    api.burst()
    newest = proc.history("h")
    everything = proc.history("h", limit=None)
    assert len(newest) == 20 and len(everything) == 25 == len({r.sequence for r in everything})
    assert everything[:20] == newest
    assert proc.history("unknown", limit=None) == []
    for bad in (0, -1, True, 2.5):
        with pytest.raises(rb.ConfigError):
            proc.history("h", limit=bad)  # type: ignore[arg-type]


def test_a_completed_sequence_keeps_its_created_at(api: ClientApi) -> None:
    proc, _ = make(api)
    proc.add("u", 1)
    (open_seq,) = proc.sequences("u")
    assert open_seq.created_at is not None
    proc.flush("u")
    api.burst()
    (done,) = proc.sequences("u")
    assert (done.sequence, done.status, done.created_at) == (0, "completed", open_seq.created_at)
    assert done.updated_at is not None and done.updated_at >= open_seq.created_at
    proc.add("u", 2)
    proc.flush("u")
    api.burst()
    (later,) = proc.sequences("u")
    assert later.sequence == 1 and later.created_at is not None and later.created_at >= done.created_at
    assert proc.delete("u::1").deleted
    assert "done_created" not in {k.decode() for k in api.client.hkeys("t:{events:0}:b:u")}


def test_failed_flush_keeps_items_and_records_error(api: ClientApi) -> None:
    calls: list[int] = []

    def handler(flush: rb.Flush) -> None:
        calls.append(flush.attempt)
        raise RuntimeError("downstream is down")

    proc = api.processor(name="f", max_batch_size=2, flush_interval=None, retry_backoff=30)(handler)
    proc.add_many("b", [1, 2])
    api.burst()
    assert calls == [1]
    (rec,) = proc.history("b")
    assert (rec.success, rec.error, rec.attempt) == (False, "RuntimeError: downstream is down", 1)
    st = proc.status("b")
    assert st is not None
    (info,) = st.batches
    assert (info.status, info.item_count, info.attempt) == ("flushing", 2, 1)
    assert info.last_error == "RuntimeError: downstream is down"
    assert info.next_attempt_at is not None and info.next_attempt_at > datetime.now(timezone.utc)
    assert proc.delete("b") == rb.DeleteResult(False, "Cannot delete batch while flushing")


def failing_until(api: ClientApi, fixed: list[bool], **kw: Any) -> tuple[ProcessorApi, list[rb.Flush]]:
    """Processor "r" (2 items a batch, no interval, a 60 s backoff: a failed flush waits for
    its retry through any burst) whose handler records each delivery and raises until
    ``fixed`` holds True."""
    got: list[rb.Flush] = []

    def handler(flush: rb.Flush) -> None:
        got.append(flush)
        if not fixed:
            raise RuntimeError("downstream is down")

    options = {"name": "r", "max_batch_size": 2, "flush_interval": None, "retry_backoff": 60}
    return api.processor(**{**options, **kw})(handler), got


def waiting(proc: ProcessorApi, batch_id: str) -> list[tuple[int, int, bool]]:
    """(sequence, attempt, due now) of each flushing sequence."""
    st = proc.status(batch_id)
    now = datetime.now(timezone.utc) + timedelta(seconds=1)
    batches = st.batches if st else []
    flushing = [b for b in batches if b.status == "flushing"]
    return [(b.sequence, b.attempt, b.due_at is not None and b.due_at <= now) for b in flushing]


def test_flush_of_a_sequence_waiting_for_a_retry_delivers_it_now(api: ClientApi) -> None:
    # the seed's failed flush accumulates again and flush(id) retries it at once; here the
    # sequence waits for its backoff, and flush("b::0") (or retry) ends the wait
    fixed: list[bool] = []
    proc, got = failing_until(api, fixed)
    proc.add_many("b", [1, 2])
    api.burst()
    api.burst()  # the backoff holds it back
    assert [f.attempt for f in got] == [1] and waiting(proc, "b") == [(0, 1, False)]
    fixed.append(True)
    result = proc.flush("b::0")
    assert result == rb.FlushResult("b", 0, 2, True, "flushing", None, (0,))
    assert waiting(proc, "b") == [(0, 1, True)]  # due now, its attempt count kept
    assert api.burst().delivered == 1
    assert [(f.sequence, f.items, f.attempt) for f in got] == [(0, [1, 2], 1), (0, [1, 2], 2)]
    assert got[0].flush_id == got[1].flush_id
    assert proc.status("b") is None
    with pytest.raises(rb.BatchNotAccumulating):
        proc.flush("b::0")


def test_flush_of_a_base_id_retries_every_waiting_sequence(api: ClientApi) -> None:
    fixed: list[bool] = []
    proc, got = failing_until(api, fixed)
    for bid in ("idle", "busy"):
        proc.add_many(bid, [1, 2, 3, 4])
    api.burst()
    assert waiting(proc, "idle") == waiting(proc, "busy") == [(0, 1, False), (1, 1, False)]
    proc.add("busy", 5)  # "busy" accumulates ::2 again
    fixed.append(True)
    # nothing accumulates: the waiting sequences are retried
    assert proc.flush("idle") == rb.FlushResult("idle", 0, 4, True, "flushing", None, (0, 1))
    # something accumulates: it is sealed, and the waiting ones are retried with it
    assert proc.flush("busy") == rb.FlushResult("busy", 2, 5, True, "flushing", None, (0, 1))
    assert api.burst().delivered == 5
    assert sorted((f.batch_id, f.sequence, f.attempt) for f in got[4:]) == [
        ("busy", 0, 2),
        ("busy", 1, 2),
        ("busy", 2, 1),
        ("idle", 0, 2),
        ("idle", 1, 2),
    ]
    assert proc.flush("idle").reason == "Batch is empty"


def test_retry_keeps_the_attempt_count_and_leaves_the_accumulating_sequence(api: ClientApi) -> None:
    proc, got = failing_until(api, [], max_attempts=2)
    proc.add_many("b", [1, 2, 3, 4, 5])  # ::0 and ::1 sealed, ::2 accumulates
    api.burst()
    before = snapshot(api.client)
    assert proc.retry("b::2") == rb.FlushResult("b", 2, 0, False, "accumulating", "Nothing waits for a retry")
    assert snapshot(api.client) == before
    assert proc.retry("b") == rb.FlushResult("b", 0, 4, True, "flushing", None, (0, 1))
    assert proc.retry("b").reason == "Nothing waits for a retry"
    assert api.burst().dead_lettered == 2  # the second failure spends max_attempts=2
    assert sorted(f.attempt for f in got) == [1, 1, 2, 2]
    (acc,) = proc.status("b").batches  # type: ignore[union-attr]
    assert (acc.sequence, acc.status, acc.item_count) == (2, "accumulating", 1)
    with pytest.raises(rb.BatchNotFound):
        proc.retry("nope")
    with pytest.raises(rb.BatchNotFound):
        proc.retry("b::9")
    assert proc.retry("b::0").reason == "Nothing waits for a retry"


def test_delete_semantics(api: ClientApi) -> None:
    proc, _ = make(api)
    assert proc.delete("nothing") == rb.DeleteResult(False, "Batch not found")
    proc.add("b", 1)
    assert proc.delete("b") == rb.DeleteResult(False, "Cannot delete batch with pending items")
    assert proc.delete("b::0") == rb.DeleteResult(False, "Cannot delete batch with pending items")
    proc.flush("b")
    assert proc.delete("b") == rb.DeleteResult(False, "Cannot delete batch while flushing")
    api.burst()
    assert proc.delete("b::5") == rb.DeleteResult(False, "Batch not found")
    assert proc.delete("b::0") == rb.DeleteResult(True, None)
    assert [s.status for s in proc.sequences("b")] == []
    assert proc.delete("b") == rb.DeleteResult(True, None)
    assert proc.history("b") == []
    assert [k for k in api.client.scan_iter("t:{events*")] == []


def test_completed_batches_leave_only_head_and_history_with_ttl(api: ClientApi) -> None:
    proc, _ = make(api, retention=timedelta(hours=1))
    proc.add_many("u", [1, 2, 3, 4])
    proc.flush("u")
    assert list(proc.batch_ids()) == ["u"]
    api.burst()
    keys = sorted(k.decode() for k in api.client.scan_iter("t:*"))
    assert keys == ["t:layout", "t:processors", "t:{events:0}:b:u", "t:{events:0}:h:u"]
    for k in ("t:{events:0}:b:u", "t:{events:0}:h:u"):
        assert 0 < api.client.ttl(k) <= 3600
    assert list(proc.batch_ids()) == []
    assert proc.status("u") is None
    (done,) = proc.sequences("u")
    assert (done.sequence, done.status, done.item_count) == (1, "completed", 1)
    # a new add revives the base id: the head stops expiring and numbering continues
    assert proc.add("u", 5).sequence == 2
    assert api.client.ttl("t:{events:0}:b:u") == -1


def test_flush_id_stays_unique_when_retention_restarts_the_numbering(api: ClientApi) -> None:
    # (batch_id, sequence) is reused once retention drops a finished base id; flush_id is not
    proc, got = make(api, retention=timedelta(hours=1))
    proc.add_many("u", [1, 2, 3])
    api.burst()
    kept = ["t:{events:0}:b:u", "t:{events:0}:h:u"]
    assert all(api.client.ttl(k) > 0 for k in kept)
    api.client.delete(*kept)  # what their expiry does, without waiting for it
    assert proc.sequences("u") == [] and proc.history("u") == []
    proc.add_many("u", [4, 5, 6])
    api.burst()
    first, again = got
    assert (first.batch_id, first.sequence) == (again.batch_id, again.sequence) == ("u", 0)
    assert first.flush_id != again.flush_id
    assert proc.history("u")[0].flush_id == again.flush_id


def test_batch_ids_iterates_active_ids(api: ClientApi) -> None:
    proc, _ = make(api, partitions=4)
    ids = {f"tenant:{i}" for i in range(50)}
    for i in ids:
        proc.add(i, 1)
    assert set(api.batch_ids("events")) == ids
    assert set(proc.batch_ids()) == ids


@pytest.mark.parametrize(
    "batch_id",
    [
        "{user}:42",
        "a b c",
        "ü:{x}}",
        "x::y",
        "::",
        "emoji 🎉",
        "{",
        "}{",
        "a" * 1024,
        "tab-free:" + "é" * 300,
    ],
)
def test_unusual_batch_ids_work(api: ClientApi, batch_id: str) -> None:
    proc, got = make(api, partitions=3)
    r = proc.add_many(batch_id, [1, 2])
    assert r.batch_id == batch_id
    proc.flush(batch_id)
    api.burst()
    assert [(f.batch_id, f.items) for f in got] == [(batch_id, [1, 2])]
    # the key is readable: it carries the raw id after the processor's hash tag
    keys = [k.decode() for k in api.client.scan_iter("t:{events:*}:b:*")]
    assert len(keys) == 1 and keys[0].endswith(":b:" + batch_id)


def test_partition_placement_ignores_braces_in_ids(api: ClientApi) -> None:
    proc, _ = make(api, partitions=8)
    for bid in ["{a}", "{b}", "x{y}z", "plain"]:
        part = proc.keys.for_base(bid)
        assert part is proc.keys.parts[partition_of(bid, 8)]
        assert part.head(bid).startswith(part.pfx)
        # the first {...} of every key is the processor's tag, whatever the id holds
        k = proc.keys.parts.index(part)
        assert part.head(bid).split("}")[0].split(":")[-1].split("~")[0] == str(k)
    # and an add writes exactly there
    proc.add("x{y}z", 1)
    assert api.client.exists(proc.keys.for_base("x{y}z").head("x{y}z")) == 1


def test_codecs(api: ClientApi) -> None:
    class Upper:
        name = "upper"

        def encode(self, item: Any) -> bytes:
            return str(item).upper().encode()

        def decode(self, data: bytes) -> Any:
            return data.decode()

    got: dict[str, list[Any]] = {}

    def keep(flush: rb.Flush) -> None:
        got[flush.processor] = flush.items

    pj = api.processor(name="j", codec="json", max_batch_size=2)(keep)
    pm = api.processor(name="m", max_batch_size=3)(keep)
    pu = api.processor(name="u", codec=Upper(), max_batch_size=1)(keep)
    pj.add_many("x", [{"a": [1, 2]}, "é"])
    pm.add_many("x", [b"\x00\xff", {1: None}, [1.5, True]])
    pu.add("x", "abc")
    api.burst()
    assert got == {"j": [{"a": [1, 2]}, "é"], "m": [b"\x00\xff", {1: None}, [1.5, True]], "u": ["ABC"]}
    with pytest.raises(rb.ItemEncodeError):
        pj.add("x", b"bytes are not json")


class RawCodec:
    """Returns what an (item kind, text) pair asks for: bytearray, memoryview, or a str."""

    name = "raw"

    def encode(self, item: Any) -> Any:
        kind, text = item
        data = text.encode()
        return {"ba": bytearray(data), "mv": memoryview(data)[1:], "str": text}[kind]

    def decode(self, data: bytes) -> Any:
        return data


RAW_ADDS: list[tuple[str, Any]] = [
    ("add", ("ba", "abc")),
    ("add", ("mv", "xdef")),
    ("add_many", [("ba", "gh"), ("mv", "_ij")]),
]
RAW_STORED = [b"abc", b"def", b"gh", b"ij"]
RAW_BAD: list[tuple[str, Any]] = [("add", ("str", "nope")), ("add_many", [("ba", "ok"), ("str", "nope")])]


def raw_items(client: Any) -> list[bytes]:
    """The items of the one accumulating sequence: its open list after the header."""
    (items_key,) = [k for k in client.keys("*raw*") if b":o:" in k]
    return list(client.lrange(items_key, 1, -1))


def test_codec_may_return_any_bytes_like_but_nothing_else(api: ClientApi) -> None:
    proc = api.processor(name="raw", codec=RawCodec(), max_batch_size=10)(lambda flush: None)
    for method, arg in RAW_ADDS:
        getattr(proc, method)("x", arg)
    before = snapshot(api.client)
    for method, arg in RAW_BAD:
        with pytest.raises(rb.ItemEncodeError, match="returned str, not bytes"):
            getattr(proc, method)("x", arg)
    assert snapshot(api.client) == before
    assert raw_items(api.client) == RAW_STORED


BAD_IDS: list[Any] = [
    "",
    "a" * 1025,
    "é" * 513,
    "a\x00b",
    "line\nbreak",
    "\x1b[31m",
    42,
    None,
    b"bytes",
    "::3",
]


def test_bad_input_raises_and_leaves_redis_untouched(api: ClientApi) -> None:
    proc, _ = make(api, max_item_bytes=100)
    proc.add("existing", 1)  # registry and one batch exist before the snapshot
    before = snapshot(api.client)
    for bad_id in BAD_IDS:
        with pytest.raises(rb.InvalidBatchId):
            proc.add(bad_id, 1)
        with pytest.raises(rb.InvalidBatchId):
            proc.add_many(bad_id, [1])
        with pytest.raises(rb.InvalidBatchId):
            proc.flush(bad_id)
        with pytest.raises(rb.InvalidBatchId):
            proc.status(bad_id)
        with pytest.raises(rb.InvalidBatchId):
            proc.delete(bad_id)
        with pytest.raises(rb.InvalidBatchId):
            proc.history(bad_id)
    for bad_item in [object(), {1, 2}, datetime.now(), 2**70, lambda: 1]:
        with pytest.raises(rb.ItemEncodeError):
            proc.add("existing", bad_item)
    with pytest.raises(rb.ItemTooLarge):
        proc.add("existing", "x" * 200)
    with pytest.raises(rb.ItemEncodeError):
        proc.add_many("existing", [1, 2, object(), 4])  # one bad item: nothing of the call is written
    with pytest.raises(rb.ItemTooLarge):
        proc.add_many("existing", [1, "y" * 101])
    with pytest.raises(rb.BatchNotFound):
        proc.flush("unknown-batch")
    with pytest.raises(rb.BatchNotFound):
        proc.flush("existing::5")
    assert snapshot(api.client) == before
    assert issubclass(rb.ItemTooLarge, rb.BatcherError) and issubclass(rb.InvalidBatchId, rb.BatcherError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch_size": 0},
        {"max_batch_size": -1},
        {"max_batch_size": True},
        {"max_batch_size": 2.5},
        {"flush_interval": -1},
        {"flush_interval": timedelta(seconds=-1)},
        {"flush_interval": float("nan")},
        {"flush_interval": "5"},
        {"flush_interval": 0},
        {"flush_interval": 0.0},
        {"flush_interval": timedelta(0)},
        {"partitions": 0},
        {"codec": "pickle"},
        {"codec": object()},
        {"max_item_bytes": 0},
        {"history_limit": 0},
        {"retention": 0},
        {"lease_timeout": 0},
        {"name": "has space"},
        {"name": "br{ace"},
        {"name": ""},
    ],
)
def test_bad_config_raises_before_any_write(api: ClientApi, kwargs: dict[str, Any]) -> None:
    before = snapshot(api.client)
    with pytest.raises(rb.ConfigError):
        api.processor(**{"name": "p", **kwargs})(lambda f: None)
    assert snapshot(api.client) == before
    assert api.processors == {}


def test_flush_interval_zero_points_to_none(api: ClientApi) -> None:
    # the seed's flushIntervalMs: 0 means "no timer"; ported literally it would deliver every
    # item on its own, so it is refused with the spelling that means what the seed meant
    with pytest.raises(rb.ConfigError, match="use None for no interval timer"):
        api.processor(name="p", flush_interval=0)(lambda f: None)
    proc = api.processor(name="p", flush_interval=None)(lambda f: None)
    assert proc.config.flush_interval is None and proc.interval_ms == -1


def test_duplicate_processor_name(api: ClientApi) -> None:
    make(api)
    before = snapshot(api.client)
    with pytest.raises(rb.DuplicateProcessor):
        make(api)
    assert snapshot(api.client) == before


def test_default_name_and_interval_types(api: ClientApi) -> None:
    @api.processor(flush_interval=timedelta(milliseconds=1500))
    def my_handler(flush: rb.Flush) -> str:
        return "called"

    assert my_handler.name == f"{__name__}.test_default_name_and_interval_types.<locals>.my_handler"
    assert my_handler.config.flush_interval == 1.5 and my_handler.interval_ms == 1500
    assert my_handler(rb.Flush("p", "b", 0, [], 1, "id")) == "called"

    @api.processor
    def bare(flush: rb.Flush) -> None:
        pass

    assert bare.config.flush_interval == 30.0 and bare.config.max_batch_size == 100


def test_decode_responses_client_is_rejected(api: ClientApi) -> None:
    with pytest.raises(rb.ConfigError):
        api.batcher_of(api.new_client(decode_responses=True))
    with pytest.raises(rb.ConfigError):
        api.batcher_of("redis://127.0.0.1:1/0", prefix="has space")


def test_noscript_recovery_after_script_flush(api: ClientApi) -> None:
    proc, got = make(api)
    proc.add("n", 1)
    api.client.script_flush()
    assert proc.add("n", 2).pending == 2
    api.client.script_flush()
    proc.flush("n")
    api.client.script_flush()
    api.burst()
    assert [f.items for f in got] == [[1, 2]]
    api.client.script_flush()
    assert proc.status("n") is None


def test_registry_and_remote_processor(api: ClientApi) -> None:
    proc, _ = make(api, partitions=2)
    proc.add("r", 1)
    # another batcher (the CLI's, a sync one) rebuilds the processor from what Redis holds
    other = rb.Batcher(api.client, prefix="t")
    remote = other.remote("events")
    assert remote.config == proc.config
    st = remote.status("r")
    assert st is not None and st.batches[0].item_count == 1
    with pytest.raises(rb.UnknownProcessor):
        other.remote("missing")
    assert set(other.registered()) == {"events"}
