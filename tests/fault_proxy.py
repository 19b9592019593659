"""A TLS-terminating HTTP proxy between the operator and the real API server that injects faults:
a status code instead of the answer (409, 500, 503), or a request held past the client's timeout.

It serves the API server's own certificate (issued for 127.0.0.1 by the test CA) and talks to the
API server as the test admin, so the operator under test only needs a kubeconfig that names the
proxy. Watches stream through unchanged.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from kubetune.s3server import free_port

from tests.kube_cluster import Cluster, kubeconfig

HOP_BY_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "accept-encoding"}


@dataclass
class Fault:
    """Requests whose method matches, whose path matches `path` (a regex) and whose body contains
    `body` are answered with `status`, or held `hold_s` seconds first, `times` times."""

    method: str
    path: str
    status: int | None = None
    hold_s: float = 0.0
    body: str = ""
    times: int = 1
    hits: list[str] = field(default_factory=list)

    def matches(self, method: str, path: str, body: bytes) -> bool:
        return (
            len(self.hits) < self.times
            and method == self.method
            and re.search(self.path, path) is not None
            and self.body.encode() in body
        )


class FaultProxy:
    def __init__(self, cluster: Cluster, workdir: Path) -> None:
        self.cluster, self.faults = cluster, []
        self.port = free_port()
        self.kubeconfig = workdir / "proxy.kubeconfig"
        user = {"client-certificate": str(cluster.pki["admin.crt"]), "client-key": str(cluster.pki["admin.key"])}
        self.kubeconfig.write_text(json.dumps(kubeconfig(f"https://127.0.0.1:{self.port}", cluster.pki, user)))
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def add(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fault proxy did not start")
        return self

    def __exit__(self, *_: Any) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _stop(self) -> None:
        await self._session.close()  # ends the streams (watches) still open upstream
        await self._runner.cleanup()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        pki = self.cluster.pki
        upstream = ssl.create_default_context(cafile=str(pki["ca.crt"]))
        upstream.load_cert_chain(pki["admin.crt"], pki["admin.key"])
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=upstream), timeout=aiohttp.ClientTimeout(total=None)
        )
        serving = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        serving.load_cert_chain(pki["server.crt"], pki["server.key"])
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=2)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=serving).start()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        for fault in self.faults:
            if fault.matches(request.method, request.path, body):
                fault.hits.append(request.path_qs)
                if fault.hold_s:
                    await asyncio.sleep(fault.hold_s)
                if fault.status:
                    status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": fault.status}
                    status |= {"message": f"injected {fault.status}", "reason": "Injected"}
                    return web.json_response(status, status=fault.status)
                break
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        async with self._session.request(
            request.method, self.cluster.url + request.path_qs, data=body or None, headers=headers
        ) as upstream:
            response = web.StreamResponse(status=upstream.status)
            for key in ("Content-Type", "Warning", "Audit-Id"):
                if key in upstream.headers:
                    response.headers[key] = upstream.headers[key]
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            except (ConnectionError, aiohttp.ClientError):  # the client went away mid-stream
                pass
            return response
