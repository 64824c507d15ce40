"""Run the real aggregation server in-process (its own event loop in a thread) for the gRPC tests."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from fedprompt.flower_procs import free_port
from fedprompt.protocols.aggregator_client import AggregatorClient
from fedprompt.server.aggregation.service import Aggregator, AggregatorSettings


class RunningAggregator:
    def __init__(self, certs_dir: Path, store: str, **settings) -> None:
        self.certs_dir = certs_dir
        self.settings = AggregatorSettings(
            certs_dir=certs_dir, store=store, listen=f"127.0.0.1:{free_port()}", **settings
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = Aggregator(self.settings)
        self._run(self.server.start())
        self.address = self.settings.listen

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def client(self, identity: str = "coordinator", **kw) -> AggregatorClient:
        return AggregatorClient(self.address, self.certs_dir, identity, **kw)

    def stop(self) -> None:
        self._run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    def __enter__(self) -> RunningAggregator:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
