"""A FastAPI service that batches incoming events per user in Redis with redis-batcher (asyncio).

Every ``POST /events/{user_id}`` appends one event to the batch id ``user:<user_id>`` with
``await events.add(...)``: concurrent requests handled by one event-loop iteration share a
single round trip to Redis (group commit), and each request still gets its own ``AddResult``.
A worker delivers each batch (100 events, or whatever accumulated after 1 s) to the async
handler below, which appends it to the Redis list ``fastapi-demo:processed``.

Run (from the repository root; ``pip install -e . fastapi uvicorn``)::

    export REDIS_URL=redis://127.0.0.1:6379/0
    uvicorn examples.fastapi_app:app                          # the API
    redis-batcher worker examples.fastapi_app:abatcher        # the worker (a separate process)

    curl -X POST localhost:8000/events/42 -H 'content-type: application/json' -d '{"type": "click"}'
    curl localhost:8000/batches/42
    curl -X POST localhost:8000/batches/42/flush

Endpoints:

- ``POST /events/{user_id}`` (a JSON object) -> 202 with the ``AddResult``
- ``POST /events/{user_id}/bulk`` (a JSON list of objects) -> 202 with the ``AddResult`` of ``add_many``
- ``GET /batches/{user_id}`` -> the ``BatchStatus`` of the user's batch id, 404 when nothing is pending
- ``POST /batches/{user_id}/flush`` -> the ``FlushResult`` (seal now: due to the worker at once)

Errors of the library map to HTTP: a bad batch id or item -> 422, an unknown batch id -> 404,
``BatchFull`` -> 429. Lifespan: processor configs are published to Redis at startup (so
``redis-batcher status user:42 --processor events --prefix fastapi-demo`` works at once) and the
connection pool is closed at shutdown.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

import redis_batcher
import redis_batcher.asyncio

PREFIX = "fastapi-demo"
PROCESSED_KEY = f"{PREFIX}:processed"

abatcher = redis_batcher.asyncio.Batcher(
    os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), prefix=PREFIX
)


@abatcher.processor(name="events", max_batch_size=100, flush_interval=1.0)
async def events(flush: redis_batcher.Flush) -> None:
    """Deliver one batch: append it, as one JSON record, to the list ``fastapi-demo:processed``.

    A real handler would bulk-insert ``flush.items`` somewhere. A batch is redelivered (with the
    same ``flush_id``) only if a worker died mid-handler, so consumers can deduplicate on it.
    ``abatcher.client`` is the worker's connection (``--redis-url`` rebinds it)."""
    record = {
        "batch_id": flush.batch_id,
        "sequence": flush.sequence,
        "flush_id": flush.flush_id,
        "attempt": flush.attempt,
        "reason": flush.reason,
        "items": flush.items,
    }
    await abatcher.client.rpush(PROCESSED_KEY, json.dumps(record))


def batch_id(user_id: str) -> str:
    return f"user:{user_id}"


def create_app(processor: redis_batcher.asyncio.AsyncProcessor = events) -> FastAPI:
    """The API for ``processor`` (the module-level ``events`` by default)."""
    batcher = processor.batcher

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.register()
        try:
            yield
        finally:
            await batcher.aclose()

    app = FastAPI(title="redis-batcher FastAPI example", lifespan=lifespan)

    @app.exception_handler(redis_batcher.BatcherError)
    async def batcher_error(request: Request, exc: redis_batcher.BatcherError) -> JSONResponse:
        if isinstance(exc, redis_batcher.BatchNotFound):
            code = 404
        elif isinstance(exc, redis_batcher.BatchFull):
            code = 429
        elif isinstance(exc, (redis_batcher.InvalidBatchId, redis_batcher.ItemError)):
            code = 422
        else:
            code = 500
        return JSONResponse({"detail": str(exc), "error": type(exc).__name__}, status_code=code)

    @app.post("/events/{user_id}", status_code=202)
    async def add_event(user_id: str, event: dict[str, Any]) -> redis_batcher.AddResult:
        return await processor.add(batch_id(user_id), event)

    @app.post("/events/{user_id}/bulk", status_code=202)
    async def add_events(user_id: str, items: list[dict[str, Any]]) -> redis_batcher.AddResult:
        return await processor.add_many(batch_id(user_id), items)

    @app.get("/batches/{user_id}")
    async def batch_status(user_id: str) -> redis_batcher.BatchStatus:
        status = await processor.status(batch_id(user_id))
        if status is None:
            raise HTTPException(404, f"nothing pending for {batch_id(user_id)!r}")
        return status

    @app.post("/batches/{user_id}/flush")
    async def flush_batch(user_id: str) -> redis_batcher.FlushResult:
        return await processor.flush(batch_id(user_id))

    return app


app = create_app()
