"""The job store: one table of jobs, one of their events, and a schema version, in SQLite or PostgreSQL.

Written once with SQLAlchemy 2 Core (async: aiosqlite, asyncpg) instead of two SQL dialects. What makes
it safe for several replicas on one PostgreSQL:

- a claim selects queued jobs ``FOR UPDATE SKIP LOCKED`` (two replicas never wait on or take the same
  row) and then moves each one with a conditional ``UPDATE … WHERE status = 'queued'``, which also keeps
  SQLite (one writer, no row locks) correct;
- a running job carries its ``owner`` and ``lease_until``; the owner renews the lease, and every write a
  worker makes about a job (events, completion) is conditional on still owning it, so a replica that lost
  its lease cannot overwrite the replica that took the job over;
- a lease that expires queues the job again, until ``max_attempts`` claims, then it fails with the reason.

A result is a file under the results folder, written before the completing update and named after the
job, so it exists exactly once whatever a crash interrupts; the row references it.
"""

from __future__ import annotations

import asyncio
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
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

Status = Literal["queued", "running", "succeeded", "failed", "canceled"]
STATUSES: tuple[Status, ...] = ("queued", "running", "succeeded", "failed", "canceled")
FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})

#: The schema this code reads and writes; a store written by a newer version is refused, an older one is
#: upgraded in place (each step additive: see :data:`UPGRADES`).
SCHEMA_VERSION = 2

#: Tries to create or check the schema (processes starting together on one SQLite file may collide).
OPEN_ATTEMPTS = 5

#: Queued jobs a claim looks past one that needs more slots than are free (OpenAI's ``n``).
CLAIM_LOOKAHEAD = 8

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


async def _upgrade_to_2(conn: AsyncConnection) -> None:
    """Schema 2 (fencing, bounded reads): the claim token column and the (status, created_at, id) index."""
    names = await conn.run_sync(lambda c: {col["name"] for col in inspect(c).get_columns("emu35_jobs")})
    if "claim_token" not in names:
        await conn.exec_driver_sql("ALTER TABLE emu35_jobs ADD COLUMN claim_token VARCHAR(32)")
    await conn.exec_driver_sql(
        "CREATE INDEX IF NOT EXISTS ix_emu35_jobs_status_created_id ON emu35_jobs (status, created_at, id)")


#: version → the step that brings a store of ``version - 1`` to it. Steps are additive (new columns,
#: new indexes), so an older replica still running during a rolling upgrade keeps working.
UPGRADES = {2: _upgrade_to_2}


class SchemaTooNew(RuntimeError):
    """The store was written by a newer emu35-serve; refusing beats corrupting it."""


@dataclass(frozen=True)
class NewJob:
    route: str
    spec: bytes
    slots: int = 1
    webhook: str | None = None


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
    spec: bytes
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
    return JobRow(
        id=m["id"], route=m["route"], status=m["status"], spec=bytes(m["spec"]), slots=m["slots"],
        created_at=m["created_at"], started_at=m["started_at"], finished_at=m["finished_at"],
        expires_at=m["expires_at"], owner=m["owner"], lease_until=m["lease_until"], attempts=m["attempts"],
        progress=json.loads(m["progress"]) if m["progress"] else {}, result_path=m["result_path"],
        error=json.loads(m["error"]) if m["error"] else None, webhook=m["webhook"],
        webhook_state=m["webhook_state"])


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


class JobStore:
    """Every read and write of jobs; safe to share between tasks, and between replicas on PostgreSQL."""

    def __init__(self, engine: AsyncEngine, results_dir: Path, ttl: float) -> None:
        self.engine = engine
        self.results_dir = results_dir
        self.ttl = ttl
        self.is_postgres = engine.dialect.name == "postgresql"
        self._watchers: dict[str, set[JobWatch]] = {}  # followers in this process, handed each commit

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
    async def submit(self, new: NewJob, now: float | None = None) -> JobRow:
        now = time.time() if now is None else now
        job_id = new_job_id()
        async with self.engine.begin() as conn:
            await conn.execute(insert(jobs).values(
                id=job_id, route=new.route, status="queued", spec=new.spec, slots=new.slots, created_at=now,
                attempts=0, webhook=new.webhook, webhook_state="pending" if new.webhook else None))
            return await self._get(conn, job_id)  # type: ignore[return-value]

    async def get(self, job_id: str) -> JobRow | None:
        async with self.engine.connect() as conn:
            return await self._get(conn, job_id)

    async def _get(self, conn: AsyncConnection, job_id: str) -> JobRow | None:
        r = (await conn.execute(select(jobs).where(jobs.c.id == job_id))).first()
        return _row(r) if r is not None else None

    async def list_jobs(self, status: str | None = None, limit: int = 20, after: str | None = None) -> list[JobRow]:
        """Newest first; ``after`` is the last id of the previous page."""
        q = select(jobs)
        if status is not None:
            q = q.where(jobs.c.status == status)
        if after is not None:
            anchor = (await self.get(after))
            if anchor is None:
                return []
            q = q.where((jobs.c.created_at < anchor.created_at)
                        | ((jobs.c.created_at == anchor.created_at) & (jobs.c.id < anchor.id)))
        q = q.order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
        async with self.engine.connect() as conn:
            return [_row(r) for r in await conn.execute(q)]

    async def counts(self) -> dict[str, int]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status))
            found = {status: n for status, n in rows}
        return {s: found.get(s, 0) for s in STATUSES}

    async def oldest_queued(self) -> float | None:
        async with self.engine.connect() as conn:
            return (await conn.execute(select(func.min(jobs.c.created_at)).where(jobs.c.status == "queued"))).scalar()

    # ---- claiming and leases -----------------------------------------------------------------------
    async def claim(self, owner: str, free_slots: int, lease: float, now: float | None = None) -> list[JobRow]:
        """Queued jobs, oldest first, that fit in ``free_slots``, now running under ``owner``'s lease."""
        if free_slots <= 0:
            return []
        now = time.time() if now is None else now
        claimed: list[JobRow] = []
        async with self.engine.begin() as conn:
            candidates = (await conn.execute(
                select(jobs.c.id, jobs.c.slots).where(jobs.c.status == "queued")
                .order_by(jobs.c.created_at, jobs.c.id).limit(free_slots + CLAIM_LOOKAHEAD)
                .with_for_update(skip_locked=True))).all()
            left = free_slots
            for job_id, slots in candidates:
                if slots > left:
                    continue
                moved = await conn.execute(
                    update(jobs).where(and_(jobs.c.id == job_id, jobs.c.status == "queued"))
                    .values(status="running", owner=owner, lease_until=now + lease, started_at=now,
                            attempts=jobs.c.attempts + 1))
                if moved.rowcount == 1:
                    left -= slots
                    claimed.append(await self._get(conn, job_id))  # type: ignore[arg-type]
        return claimed

    async def renew(self, owner: str, job_ids: Iterable[str], lease: float, now: float | None = None) -> set[str]:
        """Extend ``owner``'s leases; the ids it still holds (a canceled or taken-over job is not)."""
        ids = list(job_ids)
        if not ids:
            return set()
        now = time.time() if now is None else now
        cond = and_(jobs.c.id.in_(ids), jobs.c.owner == owner, jobs.c.status == "running")
        async with self.engine.begin() as conn:
            await conn.execute(update(jobs).where(cond).values(lease_until=now + lease))
            return set((await conn.execute(select(jobs.c.id).where(cond))).scalars())

    async def expire_leases(self, max_attempts: int, now: float | None = None) -> tuple[list[str], list[str]]:
        """Running jobs whose lease ran out: queued again, or failed after ``max_attempts`` claims.
        Returns (requeued ids, failed ids)."""
        now = time.time() if now is None else now
        expired = and_(jobs.c.status == "running", jobs.c.lease_until < now)
        return await self._requeue_or_fail(expired, max_attempts, now,
                                           "the replica running it stopped renewing its lease")

    async def requeue_owned(self, owner: str, max_attempts: int, now: float | None = None) -> tuple[list[str], list[str]]:
        """On start: the jobs this replica was running when it stopped, queued again (or failed after
        ``max_attempts``)."""
        now = time.time() if now is None else now
        mine = and_(jobs.c.status == "running", jobs.c.owner == owner)
        return await self._requeue_or_fail(mine, max_attempts, now, "the server restarted while it ran")

    async def _requeue_or_fail(self, cond: Any, max_attempts: int, now: float, why: str) -> tuple[list[str], list[str]]:
        async with self.engine.begin() as conn:
            ids = list((await conn.execute(
                select(jobs.c.id).where(cond).with_for_update(skip_locked=True))).scalars())
            if not ids:
                return [], []
            sel = and_(cond, jobs.c.id.in_(ids))
            failed = list((await conn.execute(select(jobs.c.id).where(and_(sel, jobs.c.attempts >= max_attempts)))).scalars())
            err = json.dumps({"message": f"{why}, {max_attempts} time(s); giving up", "code": "too_many_attempts"})
            if failed:
                await conn.execute(update(jobs).where(and_(sel, jobs.c.attempts >= max_attempts)).values(
                    status="failed", owner=None, lease_until=None, finished_at=now, expires_at=now + self.ttl,
                    error=err))
            await conn.execute(update(jobs).where(and_(sel, jobs.c.attempts < max_attempts)).values(
                status="queued", owner=None, lease_until=None))
        return [i for i in ids if i not in failed], failed

    # ---- what a running job writes -----------------------------------------------------------------
    def _held(self, job_id: str, owner: str) -> Any:
        return and_(jobs.c.id == job_id, jobs.c.owner == owner, jobs.c.status == "running")

    async def next_seq(self, job_id: str) -> int:
        """The sequence id the next event of ``job_id`` gets (a rerun continues after the last one)."""
        async with self.engine.connect() as conn:
            last = (await conn.execute(select(func.max(job_events.c.seq)).where(job_events.c.job_id == job_id))).scalar()
        return (last or 0) + 1

    async def add_events(self, job_id: str, owner: str, events: list[JobEvent],
                         progress: dict[str, Any] | None = None) -> bool:
        """Append events (and the progress) while ``owner`` holds the job; False when it does not."""
        async with self.engine.begin() as conn:
            held = await conn.execute(
                update(jobs).where(self._held(job_id, owner))
                .values(progress=json.dumps(progress) if progress is not None else jobs.c.progress))
            if held.rowcount != 1:
                return False
            if events:
                await conn.execute(insert(job_events), [
                    {"job_id": job_id, "seq": e.seq, "event": e.event, "data": e.data} for e in events])
        self._changed(job_id, events)
        return True

    async def events(self, job_id: str, after: int = 0) -> list[JobEvent]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(job_events.c.seq, job_events.c.event, job_events.c.data)
                                      .where(and_(job_events.c.job_id == job_id, job_events.c.seq > after))
                                      .order_by(job_events.c.seq))
            return [JobEvent(*r) for r in rows]

    async def complete(self, job_id: str, owner: str, result: bytes, now: float | None = None) -> bool:
        """Store the result file, then mark the job succeeded if ``owner`` still holds it (else the file
        is removed again: the job belongs to someone else now)."""
        now = time.time() if now is None else now
        name = f"{job_id}.json"
        path = self.results_dir / name
        tmp = path.with_suffix(f".{secrets.token_hex(4)}.tmp")
        tmp.write_bytes(result)
        async with self.engine.begin() as conn:
            done = await conn.execute(update(jobs).where(self._held(job_id, owner)).values(
                status="succeeded", finished_at=now, expires_at=now + self.ttl, owner=None, lease_until=None,
                result_path=name))
            if done.rowcount != 1:
                tmp.unlink(missing_ok=True)
                return False
            os.replace(tmp, path)  # inside the transaction: a crash before commit leaves a file the rerun replaces
        self._changed(job_id, finished=True)
        return True

    async def fail(self, job_id: str, owner: str, message: str, code: str, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        async with self.engine.begin() as conn:
            done = await conn.execute(update(jobs).where(self._held(job_id, owner)).values(
                status="failed", finished_at=now, expires_at=now + self.ttl, owner=None, lease_until=None,
                error=json.dumps({"message": message, "code": code})))
        self._changed(job_id, finished=done.rowcount == 1)
        return done.rowcount == 1

    async def release(self, job_id: str, owner: str, count_attempt: bool = False) -> bool:
        """Give a claimed job back to the queue; the attempt is not counted unless ``count_attempt``
        (this replica was busy or stopping, rather than failing)."""
        attempts = jobs.c.attempts if count_attempt else jobs.c.attempts - 1
        async with self.engine.begin() as conn:
            done = await conn.execute(update(jobs).where(self._held(job_id, owner)).values(
                status="queued", owner=None, lease_until=None, attempts=attempts))
            return done.rowcount == 1

    def result(self, job: JobRow) -> bytes | None:
        if job.result_path is None:
            return None
        try:
            return (self.results_dir / job.result_path).read_bytes()
        except FileNotFoundError:
            return None

    # ---- what clients do -----------------------------------------------------------------------------
    async def cancel(self, job_id: str, now: float | None = None) -> tuple[JobRow | None, bool]:
        """Cancel a queued or running job. Returns (the job as it is now, whether this call canceled it);
        the owner of a running job sees it is no longer held at its next renewal and aborts it."""
        now = time.time() if now is None else now
        async with self.engine.begin() as conn:
            done = await conn.execute(
                update(jobs).where(and_(jobs.c.id == job_id, jobs.c.status.in_(("queued", "running"))))
                .values(status="canceled", finished_at=now, expires_at=now + self.ttl, lease_until=None,
                        error=json.dumps({"message": "the job was canceled", "code": "canceled"})))
            row = await self._get(conn, job_id)
        self._changed(job_id, finished=done.rowcount == 1)
        return row, done.rowcount == 1

    async def delete(self, job_id: str) -> tuple[JobRow | None, bool]:
        """Remove a finished job, its events and its result; (the job, whether it was removed)."""
        async with self.engine.begin() as conn:
            job = await self._get(conn, job_id)
            if job is None or not job.finished:
                return job, False
            await self._remove(conn, [job])
        return job, True

    async def _remove(self, conn: AsyncConnection, rows: list[JobRow]) -> None:
        ids = [j.id for j in rows]
        await conn.execute(delete(job_events).where(job_events.c.job_id.in_(ids)))
        await conn.execute(delete(jobs).where(jobs.c.id.in_(ids)))
        for j in rows:
            if j.result_path:
                (self.results_dir / j.result_path).unlink(missing_ok=True)

    async def purge_expired(self, now: float | None = None) -> int:
        """Remove finished jobs past ``--job-ttl`` (and their events and results)."""
        now = time.time() if now is None else now
        async with self.engine.begin() as conn:
            rows = [_row(r) for r in await conn.execute(
                select(jobs).where(and_(jobs.c.expires_at < now, jobs.c.status.in_(tuple(FINISHED)),
                                        (jobs.c.webhook_state.is_(None)) | (jobs.c.webhook_state != "pending"))))]
            if rows:
                await self._remove(conn, rows)
        return len(rows)

    # ---- webhooks ----------------------------------------------------------------------------------
    async def pending_webhooks(self) -> list[JobRow]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(jobs).where(and_(
                jobs.c.status.in_(tuple(FINISHED)), jobs.c.webhook_state == "pending")))
            return [_row(r) for r in rows]

    async def set_webhook_state(self, job_id: str, state: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(update(jobs).where(jobs.c.id == job_id).values(webhook_state=state))


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """WAL lets readers (pollers of /events) work while the worker writes; a busy timeout makes
    concurrent writers wait instead of failing. ``synchronous=NORMAL`` (safe with WAL: a killed process
    loses nothing, only a power cut may lose the last commits) spares an fsync per event written."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


async def open_store(store: str | None, state_dir: Path, results_dir: Path | None = None,
                     ttl: float = 86400.0) -> JobStore:
    """The store ``--job-store`` names (default: SQLite under ``state_dir``), schema created or checked.
    Results go to ``results_dir`` (default: ``state_dir/results``)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    url = database_url(store, state_dir)
    engine = create_async_engine(url, pool_pre_ping=url.startswith("postgresql"))
    if engine.dialect.name == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    js = JobStore(engine, results_dir or state_dir / "results", ttl)
    await js.open()
    return js
