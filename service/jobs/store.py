"""The job store: one table of jobs, one of their events, and a schema version, in SQLite or PostgreSQL.

Written once with SQLAlchemy 2 Core (async: aiosqlite, asyncpg) instead of two SQL dialects. What makes
it safe for several replicas on one PostgreSQL:

- a claim selects queued jobs ``FOR UPDATE SKIP LOCKED`` (two replicas never wait on or take the same
  row) and then moves each one with a conditional ``UPDATE … WHERE status = 'queued'``, which also keeps
  SQLite (one writer, no row locks) correct;
- every claim draws a fresh ``claim_token`` (a fencing token); the run renews its lease and makes every
  write (events, completion, failure, release) with that token, and a write whose token is no longer the
  job's changes nothing. A run whose lease expired and whose job was claimed again (by another replica, or
  by another process sharing this one's replica id) stops at its next write and never writes again;
- ``lease_until`` is written and compared on the database's clock (``now()`` on PostgreSQL, ``julianday``
  on SQLite), never a replica's: a replica whose clock is off expires nobody;
- a lease that expires queues the job again (with a ``requeued`` event in its stream), until
  ``max_attempts`` claims, then it fails with the reason.

Reads that serve polls, lists, followers and purges never load the stored request (``spec``, up to three
uploaded images); only a claim, which runs it, does. Driver errors come out as the store errors of
:mod:`service.jobs.outage` (unavailable or full), which callers retry or answer with 503/507.

A result is a file under the results folder, written before the completing update and named after the
job, so it exists exactly once whatever a crash interrupts; the row references it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

from sqlalchemy import (
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    and_,
    cast,
    delete,
    event,
    func,
    insert,
    inspect,
    literal,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.sql.elements import ColumnElement

from service.jobs.outage import StoreHealth, translated

Status = Literal["queued", "running", "succeeded", "failed", "canceled"]
STATUSES: tuple[Status, ...] = ("queued", "running", "succeeded", "failed", "canceled")
FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})

#: The schema this code reads and writes; a store written by a newer version is refused, an older one is
#: upgraded in place (each step additive: see :data:`UPGRADES`).
SCHEMA_VERSION = 3

#: Tries to create or check the schema (processes starting together on one SQLite file may collide).
OPEN_ATTEMPTS = 5

#: Queued jobs a claim looks at beyond its free slots (among those that fit in them at all).
CLAIM_LOOKAHEAD = 8

#: Jobs removed (or leases expired) per transaction: one ``IN (…)`` list stays far below PostgreSQL's
#: 32,767 bind parameters however long the store was unattended.
BATCH = 500

metadata = MetaData()

jobs = Table(
    "emu35_jobs", metadata,
    Column("id", String(64), primary_key=True),
    Column("route", String(64), nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("spec", LargeBinary, nullable=False),  # the request, as the HTTP layer serialised it
    Column("slots", Integer, nullable=False, default=1),  # admission slots it needs (OpenAI's n)
    Column("created_at", Float, nullable=False, index=True),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("expires_at", Float, index=True),
    Column("owner", String(128)),
    Column("lease_until", Float),
    Column("attempts", Integer, nullable=False, default=0),
    Column("progress", Text),  # JSON: images and rows done
    Column("result_path", Text),  # file name under the results folder
    Column("error", Text),  # JSON: {"message", "code"}
    Column("webhook", Text),
    Column("webhook_state", String(16)),  # pending, delivered, failed (None: no webhook)
    Column("claim_token", String(32)),  # the running claim's fencing token (schema 2)
    Column("submitted_by", String(64), index=True),  # the API key's name that submitted it (schema 3; None: no key)
    Index("ix_emu35_jobs_status_created_id", "status", "created_at", "id"),  # claims, lists (schema 2)
)

job_events = Table(
    "emu35_job_events", metadata,
    Column("job_id", String(64), ForeignKey("emu35_jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("event", String(64), nullable=False),
    Column("data", Text, nullable=False),
)

schema_version = Table("emu35_schema_version", metadata, Column("version", Integer, nullable=False))


#: Columns of every read but a claim: not the stored request.
_SUMMARY = [c for c in jobs.c if c.name != "spec"]


async def _upgrade_to_2(conn: AsyncConnection) -> None:
    """Schema 2 (fencing, bounded reads): the claim token column and the (status, created_at, id) index."""
    names = await conn.run_sync(lambda c: {col["name"] for col in inspect(c).get_columns("emu35_jobs")})
    if "claim_token" not in names:
        await conn.exec_driver_sql("ALTER TABLE emu35_jobs ADD COLUMN claim_token VARCHAR(32)")
    await conn.exec_driver_sql(
        "CREATE INDEX IF NOT EXISTS ix_emu35_jobs_status_created_id ON emu35_jobs (status, created_at, id)")


async def _upgrade_to_3(conn: AsyncConnection) -> None:
    """Schema 3 (per-key ownership): the column naming the API key that submitted a job, and its index."""
    names = await conn.run_sync(lambda c: {col["name"] for col in inspect(c).get_columns("emu35_jobs")})
    if "submitted_by" not in names:
        await conn.exec_driver_sql("ALTER TABLE emu35_jobs ADD COLUMN submitted_by VARCHAR(64)")
    await conn.exec_driver_sql(
        "CREATE INDEX IF NOT EXISTS ix_emu35_jobs_submitted_by ON emu35_jobs (submitted_by)")


#: version → the step that brings a store of ``version - 1`` to it. Steps are additive (new columns,
#: new indexes), so an older replica still running during a rolling upgrade keeps working.
UPGRADES = {2: _upgrade_to_2, 3: _upgrade_to_3}


class SchemaTooNew(RuntimeError):
    """The store was written by a newer emu35-serve; refusing beats corrupting it."""


@dataclass(frozen=True)
class NewJob:
    route: str
    spec: bytes
    slots: int = 1
    webhook: str | None = None
    submitted_by: str | None = None  # the name of the API key that submitted it


@dataclass(frozen=True)
class JobEvent:
    seq: int
    event: str
    data: str


@dataclass(frozen=True)
class JobRow:
    id: str
    route: str
    status: Status
    spec: bytes | None  # the stored request: read by a claim only (None elsewhere)
    slots: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    expires_at: float | None
    owner: str | None
    lease_until: float | None
    attempts: int
    progress: dict[str, Any]
    result_path: str | None
    error: dict[str, Any] | None
    webhook: str | None
    webhook_state: str | None
    claim_token: str | None = None  # the running claim's fencing token
    submitted_by: str | None = None  # the name of the API key that submitted it (None: no key)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


class JobWatch:
    """One follower's inbox: the events this process committed to a job since the follower last looked,
    in commit order, and whether the job has ended. Reading them here instead of from the store spares
    two queries per event for a client following a job this replica runs."""

    def __init__(self) -> None:
        self._events: list[JobEvent] = []
        self._finished = False
        self._ready = asyncio.Event()

    def push(self, events: Iterable[JobEvent], finished: bool) -> None:
        self._events.extend(events)
        self._finished = self._finished or finished
        self._ready.set()

    async def next(self, timeout: float) -> tuple[list[JobEvent], bool] | None:
        """Everything pushed since the last call (events, ended), waiting up to ``timeout`` seconds for
        something; None when nothing came (the job may run on another replica: read the store)."""
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except asyncio.TimeoutError:
                return None
        events, finished = self._events, self._finished
        self._events, self._finished = [], False
        self._ready.clear()
        return events, finished


def _row(r: Any) -> JobRow:
    m = r._mapping
    spec = m.get("spec")
    return JobRow(
        id=m["id"], route=m["route"], status=m["status"], spec=bytes(spec) if spec is not None else None,
        slots=m["slots"],
        created_at=m["created_at"], started_at=m["started_at"], finished_at=m["finished_at"],
        expires_at=m["expires_at"], owner=m["owner"], lease_until=m["lease_until"], attempts=m["attempts"],
        progress=json.loads(m["progress"]) if m["progress"] else {}, result_path=m["result_path"],
        error=json.loads(m["error"]) if m["error"] else None, webhook=m["webhook"],
        webhook_state=m["webhook_state"], claim_token=m.get("claim_token"),
        submitted_by=m.get("submitted_by"))


def new_job_id() -> str:
    """Unguessable: 128 random bits."""
    return "job-" + secrets.token_hex(16)


def database_url(store: str | None, state_dir: Path) -> str:
    """``--job-store`` as an async SQLAlchemy URL: unset is a SQLite file under ``state_dir``; a
    ``postgresql://`` URL uses asyncpg."""
    if not store:
        return f"sqlite+aiosqlite:///{state_dir / 'jobs.sqlite3'}"
    url = make_url(store)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+asyncpg")
    elif url.drivername == "sqlite":
        url = url.set(drivername="sqlite+aiosqlite")
    return url.render_as_string(hide_password=False)


def new_claim_token() -> str:
    return secrets.token_hex(16)


def requeued_event_data(message: str, code: str, attempts: int) -> str:
    """The data of a ``requeued`` event: why the attempt ended and how many claims the job has had."""
    return json.dumps({"message": message, "code": code, "attempts": attempts})


class JobStore:
    """Every read and write of jobs; safe to share between tasks, and between replicas on PostgreSQL."""

    def __init__(self, engine: AsyncEngine, results_dir: Path, ttl: float) -> None:
        self.engine = engine
        self.results_dir = results_dir
        self.ttl = ttl
        self.is_postgres = engine.dialect.name == "postgresql"
        self.health = StoreHealth()  # as this process last saw the store (one log line per change)
        self._watchers: dict[str, set[JobWatch]] = {}  # followers in this process, handed each commit
        # a statement the database answered is what tells the health the store works (not a caller that
        # returned without asking it, like a claim with no free slot)
        event.listen(engine.sync_engine, "after_cursor_execute", self._answered)

    def _answered(self, *_args: Any) -> None:
        self.health.succeeded()

    # ---- the database's clock ------------------------------------------------------------------------
    def db_now(self) -> ColumnElement[float]:
        """The time on the database's clock, in seconds since the epoch: leases are written and compared
        on it, so replicas whose clocks disagree still agree on who holds what."""
        if self.is_postgres:
            return cast(func.extract("epoch", func.now()), Float)
        return literal_column("((julianday('now') - 2440587.5) * 86400.0)", type_=Float)

    def _clock(self, now: float | None) -> ColumnElement[float]:
        """``now`` when a caller (a test) gives one, else the database's clock."""
        return self.db_now() if now is None else literal(now, Float)

    # ---- change notification within this process (other replicas' writes are found by polling) -------
    def watch(self, job_id: str) -> JobWatch:
        """What this process commits to ``job_id`` from now on (its events, and the job's end), handed
        over in memory; :meth:`unwatch` it when done."""
        w = JobWatch()
        self._watchers.setdefault(job_id, set()).add(w)
        return w

    def unwatch(self, job_id: str, w: JobWatch) -> None:
        found = self._watchers.get(job_id)
        if found is not None:
            found.discard(w)
            if not found:
                del self._watchers[job_id]

    def _changed(self, job_id: str, events: Iterable[JobEvent] = (), finished: bool = False) -> None:
        """Called after a commit, so a follower never sees an event the store could lose."""
        for w in self._watchers.get(job_id, ()):
            w.push(events, finished)

    # ---- schema ----------------------------------------------------------------------------------
    @translated
    async def open(self) -> None:
        self.results_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(OPEN_ATTEMPTS):
            try:
                await self._create_or_check_schema()
                return
            except OperationalError:  # SQLite: another process was creating the same file's tables
                if self.is_postgres or attempt == OPEN_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))

    async def _create_or_check_schema(self) -> None:
        async with self.engine.begin() as conn:
            if self.is_postgres:  # replicas starting together create the schema one at a time
                await conn.exec_driver_sql("SELECT pg_advisory_xact_lock(3535353535)")
            await conn.run_sync(metadata.create_all)
            found = (await conn.execute(select(func.max(schema_version.c.version)))).scalar()
            if found is None:
                await conn.execute(insert(schema_version).values(version=SCHEMA_VERSION))
            elif found > SCHEMA_VERSION:
                raise SchemaTooNew(f"the job store has schema version {found}; this version reads {SCHEMA_VERSION}")
            elif found < SCHEMA_VERSION:
                for version in range(found + 1, SCHEMA_VERSION + 1):
                    await UPGRADES[version](conn)
                await conn.execute(update(schema_version).values(version=SCHEMA_VERSION))

    async def close(self) -> None:
        await self.engine.dispose()

    # ---- submitting and reading ---------------------------------------------------------------------
    @translated
    async def submit(self, new: NewJob, now: float | None = None) -> JobRow:
        job_id = new_job_id()
        async with self.engine.begin() as conn:
            await conn.execute(insert(jobs).values(
                id=job_id, route=new.route, status="queued", spec=new.spec, slots=new.slots,
                created_at=self._clock(now), attempts=0, webhook=new.webhook,
                webhook_state="pending" if new.webhook else None, submitted_by=new.submitted_by))
            return await self._get(conn, job_id)  # type: ignore[return-value]

    @translated
    async def get(self, job_id: str) -> JobRow | None:
        """The job without its stored request (what a poll, a follower or a webhook needs)."""
        async with self.engine.connect() as conn:
            return await self._get(conn, job_id)

    async def _get(self, conn: AsyncConnection, job_id: str) -> JobRow | None:
        r = (await conn.execute(select(*_SUMMARY).where(jobs.c.id == job_id))).first()
        return _row(r) if r is not None else None

    @translated
    async def status(self, job_id: str) -> Status | None:
        """The job's status alone (None: no such job): what a follower polls."""
        async with self.engine.connect() as conn:
            return (await conn.execute(select(jobs.c.status).where(jobs.c.id == job_id))).scalar()

    @translated
    async def list_jobs(self, status: str | None = None, limit: int = 20, after: str | None = None,
                        cursor: tuple[float, str] | None = None, submitted_by: str | None = None) -> list[JobRow]:
        """Newest first. The next page starts after ``cursor`` (the last job's ``(created_at, id)``),
        which works even once that job is gone; ``after`` (a job id) is looked up for the same (never
        another key's job). ``submitted_by``: only the jobs of that API key (None: everyone's)."""
        q = select(*_SUMMARY)
        if status is not None:
            q = q.where(jobs.c.status == status)
        if submitted_by is not None:
            q = q.where(jobs.c.submitted_by == submitted_by)
        if cursor is None and after is not None:
            anchor = await self.get(after)
            if anchor is None or (submitted_by is not None and anchor.submitted_by != submitted_by):
                return []
            cursor = (anchor.created_at, anchor.id)
        if cursor is not None:
            at, last = cursor
            q = q.where(or_(jobs.c.created_at < at, and_(jobs.c.created_at == at, jobs.c.id < last)))
        q = q.order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
        async with self.engine.connect() as conn:
            return [_row(r) for r in await conn.execute(q)]

    @translated
    async def counts(self) -> dict[str, int]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status))
            found = {status: n for status, n in rows}
        return {s: found.get(s, 0) for s in STATUSES}

    @translated
    async def oldest_queued_age(self) -> float | None:
        """Seconds the oldest queued job has waited, on the database's clock (None: nothing queued)."""
        async with self.engine.connect() as conn:
            return (await conn.execute(
                select(self.db_now() - func.min(jobs.c.created_at)).where(jobs.c.status == "queued"))).scalar()

    # ---- claiming and leases -----------------------------------------------------------------------
    @translated
    async def claim(self, owner: str, free_slots: int, lease: float, now: float | None = None,
                    total_slots: int | None = None, reserve_after: float | None = None) -> list[JobRow]:
        """Queued jobs, oldest first, that fit in ``free_slots``, now running under ``owner``'s lease, each
        with a fresh claim token. Smaller jobs pass one that does not fit; but once the oldest queued job
        has waited ``reserve_after`` seconds and fits this replica (``total_slots``), nothing else is
        claimed until enough slots are free for it (a reservation: big jobs still start)."""
        if free_slots <= 0:
            return []
        clock = self._clock(now)
        claimed: list[JobRow] = []
        async with self.engine.begin() as conn:
            if reserve_after is not None and total_slots is not None:
                oldest = (await conn.execute(
                    select(jobs.c.slots, (clock - jobs.c.created_at).label("age")).where(jobs.c.status == "queued")
                    .order_by(jobs.c.created_at, jobs.c.id).limit(1))).first()
                if oldest is not None and free_slots < oldest.slots <= total_slots and oldest.age >= reserve_after:
                    return []  # hold the free slots until the big job fits
            candidates = (await conn.execute(
                select(jobs.c.id, jobs.c.slots).where(and_(jobs.c.status == "queued", jobs.c.slots <= free_slots))
                .order_by(jobs.c.created_at, jobs.c.id).limit(free_slots + CLAIM_LOOKAHEAD)
                .with_for_update(skip_locked=True))).all()
            left = free_slots
            for job_id, slots in candidates:
                if slots > left:
                    continue
                moved = await conn.execute(
                    update(jobs).where(and_(jobs.c.id == job_id, jobs.c.status == "queued"))
                    .values(status="running", owner=owner, lease_until=clock + lease, started_at=clock,
                            attempts=jobs.c.attempts + 1, claim_token=new_claim_token()))
                if moved.rowcount == 1:
                    left -= slots
                    r = (await conn.execute(select(jobs).where(jobs.c.id == job_id))).first()
                    claimed.append(_row(r))
        return claimed

    @translated
    async def renew(self, tokens: Iterable[str], lease: float) -> set[str]:
        """Extend the leases of these claims; the tokens still held (a canceled job, or one claimed again
        since, is not)."""
        toks = list(tokens)
        if not toks:
            return set()
        cond = and_(jobs.c.claim_token.in_(toks), jobs.c.status == "running")
        async with self.engine.begin() as conn:
            await conn.execute(update(jobs).where(cond).values(lease_until=self.db_now() + lease))
            return set((await conn.execute(select(jobs.c.claim_token).where(cond))).scalars())

    @translated
    async def expire_leases(self, max_attempts: int, now: float | None = None) -> tuple[list[str], list[str]]:
        """Running jobs whose lease ran out on the database's clock: queued again, or failed after
        ``max_attempts`` claims. Returns (requeued ids, failed ids)."""
        expired = and_(jobs.c.status == "running", jobs.c.lease_until < self._clock(now))
        return await self._requeue_or_fail(expired, max_attempts, now,
                                           "the replica running it stopped renewing its lease", "lease_expired")

    @translated
    async def requeue_owned(self, owner: str, max_attempts: int, now: float | None = None) -> tuple[list[str], list[str]]:
        """On start: the jobs this replica was running when it stopped, queued again (or failed after
        ``max_attempts``)."""
        mine = and_(jobs.c.status == "running", jobs.c.owner == owner)
        return await self._requeue_or_fail(mine, max_attempts, now, "the server restarted while it ran",
                                           "server_restarted")

    async def _requeue_or_fail(self, cond: Any, max_attempts: int, now: float | None, why: str,
                               code: str) -> tuple[list[str], list[str]]:
        clock = self._clock(now)
        async with self.engine.begin() as conn:
            found = (await conn.execute(
                select(jobs.c.id, jobs.c.attempts).where(cond).order_by(jobs.c.id).limit(BATCH)
                .with_for_update(skip_locked=True))).all()
            if not found:
                return [], []
            sel = and_(cond, jobs.c.id.in_([i for i, _ in found]))
            failed = [i for i, n in found if n >= max_attempts]
            requeued = [i for i, n in found if n < max_attempts]
            err = json.dumps({"message": f"{why}, {max_attempts} time(s); giving up", "code": "too_many_attempts"})
            if failed:
                await conn.execute(update(jobs).where(and_(sel, jobs.c.attempts >= max_attempts)).values(
                    status="failed", owner=None, lease_until=None, claim_token=None, finished_at=clock,
                    expires_at=clock + self.ttl, error=err))
            if requeued:
                await conn.execute(update(jobs).where(and_(sel, jobs.c.attempts < max_attempts)).values(
                    status="queued", owner=None, lease_until=None, claim_token=None))
                attempts = dict(found)
                for job_id in requeued:  # followers see why the stream starts over, not an error
                    seq = (await conn.execute(select(func.coalesce(func.max(job_events.c.seq), 0) + 1)
                                              .where(job_events.c.job_id == job_id))).scalar()
                    await conn.execute(insert(job_events).values(
                        job_id=job_id, seq=seq, event="requeued",
                        data=requeued_event_data(why, code, attempts[job_id])))
        return requeued, failed

    # ---- what a running job writes (each with its claim's fencing token) --------------------------------
    def _held(self, job_id: str, token: str) -> Any:
        return and_(jobs.c.id == job_id, jobs.c.claim_token == token, jobs.c.status == "running")

    @translated
    async def next_seq(self, job_id: str) -> int:
        """The sequence id the next event of ``job_id`` gets (a rerun continues after the last one)."""
        async with self.engine.connect() as conn:
            last = (await conn.execute(select(func.max(job_events.c.seq)).where(job_events.c.job_id == job_id))).scalar()
        return (last or 0) + 1

    @translated
    async def add_events(self, job_id: str, token: str, events: list[JobEvent],
                         progress: dict[str, Any] | None = None) -> bool:
        """Append events (and the progress) while the claim ``token`` holds the job; False when it does not
        (then nothing is written)."""
        async with self.engine.begin() as conn:
            held = await conn.execute(
                update(jobs).where(self._held(job_id, token))
                .values(progress=json.dumps(progress) if progress is not None else jobs.c.progress))
            if held.rowcount != 1:
                return False
            if events:
                await conn.execute(insert(job_events), [
                    {"job_id": job_id, "seq": e.seq, "event": e.event, "data": e.data} for e in events])
        self._changed(job_id, events)
        return True

    @translated
    async def events(self, job_id: str, after: int = 0) -> list[JobEvent]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(job_events.c.seq, job_events.c.event, job_events.c.data)
                                      .where(and_(job_events.c.job_id == job_id, job_events.c.seq > after))
                                      .order_by(job_events.c.seq))
            return [JobEvent(*r) for r in rows]

    @translated
    async def complete(self, job_id: str, token: str, result: bytes, now: float | None = None) -> bool:
        """Store the result file, then mark the job succeeded if the claim ``token`` still holds it (else
        the file is removed again: the job belongs to someone else now). Safe to call again after a store
        error: the file is rewritten, the update applies once."""
        clock = self._clock(now)
        name = f"{job_id}.json"
        path = self.results_dir / name
        tmp = path.with_suffix(f".{secrets.token_hex(4)}.tmp")
        tmp.write_bytes(result)
        try:
            async with self.engine.begin() as conn:
                done = await conn.execute(update(jobs).where(self._held(job_id, token)).values(
                    status="succeeded", finished_at=clock, expires_at=clock + self.ttl, owner=None,
                    lease_until=None, claim_token=None, result_path=name))
                if done.rowcount != 1:
                    tmp.unlink(missing_ok=True)
                    return False
                os.replace(tmp, path)  # inside the transaction: a crash before commit leaves a file the rerun replaces
        finally:
            tmp.unlink(missing_ok=True)  # a store error: the next try writes its own
        self._changed(job_id, finished=True)
        return True

    @translated
    async def fail(self, job_id: str, token: str, message: str, code: str, now: float | None = None) -> bool:
        clock = self._clock(now)
        async with self.engine.begin() as conn:
            done = await conn.execute(update(jobs).where(self._held(job_id, token)).values(
                status="failed", finished_at=clock, expires_at=clock + self.ttl, owner=None, lease_until=None,
                claim_token=None, error=json.dumps({"message": message, "code": code})))
        self._changed(job_id, finished=done.rowcount == 1)
        return done.rowcount == 1

    @translated
    async def release(self, job_id: str, token: str, count_attempt: bool = False,
                      requeued: str | None = None) -> bool:
        """Give a claimed job back to the queue, with a ``requeued`` event of data ``requeued`` after the
        last event written (when given); the attempt is not counted unless ``count_attempt`` (this replica
        was busy, stopping or out of room, rather than failing)."""
        attempts = jobs.c.attempts if count_attempt else jobs.c.attempts - 1
        written: list[JobEvent] = []
        async with self.engine.begin() as conn:
            done = await conn.execute(update(jobs).where(self._held(job_id, token)).values(
                status="queued", owner=None, lease_until=None, claim_token=None, attempts=attempts))
            if done.rowcount == 1 and requeued is not None:
                seq = (await conn.execute(select(func.coalesce(func.max(job_events.c.seq), 0) + 1)
                                          .where(job_events.c.job_id == job_id))).scalar()
                written.append(JobEvent(int(seq), "requeued", requeued))
                await conn.execute(insert(job_events).values(job_id=job_id, seq=seq, event="requeued", data=requeued))
        if written:
            self._changed(job_id, written)
        return done.rowcount == 1

    def result(self, job: JobRow) -> bytes | None:
        if job.result_path is None:
            return None
        try:
            return (self.results_dir / job.result_path).read_bytes()
        except FileNotFoundError:
            return None

    # ---- what clients do -----------------------------------------------------------------------------
    @translated
    async def cancel(self, job_id: str, now: float | None = None) -> tuple[JobRow | None, bool]:
        """Cancel a queued or running job. Returns (the job as it is now, whether this call canceled it);
        the owner of a running job sees it is no longer held at its next renewal and aborts it."""
        clock = self._clock(now)
        async with self.engine.begin() as conn:
            done = await conn.execute(
                update(jobs).where(and_(jobs.c.id == job_id, jobs.c.status.in_(("queued", "running"))))
                .values(status="canceled", finished_at=clock, expires_at=clock + self.ttl, lease_until=None,
                        claim_token=None,
                        error=json.dumps({"message": "the job was canceled", "code": "canceled"})))
            row = await self._get(conn, job_id)
        self._changed(job_id, finished=done.rowcount == 1)
        return row, done.rowcount == 1

    @translated
    async def delete(self, job_id: str) -> tuple[JobRow | None, bool]:
        """Remove a finished job, its events and its result; (the job, whether it was removed)."""
        async with self.engine.begin() as conn:
            job = await self._get(conn, job_id)
            if job is None or not job.finished:
                return job, False
            await self._remove(conn, [(job.id, job.result_path)])
        return job, True

    async def _remove(self, conn: AsyncConnection, rows: list[tuple[str, str | None]]) -> None:
        ids = [i for i, _ in rows]
        await conn.execute(delete(job_events).where(job_events.c.job_id.in_(ids)))
        await conn.execute(delete(jobs).where(jobs.c.id.in_(ids)))
        for _, result_path in rows:
            if result_path:
                (self.results_dir / result_path).unlink(missing_ok=True)

    @translated
    async def purge_expired(self, now: float | None = None, batch: int = BATCH) -> int:
        """Remove finished jobs past ``--job-ttl`` (and their events and results), ``batch`` per
        transaction, so any backlog is removed in bounded statements."""
        clock = self._clock(now)
        removable = and_(jobs.c.expires_at < clock, jobs.c.status.in_(tuple(FINISHED)),
                         or_(jobs.c.webhook_state.is_(None), jobs.c.webhook_state != "pending"))
        removed = 0
        while True:
            async with self.engine.begin() as conn:
                rows = [(i, p) for i, p in await conn.execute(
                    select(jobs.c.id, jobs.c.result_path).where(removable).order_by(jobs.c.id).limit(batch))]
                if rows:
                    await self._remove(conn, rows)
            removed += len(rows)
            if len(rows) < batch:
                return removed

    @translated
    async def sweep_files(self, older_than: float = 3600.0, now: float | None = None) -> int:
        """Remove files in the results folder that no job references (a result whose job is gone, a
        temporary file a crash left), when older than ``older_than`` seconds (a result being written
        now exists a moment before its job's row says so)."""
        cutoff = (time.time() if now is None else now) - older_than
        stale: dict[str, Path] = {}
        for p in self.results_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if p.is_file() and p.stat().st_mtime < cutoff:
                    stale[p.name] = p
        if not stale:
            return 0
        referenced: set[str] = set()
        names = [n for n in stale if n.endswith(".json")]
        async with self.engine.connect() as conn:
            for i in range(0, len(names), BATCH):
                referenced.update((await conn.execute(
                    select(jobs.c.result_path).where(jobs.c.result_path.in_(names[i:i + BATCH])))).scalars())
        removed = 0
        for name, p in stale.items():
            if name not in referenced:
                p.unlink(missing_ok=True)
                removed += 1
        return removed

    @translated
    async def probe_room(self, nbytes: int = 256 * 1024) -> None:
        """Raise :class:`~service.jobs.outage.StoreFull` unless a job of ``nbytes`` could be stored now: a
        row that size is committed and deleted again (a rolled-back one may never reach the disk), and a
        file that size written in the results folder. After a full disk, this tells when space is freed."""
        probe = "probe-" + secrets.token_hex(8)
        async with self.engine.begin() as conn:
            await conn.execute(insert(jobs).values(
                id=probe, route="probe", status="probe", spec=os.urandom(nbytes), slots=0, created_at=0.0,
                attempts=0))
        async with self.engine.begin() as conn:
            await conn.execute(delete(jobs).where(jobs.c.id == probe))
        path = self.results_dir / f"{probe}.tmp"
        try:
            path.write_bytes(os.urandom(nbytes))
        finally:
            path.unlink(missing_ok=True)

    # ---- webhooks ----------------------------------------------------------------------------------
    @translated
    async def pending_webhooks(self) -> list[JobRow]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(*_SUMMARY).where(and_(
                jobs.c.status.in_(tuple(FINISHED)), jobs.c.webhook_state == "pending")))
            return [_row(r) for r in rows]

    @translated
    async def set_webhook_state(self, job_id: str, state: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(update(jobs).where(jobs.c.id == job_id).values(webhook_state=state))


#: Milliseconds a SQLite writer waits for another one before "database is locked" (then retried).
SQLITE_BUSY_MS = 10000


def _sqlite_pragmas(busy_ms: int) -> Any:
    """WAL lets readers (pollers of /events) work while the worker writes; a busy timeout makes
    concurrent writers wait instead of failing. ``synchronous=NORMAL`` (safe with WAL: a killed process
    loses nothing, only a power cut may lose the last commits) spares an fsync per event written."""
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return on_connect


async def open_store(store: str | None, state_dir: Path, results_dir: Path | None = None,
                     ttl: float = 86400.0, sqlite_busy_ms: int = SQLITE_BUSY_MS) -> JobStore:
    """The store ``--job-store`` names (default: SQLite under ``state_dir``), schema created or checked.
    Results go to ``results_dir`` (default: ``state_dir/results``). Raises
    :class:`~service.jobs.outage.StoreUnavailable` when the database cannot be reached."""
    state_dir.mkdir(parents=True, exist_ok=True)
    url = database_url(store, state_dir)
    engine = create_async_engine(url, pool_pre_ping=url.startswith("postgresql"))
    if engine.dialect.name == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas(sqlite_busy_ms))
    js = JobStore(engine, results_dir or state_dir / "results", ttl)
    try:
        await js.open()
    except BaseException:
        await engine.dispose()
        raise
    return js
