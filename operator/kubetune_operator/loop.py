"""The control loop: every FineTuneJob is worked on here, woken by the operator's watches.

Level-triggered, as Kubernetes controllers are: a job is reconciled (its objects made right) when
its spec has a generation its status has not observed yet, when this process first sees it, and
when an object it owns is deleted; otherwise it is observed (its status derived from its Job,
pods and rank 0's metrics). A pass is due when a watch reports a change, and every
`status_interval_s` while the status moves with time (Staging and Running jobs; finished jobs with
a TTL to carry out). kopf supplies the watches and indexes; no kopf handler writes to a job, so
there are no annotations of kopf's on it (a spec of any size the API server stores is fine) and no
finalizer.

One pass per job at a time, each its own task: rank 0 is scraped from async code (bounded, timed
out), so a hung endpoint delays only its own job and holds no thread. Everything that talks to the
API server runs in a bounded executor (`workers`). A pass that fails (the API server did not
answer, or a job waits for another owner's object) is tried again after a delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import kopf

from . import reconciling
from .kube import KubeClient
from .observing import Scrape, parse_metrics
from .settings import OperatorSettings
from .telemetry import OperatorMetrics

Key = tuple[str, str]  # (namespace, FineTuneJob name)
Index = Mapping[Key, Any]  # a kopf index: key -> the objects stored under it

log = logging.getLogger(__name__)
DEBOUNCE_S = 0.1  # a burst of watch events becomes one wake-up
RETRY_S = 5.0  # after a failed pass, unless the error says otherwise; doubled per failure in a row
MAX_RETRY_S = 120.0  # a thousand jobs retrying against a recovering API server: spread out
WAIT_S = 5.0  # a job waiting for another owner's object looks again


def retry_delay(base: float, failures: int) -> float:
    """Exponential backoff with jitter: `base` after the first failure, doubled after each
    further one up to MAX_RETRY_S, spread by ±20 % so that jobs failing together retry apart."""
    return min(MAX_RETRY_S, base * 2 ** (failures - 1)) * random.uniform(0.8, 1.2)


def _first(index: Index, key: Key) -> dict[str, Any] | None:
    return next(iter(index.get(key, ())), None)


class ControlLoop:
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
        self._due: dict[Key, bool] = {}  # key -> reconcile (not only observe)
        self._wake = asyncio.Event()
        self._inflight: dict[Key, asyncio.Task[None]] = {}
        self._deferred: dict[Key, bool] = {}  # touched while a pass of theirs was in flight
        self._reconciled: set[Key] = set()  # reconciled by this process at least once
        self._written: dict[Key, tuple[str, dict[str, Any]]] = {}  # key -> (resourceVersion read, status written)
        self._unanswered: dict[Key, int] = {}  # consecutive scrapes of a running rank 0 that failed
        self._failures: dict[Key, int] = {}  # consecutive passes that failed
        self._io = ThreadPoolExecutor(ops.workers, thread_name_prefix="kubetune")

    def touch(self, key: Key, reconcile: bool = False) -> None:
        """Work on `key` soon (called in the event loop, by the watch handlers)."""
        self._due[key] = self._due.get(key, False) or reconcile
        self._wake.set()

    def forget(self, key: Key) -> None:
        """The FineTuneJob is gone."""
        for state in (self._written, self._due, self._deferred, self._unanswered, self._failures):
            state.pop(key, None)
        self._reconciled.discard(key)

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
                        for key, stored in list(self.ftjs.items()):
                            body = next(iter(stored), None)
                            if key not in due and body is not None and self._moves(key, body):
                                due[key] = False
                    for key, reconcile in due.items():
                        self._start(session, key, reconcile)
            finally:
                for task in list(self._inflight.values()):
                    task.cancel()
                self._io.shutdown(wait=False, cancel_futures=True)

    def _moves(self, key: Key, body: dict[str, Any]) -> bool:
        return key not in self._reconciled or reconciling.moves_with_time(body)

    def _start(self, session: aiohttp.ClientSession, key: Key, reconcile: bool) -> None:
        if key in self._inflight:  # again once this one is done
            self._deferred[key] = self._deferred.get(key, False) or reconcile
            return
        task = asyncio.create_task(self._pass(session, key, reconcile), name=f"FineTuneJob {key[0]}/{key[1]}")
        self._inflight[key] = task
        task.add_done_callback(lambda _: self._done(key))

    def _done(self, key: Key) -> None:
        self._inflight.pop(key, None)
        if key in self._deferred:
            self.touch(key, self._deferred.pop(key))

    async def _pass(self, session: aiohttp.ClientSession, key: Key, reconcile: bool) -> None:
        body = _first(self.ftjs, key)
        if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
            return
        rv = (body.get("metadata") or {}).get("resourceVersion", "")
        written = self._written.get(key)
        if written is not None and written[0] == rv:  # our last PATCH has not come back by watch yet
            body = {**body, "status": written[1]}
        status = body.get("status") or {}
        generation = (body.get("metadata") or {}).get("generation")
        reconcile = reconcile or key not in self._reconciled or status.get("observedGeneration") != generation
        if not reconcile and reconciling.settled(body):
            return
        job, pods = _first(self.jobs, key), list(self.pods.get(key, ()))
        address = (
            reconciling.rank0_address(reconciling.own_pods(job, pods)) if job is not None and not reconcile else None
        )
        metrics = await self._scrape(session, address) if address else None
        self._unanswered[key] = self._unanswered.get(key, 0) + 1 if address and metrics is None else 0
        seen = reconciling.Seen(job=job, pods=pods, metrics=metrics, unanswered=self._unanswered[key])
        handler = "reconcile" if reconcile else "observe"
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            if await loop.run_in_executor(self._io, self._work, key, body, rv, seen, reconcile):
                loop.call_later(WAIT_S, self.touch, key, reconcile)
            self._failures.pop(key, None)
        except Exception as exc:  # the API server did not answer, or refused a write: try again
            self.metrics.errors.labels(handler=handler).inc()
            failures = self._failures[key] = self._failures.get(key, 0) + 1
            delay = retry_delay(exc.delay if isinstance(exc, kopf.TemporaryError) and exc.delay else RETRY_S, failures)
            log.warning("%s of FineTuneJob %s/%s failed, retrying in %.0f s: %s", handler, *key, delay, exc)
            loop.call_later(delay, self.touch, key, reconcile)
        finally:
            self.metrics.reconcile_seconds.labels(handler=handler).observe(time.perf_counter() - start)

    async def _scrape(self, session: aiohttp.ClientSession, ip: str) -> Scrape | None:
        """Rank 0's metrics, or None when it does not answer in time (the phase stays as it is)."""
        try:
            async with session.get(f"http://{ip}:{self.ops.trainer.metrics_port}/metrics") as response:
                return parse_metrics(await response.text()) if response.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError):  # ValueError: not exposition text
            return None

    def _work(self, key: Key, body: dict[str, Any], rv: str, seen: reconciling.Seen, reconcile: bool) -> bool:
        """In the executor: reconcile or observe, then write what changed in the status and the
        Event of a transition. True when the job waits for something outside it."""
        kube = self.kube()
        waiting = False
        try:
            if reconcile:
                outcome = reconciling.reconcile(body, kube, self.ops, seen=seen)
            else:
                outcome = reconciling.observe(body, kube, self.ops, seen=seen)
        except reconciling.InvalidSpec as exc:  # a bad spec, one the admin's policy or the API server refuses
            outcome = reconciling.invalid_status(body, str(exc), exc.reason)
        except reconciling.Waiting as exc:
            outcome, waiting = reconciling.waiting_status(body, str(exc)), True
        if reconcile and not waiting:
            self._reconciled.add(key)
            log.info("reconciled FineTuneJob %s/%s: %s", *key, outcome.status.get("phase"))
        changes = reconciling.status_changes(body.get("status"), outcome.status)
        if changes:
            log.debug("status of FineTuneJob %s/%s: %s changed", *key, ", ".join(sorted(changes)))
            kube.patch_status(*key, changes)
            self._written[key] = (rv, {**(body.get("status") or {}), **changes})
        self.metrics.record(body["metadata"]["uid"], outcome.status)
        if outcome.event:
            kube.post_event(body, *outcome.event)
        return waiting
