"""The status tracker: one loop keeps every FineTuneJob's status current from the operator's
watches, instead of a kopf timer (and so a finalizer) per job.

A job is observed when its Job or pods change (the watches wake the loop), and every
`status_interval_s` while its status moves with time (Staging and Running jobs: rank 0's metrics;
finished jobs with a TTL to carry out). Rank 0 is scraped from async code, with a bound on
scrapes in flight and a short timeout, so a hung endpoint holds no thread and delays no other job.
Status PATCHes, Events and the rare write (re-creating what was deleted by hand) go through a
small executor of their own: they neither wait behind the reconcile handlers nor hold them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp

from . import reconciling
from .kube import KubeClient
from .observing import Scrape, parse_metrics
from .settings import OperatorSettings
from .telemetry import OperatorMetrics

Key = tuple[str, str]  # (namespace, FineTuneJob name)
Index = Mapping[Key, Any]  # a kopf index: key -> the objects stored under it

log = logging.getLogger(__name__)
DEBOUNCE_S = 0.2  # a burst of watch events (a thousand new Jobs) becomes one pass
RETRY_S = 5.0  # after a failed pass (the API server did not answer)


def _first(index: Index, key: Key) -> dict[str, Any] | None:
    return next(iter(index.get(key, ())), None)


class Tracker:
    def __init__(
        self,
        ops: OperatorSettings,
        metrics: OperatorMetrics,
        kube: Callable[[], KubeClient],
        ftjs: Index,
        jobs: Index,
        pods: Index,
    ) -> None:
        self.ops, self.metrics, self.kube = ops, metrics, kube
        self.ftjs, self.jobs, self.pods = ftjs, jobs, pods
        self._due: dict[Key, bool] = {}  # key -> re-create what is missing (an owned object was deleted)
        self._wake = asyncio.Event()
        self._busy: set[Key] = set()  # a reconcile handler is at work on these
        self._written: dict[Key, tuple[str, dict[str, Any]]] = {}  # key -> (resourceVersion read, status written)
        self._io = ThreadPoolExecutor(ops.status_workers, thread_name_prefix="status")
        self._inflight: dict[Key, asyncio.Task[None]] = {}
        self._deferred: dict[Key, bool] = {}  # touched while a pass of theirs was in flight
        self._unanswered: dict[Key, int] = {}  # consecutive scrapes of a running rank 0 that failed

    def touch(self, key: Key, recreate: bool = False) -> None:
        """Observe `key` soon (called from the event loop by the watch handlers)."""
        self._due[key] = self._due.get(key, False) or recreate
        self._wake.set()

    @contextlib.contextmanager
    def reconciling(self, key: Key) -> Iterator[None]:
        """A reconcile handler works on `key` (and writes its status): passes leave it alone."""
        self._busy.add(key)
        try:
            yield
        finally:
            self._busy.discard(key)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        timeout = aiohttp.ClientTimeout(total=self.ops.scrape_timeout_s)
        connector = aiohttp.TCPConnector(limit=self.ops.scrape_concurrency, force_close=True)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            next_full = loop.time()
            try:
                while True:
                    wait = next_full - loop.time()
                    if wait > 0 and not self._due:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), wait)
                    self._wake.clear()
                    await asyncio.sleep(DEBOUNCE_S)
                    due, self._due = self._due, {}
                    if loop.time() >= next_full:
                        next_full = loop.time() + self.ops.status_interval_s
                        for key, body in list(self.ftjs.items()):
                            if key not in due and reconciling.moves_with_time(next(iter(body), {})):
                                due[key] = False
                    for key, recreate in due.items():
                        self._start(session, key, recreate)
            finally:
                for task in list(self._inflight.values()):
                    task.cancel()
                self._io.shutdown(wait=False, cancel_futures=True)

    def _start(self, session: aiohttp.ClientSession, key: Key, recreate: bool) -> None:
        """One pass per job at a time, each its own task: a slow scrape delays only its own job."""
        if key in self._inflight:  # again once this one is done
            self._deferred[key] = self._deferred.get(key, False) or recreate
            return
        task = asyncio.create_task(self._pass(session, key, recreate), name=f"status of {key[0]}/{key[1]}")
        self._inflight[key] = task
        task.add_done_callback(lambda _: self._done(key))

    def _done(self, key: Key) -> None:
        self._inflight.pop(key, None)
        if key in self._deferred:
            self.touch(key, self._deferred.pop(key))

    async def _pass(self, session: aiohttp.ClientSession, key: Key, recreate: bool) -> None:
        body = _first(self.ftjs, key)
        if body is None or key in self._busy or (body.get("metadata") or {}).get("deletionTimestamp"):
            return
        rv = (body.get("metadata") or {}).get("resourceVersion", "")
        written = self._written.get(key)
        if written is not None and written[0] == rv:  # our last PATCH has not come back by watch yet
            body = {**body, "status": written[1]}
        if reconciling.settled(body):
            return
        job, pods = _first(self.jobs, key), list(self.pods.get(key, ()))
        address = reconciling.rank0_address(pods) if job is not None else None
        metrics = await self._scrape(session, address) if address else None
        self._unanswered[key] = self._unanswered.get(key, 0) + 1 if address and metrics is None else 0
        seen = reconciling.Seen(job=job, pods=pods, metrics=metrics, unanswered=self._unanswered[key])
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            if await loop.run_in_executor(self._io, self._observe, key, body, rv, seen, recreate):
                loop.call_later(RETRY_S, self.touch, key, recreate)  # waiting for another owner's object
        except Exception as exc:  # the API server did not answer, or refused a write: try again
            self.metrics.errors.labels(handler="observe").inc()
            log.warning("observing FineTuneJob %s/%s failed, retrying in %.0f s: %s", *key, RETRY_S, exc)
            loop.call_later(RETRY_S, self.touch, key, recreate)
        finally:
            self.metrics.reconcile_seconds.labels(handler="observe").observe(time.perf_counter() - start)

    async def _scrape(self, session: aiohttp.ClientSession, ip: str) -> Scrape | None:
        """Rank 0's metrics, or None when it does not answer in time (the phase stays as it is)."""
        try:
            async with session.get(f"http://{ip}:{self.ops.trainer.metrics_port}/metrics") as response:
                return parse_metrics(await response.text()) if response.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError):  # ValueError: not exposition text
            return None

    def _observe(self, key: Key, body: dict[str, Any], rv: str, seen: reconciling.Seen, recreate: bool) -> bool:
        """In the executor: derive the status (re-creating what is missing) and write what changed.
        True when the job waits for something outside it and should be observed again soon."""
        kube = self.kube()
        waiting = False
        try:
            if recreate:  # an owned ConfigMap, Service or NetworkPolicy was deleted
                outcome = reconciling.reconcile(body, kube, self.ops)
            else:
                outcome = reconciling.observe(body, kube, self.ops, seen=seen)
        except reconciling.InvalidSpec as exc:
            outcome = reconciling.invalid_status(body, str(exc), exc.reason)
        except reconciling.Waiting as exc:
            outcome, waiting = reconciling.waiting_status(body, str(exc)), True
        changes = reconciling.status_changes(body.get("status"), outcome.status)
        if changes:
            log.debug("status of FineTuneJob %s/%s: %s changed", *key, ", ".join(sorted(changes)))
            kube.patch_status(*key, changes)
            self._written[key] = (rv, {**(body.get("status") or {}), **changes})
        self.metrics.record(body["metadata"]["uid"], outcome.status)
        if outcome.event:
            kube.post_event(body, *outcome.event)
        return waiting

    def forget(self, key: Key) -> None:
        for state in (self._written, self._due, self._deferred, self._unanswered):
            state.pop(key, None)
