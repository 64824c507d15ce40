"""The coordinator's network front: the only listener of the coordinator that data holders reach.

Flower 1.41's SuperLink serves three APIs on one HTTPS port: the Fleet API (SuperNodes pull and push messages),
the Control API (submit and stop runs, register node keys, list runs and nodes, stream logs) and the Runtime API
(the ServerApp's). Its Control API authenticates nobody in the open-source release: anyone who can reach that
port with the public ``ca.crt`` can register a node key of their own and submit a Flower App whose ClientApp
runs on every holder. So the SuperLink listens on loopback only, and this front is what listens on the network:

- the **fleet listener** (``--host``/``--port`` of ``fedprompt server``): TLS with the coordinator's certificate;
  it forwards ``POST`` to the twelve Fleet API paths and nothing else. Every other method or path is answered
  404 by the front itself and never reaches the SuperLink. The SuperNodes still authenticate to the SuperLink
  with their node keys: Flower's signed headers pass through unchanged, and Fleet registration is disabled
  there under ``--enable-supernode-auth``.
- the **operator listener** (optional, for a federation that runs in another pod): mutual TLS; the client must
  present a certificate of the federation's CA whose common name is ``coordinator``; it forwards the Control
  API and nothing else. A holder's own client certificate (CN ``node:NAME``) is refused.

The Runtime API is never forwarded: only the ServerApp, started by the SuperLink on the same machine, uses it.

Why a path allowlist in front of Flower rather than something inside it: it needs no change to Flower, it is
small enough to read in one sitting, and it fails closed (a route Flower adds in a later release stays
unreachable until it is listed here; ``tests`` compare the list with Flower's own router).

The front reads each request in full (bounded by ``max_body``) before it opens the upstream call, so a client
that stalls holds only its own connection; headers and bodies have deadlines, connections are capped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import h11
import httpx

from fedprompt.certs import COORDINATOR_CN

log = logging.getLogger("fedprompt.front")

# The Fleet API of flwr 1.41 (flwr/superlink/routers/fleet/router.py); tests/ checks this against Flower's router.
FLEET_PATHS = frozenset(
    f"/v1/fleet/{name}"
    for name in (
        "register-node",
        "activate-node",
        "deactivate-node",
        "unregister-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    )
)
CONTROL_PREFIX = "/v1/control/"

# Hop-by-hop headers are the front's own business on each side; the length is recomputed.
_HOP_BY_HOP = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        b"x-real-ip",
    )
)
MAX_BODY = 64 << 20  # a Flower message or object: a prompt is ~50 KB, a Flower App bundle a few KB
HEADER_TIMEOUT_S = 30.0  # an idle keep-alive connection, or a client that sends its headers slowly
BODY_TIMEOUT_S = 120.0
UPSTREAM_TIMEOUT_S = 600.0  # a Control API log stream may run long
MAX_CONNECTIONS = 512


@dataclass(frozen=True)
class Route:
    """Which requests one listener forwards."""

    paths: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    name: str = "fleet"

    def allows(self, method: bytes, target: bytes) -> bool:
        if method != b"POST":
            return False
        try:
            path = target.decode("ascii")
        except UnicodeDecodeError:
            return False
        # no query strings, fragments, dot segments or encoded characters: the path must be one of ours as is
        if any(c in path for c in "?#%\\") or "/." in path or "//" in path:
            return False
        return path in self.paths or any(path.startswith(p) and len(path) > len(p) for p in self.prefixes)


FLEET = Route(paths=FLEET_PATHS, name="fleet")
CONTROL = Route(prefixes=(CONTROL_PREFIX,), name="operator")


@dataclass
class FrontStats:
    forwarded: int = 0
    refused: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)

    def refuse(self, reason: str) -> None:
        self.refused += 1
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        # the first refusals of each kind are logged, then every 100th: a scan must not fill the disk
        count = self.by_reason[reason]
        if count <= 10 or count % 100 == 0:
            log.warning("refused (%s), %d time(s) so far", reason, count)


class _Reject(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def server_context(certs: Path, *, require_client: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certs / "server.crt", certs / "server.key")
    ctx.set_alpn_protocols(["http/1.1"])
    if require_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(certs / "ca.crt")
    return ctx


def _common_name(peercert: dict | None) -> str | None:
    for rdn in (peercert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


class Listener:
    """One listening socket of the front: TLS in, the allowed requests forwarded to ``upstream``."""

    def __init__(
        self,
        route: Route,
        ssl_context: ssl.SSLContext | None,
        upstream: httpx.AsyncClient,
        *,
        require_cn: str | None = None,
        max_body: int = MAX_BODY,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.route, self.ssl_context, self.upstream = route, ssl_context, upstream
        self.require_cn, self.max_body = require_cn, max_body
        self.slots = asyncio.Semaphore(max_connections)
        self.stats = FrontStats()
        self.server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> int:
        tls = {"ssl": self.ssl_context, "ssl_handshake_timeout": HEADER_TIMEOUT_S} if self.ssl_context else {}
        self.server = await asyncio.start_server(self._connection, host, port, **tls)
        return self.server.sockets[0].getsockname()[1]

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.slots.locked():
            self.stats.refuse("too many connections")
            writer.close()
            return
        async with self.slots:
            try:
                if self.require_cn is not None:
                    cn = _common_name(writer.get_extra_info("peercert"))
                    if cn != self.require_cn:
                        self.stats.refuse("client certificate")
                        log.warning("%s listener: refused a client certificate with CN %r", self.route.name, cn)
                        return
                await self._serve(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, TimeoutError):
                pass
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        while True:
            try:
                request = await self._next(conn, reader, HEADER_TIMEOUT_S)
                if isinstance(request, h11.ConnectionClosed):
                    return
                if not isinstance(request, h11.Request):
                    raise _Reject(400, "bad request")
                if not self.route.allows(request.method, request.target):
                    # answered before the body is read: nothing of it is ever forwarded
                    what = request.target.decode("latin-1")[:80]
                    raise _Reject(
                        404,
                        f"{self.route.name} listener does not forward {request.method.decode('latin-1')[:8]} {what}",
                    )
                body = await self._body(conn, reader, request)
            except _Reject as exc:
                self.stats.refuse(exc.reason)
                await self._send_error(conn, writer, exc.status, exc.reason)
                return
            except h11.RemoteProtocolError:
                self.stats.refuse("malformed HTTP")
                await self._send_error(conn, writer, 400, "malformed HTTP")
                return
            await self._forward(conn, writer, request, body)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _next(self, conn: h11.Connection, reader: asyncio.StreamReader, timeout: float) -> h11.Event:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await asyncio.wait_for(reader.read(64 * 1024), timeout)
            conn.receive_data(data)

    async def _body(self, conn: h11.Connection, reader: asyncio.StreamReader, request: h11.Request) -> bytes:
        declared = dict(request.headers).get(b"content-length")
        if declared is not None and int(declared) > self.max_body:
            raise _Reject(413, "body too large")
        chunks, size = [], 0
        async with asyncio.timeout(BODY_TIMEOUT_S):
            while True:
                event = await self._next(conn, reader, BODY_TIMEOUT_S)
                if isinstance(event, h11.EndOfMessage):
                    return b"".join(chunks)
                if not isinstance(event, h11.Data):
                    raise _Reject(400, "bad request body")
                size += len(event.data)
                if size > self.max_body:
                    raise _Reject(413, "body too large")
                chunks.append(event.data)

    async def _forward(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, request: h11.Request, body: bytes
    ) -> None:
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers if k not in _HOP_BY_HOP]
        upstream = self.upstream.build_request("POST", request.target.decode("ascii"), headers=headers, content=body)
        try:
            response = await self.upstream.send(upstream, stream=True)
        except httpx.HTTPError as exc:
            log.warning("%s listener: the SuperLink did not answer: %s", self.route.name, exc)
            self.stats.refuse("upstream unreachable")
            await self._send_error(conn, writer, 502, "the SuperLink is unreachable")
            return
        self.stats.forwarded += 1
        try:
            out = [(k, v) for k, v in response.headers.raw if k.lower() not in _HOP_BY_HOP]
            length = response.headers.get("content-length")
            if length is not None:
                out.append((b"content-length", length.encode("ascii")))
            writer.write(conn.send(h11.Response(status_code=response.status_code, headers=out)))
            async for chunk in response.aiter_raw():
                writer.write(conn.send(h11.Data(data=chunk)))
                await writer.drain()
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
        finally:
            await response.aclose()

    async def _send_error(self, conn: h11.Connection, writer: asyncio.StreamWriter, status: int, reason: str) -> None:
        body = f"{status} {reason}\n".encode()
        headers = [("content-type", "text/plain"), ("content-length", str(len(body))), ("connection", "close")]
        with contextlib.suppress(h11.LocalProtocolError, ConnectionError):
            writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
            writer.write(conn.send(h11.Data(data=body)))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def upstream_client(superlink: str, ca: Path) -> httpx.AsyncClient:
    """The front's connection to the SuperLink on loopback, verified against the federation's CA."""
    ctx = ssl.create_default_context(cafile=str(ca))
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
    return httpx.AsyncClient(
        base_url=f"https://{superlink}",
        verify=ctx,
        timeout=httpx.Timeout(UPSTREAM_TIMEOUT_S, connect=10.0),
        limits=limits,
        follow_redirects=False,
    )


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


async def serve(
    *,
    certs: Path,
    superlink: str,
    fleet: str,
    operator: str | None = None,
    ready: asyncio.Event | None = None,
    ports: dict[str, int] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run the front until ``stop`` is set (or forever): the fleet listener and, when given, the operator's."""
    upstream = upstream_client(superlink, certs / "ca.crt")
    listeners: list[tuple[str, Listener, str]] = [
        ("fleet", Listener(FLEET, server_context(certs, require_client=False), upstream), fleet)
    ]
    if operator:
        op = Listener(CONTROL, server_context(certs, require_client=True), upstream, require_cn=COORDINATOR_CN)
        listeners.append(("operator", op, operator))
    try:
        for name, listener, address in listeners:
            host, port = split_address(address)
            bound = await listener.start(host, port)
            if ports is not None:
                ports[name] = bound
            log.info("%s listener on %s:%d -> SuperLink %s", name, host, bound, superlink)
        if ready is not None:
            ready.set()
        await (stop.wait() if stop is not None else asyncio.Event().wait())
    finally:
        for name, listener, _ in listeners:
            await listener.close()
            log.info(
                "%s listener: forwarded %d requests, refused %d", name, listener.stats.forwarded, listener.stats.refused
            )
        await upstream.aclose()


def run_front(*, certs: Path, superlink: str, listen: str, operator_listen: str | None) -> None:
    """``fedprompt front``: serve until SIGTERM or SIGINT."""
    import signal

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        ready = asyncio.Event()
        task = asyncio.create_task(
            serve(certs=certs, superlink=superlink, fleet=listen, operator=operator_listen, ready=ready, stop=stop)
        )
        await asyncio.wait([task, asyncio.create_task(ready.wait())], return_when=asyncio.FIRST_COMPLETED)
        if ready.is_set():
            extra = f", operator listener {operator_listen} (mutual TLS)" if operator_listen else ""
            print(f"front: fleet listener {listen} -> SuperLink {superlink}{extra}", flush=True)
        await task

    asyncio.run(main())
