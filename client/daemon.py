"""``fedprompt client``: the daemon on a data holder's machine.

It opens the holder's privacy ledger (setting the budget when asked), checks that the data loads, starts
the holder's worker (model and data stay loaded between rounds) and a Flower SuperNode that connects to
the coordinator with TLS and the holder's node key. The data never leaves this machine: only prompt
updates computed under DP do, each charged to the ledger before it is computed.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

from fedprompt import certs as certs_mod
from fedprompt import datasets as ds_mod
from fedprompt import flower_procs as fp
from fedprompt.client.worker import HolderService, HolderWorker
from fedprompt.dp.cli import open_ledger
from fedprompt.errors import FedPromptError

RESTART_MIN_S = 2.0
RESTART_MAX_S = 60.0


def add_client_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="the data holder's daemon: a Flower SuperNode that tunes under DP")
    p.add_argument("--superlink", required=True, help="the coordinator's HOST:PORT")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="a CSV/TSV/JSONL file with text and label columns (and optionally split)")
    src.add_argument("--dataset", help="a bundled dataset name")
    p.add_argument("--state", required=True, help="the holder's state folder (privacy ledger, logs)")
    p.add_argument("--budget-epsilon", type=float, default=None, help="total epsilon budget (needed on first use)")
    p.add_argument("--budget-delta", type=float, default=None, help="total delta (default: 1/(2n) for n examples)")
    p.add_argument("--certs", default=None, help="a fedprompt certs folder: takes ca.crt and nodes/NAME/node.key")
    p.add_argument("--name", default=None, help="the holder's node name (its key under CERTS/nodes)")
    p.add_argument("--ca", default=None, help="the federation's CA certificate (instead of --certs)")
    p.add_argument("--node-key", default=None, help="this holder's node private key (instead of --certs)")
    p.add_argument(
        "--allow-model",
        action="append",
        default=None,
        help="a model the coordinator may ask for (repeatable; default: the zoo's names and the models registered "
        "here with fedprompt models add; never a path)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="no worker: every ClientApp process loads the model itself (slow; for measuring that cost)",
    )
    p.add_argument("--port", type=int, default=0, help="the SuperNode's local runtime port (0: a free one)")
    p.add_argument(
        "--health-listen", default=None, help="HOST:PORT for the SuperNode's plaintext gRPC health service (probes)"
    )
    p.set_defaults(func=cmd_client)


def _identity(args: argparse.Namespace) -> tuple[str, Path, Path]:
    if args.certs:
        if not args.name:
            raise FedPromptError("--certs needs --name (the holder's node name)")
        files = certs_mod.node_files(args.certs, args.name)
        ca, key, name = Path(args.certs) / "ca.crt", files.private_key, args.name
    else:
        if not (args.ca and args.node_key):
            raise FedPromptError("give --certs DIR --name NAME, or --ca FILE --node-key FILE")
        ca, key, name = Path(args.ca), Path(args.node_key), args.name or Path(args.node_key).parent.name
    for path in (ca, key):
        if not path.is_file():
            raise FedPromptError(f"{path} is missing")
    return name, ca.resolve(), key.resolve()


def _node_config(**values: str) -> str:
    """Flower's ``--node-config`` syntax: space-separated key="value" pairs (no quotes inside values)."""
    bad = {k: v for k, v in values.items() if '"' in v or "\n" in v}
    if bad:
        raise FedPromptError(f"these values cannot be passed to the SuperNode (quote or newline): {bad}")
    return " ".join(f'{k}="{v}"' for k, v in values.items())


def cmd_client(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    name, ca, key = _identity(args)
    state = Path(args.state).resolve()
    data = args.dataset or str(Path(args.data).resolve())
    dataset = ds_mod.load(data)  # fail here, not in the first round, when the data is unusable
    n = len(dataset.split("train"))
    args.state = str(state)
    ledger = open_ledger(args, default_delta=1.0 / (2 * n))
    if ledger.budget() is None:
        raise FedPromptError(f"{ledger.path}: no privacy budget yet; pass --budget-epsilon")
    budget, spent = ledger.budget(), ledger.spent()
    print(
        f"holder {name}: {n} training examples; budget epsilon = {budget.epsilon:g} (delta = {budget.delta:g}), "
        f"spent {spent.epsilon:.3f}; ledger {ledger.path}",
        flush=True,
    )
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    service = HolderService(
        data=data,
        state_dir=state,
        name=name,
        device=args.device,
        precision=args.precision,
        allowed_models=set(args.allow_model) if args.allow_model else None,
        signing_key=key,
    )
    if args.in_process:
        worker = None
        node_config = _node_config(data=data, state=str(state), holder=name, device=args.device)
    else:
        worker = HolderWorker(service)
        worker.start()
        node_config = _node_config(**{"worker": worker.address, "worker-key": worker.key_file, "holder": name})
    log = state / "logs" / "supernode.log"
    cmd = [
        fp.flower_bin("flower-supernode"),
        "--superlink", args.superlink,
        "--root-certificates", ca,
        "--auth-supernode-private-key", key,
        "--port", str(args.port or fp.free_port()),
        "--isolation", "subprocess",
        "--node-config", node_config,
    ]  # fmt: skip
    if args.health_listen:
        cmd += ["--health-server-address", args.health_listen]
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    supernode = None
    try:
        # The SuperNode exits when the coordinator is unreachable or does not know this node's key yet
        # (a restart, a registration still under way): start it again, backing off, until stopped.
        delay = RESTART_MIN_S / 2
        while not stopping:
            supernode = fp.start(cmd, log, fp.flower_env(state / "flwr-home"))
            print(f"SuperNode connecting to {args.superlink}; log: {log}", flush=True)
            started = time.monotonic()
            while not stopping and supernode.poll() is None:
                time.sleep(0.5)
            if stopping:
                break
            ran = time.monotonic() - started
            delay = RESTART_MIN_S if ran > RESTART_MAX_S else min(RESTART_MAX_S, delay * 2)
            print(
                f"the SuperNode exited with code {supernode.returncode} after {ran:.0f} s "
                f"(coordinator down, or this node's key not registered there?); retrying in {delay:.0f} s",
                file=sys.stderr,
                flush=True,
            )
            deadline = time.monotonic() + delay
            while not stopping and time.monotonic() < deadline:
                time.sleep(0.5)
        return 0
    finally:
        fp.stop(supernode)
        if worker is not None:
            worker.stop()
        total = ledger.spent()
        print(f"holder {name} stopped; privacy spent: epsilon = {total.epsilon:.3f} ({total.method})", flush=True)
