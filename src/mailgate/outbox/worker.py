"""The delivery worker: claims due messages, sends each through its tenant's resolved mail server,
and records what happened to every recipient.

A claim loop keeps a small backlog of claimed messages (each claim is a lease). Claimed messages
go into one lane per mail server (version); up to `concurrency` senders work the lanes, each
holding one pooled connection and sending message after message through it, up to PIPELINE at
a time pipelined one after the other (one round trip each). Senders go to the
lanes that have fewest, and a lane never has more senders than its server allows connections, so
a slow, broken or black-holed server ties up only its own senders — and once a server failed
(unreachable, throttling, refused credentials), its lane holds the rest of its messages back for a
while (growing) and defers them without trying, then tries one connection before the others.

A recorder writes the outcomes as they come. A stop (SIGTERM) gives back what no sender has taken,
lets the sends under way finish — up to `stop_grace` — and records them; nothing is lost. A worker
that dies instead leaves leases that run out, and another worker takes those messages over,
saying in the attempt log that they may have been delivered already.

Nothing one message or one tenant holds stops the others: a message that can't be built fails
alone, a tenant whose settings can't be read (or whose secrets the keys no longer decrypt) waits
alone, and a bug in a sender or in the claim loop is logged and outlived — the messages it held
are recorded as deferred, never left in the worker's hands.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import DataError, SQLAlchemyError

from ..config import Config
from ..db.models import now
from ..delivery import Delivery, Outcome
from ..diagnostics.catalogue import Explanation, explain_failure, with_explanation
from ..errors import DeliveryError, InvalidInput, MailgateError, MessageError, NotFound, traceback_of
from ..message import Envelope, Message
from ..oauth.cache import TokenCache
from ..settings.document import MailServer
from ..settings.secrets import CANNOT_DECRYPT, SecretsError
from ..settings.store import GLOBAL, Resolution, Servers
from ..smtp.errors import SMTPNotSupportedError
from ..transports.base import Transport
from ..transports.pool import Pools, QuotaWait, pool_size
from ..transports.smtp import SMTPTransport
from .quota import ConnectionSlots, Quotas
from .retry import retry_delay
from .store import ACCEPTED, DEFERRED, FAILED, HELD, PENDING, REFUSED, SENT, Claimed, Outbox, RecipientState
from .store import Outcome as Recorded

if TYPE_CHECKING:
    from ..webhooks import WebhookSender

log = logging.getLogger("mailgate.worker")
protocol_log = logging.getLogger("mailgate.protocol")

Finish = Callable[..., Recorded]  # builds the Outcome of the attempt under way

DATABASE_ERRORS = (SQLAlchemyError, OSError)
MAX_BACKOFF = 30.0  # seconds between tries while the database is away
HOUSEKEEPING_EVERY = 5.0  # seconds: release held messages whose tenants may send again
PURGE_EVERY = 600.0
HOLD_BACK = 5.0  # seconds a lane holds back after its server failed; doubles each time, at most:
MAX_HOLD_BACK = 300.0
PIPELINE = 8  # messages a sender takes from its lane at once, pipelined on its connection
RESOLVE_TTL = 2.0  # seconds a tenant's resolved server is reused
# Senders a lane starts with until its server takes a message: a server that never answers (a
# black hole, a tarpit) ties up this many of the worker's senders, not its whole pool_size.
SLOW_START = 2


@dataclass
class WorkerStats:
    claimed: int = 0
    sent: int = 0
    deferred: int = 0
    failed: int = 0
    released: int = 0


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


@dataclass(eq=False)
class _Lane:
    """The claimed messages for one mail server version, and the senders working on them."""

    key: tuple[int, int]
    server: MailServer
    capacity: int
    scope: str  # "global", or the tenant whose own server it is: which destination policy it obeys
    backlog: deque[tuple[Claimed, Resolution]] = field(default_factory=deque)
    active: int = 0  # senders on this lane
    failed: DeliveryError | InvalidInput | None = None  # the server's last failure, while held back
    held_until: float = 0.0  # loop time
    trips: int = 0  # failures in a row
    turn: int = 0  # when a sender last started on it: the lane that waited longest goes first
    proven: bool = False  # its server took a message since the lane was made

    def open_slots(self, now: float) -> int:
        """How many more senders may start: none while held back, one (a probe) after a failure,
        SLOW_START until the server took a message, then its capacity."""
        if self.failed is not None and now < self.held_until:
            return 1 if self.active == 0 else 0  # it defers without trying: one sender is plenty
        if self.trips:
            return 1 - self.active
        return (self.capacity if self.proven else min(self.capacity, SLOW_START)) - self.active

    def trip(self, error: DeliveryError | InvalidInput, now: float) -> None:
        if isinstance(error, QuotaWait):  # no failure: the quota allows no more connections now
            self.failed, self.held_until = error, now + (error.retry_after or 1.0)
            return
        transient = isinstance(error, DeliveryError) and error.transient
        if transient and self.failed is not None and now < self.held_until:
            return  # another sender's news of the same outage: no longer hold-back for it
        self.trips += 1
        if transient:
            assert isinstance(error, DeliveryError)
            hold = min(HOLD_BACK * 2 ** (self.trips - 1), MAX_HOLD_BACK)
            self.held_until = now + max(hold, min(error.retry_after or 0.0, MAX_HOLD_BACK))
        else:
            self.held_until = float("inf")  # refused for good: only new settings (a new lane) help
        self.failed = error

    def succeeded(self) -> None:
        self.trips, self.failed, self.held_until, self.proven = 0, None, 0.0, True


@dataclass(frozen=True)
class _Unresolved:
    """A tenant whose mail server could not be worked out (its stored settings can't be read):
    its messages wait, the other tenants' go."""

    reason: str


@dataclass
class _Ready:
    """A message about to go: what the attempt needs to conclude it."""

    c: Claimed
    finish: Finish
    where: dict[str, Any]
    envelope: Envelope
    message: Message
    pending: dict[str, int]
    note: str | None = None  # for the attempt log: the From was rewritten (the server's sender policy)


class Worker:
    def __init__(
        self,
        outbox: Outbox,
        servers: Servers,
        config: Config,
        *,
        name: str | None = None,
        tokens: TokenCache | None = None,
        webhooks: WebhookSender | None = None,
    ) -> None:
        self.outbox = outbox
        self.webhooks = webhooks  # delivered beside the mail, in a task of its own (webhooks.py)
        self.servers = servers
        self.config = config
        self.name = name or worker_name()
        self.stats = WorkerStats()
        self._quotas = Quotas(outbox.db)
        self._slots = ConnectionSlots(self._quotas, self.name)
        self._pools = Pools(
            lambda prefix: lambda line: protocol_log.info("%s %s", prefix, line),
            tokens=tokens,
            store_refresh_token=servers.store_refresh_token,
            max_connections=config.max_connections,
            admission=self._slots,
            destinations=config.destinations,
        )
        self._rng = random.Random()
        self._lanes: dict[tuple[int, int], _Lane] = {}
        self._resolved: dict[str, tuple[float, _Resolved]] = {}  # tenant → (loop time, resolution)
        self._waiting: dict[tuple[int, int], _Lane] = {}  # lanes with a backlog
        self._backlog = 0  # claimed messages no sender has taken yet
        self._ready = 0  # of those, what the lanes could start on at once: sum of min(backlog, capacity)
        self._max_backlog = 2 * config.batch_size
        self._free = config.concurrency  # senders that may start
        self._turns = 0
        self._senders: set[asyncio.Task[None]] = set()
        self._stale: list[int] = []  # claimed messages held too long to send: given back
        self._held: set[int] = set()  # claimed and not yet settled: their leases are renewed
        self._renewed_at = 0.0  # loop time of the last lease renewal of everything held
        self._recorder: _Recorder | None = None
        self._stop = asyncio.Event()
        # Wakes the claim loop: the backlog ran low, the worker went idle, or it is stopping.
        self._wake = asyncio.Event()
        self._housekeeping_at = self._purge_at = 0.0
        self.heartbeat = time.monotonic()  # the claim loop's last turn: /readyz reads it
        self._health: dict[int, dict[str, Any]] = {}  # server id → news for its credential health
        self._notices: set[asyncio.Task[None]] = set()  # "your mail server is broken" mails on their way
        self._token_expiry: dict[int, datetime] = {}  # as last written
        self._keys_checked = False  # servers marked broken by keys this process decrypts: mended once

    @property
    def pools(self) -> Pools:
        return self._pools

    async def run(self, stop: asyncio.Event | None = None, *, until_idle: bool = False) -> WorkerStats:
        """Deliver until `stop` is set (or, with `until_idle`, until nothing is due).

        The claim loop keeps a backlog of about one or two batches, never much more (leases should
        not run out in memory), and claims again when the lanes could start on fewer messages
        than there are senders.
        """
        self._stop = stop = stop or asyncio.Event()
        self._recorder = recorder = _Recorder(self.outbox, self.name, self.config.stop_grace)
        relay = asyncio.create_task(self._relay(stop))
        # Webhooks go out from long-running workers; a run until idle (a cron job, a test) sends mail only.
        hooks = asyncio.create_task(self.webhooks.run(stop)) if self.webhooks is not None and not until_idle else None
        backoff = self.config.poll_interval
        failure = ""  # the claim loop's last unexpected failure: its traceback is logged once
        log.info("worker %s started", self.name)
        try:
            while not stop.is_set():
                try:
                    if not await self._step(recorder, until_idle):
                        break
                    backoff, failure = self.config.poll_interval, ""
                except DATABASE_ERRORS as e:
                    # The database is away for a while: try again, never give up the worker.
                    log.warning("the database failed (%s); trying again in %.1f s", _first_line(e), backoff)
                    await self._pause(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
                except Exception as e:
                    # A bug, or something this version can't handle: never the end of the worker
                    # (what the turn claimed was given back), nor a log flooded with tracebacks.
                    seen = _failure(e)
                    if seen != failure:
                        log.error("the claim loop failed; trying again in %.1f s: %s", backoff, traceback_of(e))
                    else:
                        log.warning("the worker's claim loop failed again (%s); trying again in %.1f s", seen, backoff)
                    failure = seen
                    await self._pause(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
        finally:
            relay.cancel()
            stop.set()
            await self._shut_down(recorder)
            if hooks is not None:
                await asyncio.gather(hooks, return_exceptions=True)
            log.info("worker %s stopped: %s", self.name, self.stats)
        return self.stats

    def _wants_more(self) -> bool:
        return self._backlog < self._max_backlog and self._ready < self.config.concurrency

    async def _step(self, recorder: _Recorder, until_idle: bool) -> bool:
        """One turn of the claim loop: housekeeping when due, then claim or wait. False: done."""
        loop = asyncio.get_running_loop()
        self.heartbeat = time.monotonic()
        if loop.time() >= self._housekeeping_at:
            # Due again later even if it fails: a failure that repeats must not keep every turn from claiming.
            self._housekeeping_at = loop.time() + HOUSEKEEPING_EVERY
            if not self._keys_checked:  # restarted with the keys that decrypt them: they send again
                for scope in await self.servers.mend_decryptable():
                    log.warning("the secrets of the %s mail server decrypt again: no longer marked broken", scope)
                self._keys_checked = True
            await self._release_held()
            await self._write_health()
            self._pools.sweep()
            await self._slots.renew()  # the connection slots of open connections
        renew_every = self.config.lease / 4
        if self._held and loop.time() - self._renewed_at >= renew_every:
            started = loop.time()
            await self.outbox.renew(self.name, list(self._held))
            self._renewed_at = started  # every message held now has a lease from `started` on
        if self._stale:
            stale, self._stale = self._stale, []
            try:
                released = await self.outbox.release(self.name, stale)
            except BaseException:
                self._stale[:0] = stale
                raise
            log.info("gave back %d claimed messages that waited too long for a sender (lease %g s)", released,
                     self.config.lease)  # fmt: skip
            self.stats.released += released
        if loop.time() >= self._purge_at:
            self._purge_at = loop.time() + PURGE_EVERY
            bodies, lines = await self.outbox.purge()
            if bodies or lines:
                log.info("purged %d message bodies and %d old messages", bodies, lines)
        if recorder.failing or not self._wants_more():
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
                try:
                    self._take(c, resolutions[c.tenant_id], recorder)
                except Exception as e:  # a bug: this message is given back for later, the others go on
                    log.error("taking message %s failed: %s", c.pk, traceback_of(e))
                    self._add(recorder, self._gave_back(c, self._finisher(c), e, {}))
            self._dispatch()
            return True
        if until_idle and self._backlog == 0 and not self._senders:
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

    async def _resolve(self, batch: list[Claimed]) -> dict[str, _Resolved]:
        """Each tenant's resolved server, looked up at most every RESOLVE_TTL seconds: a lookup
        (two queries, decrypting the secrets, validating the document) costs more than sending
        a message, and a batch may hold many tenants. New settings take effect within the TTL.
        A tenant whose server can't be worked out waits alone; only the database failing stops
        the batch (it is given back)."""
        at = asyncio.get_running_loop().time()
        resolutions: dict[str, _Resolved] = {}
        for tenant in {c.tenant_id for c in batch}:
            cached = self._resolved.get(tenant)
            if cached is not None and at - cached[0] < RESOLVE_TTL:
                resolutions[tenant] = cached[1]
                continue
            try:
                resolutions[tenant] = await self.servers.resolve(tenant)
            except NotFound:
                resolutions[tenant] = None  # the tenant was removed
            except SecretsError as e:
                resolutions[tenant] = await self._undecryptable(tenant, e)
            except DATABASE_ERRORS:
                raise
            except Exception as e:  # whatever this tenant's settings raise: not the others' problem
                why = f"mailgate could not read the mail server settings of {tenant} ({_failure(e)})"
                log.error("%s; its messages wait: %s", why, traceback_of(e))
                resolutions[tenant] = _Unresolved(f"{why}; saving the settings again may fix it")
            self._resolved[tenant] = (at, resolutions[tenant])
        if len(self._resolved) > 10_000:  # forget the stale ones
            self._resolved = {t: v for t, v in self._resolved.items() if at - v[0] < RESOLVE_TTL}
        return resolutions

    async def _undecryptable(self, tenant: str, e: SecretsError) -> Resolution | None:
        """The tenant's server has a secret this process's keys don't decrypt (even after reading
        a changed key file again): the server is marked broken with the reason — what the admin
        sees, and what to do — and its messages wait; other servers keep sending."""
        try:
            plain = await self.servers.resolve(tenant, secrets=False)
        except NotFound:
            return None
        if plain.server_id is None or plain.version is None:
            return plain  # sending was switched off meanwhile
        reason = str(e)
        if await self.servers.mark_broken(plain.server_id, plain.version, reason):
            # The operator's keys, not the tenant's settings: the log, not the tenant admin, hears it.
            log.error("mail server %s (version %s) marked broken: %s", plain.server_id, plain.version, reason)
        return dataclasses.replace(plain, broken_reason=plain.broken_reason or reason)

    # ---- lanes and senders -------------------------------------------------------------------

    def _add(self, recorder: _Recorder, outcome: Recorded) -> None:
        """The message is settled (or waits again): recorded, no longer held by this worker."""
        self._held.discard(outcome.pk)
        recorder.add(outcome)
        self._count(outcome)

    def _take(self, c: Claimed, resolution: _Resolved, recorder: _Recorder) -> None:
        """A claimed message goes to its server's lane, or is settled at once when there is no
        server to try (tenant removed, sending disabled, server marked broken, settings unusable)."""
        if isinstance(resolution, _Unresolved):
            self._add(recorder, self._retry_later(c, self._finisher(c), "error", resolution.reason, None))
            return
        if resolution is None or resolution.server is None or resolution.broken_reason:
            self._add(recorder, self._without_server(c, resolution))
            return
        assert resolution.server_id is not None and resolution.version is not None
        key = (resolution.server_id, resolution.version)
        lane = self._lanes.get(key)
        if lane is None:
            for old in [k for k in self._lanes if k[0] == key[0] and k[1] < key[1]]:
                if not self._lanes[old].backlog and not self._lanes[old].active:
                    del self._lanes[old]  # settings changed: the old version's lane is done
            scope = GLOBAL if resolution.source == GLOBAL else resolution.tenant
            # At most half the senders on one server: a tenant's pool_size can't take them all.
            capacity = min(pool_size(resolution.server), max(1, self.config.concurrency // 2))
            lane = self._lanes[key] = _Lane(key, resolution.server, capacity, scope)
        if len(lane.backlog) < lane.capacity:
            self._ready += 1
        c.claimed_at = asyncio.get_running_loop().time()
        self._held.add(c.pk)
        lane.backlog.append((c, resolution))
        self._waiting[key] = lane
        self._backlog += 1

    def _pop(self, lane: _Lane) -> tuple[Claimed, Resolution]:
        if len(lane.backlog) <= lane.capacity:
            self._ready -= 1
        item = lane.backlog.popleft()
        self._backlog -= 1
        if not lane.backlog:
            del self._waiting[lane.key]
        if self._wants_more():
            self._wake.set()
        return item

    def _dispatch(self) -> None:
        """Start senders while there are free ones, on the lanes with fewest senders first."""
        if self._stop.is_set():
            return
        now = asyncio.get_running_loop().time()
        while self._free > 0 and self._waiting:
            open_lanes = [lane for lane in self._waiting.values() if lane.open_slots(now) > 0]
            if not open_lanes:
                return
            open_lanes.sort(key=lambda lane: (lane.active, lane.turn))
            for lane in open_lanes:
                if self._free == 0:
                    return
                if lane.open_slots(now) > 0:
                    self._start(lane)

    def _start(self, lane: _Lane) -> None:
        self._free -= 1
        self._turns += 1
        lane.active += 1
        lane.turn = self._turns
        task = asyncio.get_running_loop().create_task(self._sender(lane))
        self._senders.add(task)
        task.add_done_callback(self._senders.discard)

    def _stale_lease(self, c: Claimed) -> bool:
        """Held so long that its lease may run out before the send is done: never sent then (the
        message would go twice if another worker takes it over); given back instead."""
        since = max(c.claimed_at, self._renewed_at)
        return asyncio.get_running_loop().time() - since > self.config.lease / 2

    def _others_wait(self, lane: _Lane) -> bool:
        """Another lane has messages and no sender, and none is free: time to make room."""
        if self._free > 0:
            return False
        return any(other.active == 0 and other is not lane for other in self._waiting.values())

    async def _sender(self, lane: _Lane) -> None:
        """One sender on one lane: borrows one connection and sends message after message through
        it, until the lane is empty, the worker stops, or another lane needs the sender more."""
        recorder = self._recorder
        assert recorder is not None
        loop = asyncio.get_running_loop()
        holding: dict[int, tuple[Claimed, Resolution]] = {}  # taken from the lane, not yet recorded

        def conclude(outcome: Recorded) -> None:
            holding.pop(outcome.pk, None)
            self._add(recorder, outcome)

        transport: Transport | None = None
        took = 0
        try:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    transport = await stack.enter_async_context(
                        self._pools.get(*lane.key, lane.server, scope=lane.scope).transport()
                    )
                except (DeliveryError, InvalidInput) as e:  # these settings can't make a connection
                    lane.trip(e, loop.time())
                    if isinstance(e, QuotaWait) and lane.active > 1:
                        return  # the lane's other senders have connections: they go on
                while lane.backlog and not self._stop.is_set():
                    # Several at once through one connection: pipelined, one round trip each.
                    take = min(len(lane.backlog), PIPELINE if isinstance(transport, SMTPTransport) else 1)
                    if transport is None:  # held back: each waits untried, at once
                        take = len(lane.backlog)
                    fresh: list[tuple[Claimed, Resolution]] = []
                    stale: list[int] = []
                    for c, r in (self._pop(lane) for _ in range(take)):
                        if self._stale_lease(c):
                            stale.append(c.pk)
                        else:
                            fresh.append((c, r))
                    if stale:  # its lease may run out mid-send and it would go twice: given back
                        self._stale.extend(stale)
                        self._held.difference_update(stale)
                        self._wake.set()
                    holding.update((c.pk, (c, r)) for c, r in fresh)
                    took += len(fresh) + len(stale)
                    if fresh:
                        await self._attempt(fresh, lane, transport, conclude)
                    if lane.failed is not None and lane.active > 1:
                        break  # held back: one sender defers the rest, the others go elsewhere
                    if self._others_wait(lane):
                        break
        except Exception as e:
            # A bug: logged once, with its traceback. The messages this sender held wait again
            # (deferred, with the growing backoff and the maximum age of any failure) rather than
            # given back for at once: the same bug would meet them again at once, and the send may
            # have reached the server. Its connection is closed: it may be mid-transaction.
            log.error("a sender of mail server %s failed; its %d messages wait: %s", lane.key[0], len(holding),
                      traceback_of(e))  # fmt: skip
            if not took:  # it failed before taking a message: the next sender would at once, again and again
                lane.trip(DeliveryError(f"mailgate failed ({_failure(e)}; the log has the details)"), loop.time())
            for c, r in list(holding.values()):
                where = {"server_scope": r.source, "server_id": lane.key[0], "server_version": lane.key[1]}
                conclude(self._gave_back(c, self._finisher(c), e, where))
            if isinstance(transport, SMTPTransport):  # its own connection (a Graph transport is shared)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(transport.aclose(), self.config.stop_grace)
        finally:
            lane.active -= 1
            self._free += 1
            if not lane.backlog and not lane.active and lane.failed is None and self._lanes.get(lane.key) is lane:
                del self._lanes[lane.key]  # forgotten when idle; a failed lane remembers its hold-back
            if len(self._senders) <= 1:
                self._wake.set()  # idle: until_idle may be done
            self._dispatch()

    async def _shut_down(self, recorder: _Recorder) -> None:
        """Give back what no sender has taken yet, let the sends under way finish (at most
        `stop_grace`, then they are interrupted and recorded as such), write every outcome."""
        senders = set(self._senders)
        if senders:
            _, late = await asyncio.wait(senders, timeout=self.config.stop_grace)
            for task in late:
                task.cancel()  # _attempt records an interrupted send as such
            await asyncio.gather(*senders, return_exceptions=True)
        untried = [c.pk for lane in self._lanes.values() for c, _ in lane.backlog] + self._stale
        self._lanes.clear()
        self._waiting.clear()
        self._backlog = self._ready = 0
        if self._notices:
            await asyncio.wait(set(self._notices), timeout=self.config.stop_grace)
        await recorder.close()
        if untried:
            self.stats.released += await self.outbox.release(self.name, untried)
        with contextlib.suppress(*DATABASE_ERRORS):
            await self._write_health()
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
            except DATABASE_ERRORS:
                raise
            except Exception as e:  # this tenant's settings can't be read: its messages stay held, the others not
                log.error("whether %s may send again could not be worked out: %s", tenant, traceback_of(e))
                continue
            if not resolution.disabled:
                log.info("sending is enabled again for %s: released %d held messages", tenant,
                         await self.outbox.release_held(tenant))  # fmt: skip

    # ---- one message -------------------------------------------------------------------------

    def _finisher(self, c: Claimed) -> Finish:
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

        return finish

    def _without_server(self, c: Claimed, resolution: Resolution | None) -> Recorded:
        """A message whose tenant has no server to try now: removed, disabled, or marked broken."""
        finish = self._finisher(c)
        if resolution is None:
            gone = "the tenant was removed"
            return self._settle(c, finish, _every(c, (REFUSED, None, None, gone)), "permanent", gone)
        if resolution.server is None:  # disabled, or its stored settings don't load (broken_reason)
            if self.config.hold_when_disabled or resolution.broken_reason is not None:
                return finish("held", resolution.reason, status=HELD, count_attempt=False, last_error=resolution.reason)
            return self._retry_later(c, finish, "transient", resolution.reason, None, server=None)
        assert resolution.broken_reason is not None  # marked earlier: wait, without trying
        where = {"server_scope": resolution.source, "server_id": resolution.server_id,
                 "server_version": resolution.version}  # fmt: skip
        return self._wait_for_fix(finish, resolution.broken_reason, count_attempt=False, **where)

    async def _attempt(
        self, items: list[tuple[Claimed, Resolution]], lane: _Lane, transport: Transport | None,
        conclude: Callable[[Recorded], None],
    ) -> None:  # fmt: skip
        """Send these messages of one lane through `transport` — several at once pipelined one
        after the other — and work out what each becomes, telling `conclude` as each is known."""
        ready: list[_Ready] = []
        for c, resolution in items:
            finish = self._finisher(c)
            where: dict[str, Any] = {"server_scope": resolution.source, "server_id": lane.key[0],
                                     "server_version": lane.key[1]}  # fmt: skip
            untried = self._held_back(c, finish, where, lane, transport)
            if untried is None and (lane.server.quota.messages_per_minute or lane.server.quota.recipients_per_day):
                untried = await self._reserve(c, lane, finish, where)
            if untried is not None:
                conclude(untried)
                continue
            pending = {address: pos for pos, address in c.pending}
            try:
                # The server's sender policy, as it is now (its settings may have changed since the
                # submit): a From it does not allow goes as under fixed, and the attempt says so.
                policy = lane.server.effective_from_policy(is_global=resolution.source == "global")
                rewritten = lane.server.from_refusal(c.message, policy=policy)
                message = lane.server.fill_in(c.message, policy=policy)
                envelope = Envelope(lane.server.envelope_from or message.sender().envelope_form(False), tuple(pending))
            except MessageError as e:
                refused = _every(c, (REFUSED, None, None, str(e)))
                conclude(self._settle(c, finish, refused, "permanent", str(e), **where))
                continue
            except Exception as e:  # this message, not the server: it fails alone
                conclude(self._could_not_build(c, finish, e, where))
                continue
            note = None if rewritten is None else f"sent from {message.sender().address} instead: {rewritten}"
            ready.append(_Ready(c, finish, where, envelope, message, pending, note))
        if not ready:
            return
        assert transport is not None
        for r in ready:
            r.where["server"] = transport.server
        results = await self._send(transport, ready)
        for r, result in zip(ready, results, strict=True):
            try:
                outcome = await self._outcome(r, lane, result)
            except Exception as e:  # a bug, or the database failed marking the server: not the others' outcomes
                log.error("concluding message %s failed: %s", r.c.pk, traceback_of(e))
                outcome = self._gave_back(r.c, r.finish, e, r.where)
            conclude(outcome)

    async def _outcome(self, r: _Ready, lane: _Lane, result: Result) -> Recorded:
        outcome = self._conclude(r.c, r.finish, r.where, lane, r.pending, result)
        accepted = isinstance(result, Delivery) and result.all_accepted
        explanation = None if accepted else explain_failure(result, lane.server)
        if outcome is None:  # refused for good: mark the server
            err = result
            assert isinstance(err, DeliveryError | InvalidInput)
            text = with_explanation(err.message if isinstance(err, DeliveryError) else str(err), explanation)
            code = {"code": err.code, "enhanced": err.enhanced} if isinstance(err, DeliveryError) else {}
            outcome = await self._broken(r.c, r.finish, text, **code, **r.where)
        elif explanation is not None and outcome.outcome not in ("accepted", "quota"):
            outcome.note = _join(outcome.note, str(explanation))
        if r.note is not None:
            outcome.note = _join(outcome.note, r.note)
        self._note_health(lane.key[0], result, explanation)
        return outcome

    async def _send(self, transport: Transport, ready: list[_Ready]) -> list[Result]:
        """Each message's Delivery, or the error that stopped it: one shared by all when the
        server failed. The SMTP transport gives a message that can't be composed its own error;
        a transport that takes one message at a time raises it, and if that message does not
        compose, its error is its result. Anything else raised is a bug, for the sender."""
        try:
            if isinstance(transport, SMTPTransport) and len(ready) > 1:
                return list(await transport.send_many([(r.envelope, r.message) for r in ready]))
            assert len(ready) == 1  # other transports take one message at a time
            return [await transport.send(ready[0].envelope, ready[0].message)]
        except (asyncio.CancelledError, DeliveryError, InvalidInput) as e:
            return [e] * len(ready)
        except Exception:
            own = _compose_error(ready[0].message) if len(ready) == 1 else None
            if own is None:
                raise
            return [own]

    def _note_health(self, server_id: int, result: Delivery | BaseException, explanation: Explanation | None) -> None:
        """A send the server accepted, or a failure of the server itself (not a recipient's)."""
        news = self._health.setdefault(server_id, {})
        if isinstance(result, Delivery):
            if any(r.outcome is Outcome.ACCEPTED for r in result.results):
                news["last_success_at"] = now()
        elif isinstance(result, DeliveryError) and not isinstance(result, QuotaWait):
            news["last_failure_at"], news["last_failure"] = now(), with_explanation(result.message, explanation)

    async def _write_health(self) -> None:
        """Every few seconds: what the sends said of each server, and its access token's expiry."""
        for server_id, handle in self._pools.token_handles.items():
            token = handle.current
            if token is not None:
                expires = datetime.fromtimestamp(token.expires_at, UTC)
                if self._token_expiry.get(server_id) != expires:
                    self._health.setdefault(server_id, {})["token_expires_at"] = expires
                    self._token_expiry[server_id] = expires
        news = {k: v for k, v in self._health.items() if v}
        self._health = {}
        if news:
            try:
                await self.servers.record_health(news)
            except BaseException:
                for server_id, values in news.items():  # kept for the next try; newer news wins
                    self._health[server_id] = {**values, **self._health.get(server_id, {})}
                self._token_expiry.clear()
                raise

    def _held_back(
        self, c: Claimed, finish: Finish, where: dict[str, Any], lane: _Lane, transport: Transport | None
    ) -> Recorded | None:
        """While the lane is held back (its server failed a moment ago, or its quota is used up),
        the message waits with the same answer, untried."""
        loop = asyncio.get_running_loop()
        failed = lane.failed
        held = loop.time() < lane.held_until and not isinstance(failed, QuotaWait)  # a quota wait spares connections
        if failed is None or not (transport is None or held):
            return None
        if isinstance(failed, QuotaWait):
            due = now() + timedelta(seconds=max(lane.held_until - loop.time(), 0.0))
            return finish("quota", failed.message, due_at=due, count_attempt=False, last_error=failed.message,
                          **where)  # fmt: skip
        if isinstance(failed, DeliveryError) and failed.transient:
            why = f"not tried: the mail server failed a moment ago ({failed.message})"
            return self._retry_later(c, finish, "transient", failed.message, failed.retry_after, code=failed.code,
                                     enhanced=failed.enhanced, note=why, **where)  # fmt: skip
        reason = failed.message if isinstance(failed, DeliveryError) else str(failed)
        return self._wait_for_fix(finish, reason, count_attempt=False, **where)

    def _conclude(
        self, c: Claimed, finish: Finish, where: dict[str, Any], lane: _Lane, pending: dict[str, int],
        result: Delivery | BaseException,
    ) -> Recorded | None:  # fmt: skip
        """What one message becomes after its send; None when the server refused us for good."""
        loop = asyncio.get_running_loop()
        e = result
        if isinstance(e, asyncio.CancelledError):
            why = "the worker stopped during the send; the server may have accepted the message"
            return self._retry_later(c, finish, "transient", why, None, note=why, **where)
        if isinstance(e, SMTPNotSupportedError):  # this message, not the server
            refused = _every(c, (REFUSED, e.code, e.enhanced, e.message))
            return self._settle(c, finish, refused, "permanent", e.message, code=e.code, enhanced=e.enhanced, **where)
        if isinstance(e, DeliveryError):
            lane.trip(e, loop.time())
            if e.transient:
                return self._retry_later(c, finish, "transient", e.message, e.retry_after, code=e.code,
                                         enhanced=e.enhanced, **where)  # fmt: skip
            return None
        if isinstance(e, MessageError):
            return self._settle(c, finish, _every(c, (REFUSED, None, None, str(e))), "permanent", str(e), **where)
        if isinstance(e, InvalidInput):  # the stored settings can't send (e.g. no token source yet)
            lane.trip(e, loop.time())
            return None
        if isinstance(e, Exception) and not isinstance(e, MailgateError):  # this item's own: composing it raised
            return self._could_not_build(c, finish, e, where)
        if isinstance(e, BaseException):
            raise e
        slow_start = not lane.proven
        lane.succeeded()
        if slow_start:
            self._dispatch()  # past its slow start: the lane may take more senders now
        return self._record_delivery(c, finish, e, pending, where)

    async def _reserve(self, c: Claimed, lane: _Lane, finish: Finish, where: dict[str, Any]) -> Recorded | None:
        """Its place within the server's rate quotas: None to send now, else it waits for it."""
        if c.quota_slot is not None and c.quota_slot <= now() + timedelta(seconds=1):
            return None  # it waited for its place: that is now
        try:
            place = await self._quotas.reserve(lane.key[0], lane.server.quota, len(c.pending))
        except DATABASE_ERRORS as e:
            why = f"the quota could not be checked: the database failed ({_first_line(e)})"
            return self._retry_later(c, finish, "transient", why, None, **where)
        if place.kind is None or place.at <= time.time() + 0.5:
            return None
        text = place.explain()
        return finish("quota", text, due_at=place.when, quota_slot=place.when, count_attempt=False, last_error=text,
                      **where)  # fmt: skip

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
            if self.config.notify_broken:  # only the worker that marked it: once, not per message
                task = asyncio.create_task(self._notify_broken(server_id, reason))
                self._notices.add(task)
                task.add_done_callback(self._notices.discard)
        return self._wait_for_fix(finish, reason, **kw)

    async def _notify_broken(self, server_id: int, reason: str) -> None:
        """Tell the tenant's admin address, through the global server, that the tenant's own mail
        server refused us and its mail waits. Best effort: a failure is logged, never retried."""
        try:
            broken = await self.servers.loaded_by_id(server_id)
            if broken is None or broken.scope == "global":
                return  # the global server can't carry news of itself; the operator's log has it
            to = await self.servers.admin_address(broken.scope)
            glob = await self.servers.loaded("global")
            if to is None or glob is None:
                return
            resolution = await self.servers.resolve(broken.scope, secrets=False)
            if not glob.server.enabled or resolution.server is None:
                return
            message = Message(
                from_=glob.server.sender_address, to=to,
                subject=f"Mail of {broken.scope} is waiting: its mail server refused mailgate",
                text=(f"The mail server of {broken.scope} ({broken.server.kind}) refused mailgate for good, so its "
                      f"messages wait instead of being sent:\n\n{reason}\n\nWhen its settings are saved again "
                      "(after the fix), the waiting messages go at once. Run the test e-mail from the mail server "
                      "settings to see each step.\n"),
            )  # fmt: skip
            message = glob.server.fill_in(message, policy=glob.server.effective_from_policy(is_global=True))
            pool = self._pools.get(glob.id, glob.version, glob.server, scope=GLOBAL)
            async with pool.transport() as transport:
                delivery = await transport.send(message.envelope(mail_from=glob.server.envelope_from), message)
            if delivery.accepted:
                log.info("told %s that the mail server of %s is broken", to, broken.scope)
            else:
                log.warning("telling %s that the mail server of %s is broken failed: %s", to, broken.scope,
                            delivery.results[0].text)  # fmt: skip
        except Exception as e:
            log.warning("telling the admin that mail server %s is broken failed: %s", server_id, _first_line(e))

    def _could_not_build(self, c: Claimed, finish: Finish, e: BaseException, where: dict[str, Any]) -> Recorded:
        """The message can't be made into e-mail: it fails alone, for good (it would fail again),
        saying why without quoting what it holds."""
        why = f"mailgate could not build the message: {_build_failure(c.message, e)}; it was not sent"
        if isinstance(e, UnicodeError):  # what it carries, not mailgate: no traceback needed
            log.warning("message %s of %s failed: %s", c.pk, c.tenant_id, why)
        else:
            log.error("message %s of %s failed: %s: %s", c.pk, c.tenant_id, why, traceback_of(e))
        return self._settle(c, finish, _every(c, (REFUSED, None, None, why)), "error", why, **where)

    def _gave_back(self, c: Claimed, finish: Finish, e: BaseException, where: dict[str, Any]) -> Recorded:
        """A message a bug interrupted: it waits and is tried again later (in the end, after the
        maximum age, it fails). The send may have reached the server."""
        why = f"mailgate failed while handling the message ({_failure(e)}; the log has the details)"
        note = "the send may have reached the server before mailgate failed"
        return self._retry_later(c, finish, "error", why, None, note=note, **where)

    def _wait_for_fix(self, finish: Finish, reason: str, **kw: Any) -> Recorded:
        """The message waits for the broken server's settings to be saved (or re-checks later)."""
        due = now() + timedelta(seconds=self.config.broken_recheck)
        if reason.startswith(CANNOT_DECRYPT):  # mailgate's keys, not the server: the reason says what to do
            why = f"waiting: {reason}"
        else:
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
                    await self._write(batch)
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

    async def _write(self, batch: list[Recorded]) -> None:
        """Write a group of outcomes. One the database refuses for what it holds (not for being
        away), or that a bug stops, is written one outcome at a time, so that a bad outcome can't
        hold up the others, nor stop the recorder: that one is left to its lease, which runs out,
        and another worker takes the message over, saying it may have been delivered."""
        try:
            await self._outbox.record(self._worker, batch)
        except Exception as e:
            if isinstance(e, DATABASE_ERRORS) and not isinstance(e, DataError):
                raise  # the database is away: the caller keeps them and tries again
            if len(batch) == 1:
                log.error("the outcome of message %s could not be written; another worker takes the message over "
                          "when its lease runs out: %s", batch[0].pk, traceback_of(e))  # fmt: skip
                return
            log.error("%d outcomes could not be written together (%s); writing them one by one", len(batch),
                      type(e).__name__)  # fmt: skip
            for outcome in batch:
                await self._write([outcome])


_Resolved = Resolution | _Unresolved | None  # None: the tenant was removed
Result = Delivery | BaseException


def _compose_error(message: Message) -> Exception | None:
    """What composing `message` raises, in either form the transports compose (UTF-8 headers or
    encoded words); None if it composes."""
    try:
        for utf8 in (False, True):
            message.compose(utf8=utf8)
    except Exception as e:
        return e
    return None


def _build_failure(message: Message, e: BaseException) -> str:
    """Why a message could not be built — the field and the character's code point when a codec
    refused one, else the exception's type — without a word of what the message says."""
    if isinstance(e, UnicodeEncodeError):
        try:
            found = _unencodable(message.to_dict(), "")
        except Exception:
            found = None
        what = f"{e.reason} ({type(e).__name__})"
        if found is not None:
            return f"its {found[0]} holds {found[1]}, which can't be encoded as UTF-8: {what}"
        return what
    if isinstance(e, UnicodeError):
        return f"{getattr(e, 'reason', 'a character could not be encoded')} ({type(e).__name__})"
    return f"{type(e).__name__} while composing it"


def _unencodable(data: Any, path: str) -> tuple[str, str] | None:
    """The first text in `data` (a message's stored form) that UTF-8 can't encode: (its field, the
    code point)."""
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError as e:
            return path or "text", f"U+{ord(data[e.start]):04X}"
    elif isinstance(data, dict):
        for key, value in data.items():
            if (found := _unencodable(value, f"{path}.{key}" if path else str(key))) is not None:
                return found
    elif isinstance(data, list):
        for i, value in enumerate(data):
            if (found := _unencodable(value, f"{path}[{i}]")) is not None:
                return found
    return None


def _failure(e: BaseException) -> str:
    """An unexpected failure for a message's log: mailgate's own errors are written for people
    (never with a secret), anything else may quote what it failed on: its type only."""
    return f"{type(e).__name__}: {_first_line(e)[:300]}" if isinstance(e, MailgateError) else type(e).__name__


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
