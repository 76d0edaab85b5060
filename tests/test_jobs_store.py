"""The job store and worker below HTTP, on SQLite and on a real PostgreSQL: claims fit free slots and never
take a job twice, leases are renewed and expire into the queue, too many attempts fail the job with the
reason, events replay by sequence id, results are stored exactly once, TTL removes finished jobs, and
webhooks are signed and retried."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from service.jobs import (
    JobEvent,
    JobFailed,
    JobLost,
    JobReporter,
    JobRetry,
    JobRow,
    JobWorker,
    NewJob,
    RetryPolicy,
    WebhookRefused,
    WebhookSender,
    WorkerConfig,
    check_webhook_url,
    follow_events,
    open_store,
)
from service.jobs.store import SCHEMA_VERSION, SchemaTooNew, database_url, schema_version
from tests.pgcluster import fresh_database


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str | None:
    """None: the default SQLite file under the state folder; else a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    cluster = request.getfixturevalue("pg_cluster")
    return fresh_database(cluster, "t" + uuid.uuid4().hex[:12])


def run(coro):
    return asyncio.run(coro)


async def opened(url: str | None, tmp_path: Path, ttl: float = 3600.0):
    return await open_store(url, tmp_path / "state", tmp_path / "results", ttl=ttl)


def test_database_url_defaults_to_sqlite_under_the_state_dir_and_uses_asyncpg(tmp_path):
    assert database_url(None, tmp_path) == f"sqlite+aiosqlite:///{tmp_path}/jobs.sqlite3"
    assert database_url("postgresql://u:p@db:5432/jobs", tmp_path) == "postgresql+asyncpg://u:p@db:5432/jobs"


def test_claims_fit_free_slots_oldest_first_and_never_twice(store_url, tmp_path):
    async def scenario():
        s = await opened(store_url, tmp_path)
        try:
            ids = [(await s.submit(NewJob("t2i", b"{}", slots=n), now=100.0 + i)).id for i, n in enumerate([1, 2, 1])]
            assert await s.claim("a", 0, 30) == []
            first = await s.claim("a", 2, 30, now=200.0)  # job 0 (1 slot) fits, job 1 (2 slots) does not, job 2 does
            assert [j.id for j in first] == [ids[0], ids[2]]
            assert all(j.status == "running" and j.owner == "a" and j.attempts == 1 for j in first)
            assert await s.claim("b", 1, 30) == []  # the 2-slot job needs 2
            (second,) = await s.claim("b", 4, 30)
            assert second.id == ids[1] and second.owner == "b"
            assert (await s.counts())["running"] == 3
        finally:
            await s.close()

    run(scenario())


def test_concurrent_claims_take_each_job_once(store_url, tmp_path):
    async def scenario():
        s = await opened(store_url, tmp_path)
        try:
            for _ in range(20):
                await s.submit(NewJob("t2i", b"{}"))
            batches = await asyncio.gather(*(s.claim(f"r{i}", 3, 30) for i in range(10)))
            taken = [j.id for b in batches for j in b]
            assert len(taken) == len(set(taken))  # none twice (SQLite's racers may come back empty-handed)
            taken += [j.id for j in await s.claim("last", 20, 30)]
            assert len(taken) == len(set(taken)) == 20
        finally:
            await s.close()

    run(scenario())


def test_expired_leases_are_requeued_then_failed_after_max_attempts(store_url, tmp_path):
    async def scenario():
        s = await opened(store_url, tmp_path)
        try:
            job = await s.submit(NewJob("t2i", b"{}"), now=0.0)
            for attempt in (1, 2):
                (claimed,) = await s.claim("dead", 1, lease=10, now=100.0 * attempt)
                assert claimed.attempts == attempt
                assert await s.expire_leases(max_attempts=2, now=100.0 * attempt + 5) == ([], [])  # held
                requeued, failed = await s.expire_leases(max_attempts=2, now=100.0 * attempt + 20)
                if attempt == 1:
                    assert (requeued, failed) == ([job.id], [])
                    assert (await s.get(job.id)).status == "queued"
            assert (requeued, failed) == ([], [job.id])
            gone = await s.get(job.id)
            assert gone.status == "failed" and gone.error["code"] == "too_many_attempts"
            assert "stopped renewing its lease" in gone.error["message"]
        finally:
            await s.close()

    run(scenario())


def test_a_replica_that_lost_its_job_cannot_write_to_it(store_url, tmp_path):
    async def scenario():
        s = await opened(store_url, tmp_path)
        try:
            job = await s.submit(NewJob("t2i", b"{}"), now=0.0)
            (old,) = await s.claim("old", 1, lease=10, now=1.0)
            await s.expire_leases(3, now=20.0)
            (new,) = await s.claim("new", 1, lease=10, now=21.0)
            assert await s.renew([old.claim_token], 10) == set()
            assert not await s.add_events(job.id, old.claim_token, [JobEvent(2, "text", "x")])
            assert not await s.complete(job.id, old.claim_token, b'{"old": 1}')
            assert await s.complete(job.id, new.claim_token, b'{"new": 1}')
            done = await s.get(job.id)
            assert done.status == "succeeded" and s.result(done) == b'{"new": 1}'
            assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [f"{job.id}.json"]
        finally:
            await s.close()

    run(scenario())


def test_restart_requeues_this_replicas_running_jobs_only(store_url, tmp_path):
    async def scenario():
        s = await opened(store_url, tmp_path)
        try:
            a = await s.submit(NewJob("t2i", b"{}"))
            b = await s.submit(NewJob("t2i", b"{}"))
            await s.claim("me", 1, 30)
            await s.claim("other", 1, 30)
            assert await s.requeue_owned("me", max_attempts=3) == ([a.id], [])
            assert (await s.get(a.id)).status == "queued" and (await s.get(b.id)).status == "running"
        finally:
            await s.close()

    run(scenario())


def test_events_replay_after_a_sequence_id_and_follow_ends_with_the_job(store_url, tmp_path):
    async def scenario():
        s = await opened(store_url, tmp_path)
        try:
            job = await s.submit(NewJob("t2i", b"{}"))
            (claim,) = await s.claim("w", 1, 30)
            w = claim.claim_token
            for seq in range(1, 6):
                assert await s.add_events(job.id, w, [JobEvent(seq, "text", f"d{seq}")], {"rows": seq})
            assert [e.seq for e in await s.events(job.id, after=3)] == [4, 5]
            assert (await s.get(job.id)).progress == {"rows": 5}
            assert await s.next_seq(job.id) == 6

            async def finish_later():
                await asyncio.sleep(0.3)
                await s.add_events(job.id, w, [JobEvent(6, "done", "{}")])
                await s.complete(job.id, w, b"{}")

            finisher = asyncio.create_task(finish_later())
            got = [e.seq async for e in follow_events(s, job.id, after=2, poll=0.05)]
            await finisher
            assert got == [3, 4, 5, 6]
        finally:
            await s.close()

    run(scenario())


class CountingReads:
    """Counts a store's reads of events, to tell a follower served from memory from one that polls."""

    def __init__(self, store) -> None:
        self.n, self._events = 0, store.events
        store.events = self

    async def __call__(self, job_id, after=0):
        self.n += 1
        return await self._events(job_id, after)


def test_a_follower_gets_this_processs_events_in_memory_and_reads_the_store_for_a_gap(store_url, tmp_path):
    """Events this process commits reach its followers without a store read per event; events another
    replica wrote in between (a gap in the sequence ids) are read from the store, so none is lost."""
    async def scenario():
        here = await opened(store_url, tmp_path)
        other = await opened(store_url, tmp_path)  # another replica on the same store
        try:
            job = await here.submit(NewJob("t2i", b"{}"))
            (claim,) = await here.claim("w", 1, 30)
            w = claim.claim_token
            reads = CountingReads(here)

            async def write() -> None:
                await asyncio.sleep(0.05)
                for seq in range(1, 21):  # 20 events from this process
                    assert await here.add_events(job.id, w, [JobEvent(seq, "text", f"d{seq}")])
                    await asyncio.sleep(0)
                # 21-22 from the other replica: this process's watch never sees them
                assert await other.add_events(job.id, w, [JobEvent(21, "text", "d21"), JobEvent(22, "text", "d22")])
                assert await here.add_events(job.id, w, [JobEvent(23, "done", "{}")])
                await here.complete(job.id, w, b"{}")

            writer = asyncio.create_task(write())
            got = [(e.seq, e.data) async for e in follow_events(here, job.id, poll=30)]  # no polling
            await writer
            assert got == [(s, f"d{s}") for s in range(1, 23)] + [(23, "{}")]
            # the first read, the gap and the end: not one read per event
            assert reads.n <= 3
        finally:
            await here.close()
            await other.close()

    run(scenario())


def test_dense_events_are_written_together_sparse_ones_at_once_and_all_in_order(store_url, tmp_path):
    """A job's events cost a few store writes a second however fast they come (text tokens), one that
    follows a quiet spell is written at once, the timer writes what waits, and a lost job is noticed."""
    async def scenario():
        s = await opened(store_url, tmp_path)
        try:
            job = await s.submit(NewJob("t2i", b"{}"))
            (claim,) = await s.claim("w", 1, 30)
            writes: list[list[int]] = []
            add_events = s.add_events

            async def counting(job_id, owner, events, progress=None):
                writes.append([e.seq for e in events])
                return await add_events(job_id, owner, events, progress)

            s.add_events = counting
            report = JobReporter(s, job.id, claim.claim_token, first_seq=1, write_every=0.2)
            for i in range(50):  # a burst: the first at once, the rest together when the timer fires
                report.rows_done(i + 1)
                await report.event("text", f"t{i}")
            assert writes == [[1]]
            await asyncio.sleep(0.6)
            assert writes == [[1], list(range(2, 51))]
            assert (await s.get(job.id)).progress == {"images": 0, "rows": 50}
            await report.event("text", "after a quiet spell")  # written at once
            assert writes[-1] == [51]
            await report.event("text", "soon after")
            await report.flush()  # what the worker does before storing the result
            assert writes[-1] == [52]
            assert [e.seq for e in await s.events(job.id)] == list(range(1, 53))

            await s.cancel(job.id)
            await report.event("text", "x")  # waits for the timer, which finds the job gone
            await asyncio.sleep(0.6)
            with pytest.raises(JobLost):
                await report.event("text", "y")
            report.close()
        finally:
            await s.close()

    run(scenario())


def test_events_a_failed_write_could_not_store_go_with_the_next_write(tmp_path):
    async def scenario():
        s = await opened(None, tmp_path)
        try:
            job = await s.submit(NewJob("t2i", b"{}"))
            (claim,) = await s.claim("w", 1, 30)
            add_events, failures = s.add_events, [ValueError("not a store error")]

            async def flaky(job_id, owner, events, progress=None):
                if failures:
                    raise failures.pop()
                return await add_events(job_id, owner, events, progress)

            s.add_events = flaky
            report = JobReporter(s, job.id, claim.claim_token, first_seq=1, write_every=0.2)
            with pytest.raises(ValueError):
                await report.event("text", "a")  # written at once: the write fails
            await report.event("text", "b")  # waits for the timer, which writes both
            await asyncio.sleep(0.6)
            assert [(e.seq, e.data) for e in await s.events(job.id)] == [(1, "a"), (2, "b")]
            report.close()
        finally:
            await s.close()

    run(scenario())


def test_cancel_only_unfinished_and_delete_only_finished(store_url, tmp_path):
    async def scenario():
        s = await opened(store_url, tmp_path)
        try:
            job = await s.submit(NewJob("t2i", b"{}"))
            assert (await s.delete(job.id))[1] is False  # queued: not removable
            row, changed = await s.cancel(job.id)
            assert changed and row.status == "canceled"
            row, changed = await s.cancel(job.id)
            assert not changed and row.status == "canceled"  # the HTTP layer answers 409
            assert await s.claim("w", 4, 30) == []
            assert (await s.delete(job.id))[1] is True
            assert await s.get(job.id) is None
            assert await s.cancel("job-unknown") == (None, False)
        finally:
            await s.close()

    run(scenario())


def test_ttl_purges_finished_jobs_with_their_events_and_results(store_url, tmp_path):
    async def scenario():
        s = await opened(store_url, tmp_path, ttl=10.0)
        try:
            old = await s.submit(NewJob("t2i", b"{}"))
            live = await s.submit(NewJob("t2i", b"{}"))
            (claim,) = await s.claim("w", 1, 30)
            await s.add_events(old.id, claim.claim_token, [JobEvent(1, "done", "{}")])
            await s.complete(old.id, claim.claim_token, b"{}", now=100.0)
            assert await s.purge_expired(now=105.0) == 0
            assert await s.purge_expired(now=111.0) == 1
            assert await s.get(old.id) is None and await s.events(old.id) == []
            assert not (tmp_path / "results" / f"{old.id}.json").exists()
            assert (await s.get(live.id)).status == "queued"
        finally:
            await s.close()

    run(scenario())


def test_listing_filters_by_status_and_pages_newest_first(store_url, tmp_path):
    async def scenario():
        s = await opened(store_url, tmp_path)
        try:
            ids = [(await s.submit(NewJob("t2i", b"{}"), now=float(i))).id for i in range(5)]
            await s.cancel(ids[1])
            page1 = await s.list_jobs(status="queued", limit=2)
            page2 = await s.list_jobs(status="queued", limit=2, after=page1[-1].id)
            assert [j.id for j in page1 + page2] == [ids[4], ids[3], ids[2], ids[0]]
            assert [j.id for j in await s.list_jobs(status="canceled")] == [ids[1]]
        finally:
            await s.close()

    run(scenario())


def test_processes_opening_one_new_sqlite_store_together_all_succeed(tmp_path):
    async def scenario():
        stores = await asyncio.gather(*(opened(None, tmp_path) for _ in range(4)))
        try:
            job = await stores[0].submit(NewJob("t2i", b"{}"))
            assert (await stores[3].get(job.id)).status == "queued"
        finally:
            for s in stores:
                await s.close()

    run(scenario())


def test_a_store_from_a_newer_version_is_refused(tmp_path):
    async def scenario():
        s = await opened(None, tmp_path)
        async with s.engine.begin() as conn:
            await conn.execute(schema_version.update().values(version=SCHEMA_VERSION + 1))
        await s.close()
        with pytest.raises(SchemaTooNew):
            await opened(None, tmp_path)

    run(scenario())


# ---- the worker with a stand-in executor ---------------------------------------------------------------
class FakeExecutor:
    """Runs a job by emitting three events; a spec of {"fail": true} fails, {"block": true} waits."""

    def __init__(self, slots: int = 2) -> None:
        self.slots, self.active, self.ran = slots, 0, []
        self.unblock = asyncio.Event()

    def free_slots(self) -> int:
        return self.slots - self.active

    def total_slots(self) -> int:
        return self.slots

    async def run(self, job: JobRow, report: JobReporter) -> bytes:
        spec = json.loads(job.spec)
        self.active += job.slots
        report.admitted.set()
        try:
            self.ran.append(job.id)
            if spec.get("fail"):
                raise JobFailed("bad request", "invalid_generation")
            for i in range(3):
                report.rows_done(i + 1)
                await report.event("image_progress", json.dumps({"rows": i + 1}))
            if spec.get("retry") and self.ran.count(job.id) == 1:  # the first run's replica gives up on it
                raise JobRetry("engine died", count_attempt=spec["retry"] == "counted")
            if spec.get("block"):
                await self.unblock.wait()
            return json.dumps({"job": job.id}).encode()
        finally:
            self.active -= job.slots

    def webhook_body(self, job: JobRow) -> bytes:
        return json.dumps({"id": job.id, "status": job.status}).encode()


async def wait_for(predicate, timeout: float = 10.0) -> None:
    async def poll():
        while not await predicate():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


def test_worker_runs_jobs_within_its_slots_and_stores_each_result_once(store_url, tmp_path):
    async def scenario():
        s = await opened(store_url, tmp_path)
        ex = FakeExecutor(slots=2)
        w = JobWorker(s, ex, WorkerConfig(owner="w1", poll=0.05, housekeeping=0.05))
        try:
            ids = [(await s.submit(NewJob("t2i", json.dumps({"block": True}).encode()))).id for _ in range(3)]
            bad = (await s.submit(NewJob("t2i", b'{"fail": true}'))).id
            await w.start()
            await wait_for(lambda: _count(s, "running", 2))
            assert (await s.counts())["queued"] == 2  # the third waits for a free slot
            ex.unblock.set()
            await wait_for(lambda: _count(s, "succeeded", 3))
            await wait_for(lambda: _count(s, "failed", 1))
            failed = await s.get(bad)
            assert failed.status == "failed" and failed.error == {"message": "bad request", "code": "invalid_generation"}
            for job_id in ids:
                row = await s.get(job_id)
                assert json.loads(s.result(row)) == {"job": job_id}
                assert [e.seq for e in await s.events(job_id)] == [1, 2, 3]
                assert row.progress == {"images": 0, "rows": 3}
            assert sorted(ex.ran) == sorted([*ids, bad])
        finally:
            await w.stop()
            await s.close()

    run(scenario())


async def _count(s, status: str, n: int) -> bool:
    return (await s.counts())[status] == n


@pytest.mark.parametrize("retry", ["counted", "uncounted"])
def test_a_job_its_replica_could_not_finish_is_queued_again(store_url, tmp_path, retry):
    async def scenario():
        s = await opened(store_url, tmp_path)
        ex = FakeExecutor(slots=1)
        w = JobWorker(s, ex, WorkerConfig(owner="w1", poll=0.05, housekeeping=0.05))
        try:
            job = await s.submit(NewJob("t2i", json.dumps({"retry": retry}).encode()))
            await w.start()
            await wait_for(lambda: _count(s, "succeeded", 1))
            row = await s.get(job.id)
            assert ex.ran == [job.id, job.id] and row.attempts == (2 if retry == "counted" else 1)
            events = await s.events(job.id)
            assert [e.seq for e in events] == [1, 2, 3, 4, 5, 6, 7]  # the rerun continues the ids
            # followers see why the stream starts over: a `requeued` event, never an `error`
            assert [e.event for e in events] == ["image_progress"] * 3 + ["requeued"] + ["image_progress"] * 3
            assert json.loads(events[3].data) == {"message": "engine died", "code": "engine_unavailable", "attempts": 1}
        finally:
            await w.stop()
            await s.close()

    run(scenario())


def test_a_job_launched_while_leases_are_renewed_is_not_taken_for_lost(tmp_path):
    """The renewal answers for the jobs it was asked about; one claimed meanwhile is not 'no longer held'."""
    async def scenario():
        s = await opened(None, tmp_path)
        w = JobWorker(s, FakeExecutor(slots=1), WorkerConfig(owner="w1"))
        try:
            job = await s.submit(NewJob("t2i", b'{"block": true}'))
            renew = s.renew

            async def renew_while_a_claim_lands(tokens, lease):
                held = await renew(tokens, lease)
                await w.claim_once()  # launched after the renewal read its ids, before it answered
                return held

            s.renew = renew_while_a_claim_lands  # type: ignore[method-assign]
            await w.housekeeping_once()
            launched = w.running[job.id].task
            await asyncio.sleep(0.05)
            assert not launched.cancelled() and not launched.done()
        finally:
            await w.stop()
            await s.close()

    run(scenario())


def test_canceling_a_running_job_stops_its_run(store_url, tmp_path):
    async def scenario():
        s = await opened(store_url, tmp_path)
        ex = FakeExecutor(slots=1)
        w = JobWorker(s, ex, WorkerConfig(owner="w1", poll=0.05, housekeeping=0.05))
        try:
            job = await s.submit(NewJob("t2i", b'{"block": true}'))
            await w.start()
            await wait_for(lambda: _count(s, "running", 1))
            await wait_for(lambda: _has_events(s, job.id))
            await s.cancel(job.id)  # as another replica would: seen at the next lease renewal
            await wait_for(lambda: _idle(w))
            assert ex.active == 0 and (await s.get(job.id)).status == "canceled"
        finally:
            await w.stop()
            await s.close()

    run(scenario())


async def _has_events(s, job_id: str) -> bool:
    return len(await s.events(job_id)) == 3


async def _idle(w) -> bool:
    return not w.running


def test_a_dead_replicas_job_is_taken_over_after_its_lease(store_url, tmp_path):
    async def scenario():
        s = await opened(store_url, tmp_path)
        job = await s.submit(NewJob("t2i", b"{}"))
        await s.claim("dead-replica", 1, lease=0.3)
        ex = FakeExecutor()
        w = JobWorker(s, ex, WorkerConfig(owner="alive", poll=0.05, housekeeping=0.05))
        try:
            await w.start()
            await wait_for(lambda: _count(s, "succeeded", 1))
            row = await s.get(job.id)
            assert row.attempts == 2 and ex.ran == [job.id]
        finally:
            await w.stop()
            await s.close()

    run(scenario())


# ---- webhooks ---------------------------------------------------------------------------------------
def test_webhook_hosts_must_be_allowed():
    assert check_webhook_url("https://hooks.example.com/x", ["*.example.com"])  # more in test_webhook_safety.py
    for url, allow in [("https://evil.test/x", ["*.example.com"]), ("file:///etc/passwd", ["*"]),
                       ("http://user:pw@hooks.example.com/", ["*.example.com"]), ("http://127.0.0.1/", [])]:
        with pytest.raises(WebhookRefused):
            check_webhook_url(url, allow)


class _Receiver(BaseHTTPRequestHandler):
    failures_left = 2
    got: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).got.append((dict(self.headers), body))
        status = 500 if type(self).failures_left > 0 else 204
        type(self).failures_left -= 1
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_webhook_is_signed_and_retried_after_two_500s():
    secret = "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQ="
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        async def scenario():
            sender = WebhookSender(secret, RetryPolicy(attempts=4, first_delay=0.05), allow_hosts=["127.0.0.1:*"],
                                   allow_private=True)
            try:
                return await sender.deliver(f"http://127.0.0.1:{server.server_port}/hook", "msg_1", b'{"id": "job-1"}')
            finally:
                await sender.close()

        assert run(scenario()) is True
    finally:
        server.shutdown()
    assert len(_Receiver.got) == 3
    for headers, body in _Receiver.got:
        assert Webhook(secret).verify(body, headers) == {"id": "job-1"}
        assert headers["webhook-id"] == "msg_1"
