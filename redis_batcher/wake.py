"""Wake-ups: how idle workers hear that something of a partition is due.

Each partition has its own channel, ``<pfx>wake`` (``rb:{events:0}:wake``): it carries the
partition's hash tag, so it hashes to the partition's slot. The scripts that make something due
at once (a sealed sequence, an earlier timer, a manual flush, a release, a replay) publish the
partition's prefix there: ``SPUBLISH`` on Redis 7+, sharded pub/sub, which only the nodes
serving the slot deliver and a cluster never broadcasts over its bus; ``PUBLISH`` on older
servers. ``publish_wake`` (``lua/includes/publish_wake.lua``) asks the server it runs on (is
``redis.REDIS_VERSION_NUM`` set?): no argument is sent for it, and an add that wakes nobody does
no work for it. A worker subscribes to the channels of the partitions it serves, asking its
server the same question once per connection: ``SSUBSCRIBE`` on Redis 7+, else ``SUBSCRIBE``.

Every worker serving a partition hears its wake-ups, but a wake-up is a token: the script that
publishes it sets ``<pfx>woke``, and only the woken worker whose ``DEL`` of that key answers 1
claims (one with a free slot; see ``WorkerCore.on_wake``). A listener only records what it heard.

On Redis Cluster a sharded subscription is made on the node serving the channel's slot: the
channels are grouped by node (the cluster client's slot map), one subscription per node. When a
slot moves to another node (resharding, failover), its old node drops the subscription (a
``sunsubscribe`` message) or the connection fails; the cluster client is then made to learn the
new layout (a read of each of those channel names as a key: redis-py follows the MOVED reply and
updates its map, or reloads the layout after a connection error) and those channels are
subscribed again where they now live. After each (re)subscription every partition is checked,
since a wake-up sent meanwhile was lost; the worker's timed full check (``max_idle_wait``)
stays the safety net for anything else.

The sync worker listens with a thread per node (redis-py's sync pub/sub waits on one connection
at a time), the asyncio worker with a task per node. Only redis-py's public API is used (a
node's own client, ``PubSub``); redis-py's cluster pub/sub is not, because before 8.x it neither
waits for sharded messages nor follows a slot that moved.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.exceptions import RedisError, ResponseError

log = logging.getLogger("redis_batcher.worker")

POLL = 1.0  # seconds a listener waits for a message before it looks whether to stop
MAX_DELAY = 5.0  # longest wait before subscribing again after a failure

OnWake = Callable[[Any], None]  # a wake-up's payload: the partition prefix
OnReady = Callable[[], None]  # (re)subscribed: check every partition


class SlotMoved(RedisError):
    """The server dropped a subscription by itself: the channel's slot moved to another node."""


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# what publish_wake (lua/includes/publish_wake.lua) goes by: redis.REDIS_VERSION_NUM is set from
# Redis 7.0 on, with sharded pub/sub; asked the same way, a worker and the scripts never disagree
PROBE = "return redis.REDIS_VERSION_NUM and 1 or 0"


def sharded(client: Any) -> bool:
    """Whether the scripts publish wake-ups with ``SPUBLISH`` on ``client``'s server (one node):
    Redis 7+. Asked with the scripts' own test (:data:`PROBE`)."""
    return bool(client.execute_command("EVAL", PROBE, 0))


async def asharded(client: Any) -> bool:
    """:func:`sharded` for a ``redis.asyncio`` client."""
    return bool(await client.execute_command("EVAL", PROBE, 0))


class _Reader:
    """What the messages of one subscription mean (shared by the sync and asyncio listeners)."""

    def __init__(self, channels: Sequence[str], on_wake: OnWake, on_ready: OnReady) -> None:
        self.on_wake = on_wake
        self.on_ready = on_ready
        self.unconfirmed = len(channels)

    def read(self, msg: dict[str, Any] | None) -> None:
        if msg is None:
            return
        kind = _text(msg.get("type"))
        if kind in ("message", "smessage"):
            self.on_wake(msg.get("data"))
        elif kind in ("subscribe", "ssubscribe"):
            # every channel is subscribed once the last confirmation is here: from then on no
            # wake-up can be missed, so that is when every partition is checked
            self.unconfirmed -= 1
            if self.unconfirmed == 0:
                self.on_ready()
        elif kind in ("unsubscribe", "sunsubscribe"):
            # never asked for: the server dropped the channel (its slot left this node)
            raise SlotMoved(f"the server dropped the subscription to {_text(msg.get('channel'))}")


# -- sync ----------------------------------------------------------------------------------------


def listen(
    client: Any, channels: Sequence[str], on_wake: OnWake, on_ready: OnReady, stop: threading.Event
) -> None:
    """Call ``on_wake(payload)`` for each wake-up on ``channels`` and ``on_ready()`` after each
    (re)subscription, until ``stop`` is set. Failures are logged and retried with backoff."""
    lock = threading.Lock()  # the callbacks are called from one thread at a time
    delay = [0.1]

    def wake(data: Any) -> None:
        with lock:
            on_wake(data)

    def ready() -> None:
        delay[0] = 0.1
        with lock:
            on_ready()

    while not stop.is_set():
        try:
            if isinstance(client, redis.RedisCluster):
                _listen_cluster(client, channels, wake, ready, stop)
            else:
                listen_node(client, channels, wake, ready, stop)
        except Exception as exc:  # subscribe again with backoff, whatever went wrong
            log.debug("wake-up subscription failed: %s", exc)
            stop.wait(delay[0])
            delay[0] = min(delay[0] * 2, MAX_DELAY)


def listen_node(
    client: Any, channels: Sequence[str], on_wake: OnWake, on_ready: OnReady, stop: threading.Event
) -> None:
    """Subscribe to ``channels`` on one server (sharded where it has it) and read until ``stop``;
    raises when the connection fails or the server dropped a channel (:class:`SlotMoved`)."""
    shard = sharded(client)
    pubsub = client.pubsub()
    try:
        for channel in channels:  # on a cluster one SSUBSCRIBE takes channels of one slot only
            if shard:
                pubsub.ssubscribe(channel)
            else:
                pubsub.subscribe(channel)
        reader = _Reader(channels, on_wake, on_ready)
        while not stop.is_set():
            reader.read(pubsub.get_message(timeout=POLL))
    finally:
        try:
            pubsub.close()
        except Exception:
            pass


def by_node(cluster: Any, channels: Sequence[str]) -> dict[str, tuple[Any, tuple[str, ...]]]:
    """The channels grouped by the node serving their slot, by the cluster client's map:
    node name -> (node, its channels in order)."""
    groups: dict[str, tuple[Any, list[str]]] = {}
    for channel in channels:
        node = cluster.get_node_from_key(channel)
        groups.setdefault(node.name, (node, []))[1].append(channel)
    return {name: (node, tuple(chs)) for name, (node, chs) in groups.items()}


def relearn(cluster: Any, channels: Sequence[str]) -> None:
    """Make a cluster client learn where ``channels``' slots live now: a read of each name as a
    key (it holds nothing) goes to the node the client's map names; a MOVED reply makes redis-py
    update its map, a failed connection makes it reload the layout."""
    for channel in channels:
        try:
            cluster.exists(channel)
        except RedisError as exc:
            log.debug("cluster layout check on %s: %s", channel, exc)


class _NodeListener(threading.Thread):
    def __init__(
        self,
        name: str,
        client: Any,
        channels: tuple[str, ...],
        on_wake: OnWake,
        on_ready: OnReady,
        ended: threading.Event,
    ) -> None:
        super().__init__(name=f"rb-wake {name}", daemon=True)
        self.node = name
        self.client = client
        self.channels = channels
        self.on_wake = on_wake
        self.on_ready = on_ready
        self.ended = ended
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            listen_node(self.client, self.channels, self.on_wake, self.on_ready, self.stop)
        except BaseException as exc:
            self.error = exc
        finally:
            self.ended.set()


def _listen_cluster(
    cluster: Any, channels: Sequence[str], on_wake: OnWake, on_ready: OnReady, stop: threading.Event
) -> None:
    """One listener thread per node serving some of ``channels``. When one ends (its slot moved,
    its node failed) the cluster client relearns those channels' places, and the nodes whose
    share changed are subscribed again; the others keep listening."""
    running: dict[str, _NodeListener] = {}
    ended = threading.Event()
    delay = 0.1
    try:
        while not stop.is_set():
            groups = by_node(cluster, channels)
            for name, t in list(running.items()):
                if not t.is_alive() or groups.get(name, (None, ()))[1] != t.channels:
                    t.stop.set()
                    t.join()
                    del running[name]
            for name, (node, chs) in groups.items():
                if name not in running:
                    t = _NodeListener(name, cluster.get_redis_connection(node), chs, on_wake, on_ready, ended)
                    t.start()
                    running[name] = t
            while not ended.wait(0.5):
                if stop.is_set():
                    return
            ended.clear()
            gone = [t for t in running.values() if not t.is_alive()]
            failed = [t.error for t in gone if t.error is not None and not isinstance(t.error, SlotMoved)]
            for t in gone:
                log.debug("wake-up subscription on %s ended: %s", t.node, t.error)
            relearn(cluster, [ch for t in gone for ch in t.channels])
            if failed:  # a node failed (or is failing over): not at once again
                stop.wait(delay)
                delay = min(delay * 2, MAX_DELAY)
            else:
                delay = 0.1
    finally:
        for t in running.values():
            t.stop.set()
        for t in running.values():
            t.join()


# -- asyncio -------------------------------------------------------------------------------------


async def _aclose(resource: Any) -> None:
    """Close a ``redis.asyncio`` client or pubsub (``aclose()`` since redis-py 5.0.1)."""
    close = getattr(resource, "aclose", None)
    await (close() if close is not None else resource.close())


async def alisten(client: Any, channels: Sequence[str], on_wake: OnWake, on_ready: OnReady) -> None:
    """:func:`listen` for a ``redis.asyncio`` client: runs until cancelled."""
    import redis.asyncio as aioredis

    delay = [0.1]

    def ready() -> None:
        delay[0] = 0.1
        on_ready()

    while True:
        try:
            if isinstance(client, aioredis.RedisCluster):
                await _alisten_cluster(client, channels, on_wake, ready)
            else:
                await alisten_node(client, channels, on_wake, ready)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # subscribe again with backoff, whatever went wrong
            log.debug("wake-up subscription failed: %s", exc)
            await asyncio.sleep(delay[0])
            delay[0] = min(delay[0] * 2, MAX_DELAY)


async def alisten_node(client: Any, channels: Sequence[str], on_wake: OnWake, on_ready: OnReady) -> None:
    """:func:`listen_node` for a ``redis.asyncio`` client: reads until cancelled or it fails."""
    shard = await asharded(client)
    pubsub = client.pubsub()
    try:
        for channel in channels:  # on a cluster one SSUBSCRIBE takes channels of one slot only
            if not shard:
                await pubsub.subscribe(channel)
            elif hasattr(pubsub, "ssubscribe"):  # redis-py 8+
                await pubsub.ssubscribe(channel)
            else:  # the command itself; its messages are read as any others
                await pubsub.execute_command("SSUBSCRIBE", channel)
        reader = _Reader(channels, on_wake, on_ready)
        while True:
            reader.read(await pubsub.get_message(timeout=POLL))
    finally:
        try:
            await _aclose(pubsub)
        except Exception:
            pass


async def _anode_listen(node: Any, channels: Sequence[str], on_wake: OnWake, on_ready: OnReady) -> None:
    """Listen on one node of a ``redis.asyncio`` cluster client, over a pool of its own made
    like the node's (the node's connection class and settings)."""
    import redis.asyncio as aioredis

    pool = aioredis.ConnectionPool(connection_class=node.connection_class, **node.connection_kwargs)
    client = aioredis.Redis(connection_pool=pool)
    try:
        await alisten_node(client, channels, on_wake, on_ready)
    finally:
        try:
            await _aclose(client)
            await pool.disconnect()
        except Exception:
            pass


async def _arelearn(cluster: Any, channels: Sequence[str]) -> None:
    """:func:`relearn` for a ``redis.asyncio`` cluster client."""
    for channel in channels:
        try:
            await cluster.exists(channel)
        except RedisError as exc:
            log.debug("cluster layout check on %s: %s", channel, exc)


async def _alisten_cluster(cluster: Any, channels: Sequence[str], on_wake: OnWake, on_ready: OnReady) -> None:
    """:func:`_listen_cluster` with a task per node."""
    running: dict[str, tuple[tuple[str, ...], asyncio.Future[None]]] = {}
    delay = 0.1
    try:
        while True:
            await cluster.initialize()
            groups = by_node(cluster, channels)
            for name, (chs, task) in list(running.items()):
                if task.done() or groups.get(name, (None, ()))[1] != chs:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    del running[name]
            for name, (node, chs) in groups.items():
                if name not in running:
                    running[name] = (chs, asyncio.ensure_future(_anode_listen(node, chs, on_wake, on_ready)))
            await asyncio.wait([task for _, task in running.values()], return_when=asyncio.FIRST_COMPLETED)
            gone = [(chs, task) for chs, task in running.values() if task.done()]
            errors = [task.exception() for _, task in gone if not task.cancelled()]
            for error in errors:
                log.debug("wake-up subscription on a node ended: %s", error)
            await _arelearn(cluster, [ch for chs, _ in gone for ch in chs])
            if any(e is not None and not isinstance(e, SlotMoved) for e in errors):
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_DELAY)
            else:
                delay = 0.1
    finally:
        for _, task in running.values():
            task.cancel()
        await asyncio.gather(*(task for _, task in running.values()), return_exceptions=True)


def subscribers(client: Any, channel: str) -> int:
    """How many connections of ``client``'s server (one node) listen on a wake-up ``channel``:
    sharded subscriptions and plain ones (``PUBSUB SHARDNUMSUB``, ``NUMSUB``)."""
    count = 0
    for sub in ("SHARDNUMSUB", "NUMSUB"):
        try:
            reply = client.execute_command("PUBSUB", sub, channel)
        except ResponseError:  # no SHARDNUMSUB before Redis 7
            continue
        count += int(reply[1]) if isinstance(reply, (list, tuple)) and len(reply) > 1 else 0
    return count
