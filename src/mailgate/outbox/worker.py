"""The delivery worker: claims due messages, sends each through its tenant's resolved mail server,
and records what happened to every recipient.

A claim loop keeps a small queue of claimed messages (each claim is a lease) topped up;
`concurrency` senders take from it and send each through its tenant's resolved server; a recorder
writes the outcomes as they come. A stop (SIGTERM) gives back what no sender has taken, lets the
sends under way finish — up to `stop_grace` — and records them; nothing is lost. A worker that
dies instead leaves leases that run out, and another worker takes those messages over, saying in
the attempt log that they may have been delivered already.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from ..config import Config
from ..db.models import now
from ..delivery import Delivery, Outcome
from ..errors import DeliveryError, InvalidInput, MessageError, NotFound
from ..message import Envelope
from ..oauth.cache import TokenCache
from ..settings.store import Resolution, Servers
from ..smtp.errors import SMTPNotSupportedError
from ..transports.pool import Pools
from .retry import retry_delay
from .store import ACCEPTED, DEFERRED, FAILED, HELD, PENDING, REFUSED, SENT, Claimed, Outbox, RecipientState
from .store import Outcome as Recorded

log = logging.getLogger("mailgate.worker")
protocol_log = logging.getLogger("mailgate.protocol")

Finish = Callable[..., Recorded]  # builds the Outcome of the attempt under way

DATABASE_ERRORS = (SQLAlchemyError, OSError)
MAX_BACKOFF = 30.0  # seconds between tries while the database is away
HOUSEKEEPING_EVERY = 5.0  # seconds: release held messages whose tenants may send again
PURGE_EVERY = 600.0


@dataclass
class WorkerStats:
    claimed: int = 0
    sent: int = 0
    deferred: int = 0
    failed: int = 0
    released: int = 0


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


class Worker:
    def __init__(
        self,
        outbox: Outbox,
        servers: Servers,
        config: Config,
        *,
        name: str | None = None,
        tokens: TokenCache | None = None,
    ) -> None:
        self.outbox = outbox
        self.servers = servers
        self.config = config
        self.name = name or worker_name()
        self.stats = WorkerStats()
        self._pools = Pools(
            lambda prefix: lambda line: protocol_log.info("%s %s", prefix, line),
            tokens=tokens,
            store_refresh_token=servers.store_refresh_token,
        )
        self._rng = random.Random()
        # Claimed messages waiting for a free sender, with their tenants' resolutions.
        self._queue: asyncio.Queue[tuple[Claimed, Resolution | None] | None] = asyncio.Queue()
        # Wakes the claim loop: the queue ran low, the worker went idle, or it is stopping.
        self._wake = asyncio.Event()
        self._busy = 0
        # Claim again once the queue is down to this: half of what the senders can take at once.
        self._low_water = max(1, config.concurrency // 2)
        self._untried: list[int] = []  # taken from the queue after a stop: given back unsent
        self._housekeeping_at = self._purge_at = 0.0

    async def run(self, stop: asyncio.Event | None = None, *, until_idle: bool = False) -> WorkerStats:
        """Deliver until `stop` is set (or, with `until_idle`, until nothing is due).

        The claim loop keeps up to about `concurrency` messages waiting for the senders, never
        many more (leases should not run out in a queue), and claims again when half are taken.
        """
        stop = stop or asyncio.Event()
        recorder = _Recorder(self.outbox, self.name, self.config.stop_grace)
        senders = [asyncio.create_task(self._sender(recorder, stop)) for _ in range(self.config.concurrency)]
        relay = asyncio.create_task(self._relay(stop))
        backoff = self.config.poll_interval
        log.info("worker %s started", self.name)
        try:
            while not stop.is_set():
                try:
                    if not await self._step(recorder, until_idle):
                        break
                    backoff = self.config.poll_interval
                except DATABASE_ERRORS as e:
                    # The database is away for a while: try again, never give up the worker.
                    log.warning("the database failed (%s); trying again in %.1f s", _first_line(e), backoff)
                    await self._pause(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
        finally:
            relay.cancel()
            await self._shut_down(senders, recorder)
            log.info("worker %s stopped: %s", self.name, self.stats)
        return self.stats

    async def _step(self, recorder: _Recorder, until_idle: bool) -> bool:
        """One turn of the claim loop: housekeeping when due, then claim or wait. False: done."""
        loop = asyncio.get_running_loop()
        if loop.time() >= self._housekeeping_at:
            await self._release_held()
            self._housekeeping_at = loop.time() + HOUSEKEEPING_EVERY
        if loop.time() >= self._purge_at:
            bodies, lines = await self.outbox.purge()
            if bodies or lines:
                log.info("purged %d message bodies and %d old messages", bodies, lines)
            self._purge_at = loop.time() + PURGE_EVERY
        if recorder.failing or self._queue.qsize() > self._low_water:
            # Nothing new is sent while outcomes can't be written: each would be sent again.
            await self._pause(self.config.poll_interval)
            return True
        batch = await self.outbox.claim(self.name, self.config.batch_size)
        if batch:
            self.stats.claimed += len(batch)
            try:
                resolutions = await self._resolve(batch)
            except BaseException:
                with contextlib.suppress(*DATABASE_ERRORS):
                    await self.outbox.release(self.name, [c.pk for c in batch])
                raise
            for c in batch:
                self._queue.put_nowait((c, resolutions[c.tenant_id]))
            return True
        if until_idle and self._queue.empty() and self._busy == 0:
            return False
        await self._pause(self.config.poll_interval)
        return True

    async def _pause(self, timeout: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _relay(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()

    async def _resolve(self, batch: list[Claimed]) -> dict[str, Resolution | None]:
        resolutions: dict[str, Resolution | None] = {}
        for tenant in {c.tenant_id for c in batch}:
            try:
                resolutions[tenant] = await self.servers.resolve(tenant)
            except NotFound:
                resolutions[tenant] = None  # the tenant was removed
        return resolutions

    async def _sender(self, recorder: _Recorder, stop: asyncio.Event) -> None:
        while (item := await self._queue.get()) is not None:
            if self._queue.qsize() <= self._low_water:
                self._wake.set()  # time to claim more
            c, resolution = item
            if stop.is_set():  # stopping: no new sends; given back at shut-down
                self._untried.append(c.pk)
                continue
            self._busy += 1
            try:
                outcome = await self._attempt(c, resolution)
            finally:
                self._busy -= 1
                if self._busy == 0:
                    self._wake.set()  # idle: until_idle may be done
            recorder.add(outcome)
            self._count(outcome)

    async def _shut_down(self, senders: list[asyncio.Task[None]], recorder: _Recorder) -> None:
        """Give back what no sender has taken yet, let the sends under way finish (at most
        `stop_grace`, then they are interrupted and recorded as such), write every outcome."""
        untried = self._untried
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None:
                untried.append(item[0].pk)
        for _ in senders:
            self._queue.put_nowait(None)
        _, late = await asyncio.wait(senders, timeout=self.config.stop_grace)
        for task in late:
            task.cancel()  # _attempt records an interrupted send as such
        await asyncio.gather(*senders, return_exceptions=True)
        await recorder.close()
        if untried:
            self.stats.released += await self.outbox.release(self.name, untried)
        await self._pools.aclose()

    def _count(self, o: Recorded) -> None:
        if o.status == SENT:
            self.stats.sent += 1
        elif o.status == FAILED:
            self.stats.failed += 1
        else:
            self.stats.deferred += 1

    async def _release_held(self) -> None:
        for tenant in await self.outbox.held_tenants():
            try:
                resolution = await self.servers.resolve(tenant, secrets=False)
            except NotFound:
                continue
            if not resolution.disabled:
                log.info("sending is enabled again for %s: released %d held messages", tenant,
                         await self.outbox.release_held(tenant))  # fmt: skip

    # ---- one message -------------------------------------------------------------------------

    async def _attempt(self, c: Claimed, resolution: Resolution | None) -> Recorded:
        started_at = now()
        t0 = time.monotonic()

        def finish(outcome: str, text: str, **kw: Any) -> Recorded:
            kw.setdefault("status", DEFERRED)
            kw.setdefault("due_at", None)
            if c.previous_owner:
                took_over = (f"took over from worker {c.previous_owner}, whose lease ran out: it may have "
                             "delivered this message already")  # fmt: skip
                kw["note"] = took_over + ("; " + kw["note"] if kw.get("note") else "")
            kw["attempts_before"] = c.attempts
            return Recorded(c.pk, started_at, int((time.monotonic() - t0) * 1000), outcome, text, **kw)

        if resolution is None:
            gone = "the tenant was removed"
            return self._settle(c, finish, _every(c, (REFUSED, None, None, gone)), "permanent", gone)
        if resolution.server is None:
            if self.config.hold_when_disabled:
                return finish("held", resolution.reason, status=HELD, count_attempt=False, last_error=resolution.reason)
            return self._retry_later(c, finish, "transient", resolution.reason, None, server=None)
        server, server_id, version = resolution.server, resolution.server_id, resolution.version
        where: dict[str, Any] = {"server_scope": resolution.source, "server_id": server_id, "server_version": version}
        if resolution.broken_reason:  # marked earlier: wait, without trying
            return self._wait_for_fix(finish, resolution.broken_reason, count_attempt=False, **where)

        message = server.fill_in(c.message)
        pending = {address: pos for pos, address in c.pending}
        try:
            sender = server.envelope_from or message.sender().envelope_form(False)
            envelope = Envelope(sender, tuple(pending))
            assert server_id is not None and version is not None
            async with self._pools.get(server_id, version, server).transport() as transport:
                where["server"] = transport.server
                delivery = await transport.send(envelope, message)
        except asyncio.CancelledError:
            why = "the worker stopped during the send; the server may have accepted the message"
            return self._retry_later(c, finish, "transient", why, None, note=why, **where)
        except DeliveryError as e:
            if e.transient:
                return self._retry_later(c, finish, "transient", e.message, e.retry_after, code=e.code,
                                         enhanced=e.enhanced, **where)  # fmt: skip
            if isinstance(e, SMTPNotSupportedError):  # this message, not the server
                refused = _every(c, (REFUSED, e.code, e.enhanced, e.message))
                return self._settle(c, finish, refused, "permanent", e.message, code=e.code, enhanced=e.enhanced,
                                    **where)  # fmt: skip
            return await self._broken(c, finish, e.message, code=e.code, enhanced=e.enhanced, **where)
        except MessageError as e:
            return self._settle(c, finish, _every(c, (REFUSED, None, None, str(e))), "permanent", str(e), **where)
        except InvalidInput as e:  # the stored settings can't send (e.g. no token source yet)
            return await self._broken(c, finish, str(e), **where)
        return self._record_delivery(c, finish, delivery, pending, where)

    def _record_delivery(
        self, c: Claimed, finish: Finish, delivery: Delivery, pending: dict[str, int], where: dict[str, Any]
    ) -> Recorded:
        recipients: dict[int, RecipientState] = {}
        transient = []
        for r in delivery.results:
            pos = pending[r.recipient]
            if r.outcome is Outcome.ACCEPTED:
                recipients[pos] = (ACCEPTED, r.code, r.enhanced, r.text)
            elif r.outcome is Outcome.PERMANENT:
                recipients[pos] = (REFUSED, r.code, r.enhanced, r.text)
            else:
                recipients[pos] = (PENDING, r.code, r.enhanced, r.text)
                transient.append(r)
        results = [r.to_dict() for r in delivery.results]
        worst = next((r for r in delivery.results if not r.accepted), delivery.results[0])
        kinds = {r.outcome for r in delivery.results}
        outcome = next(iter(kinds)).value if len(kinds) == 1 else "mixed"
        note = None
        if any(r.uncertain for r in delivery.results):
            note = "the connection broke after the message was sent: the server may have accepted it"
        kw = {"code": worst.code, "enhanced": worst.enhanced, "results": results, "note": note, **where}
        text = _reply_text(worst.code, worst.enhanced, worst.text)
        if transient:
            return self._retry_later(c, finish, outcome, text, delivery.retry_after, recipients=recipients, **kw)
        return self._settle(c, finish, recipients, outcome, text, **kw)

    def _retry_later(
        self, c: Claimed, finish: Finish, outcome: str, text: str, retry_after: float | None, **kw: Any
    ) -> Recorded:
        recipients = kw.pop("recipients", {})
        delay = retry_delay(c.attempts + 1, self.config, retry_after=retry_after, rng=self._rng)
        due = now() + timedelta(seconds=delay)
        if due > c.expires_at:  # the maximum age: give up on those still pending
            gave_up = f"gave up: still failing after {_age(c.created_at)} ({text})"
            for pos, _address in c.pending:
                st, code, enhanced, _ = recipients.get(pos, (PENDING, kw.get("code"), kw.get("enhanced"), text))
                if st == PENDING:
                    recipients[pos] = (REFUSED, code, enhanced, gave_up)
            return self._settle(c, finish, recipients, outcome, text, note=_join(kw.pop("note", None), gave_up), **kw)
        return finish(outcome, text, status=DEFERRED, due_at=due, recipients=recipients, last_error=text, **kw)

    def _settle(
        self, c: Claimed, finish: Finish, recipients: dict[int, RecipientState],
        outcome: str, text: str, **kw: Any,
    ) -> Recorded:  # fmt: skip
        """Every recipient has its final answer: sent if any accepted (now or before), else failed."""
        accepted = c.accepted_before + sum(1 for st, *_ in recipients.values() if st == ACCEPTED)
        status = SENT if accepted else FAILED
        last_error = None if status == SENT and all(st == ACCEPTED for st, *_ in recipients.values()) else text
        return finish(outcome, text, status=status, due_at=None, recipients=recipients, last_error=last_error, **kw)

    async def _broken(self, c: Claimed, finish: Finish, reason: str, **kw: Any) -> Recorded:
        """The server refused us in a way that won't mend by itself: mark it, and let its messages
        wait for new settings instead of hammering it."""
        server_id, version = kw["server_id"], kw["server_version"]
        if await self.servers.mark_broken(server_id, version, reason):
            log.warning("mail server %s (version %s) marked broken: %s", server_id, version, reason)
        return self._wait_for_fix(finish, reason, **kw)

    def _wait_for_fix(self, finish: Finish, reason: str, **kw: Any) -> Recorded:
        """The message waits for the broken server's settings to be saved (or re-checks later)."""
        due = now() + timedelta(seconds=self.config.broken_recheck)
        why = f"waiting: the mail server refused us for good ({reason}); fix its settings"
        return finish("broken", why, due_at=due, last_error=why, **kw)


class _Recorder:
    """Writes outcomes as they come, so a message the server accepted is marked sent at once:
    if the worker dies, only what is between the server's reply and the next commit may be sent
    twice. Outcomes that arrive during a write go together in the next one (a group commit).

    When a write fails (the database is away), the outcomes are kept and written again, with
    growing pauses; meanwhile `failing` tells the claim loop to claim nothing. On close it keeps
    trying for `grace` seconds; after that the messages' leases run out and another worker takes
    them over, noting that they may have been delivered."""

    LINGER = 0.01
    MAX_GROUP = 200

    def __init__(self, outbox: Outbox, worker: str, grace: float) -> None:
        self._outbox = outbox
        self._worker = worker
        self._grace = grace
        self._buffer: list[Recorded] = []
        self._wake = asyncio.Event()
        self._closing = False
        self.failing = False
        self._task = asyncio.create_task(self._run())

    def add(self, outcome: Recorded) -> None:
        self._buffer.append(outcome)
        self._wake.set()

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        pause = 0.2
        give_up_at: float | None = None
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._closing and len(self._buffer) < self.MAX_GROUP:
                # Let a few more outcomes join this commit: a transaction costs far more than
                # a row, and 10 ms is little next to the claim-to-commit time of a message.
                await asyncio.sleep(self.LINGER)
            while self._buffer:
                batch, self._buffer = self._buffer, []
                try:
                    await self._outbox.record(self._worker, batch)
                except DATABASE_ERRORS as e:
                    self._buffer[:0] = batch
                    if not self.failing:
                        log.warning("outcomes can't be written (%s): sending paused, writing again", _first_line(e))
                    self.failing = True
                    if self._closing:
                        give_up_at = give_up_at or loop.time() + self._grace
                        if loop.time() >= give_up_at:
                            log.error("%d outcomes were not written; their messages go to another worker when "
                                      "the leases run out", len(self._buffer))  # fmt: skip
                            return
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 10.0)
                    continue
                if self.failing:
                    log.warning("outcomes are written again")
                self.failing, pause = False, 0.2
            if self._closing:
                return


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _every(c: Claimed, state: RecipientState) -> dict[int, RecipientState]:
    """The same answer for every recipient still due."""
    return {pos: state for pos, _ in c.pending}


def _reply_text(code: int | None, enhanced: str | None, text: str) -> str:
    return " ".join(str(x) for x in (code, enhanced, text) if x)


def _join(a: str | None, b: str) -> str:
    return f"{a}; {b}" if a else b


def _age(since: datetime) -> str:
    hours = (now() - since).total_seconds() / 3600
    return f"{hours:.1f} h"
