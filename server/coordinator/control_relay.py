"""The federation Job's way to its SuperLink when the two run apart (a Kubernetes Job, ``fedprompt server
--superlink``): the ``flwr`` CLI talks plain HTTP to a loopback listener, which forwards the Control API alone,
with the coordinator's client certificate, to the SuperLink's operator listener (``front.py``)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import httpx

from fedprompt.server.coordinator.front import CONTROL, UPSTREAM_TIMEOUT_S, Listener


def relay_client(operator: str, certs: Path) -> httpx.AsyncClient:
    """The federation Job's connection to a remote operator listener: mutual TLS with ``coordinator.crt``."""
    ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    ctx.load_cert_chain(certs / "coordinator.crt", certs / "coordinator.key")
    return httpx.AsyncClient(
        base_url=f"https://{operator}",
        verify=ctx,
        timeout=httpx.Timeout(UPSTREAM_TIMEOUT_S, connect=10.0),
        follow_redirects=False,
    )


class ControlRelay:
    """A loopback listener for the ``flwr`` CLI of a federation that runs away from its SuperLink (a Kubernetes
    Job): plain HTTP on 127.0.0.1 inside the Job's own network namespace, forwarded with the coordinator's client
    certificate to the SuperLink's operator listener. Control API paths only. Runs in a thread of its own."""

    def __init__(self, operator: str, certs: Path) -> None:
        self.operator, self.certs = operator, certs
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = None

    def start(self, timeout: float = 30.0) -> int:
        import threading

        started = threading.Event()
        errors: list[BaseException] = []

        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            client = relay_client(self.operator, self.certs)
            listener = Listener(CONTROL, None, client)  # plain HTTP, loopback only
            try:
                self.port = await listener.start("127.0.0.1", 0)
                started.set()
                await self._stop.wait()
            finally:
                await listener.close()
                await client.aclose()

        def run() -> None:
            try:
                asyncio.run(main())
            except BaseException as exc:  # reported to start()
                errors.append(exc)
                started.set()

        self._thread = threading.Thread(target=run, name="control-relay", daemon=True)
        self._thread.start()
        if not started.wait(timeout) or errors or self.port is None:
            raise RuntimeError(f"the control relay did not start: {errors[0] if errors else 'timeout'}")
        return self.port

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)
