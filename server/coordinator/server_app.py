"""The Flower ServerApp of every federated method: it reads the run's settings and runs the method's
coordinator side (``protocols/methods.py`` names it)."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedprompt.server.coordinator.config import FederationConfig

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = FederationConfig.from_run_config(dict(context.run_config))
    cfg.coordinator_side().run(grid, cfg, run_id=str(context.run_id))
