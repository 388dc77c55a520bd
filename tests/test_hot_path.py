"""The producer's hot path against a real redis-server: the connection layer's links (each
thread's own connection for script calls), add.lua's single-item fast branch, and linking only
the Lua helpers a script uses."""

from __future__ import annotations

import gc
import multiprocessing
import threading
import time
from typing import Any

import pytest
import redis

import redis_batcher as rb
from redis_batcher import Batcher, Worker, connection, ops
from redis_batcher.connection import Link
from redis_batcher.scripts import INCLUDES, Includes, lua_dir, scripts
from redis_batcher.testing import RedisServer
from tests.conftest import held_items, snapshot, wake_pubsub


def make(batcher: Batcher, **config: Any) -> rb.Processor:
    config.setdefault("max_batch_size", 3)
    config.setdefault("flush_interval", None)
    return batcher.processor(name="hot", **config)(lambda flush: None)


def items_of(client: redis.Redis, proc: rb.Processor, base: str, seq: int) -> int:
    return len(held_items(client, proc.keys.for_base(base), base, seq))


def client_id(link: Link) -> int:
    """The server's id of the connection this thread's link uses."""
    return int(link.call((b"CLIENT", b"ID")))


def test_link_is_used_for_redis_clients_of_any_connection_class(redis_server: RedisServer) -> None:
    import fakeredis

    class Traced(redis.Connection):
        pass

    custom = redis.Redis(
        connection_pool=redis.ConnectionPool(connection_class=Traced, port=redis_server.port)
    )
    # only redis-py's public connection API is used: any connection class
    for conn in (redis_server.url, redis.Redis(host="127.0.0.1", port=redis_server.port), custom):
        batcher = Batcher(conn)
        assert batcher.executor.link is not None
        proc = make(batcher, max_batch_size=10)
        assert proc.add("a", 1).added == 1
        batcher.close()

    class Instrumented(redis.Redis):
        pass

    # a subclass of the client (its execute_command may trace) keeps redis-py's path
    assert Batcher(Instrumented(port=redis_server.port)).executor.link is None
    assert Batcher(fakeredis.FakeRedis()).executor.link is None


def test_link_reconnects_after_the_server_closed_an_idle_connection(
    real_batcher: Batcher, real_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = make(real_batcher, max_batch_size=100)
    proc.add("k", 1)
    # an idle connection (unused for RECHECK_IDLE) is checked before sending: a socket the
    # server closed is replaced, the add goes through, nothing is duplicated
    monkeypatch.setattr(connection, "RECHECK_IDLE", 0.0)
    assert real_client.client_kill_filter(_type="normal", skipme=True) >= 1
    assert proc.add("k", 2).pending == 2
    # a connection that answered a moment ago is trusted: a restart inside that window fails
    # one add whose request went out on the closed connection (OutcomeUnknown: here nothing
    # was written), and the next one reconnects
    monkeypatch.setattr(connection, "RECHECK_IDLE", 60.0)
    assert real_client.client_kill_filter(_type="normal", skipme=True) >= 1
    with pytest.raises(rb.OutcomeUnknownConnectionError):
        proc.add("k", 3)
    assert proc.add("k", 4).pending == 3
    items = held_items(real_client, proc.keys.for_base("k"), "k", 0)
    assert [proc.codec.decode(i) for i in items] == [1, 2, 4]


def test_link_keeps_a_connection_per_thread_and_close_closes_them(
    redis_server: RedisServer, real_client: redis.Redis
) -> None:
    def named() -> int:
        return sum(1 for c in real_client.client_list() if c.get("name") == "rb-pins")

    batcher = Batcher(redis.Redis(port=redis_server.port, client_name="rb-pins"))
    proc = make(batcher, max_batch_size=10_000)
    link = batcher.executor.link
    assert link is not None
    ids: set[int] = set()
    go = threading.Barrier(5)

    def adder() -> None:
        go.wait(10)  # all threads alive at once: each keeps its own connection
        for i in range(50):
            proc.add("t", i)
        ids.add(client_id(link))
        go.wait(10)

    threads = [threading.Thread(target=adder) for _ in range(4)]
    for t in threads:
        t.start()
    adder()
    for t in threads:
        t.join()
    assert proc.status("t") is not None
    assert sum(b.item_count for b in proc.status("t").batches) == 250  # type: ignore[union-attr]
    assert len(ids) == 5  # one connection per thread
    batcher.close()
    assert named() == 0  # closed, the threads' ones too
    assert proc.add("t", 0).pending == 251  # this thread takes a new one
    batcher.client.close()


def test_a_threads_connection_goes_back_to_the_pool_when_the_thread_ends(redis_server: RedisServer) -> None:
    # a pool of two connections: a third thread can add only once an earlier one gave its back
    pool = redis.BlockingConnectionPool(port=redis_server.port, max_connections=2, timeout=0.5)
    batcher = Batcher(redis.Redis(connection_pool=pool), connect_retry=0.0)
    proc = make(batcher, max_batch_size=10_000)
    proc.add("p", 0)  # this thread keeps one of the two
    for i in range(3):
        t = threading.Thread(target=proc.add, args=("p", i))
        t.start()
        t.join()
        gc.collect()
    assert proc.status("p").pending == 4  # type: ignore[union-attr]
    batcher.close()
    batcher.client.close()


def test_forked_child_opens_its_own_connection(redis_server: RedisServer) -> None:
    batcher = Batcher(redis_server.url)
    proc = make(batcher, max_batch_size=10_000)
    link = batcher.executor.link
    assert link is not None
    proc.add("f", "parent")
    parent_id = client_id(link)
    ctx = multiprocessing.get_context("fork")
    done = ctx.Queue()

    def child() -> None:
        proc.add("f", "child")
        done.put(client_id(link))

    p = ctx.Process(target=child)
    p.start()
    assert done.get(timeout=20) != parent_id
    p.join(timeout=20)
    assert p.exitcode == 0
    # the parent's connection was not touched by the child and still works
    assert proc.add("f", "parent again").pending == 3
    assert client_id(link) == parent_id
    batcher.close()


def test_script_error_keeps_the_connection_in_step(real_batcher: Batcher) -> None:
    link = real_batcher.executor.link
    assert link is not None
    with pytest.raises(redis.ResponseError):
        link.call((b"EVAL", "return redis.error_reply('nope')", 0))
    assert link.call((b"PING",)) == b"PONG"
    assert link.call((b"ECHO", "x" * 70_000)) == b"x" * 70_000


@pytest.mark.parametrize("max_pending", [None, 4])
def test_single_item_fast_branch_matches_the_general_path(
    real_batcher: Batcher, real_client: redis.Redis, max_pending: int | None
) -> None:
    # without max_pending a single add into an open sequence takes the fast branch (the open
    # list alone); with it, the general path (the head's pending count is read too)
    proc = make(real_batcher, max_batch_size=3, max_pending=max_pending)
    part = proc.keys.for_base("u")
    first = proc.add("u", "a")  # opens sequence 0 (general path)
    assert first == rb.AddResult("u", 0, 1, 1, False, "accumulating", 0)
    head_before = real_client.hgetall(part.head("u"))
    assert proc.add("u", "b") == rb.AddResult("u", 0, 1, 2, False, "accumulating", 0)
    assert real_client.hgetall(part.head("u")) == head_before  # an add into it leaves the head be
    # the fast branch seals a full sequence and wakes workers like the general path
    pubsub = wake_pubsub(real_client, part.wake, ignore_subscribe_messages=False)
    assert pubsub.get_message(timeout=1)["type"] in ("subscribe", "ssubscribe")  # type: ignore[index]
    assert proc.add("u", "c") == rb.AddResult("u", 0, 1, 3, True, "flushing", 1)
    message = pubsub.get_message(timeout=1)
    assert message is not None and message["data"] == part.pfx.encode()
    pubsub.close()
    assert real_client.zscore(part.due, "u::0") is not None
    # sealing renamed the open list to the sequence's own list, header dropped
    assert held_items(real_client, part, "u", 0) == [proc.codec.encode(x) for x in "abc"]
    assert real_client.exists(part.open_items("u")) == 0
    assert proc.add("u", "d").sequence == 1  # general path again: opens sequence 1
    assert real_client.hget(part.head("u"), "pending") == b"3"  # the sealed sequences' items
    if max_pending is not None:
        # checked against sealed and open items alike, before anything is written
        before = snapshot(real_client)
        with pytest.raises(rb.BatchFull) as info:
            proc.add("u", "e")
        assert info.value.pending == 4
        assert snapshot(real_client) == before
    else:
        assert proc.add("u", "e").pending == 2
    assert items_of(real_client, proc, "u", 1) == (1 if max_pending else 2)


def test_open_list_holds_the_accumulating_sequence_until_it_is_sealed(
    real_batcher: Batcher, real_client: redis.Redis
) -> None:
    got: list[rb.Flush] = []
    proc = real_batcher.processor(name="open", max_batch_size=100, flush_interval=0.05)(got.append)
    part = proc.keys.for_base("u")
    enc = proc.codec.encode
    proc.add_many("u", [1, 2])
    proc.add("u", 3)
    header, *items = real_client.lrange(part.open_items("u"), 0, -1)
    seq, rest = header.decode().split(":")
    added_ms, opened_max = rest.split("/")  # the max_batch_size the sequence was opened with
    assert seq == "0" and len(added_ms) == 13 and opened_max == "100"
    assert items == [enc(1), enc(2), enc(3)]
    [info] = proc.status("u").batches  # type: ignore[union-attr]
    assert info.item_count == 3 and info.updated_at is not None
    assert round(info.updated_at.timestamp() * 1000) == int(added_ms)
    # a batch id with items accumulating is not deleted, its open list untouched
    assert not proc.delete("u").deleted
    assert real_client.llen(part.open_items("u")) == 4
    # the interval seal (by a claim) renames the open list to the sequence's own, header dropped
    time.sleep(0.1)
    owner = ops.new_token()
    call = ops.claim_call(proc, part, 10, owner)
    _, claimed = ops.parse_claim(proc, part, owner, real_batcher.executor.run_once(call))
    assert [(c.member, c.cutoff) for c in claimed] == [("u::0", 3)]
    assert real_client.exists(part.open_items("u")) == 0
    assert real_client.lrange(part.items("u", 0), 0, -1) == [enc(1), enc(2), enc(3)]
    assert real_client.hget(part.head("u"), "pending") == b"3"
    # a later add opens the next sequence in a new open list; the sealed one is untouched
    assert proc.add("u", 4).sequence == 1
    assert real_client.lrange(part.open_items("u"), 1, -1) == [enc(4)]
    assert real_client.lindex(part.open_items("u"), 0).startswith(b"1:")  # type: ignore[union-attr]
    # a manual flush seals it the same way; a worker delivers both, nothing left
    assert proc.flush("u").item_count == 1
    assert real_client.exists(part.open_items("u")) == 0
    for c in claimed:  # hand sequence 0 back rather than wait for its lease
        assert real_batcher.executor.execute(ops.release_call(c), wait=False)
    Worker(real_batcher).run(burst=True)
    assert sorted((f.sequence, f.items) for f in got) == [(0, [1, 2, 3]), (1, [4])]
    assert real_client.hget(part.head("u"), "pending") == b"0"
    assert real_client.keys(part.pfx + "[io]:*") == []


@pytest.mark.parametrize("header", [b"garbage", b"7:1795956439667", b""])
@pytest.mark.parametrize("how", ["interval", "flush", "add"])
def test_items_under_a_damaged_open_list_header_stay_the_accumulating_sequences(
    real_batcher: Batcher, real_client: redis.Redis, header: bytes, how: str
) -> None:
    # a header that names no sequence, or another one than the head's accumulating sequence
    # (never written by the scripts: a damaged key): its items are still delivered, with the
    # sequence, and the header is never taken for an item
    got: list[rb.Flush] = []
    proc = real_batcher.processor(name="guard", max_batch_size=100, flush_interval=0.05)(got.append)
    part = proc.keys.for_base("u")
    proc.add_many("u", [1, 2])
    proc.add("u", 3)
    real_client.lset(part.open_items("u"), 0, header)
    assert proc.status("u").batches[0].item_count == 3  # type: ignore[union-attr]
    if how == "flush":
        assert proc.flush("u").item_count == 3
    elif how == "add":
        # the hot path trusts a well-formed header (it reads no other key): the add lands in the
        # open list all the same, under the number the header names
        seq = 7 if header.startswith(b"7:") else 0
        assert proc.add("u", 4) == rb.AddResult("u", seq, 1, 4, False, "accumulating", 0)
    time.sleep(0.1)  # the interval seal
    Worker(real_batcher).run(burst=True)
    assert [f.items for f in got] == [[1, 2, 3, 4] if how == "add" else [1, 2, 3]]
    assert real_client.keys(part.pfx + "[ios]:*") == []
    assert proc.dead_letters() == []


def to_layout_before_the_open_list(client: redis.Redis, part: Any, base: str, seq: int) -> None:
    """Turn an accumulating sequence into how a version from before the open list stored it:
    items in the sequence's own list, counted in the head's pending, no open list."""
    n = client.llen(part.open_items(base)) - 1
    client.rename(part.open_items(base), part.items(base, seq))
    client.lpop(part.items(base, seq))
    client.hincrby(part.head(base), "pending", n)


@pytest.mark.parametrize("seal", ["size", "flush", "interval"])
def test_items_stored_before_the_open_list_are_kept_and_delivered_first(
    real_batcher: Batcher, real_client: redis.Redis, seal: str
) -> None:
    # data left by the layout before the open list (an upgrade, or an older producer still
    # running): sealing never renames the open list over the sequence's own list
    got: list[rb.Flush] = []
    interval = 0.05 if seal == "interval" else None
    proc = real_batcher.processor(name="old", max_batch_size=5, flush_interval=interval)(got.append)
    part = proc.keys.for_base("u")
    proc.add_many("u", [1, 2])
    to_layout_before_the_open_list(real_client, part, "u", 0)
    assert proc.status("u").pending == 2  # type: ignore[union-attr]
    later = [3, 4, 5, 6, 7] if seal == "size" else [3]
    results = [proc.add("u", x) for x in later]
    assert {r.sequence for r in results} == {0}
    assert proc.status("u").pending == 2 + len(later)  # type: ignore[union-attr]
    if seal == "flush":
        assert proc.flush("u").item_count == 3
    elif seal == "interval":
        time.sleep(0.1)
    else:
        assert results[-1].flushed and results[-1].pending == 7  # the open list held 5
    Worker(real_batcher).run(burst=True)
    # one sequence, in add order (7 items go out in windows of max_batch_size)
    assert {f.sequence for f in got} == {0}
    assert [x for f in got for x in f.items] == [1, 2, *later]
    assert all(len(f.items) <= 5 for f in got)
    assert real_client.hget(part.head("u"), "pending") == b"0"
    assert real_client.keys(part.pfx + "[io]:*") == []


def test_updated_at_of_the_accumulating_sequence_is_its_last_add(real_batcher: Batcher) -> None:
    proc = make(real_batcher, max_batch_size=100)
    proc.add("w", 1)
    time.sleep(0.05)
    proc.add("w", 2)
    [info] = proc.status("w").batches  # type: ignore[union-attr]
    assert info.created_at is not None and info.updated_at is not None
    assert (info.updated_at - info.created_at).total_seconds() >= 0.04


def test_highest_completed_sequence_is_kept_whatever_order_flushes_finish(real_batcher: Batcher) -> None:
    release_first = threading.Event()

    def handler(flush: rb.Flush) -> None:
        if flush.sequence == 0:
            assert release_first.wait(10)
        else:
            release_first.set()

    proc = real_batcher.processor(name="order", max_batch_size=2, flush_interval=None)(handler)
    proc.add_many("o", [1, 2, 3, 4])
    stats = Worker(real_batcher, concurrency=2).run(burst=True)
    assert stats.delivered == 2
    [done] = [b for b in proc.sequences("o") if b.status == "completed"]
    assert done.sequence == 1  # sequence 0 finished last, but 1 is the latest completed


def test_scripts_link_only_the_helpers_they_use(real_client: redis.Redis) -> None:
    table = scripts()
    assert "local function bury" not in table.add.source
    assert "local function advance" in table.ack.source
    # advance uses retire and unpark: linked through it, though ack.lua does not include them
    assert "local function retire" in table.ack.source and "local function unpark" in table.ack.source
    assert not any("--- @include" in s.source for s in table.scripts.values())
    flags = int(str(real_client.info("server")["redis_version"]).split(".")[0]) >= 7
    for script in table.scripts.values():
        # each compiles: the plain variant everywhere, the one with script flags on Redis 7
        assert real_client.script_load(script.plain.source) == script.plain.sha
        if flags:
            assert real_client.script_load(script.source) == script.sha
    # a script without include lines gets no helper
    bare = "-- x.lua: x\nreturn 1"
    assert Includes(lua_dir() / INCLUDES).assemble(bare, "x.lua") == bare


def test_async_link_for_lone_adds(
    redis_server: RedisServer, real_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection, "RECHECK_IDLE", 60.0)
    import asyncio

    import fakeredis
    import redis.asyncio as aioredis

    from redis_batcher import asyncio as aio

    async def main() -> None:
        assert aio.Batcher(fakeredis.FakeAsyncRedis()).executor.link is None
        ab = aio.Batcher(redis_server.url, prefix="ahot")
        link = ab.executor.link
        assert link is not None
        proc = ab.processor(name="hot", max_batch_size=1000, flush_interval=None)(lambda f: None)
        assert (await proc.add("a", 1)).pending == 1
        assert len(link._idle[asyncio.get_running_loop()]) == 1
        # the server closes the idle connection: the next lone add reconnects before sending
        connection.RECHECK_IDLE = 0.0
        real_client.client_kill_filter(_type="normal", skipme=True)
        await asyncio.sleep(0.05)  # the event loop sees the close (as it does while idle)
        assert (await proc.add("a", 2)).pending == 2
        # a call cancelled while waiting for its reply never hands its connection to the next one
        slow = asyncio.ensure_future(link.call((b"BLPOP", "ahot:never", 2)))
        await asyncio.sleep(0.2)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        assert (await proc.add("a", 3)).pending == 3  # not confused by BLPOP's late reply
        with pytest.raises(redis.ResponseError):
            await link.call((b"EVAL", "return redis.error_reply('nope')", 0))
        assert await link.call((b"PING",)) == b"PONG"
        assert all(c.is_connected for c, _ in link._idle[asyncio.get_running_loop()])
        await ab.aclose()
        assert link._idle.get(asyncio.get_running_loop()) is None
        check = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
        part = proc.keys.for_base("a")
        assert await check.llen(part.open_items("a")) == 1 + 3  # the header and 3 items
        await check.aclose()

    asyncio.run(main())


def test_add_frame_is_the_general_framing_of_a_single_add(real_batcher: Batcher) -> None:
    from redis_batcher import ops

    for partitions in (1, 4):
        proc = make(real_batcher, partitions=partitions, max_pending=10)
        for base in ("a", "user:42", "ünïcødé-🙂", "x" * 300):
            for data in (b"", b"\x91\x01", b"\r\n$3\r\n", b"x" * 70_000):
                call = ops.add_call(proc, base, [data])
                assert ops.add_frame(proc, base, data) == call.script.framed(call.keys, call.args)
        real_batcher.processors.pop("hot")


def test_link_reconnects_on_next_use_after_close(real_batcher: Batcher) -> None:
    proc = make(real_batcher, max_batch_size=100)
    link = real_batcher.executor.link
    assert link is not None
    proc.add("c", 1)
    before = client_id(link)
    real_batcher.close()
    assert proc.add("c", 2).pending == 2  # at once, not RECHECK_IDLE later: a new connection
    assert client_id(link) != before


def test_pack_matches_redis_py() -> None:
    from redis_batcher.connection import pack

    args = (b"EVALSHA", "abc", 1, "k\u00e9y", b"\x00\xff", 3.5, -7)
    assert pack(args) == b"".join(redis.Connection().pack_command(*args))
    # integers come from a cache after their first use: the same frames every time
    many = (b"EVALSHA", 0, 1, -1, 2**63, 30000, "30000", 1000, 1000, -7)
    for _ in range(3):
        assert pack(many) == b"".join(redis.Connection().pack_command(*many))
    # bulk-string headers come from a cache by length: items alike and unlike, empty ones too
    items = (b"RPUSH", "k", *(b"x" * n for n in (96, 0, 96, 97, 1, 10_000, 96)))
    for _ in range(2):
        assert pack(items) == b"".join(redis.Connection().pack_command(*items))
    assert pack(()) == b"*0\r\n"


def test_script_evalsha_frames_match_redis_py() -> None:
    # a script's "EVALSHA sha numkeys" is framed once; the command must stay byte for byte
    script = scripts().add
    calls = [(("rb:{p:0}:b:x",), ("x", "100 -1 -1 -", b"\x81\xa1a\x01")), ((), (7,)), (("a", "b"), ())]
    for keys, args in calls:
        for _ in range(2):  # the second time from the cached head
            want = b"".join(redis.Connection().pack_command("EVALSHA", script.sha, len(keys), *keys, *args))
            assert script._evalsha(keys, args) == want


def test_add_result_fast_constructor_is_the_dataclass() -> None:
    import dataclasses

    from redis_batcher.models import AddResult, add_result

    fast = add_result("b", 3, 1, 7, True, "flushing", 1)
    slow = AddResult("b", 3, 1, 7, True, "flushing", 1)
    assert fast == slow and hash(fast) == hash(slow) and repr(fast) == repr(slow)
    # every field is set (a field added to AddResult must be added to add_result too)
    assert fast.__dict__ == dataclasses.asdict(slow)
    assert list(fast.__dict__) == [f.name for f in dataclasses.fields(AddResult)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.pending = 0  # type: ignore[misc]


def test_link_maps_socket_timeouts_to_redis_errors(redis_server: RedisServer) -> None:
    batcher = Batcher(redis.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=0.2))
    link = batcher.executor.link
    assert link is not None
    assert link.call((b"PING",)) == b"PONG"
    t0 = time.monotonic()
    with pytest.raises(rb.OutcomeUnknownTimeoutError):
        link.call((b"BLPOP", "never", 2))
    assert 0.15 < time.monotonic() - t0 < 1.5  # the 0.2 s timeout fired, not the 2 s BLPOP
    assert link.call((b"PING",)) == b"PONG"  # a fresh connection, not the late BLPOP reply
    batcher.close()


def test_async_link_maps_socket_timeouts_and_closed_connections(redis_server: RedisServer) -> None:
    import asyncio

    import redis.asyncio as aioredis

    from redis_batcher.connection import AsyncLink

    async def main() -> None:
        client = aioredis.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=0.2)
        link = AsyncLink(client)
        with pytest.raises(redis.TimeoutError):
            await link.call((b"BLPOP", "never", 2))
        assert await link.call((b"PING",)) == b"PONG"  # a fresh connection, not BLPOP's reply
        assert await link.call((b"ECHO", b"x" * 200_000)) == b"x" * 200_000  # many reads
        assert await link.call((b"ECHO", b"abc")) == b"abc"  # whole in one read
        assert await link.call((b"ECHO", b"")) == b""
        assert await link.call((b"LRANGE", "nothing", 0, -1)) == []
        assert await link.call((b"QUIT",)) == b"OK"
        with pytest.raises(redis.ConnectionError):
            await link.call((b"PING",))  # closed by the server a moment ago: this call fails
        assert await link.call((b"PING",)) == b"PONG"  # and the next one reconnects
        await link.close()
        await client.aclose()

    asyncio.run(main())


def test_async_link_keeps_connections_per_event_loop(redis_server: RedisServer) -> None:
    import asyncio

    import redis.asyncio as aioredis

    from redis_batcher.connection import AsyncLink

    client = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
    link = AsyncLink(client)
    ids: list[int] = []

    async def use() -> None:
        loop = asyncio.get_running_loop()
        assert await link.call((b"ECHO", b"abc")) == b"abc"
        first = int(await link.call((b"CLIENT", b"ID")))
        assert len(link._idle[loop]) == 1  # this loop's connection, kept and reused
        await link.close()
        # after close(): a new server connection, kept too
        assert int(await link.call((b"CLIENT", b"ID"))) not in (first, *ids)
        assert len(link._idle[loop]) == 1
        ids.append(first)
        await link.close()
        assert loop not in link._idle

    asyncio.run(use())
    asyncio.run(use())  # another loop: its own connections
    assert ids[0] != ids[1]


def test_async_group_commit_is_pipelined_over_the_link(
    redis_server: RedisServer, real_client: redis.Redis
) -> None:
    """Concurrent adds to several batch ids go out as one write of EVALSHAs on a connection
    of the link, not through redis-py's pipeline. After SCRIPT FLUSH the whole pipeline meets
    NOSCRIPT and is sent again with EVAL; a call refused by its script (CorruptData: a key of
    another type; BatchFull) fails only its own callers; every other item is written exactly once."""
    import asyncio

    from redis_batcher import asyncio as aio

    async def main() -> None:
        ab = aio.Batcher(redis_server.url, prefix="gp")
        assert ab.executor.link is not None

        def no_redis_py_pipeline(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("the group commit used redis-py's pipeline")

        ab.client.pipeline = no_redis_py_pipeline  # type: ignore[method-assign]
        proc = ab.processor(name="g", max_batch_size=1000, flush_interval=None, max_pending=4)(lambda f: None)
        await ab.register()
        real_client.set(proc.keys.for_base("broken").head("broken"), "not a hash")
        requests: list[int] = []
        request = ab.executor.link.request

        async def counting(data: bytes, count: int = 0) -> Any:
            requests.append(count)
            return await request(data, count)

        ab.executor.link.request = counting  # type: ignore[method-assign]
        for round_ in range(2):
            real_client.script_flush()
            requests.clear()
            adds = [proc.add(f"id{i % 5}", (round_, i)) for i in range(10)]
            adds += [proc.add("broken", "x"), proc.add_many("full", range(5))]
            outs = await asyncio.gather(*adds, return_exceptions=True)
            assert all(isinstance(o, rb.AddResult) for o in outs[:10]), outs
            assert [o.pending for o in outs[:10]] == [2 * round_ + 1] * 5 + [2 * round_ + 2] * 5  # type: ignore[union-attr]
            assert isinstance(outs[10], rb.CorruptData) and "b:broken is a string" in str(outs[10])
            assert isinstance(outs[11], rb.BatchFull)
            # one pipelined write of 7 EVALSHAs, then the same 7 again with EVAL (NOSCRIPT)
            assert requests == [7, 7], requests
        for i in range(5):
            assert await proc.pending(f"id{i}") == 4
        assert await proc.pending("full") == 0
        await ab.aclose()

    asyncio.run(main())


def test_async_lone_adds_start_no_task_and_a_socket_timeout_fires(redis_server: RedisServer) -> None:
    """A lone add is sent by its caller's task: the group commit starts no task for it. (With
    a socket_timeout, redis-py's own write waits with asyncio.wait_for, which runs as a task
    before Python 3.12: hence a client without one here.) The link's reads still honour a
    client's socket_timeout."""
    import asyncio

    import redis.asyncio as aioredis

    from redis_batcher import asyncio as aio

    async def main() -> None:
        client = aioredis.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=None)
        ab = aio.Batcher(client, prefix="lt")
        assert ab.executor.link is not None
        proc = ab.processor(name="lt", max_batch_size=1000, flush_interval=None)(lambda f: None)
        await proc.add("a", 0)
        loop = asyncio.get_running_loop()
        tasks: list[Any] = []

        def factory(loop: Any, coro: Any, **kw: Any) -> Any:
            tasks.append(coro)
            return asyncio.Task(coro, loop=loop, **kw)

        loop.set_task_factory(factory)
        for i in range(20):
            assert (await proc.add("a", i)).pending == i + 2
        loop.set_task_factory(None)
        assert tasks == []
        short = aio.Batcher(aioredis.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=0.2))
        assert short.executor.link is not None
        t0 = time.monotonic()
        with pytest.raises(rb.OutcomeUnknownTimeoutError):
            await short.executor.link.call((b"BLPOP", "lt:never", 2))
        assert time.monotonic() - t0 < 1.5
        await short.aclose()
        await ab.aclose()

    asyncio.run(main())


def test_msgpack_codec_encodes_as_packb_in_every_thread_and_after_a_failed_item() -> None:
    import copy

    import msgpack

    from redis_batcher.codec import MsgpackCodec, encode_item

    codec = MsgpackCodec()
    items: list[Any] = [{"id": i, "s": "é" * i, "b": b"\x00" * i, "l": [1.5, None, True]} for i in range(50)]
    expected = [msgpack.packb(item, use_bin_type=True) for item in items]
    with pytest.raises(rb.ItemEncodeError):
        encode_item(codec, {"ok": 1, "bad": object()}, 1 << 20)  # fails half-way through a map
    with pytest.raises(rb.ItemEncodeError):
        encode_item(codec, [1, 2**70], 1 << 20)
    assert [codec.encode(item) for item in items] == expected  # nothing left of the failed packs
    assert copy.deepcopy(codec).encode(items[3]) == expected[3]  # no per-instance state to copy

    results: dict[int, list[bytes]] = {}

    def encode_all(n: int) -> None:
        results[n] = [codec.encode(item) for _ in range(20) for item in items]

    threads = [threading.Thread(target=encode_all, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(got == expected * 20 for got in results.values())


def test_msgpack_decode_many_reads_every_key_type_and_refuses_a_bad_entry() -> None:
    import msgpack

    from redis_batcher.codec import MsgpackCodec

    codec = MsgpackCodec()
    plain = [codec.encode(item) for item in ({"a": 1}, "é", b"\xff", [1, {"k": None}])]
    assert codec.decode_many(plain) == [codec.decode(d) for d in plain]
    # a map with an int key makes the whole window go the slower way: the same result
    mixed = [*plain, codec.encode({1: "one", b"k": [2]})]
    assert codec.decode_many(mixed) == [{"a": 1}, "é", b"\xff", [1, {"k": None}], {1: "one", b"k": [2]}]
    assert codec.decode_many(iter(plain)) == codec.decode_many(plain)
    for bad in (b"\xc1", msgpack.packb(1) + msgpack.packb(2), msgpack.packb("abc")[:-1]):
        with pytest.raises(ValueError):
            codec.decode_many([*plain, bad])
