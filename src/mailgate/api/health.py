"""/healthz (the process answers), /readyz (the database answers and, when this process runs a
worker, its claim loop is turning), /metrics (Prometheus text format)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .deps import Service, Who
from .errors import database_trouble, unavailable

if TYPE_CHECKING:
    from ..outbox.worker import Worker

router = APIRouter(tags=["health"])
READY_TIMEOUT = 5.0
# A route that found the database unavailable keeps /readyz failing this long: a full disk fails
# writes while the read /readyz makes itself still works.
TROUBLE_MEMORY = 30.0


def worker_alive(request: Request) -> bool | None:
    """None: no worker runs in this process. Else whether its claim loop turned lately."""
    worker = getattr(request.app.state, "worker", None)
    task = getattr(request.app.state, "worker_task", None)
    if worker is None or task is None:
        return None
    quiet = time.monotonic() - worker.heartbeat
    return not task.done() and quiet < max(30.0, 5 * worker.config.poll_interval)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Not ready: the database or the worker; `checks` says why."}})
async def readyz(request: Request, mg: Service) -> JSONResponse:
    """Ready: the database answers (within 5 s), no request found it unavailable in the last 30 s
    (a full disk, a lost connection), and this process's worker, if it runs one, is alive. A check
    that failed says why in a few words, never with the driver's text (it may quote a URL)."""
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(mg.ping(), READY_TIMEOUT)
    except TimeoutError:
        checks["database"] = f"failed: no answer within {READY_TIMEOUT:g} s"
    except Exception as e:  # any failure means not ready
        checks["database"] = f"failed: {unavailable(e) or 'error'} ({type(e).__name__})"
    else:
        trouble = database_trouble(request.app, TROUBLE_MEMORY)
        checks["database"] = "ok" if trouble is None else f"failed: {trouble[0]} ({trouble[1]}, in a recent request)"
    alive = worker_alive(request)
    checks["worker"] = {None: "not in this process", True: "ok", False: "stopped"}[alive]
    ready = checks["database"] == "ok" and alive is not False
    return JSONResponse({"status": "ok" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503)


class _Snapshot:
    """A collector over numbers gathered (asynchronously) just before the scrape is written."""

    def __init__(self, counts: dict[str, Any], connections: int | None, token_requests: int) -> None:
        self.counts, self.connections, self.token_requests = counts, connections, token_requests

    def collect(self) -> Any:
        messages = GaugeMetricFamily("mailgate_messages", "Messages in the outbox, by tenant and status.",
                                     labels=["tenant", "status"])  # fmt: skip
        for tenant, status, n in self.counts["messages"]:
            messages.add_metric([tenant, status], n)
        yield messages
        attempts = GaugeMetricFamily("mailgate_attempts", "Delivery attempts kept in the log, by outcome.",
                                     labels=["outcome"])  # fmt: skip
        for outcome, n in sorted(self.counts["attempts"].items()):
            attempts.add_metric([outcome], n)
        yield attempts
        queue = self.counts["queue"]
        yield GaugeMetricFamily("mailgate_queue_due", "Messages due for delivery now.", value=queue["due_now"])
        age = queue["oldest_waiting_age_s"]
        yield GaugeMetricFamily("mailgate_queue_oldest_age_seconds", "Age of the oldest message not yet done.",
                                value=age or 0.0)  # fmt: skip
        if self.connections is not None:
            yield GaugeMetricFamily("mailgate_pool_connections", "SMTP connections this process's worker holds open.",
                                    value=self.connections)  # fmt: skip
        yield CounterMetricFamily("mailgate_token_requests", "OAuth token requests this process sent.",
                                  value=self.token_requests)  # fmt: skip


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request, mg: Service, who: Who) -> Response:
    """Prometheus metrics, for a system-admin token (they name every tenant): in Prometheus,
    `authorization: {credentials: mgt_…}` in the scrape config."""
    who.must_be("system-admin")
    worker: Worker | None = getattr(request.app.state, "worker", None)
    registry = CollectorRegistry(auto_describe=False)
    snapshot = _Snapshot(await mg.queue.counts(), worker.pools.open_connections if worker else None,
                         mg.tokens.requests)  # fmt: skip
    registry.register(snapshot)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
