"""The ``maxmemory-policy`` checks: reading a server's policy and refusing one that may evict
queued items (shared by the sync and asyncio batchers)."""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import ResponseError

from .errors import EvictionPolicyError

log = logging.getLogger("redis_batcher")


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None if value is None else str(value)


def policy_from_info(info: Any) -> str | None:
    """``maxmemory_policy`` of an ``INFO memory`` reply (None when it has none)."""
    return _text(info.get("maxmemory_policy")) if isinstance(info, dict) else None


def policy_from_config(reply: Any) -> str | None:
    """``maxmemory-policy`` of a ``CONFIG GET maxmemory-policy`` reply (None when absent)."""
    if isinstance(reply, dict):
        for key, value in reply.items():
            if _text(key) == "maxmemory-policy":
                return _text(value)
    return None


def policy_evicts(policy: str) -> bool:
    """True for a ``maxmemory-policy`` that may evict keys without a TTL, the only kind the
    library's undelivered items are."""
    return policy != "noeviction" and not policy.startswith("volatile-")


def judge_memory_policy(policy: str | None, node: str | None, *, allow_eviction: bool, logged: bool) -> bool:
    """Refuse an evicting ``policy`` (read from ``node``, None: the only server) unless
    ``allow_eviction``; say once (unless ``logged`` says it was said already) when the server
    could not tell or eviction is allowed. Returns whether it has been said now. Shared by
    the sync and asyncio batchers."""
    if policy is None:
        if not logged:
            log.debug("Redis does not report its maxmemory-policy (INFO and CONFIG refused)")
        return True
    if not policy_evicts(policy):
        return logged
    if not allow_eviction:
        raise EvictionPolicyError(policy, node)
    if not logged:
        log.warning(
            "Redis maxmemory-policy is %r%s: queued items can be evicted (allow_eviction=True)",
            policy,
            f" on {node}" if node else "",
        )
    return True


def read_memory_policy(client: Any) -> str | None:
    """The ``maxmemory-policy`` of the server behind a sync client: from ``INFO memory`` (which
    managed services allow), else ``CONFIG GET``; None when it answers neither."""
    try:
        policy = policy_from_info(client.info("memory"))
    except ResponseError:  # an unknown command (a Redis-like server), an ACL refusal
        policy = None
    if policy is None:
        try:
            policy = policy_from_config(client.config_get("maxmemory-policy"))
        except ResponseError:
            policy = None
    return policy
