"""Iterator jobs' script calls as data, and how to read their replies (no I/O: the sync and
asyncio runners and handles run them through their executors)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from . import ops
from .errors import (
    CorruptData,
    JobExists,
    JobNotFound,
    JobStateError,
)
from .job_model import RATE_WINDOW_MS, IteratorConfig, JobKeys, JobStats, JobStatus, Page, validate_job_id
from .models import as_text, ms_to_dt
from .scripts import scripts

log = logging.getLogger("redis_batcher.jobs")


def _ms(seconds: float) -> int:
    # the scripts take times in ms; 0 would mean 'none' to some of them
    return max(1, round(seconds * 1000))


# -- script calls ----------------------------------------------------------------------------------


def _call(name: str, keys: JobKeys, key: str, *args: str | int) -> ops.Call:
    return ops.Call(scripts().scripts[name], (key, keys.guard), tuple(args))


def start_call(
    keys: JobKeys, config: IteratorConfig, job_id: str, params_json: str, overrides_json: str = ""
) -> ops.Call:
    """``config``: what the job runs with; ``overrides_json``: its own settings (job_overrides)."""
    return _call(
        "job_start",
        keys,
        keys.job(job_id),
        keys.pfx,
        job_id,
        config.name,
        params_json,
        config.to_json(),
        overrides_json,
    )


def claim_call(keys: JobKeys, config: IteratorConfig, limit: int, owner: str, label: str) -> ops.Call:
    return ops.Call(
        scripts().scripts["job_claim"],
        (keys.due, keys.guard),
        (keys.pfx, limit, _ms(config.lease_timeout), owner, label),
    )


def commit_call(
    keys: JobKeys,
    config: IteratorConfig,
    job_id: str,
    owner: str,
    cursor: str | None,
    count: int,
    exhausted: bool,
    step: int,
) -> ops.Call:
    """``step``: the step's number within this claim (1, 2, ...), so that a commit re-sent after
    a connection error that may have run is not counted twice."""
    return _call(
        "job_commit",
        keys,
        keys.job(job_id),
        keys.pfx,
        job_id,
        owner,
        "0" if cursor is None else "1",
        cursor or "",
        count,
        "1" if exhausted else "0",
        _ms(config.lease_timeout),
        step,
    )


def fail_call(keys: JobKeys, config: IteratorConfig, job_id: str, owner: str, error: str) -> ops.Call:
    return _call(
        "job_fail",
        keys,
        keys.job(job_id),
        keys.pfx,
        job_id,
        owner,
        error,
        config.max_attempts,
        _ms(config.retry_backoff),
        _ms(config.retry_backoff_max),
    )


def owner_call(name: str, keys: JobKeys, job_id: str, owner: str) -> ops.Call:
    """job_finish / job_release: the lease holder's token is the only argument."""
    return _call(name, keys, keys.job(job_id), keys.pfx, job_id, owner)


def extend_call(keys: JobKeys, config: IteratorConfig, job_id: str, owner: str) -> ops.Call:
    return _call("job_extend", keys, keys.job(job_id), keys.pfx, job_id, owner, _ms(config.lease_timeout))


def control_call(action: str, keys: JobKeys, job_id: str) -> ops.Call:
    """job_pause / job_resume / job_cancel / job_delete."""
    return _call(f"job_{action}", keys, keys.job(validate_job_id(job_id)), keys.pfx, job_id)


# -- replies -------------------------------------------------------------------------------------


@dataclass
class Claimed:
    """A job leased to this worker by job_claim.lua."""

    job_id: str
    owner: str
    cursor: str | None
    processed: int
    retries: int
    params: Any
    exhausted: bool
    overrides: dict[str, Any] = field(default_factory=dict)  # the job's own settings (JobOptions)


def parse_claim(owner: str, reply: Sequence[Any]) -> tuple[int, list[Claimed]]:
    """(ms until the earliest remaining entry is runnable, -1 for none; the claimed jobs)."""
    out: list[Claimed] = []
    for i in range(1, len(reply), 7):
        job_id, cursor, processed, retries, params, exhausted, overrides = reply[i : i + 7]
        out.append(
            Claimed(
                job_id=as_text(job_id),
                owner=owner,
                cursor=None if cursor is None else as_text(cursor),
                processed=int(processed),
                retries=int(retries),
                params=json.loads(params),
                exhausted=as_text(exhausted) == "1",
                overrides=_overrides(job_id, overrides),
            )
        )
    return int(reply[0]), out


def _overrides(job_id: Any, raw: Any) -> dict[str, Any]:
    """A job's stored overrides; {} (its iterator's settings) when there are none or they are
    not a JSON object (logged: only this library writes them)."""
    text = as_text(raw)
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        log.error("job %s: overrides %r are not a JSON object; the iterator's apply", as_text(job_id), text)
        return {}
    return data


def parse_start(iterator: str, job_id: str, reply: Sequence[Any]) -> None:
    if as_text(reply[0]) == "exists":
        raise JobExists(iterator, job_id, as_text(reply[1]))
    if as_text(reply[0]) == "corrupt":
        raise CorruptData(f"job {job_id!r} of {iterator!r}: {as_text(reply[1])}; nothing was written")


def parse_control(action: str, iterator: str, job_id: str, reply: Sequence[Any]) -> str:
    """The status the control script reports, or the exception its refusal means."""
    code, status = as_text(reply[0]), as_text(reply[1])
    if code == "corrupt":
        raise CorruptData(f"cannot {action} job {job_id!r} of {iterator!r}: {status}; nothing was written")
    if code == "missing":
        raise JobNotFound(f"no job {job_id!r} for iterator {iterator!r}")
    if code in ("invalid", "refused"):
        raise JobStateError(f"cannot {action} job {job_id!r} of {iterator!r}: it is {status}", status)
    return status


def rate(samples: Sequence[Any], processed: int, end_ms: float) -> float:
    """Items/s over the minute before ``end_ms`` from "<ms>:<processed>" samples and the current
    count: the growth since the oldest sample inside the window, over the time since it."""
    start = end_ms - RATE_WINDOW_MS
    oldest: tuple[int, int] | None = None
    for raw in samples:
        t_text, _, p_text = as_text(raw).partition(":")
        t, p = int(t_text), int(p_text)
        if t >= start and (oldest is None or t < oldest[0]):
            oldest = (t, p)
    if oldest is None or end_ms <= oldest[0]:
        return 0.0
    return max(processed - oldest[1], 0) * 1000.0 / (end_ms - oldest[0])


def parse_status(raw: dict[Any, Any], samples: Sequence[Any], now_ms: float) -> JobStatus:
    """A job hash (HGETALL) and its samples as a :class:`JobStatus`."""
    f = {as_text(k): as_text(v) for k, v in raw.items()}
    status = f["status"]
    processed = int(f.get("processed", "0"))
    last_run = int(f["last_run_at"]) if f.get("last_run_at") else None
    if status == "running":
        end = now_ms
    else:
        end = float(last_run) if last_run is not None else 0.0
    try:
        config: IteratorConfig | None = IteratorConfig.from_json(f["config"]) if "config" in f else None
    except (ValueError, TypeError):
        config = None
    return JobStatus(
        job_id=f.get("job_id", ""),
        iterator=f.get("iterator", ""),
        status=status,
        processed=processed,
        cursor=f.get("cursor"),
        retry_count=int(f.get("retries", "0")),
        error=f.get("error") or None,
        params=json.loads(f.get("params", "null")),
        config=config,
        created_at=ms_to_dt(f.get("created_at")),
        started_at=ms_to_dt(f.get("started_at")),
        updated_at=ms_to_dt(f.get("updated_at")),
        last_run_at=ms_to_dt(f.get("last_run_at")),
        finished_at=ms_to_dt(f.get("finished_at")),
        next_run_at=ms_to_dt(f.get("next_run_at")),
        worker=f.get("worker") or None,
        items_per_second=round(rate(samples, processed, end), 3) if end else 0.0,
        exhausted=f.get("exhausted") == "1",
    )


def step_saved(stats: JobStats, iterator: str, job_id: str, reply: Any, items: int) -> bool:
    """Count and log a job_commit.lua reply (None: it could not be written). True when the
    step was saved and the job goes on; False stops this runner's work on the job (its lease
    was lost, or the job was paused, cancelled, ... meanwhile)."""
    code = None if reply is None else as_text(reply)
    if code == "ok":
        stats.steps += 1
        stats.items += items
        return True
    if code == "lease_lost":
        stats.lease_lost += 1
        log.warning("%s %s: lease lost; another worker runs the job now", iterator, job_id)
    elif code == "corrupt":
        log.error("%s %s: its keys hold data this library did not write; step not saved", iterator, job_id)
    elif code is not None:
        log.info("%s %s: %s; stopping after the saved step", iterator, job_id, code)
    return False


def check_page(page: Any) -> Page:
    if not isinstance(page, Page):
        raise TypeError(f"next_batch must return a redis_batcher.Page, got {type(page).__name__}")
    if page.cursor is not None and not isinstance(page.cursor, str):
        raise TypeError(f"Page.cursor must be a str or None, got {type(page.cursor).__name__}")
    if isinstance(page.items, (str, bytes)) or not isinstance(page.items, Sequence):
        raise TypeError(f"Page.items must be a list, got {type(page.items).__name__}")
    return page
