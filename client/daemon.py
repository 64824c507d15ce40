"""``fedprompt client``: the daemon on a data holder's machine.

It opens the holder's privacy ledger (setting the budget when asked), reads the holder's policy, checks that
the data loads, and starts a Flower SuperNode in ``process`` isolation that connects to the coordinator with TLS
and the holder's node key, plus fedprompt's own ClientApp runner in this process (``client/runner.py``): the
model and data stay loaded between rounds, and no code from a run's bundle ever runs here. The data never
leaves this machine: only what the holder's policy allows does, each DP release charged to the ledger first.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

from fedprompt import certs as certs_mod
from fedprompt import flower_procs as fp
from fedprompt import taskfile
from fedprompt.bind import BIND_ENV, health_default
from fedprompt.cli.common import add_runtime
from fedprompt.client.connection import SupernodeLog
from fedprompt.client.policy import HolderPolicy
from fedprompt.data import datasets as ds_mod
from fedprompt.dp.cli import open_ledger
from fedprompt.errors import FedPromptError
from fedprompt.protocols.aggregator_client import DEFAULT_PORT

HEALTH_PORT = 9097
RESTART_MIN_S = 2.0
RESTART_MAX_S = 60.0


def add_client_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="the data holder's daemon: a Flower SuperNode that tunes under DP")
    p.add_argument("--superlink", required=True, help="the coordinator's HOST:PORT")
    p.add_argument(
        "--aggregator",
        default=None,
        help="the aggregation server's HOST:PORT, where this holder runs secure rounds itself over mutual TLS "
        f"(default: the --superlink host, port {DEFAULT_PORT})",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="a CSV/TSV/JSONL file with text and label columns (and optionally split)")
    src.add_argument("--dataset", help="a bundled dataset name")
    p.add_argument(
        "--task",
        default=None,
        help="this holder's task file: its data's columns, the labels it trains (a run with other labels is "
        "refused), and its data when --data is not given",
    )
    p.add_argument("--state", required=True, help="the holder's state folder (privacy ledger, logs)")
    p.add_argument("--budget-epsilon", type=float, default=None, help="total epsilon budget (needed on first use)")
    p.add_argument("--budget-delta", type=float, default=None, help="total delta (default: 1/(2n) for n examples)")
    p.add_argument("--certs", default=None, help="a fedprompt certs folder: takes ca.crt and nodes/NAME/node.key")
    p.add_argument("--name", default=None, help="the holder's node name (its key under CERTS/nodes)")
    p.add_argument("--ca", default=None, help="the federation's CA certificate (instead of --certs)")
    p.add_argument("--node-key", default=None, help="this holder's node private key (instead of --certs)")
    p.add_argument(
        "--peers",
        default=None,
        help="the roster: a folder of every node's public key (node.NAME.pub, or NAME/node.pub); secure rounds check "
        "neighbours against it (default: peers/ beside the node key, the key's own folder, or the --certs nodes)",
    )
    p.add_argument(
        "--allow-model",
        action="append",
        default=None,
        help="a model the coordinator may ask for (repeatable; default: the zoo's names and the models registered "
        "here with fedprompt models add; never a path)",
    )
    add_runtime(p)
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: an equal share of this machine's usable cores among the holder daemons running "
        "on it, counted again before each round)",
    )
    p.add_argument(
        "--port", type=int, default=0, help="the SuperNode's local runtime port, on 127.0.0.1 (0: a free one)"
    )
    add_policy_arguments(p)
    p.add_argument(
        "--health-listen",
        default=health_default(HEALTH_PORT),
        help="HOST:PORT for the SuperNode's plaintext gRPC health service (probes; default: none, or port "
        f"{HEALTH_PORT} where ${BIND_ENV} is set, as in the image)",
    )
    p.set_defaults(func=cmd_client)


def add_policy_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "the holder's policy (also read from STATE/policy.toml; a flag wins over the file; the coordinator "
        "can only ask)"
    )
    g.add_argument(
        "--allow-no-dp",
        action="store_const",
        const=False,
        dest="require_dp",
        default=None,
        help="take part in runs without DP too (default: refuse them)",
    )
    g.add_argument("--max-run-epsilon", type=float, default=None, help="the most epsilon one run may spend here")
    g.add_argument("--max-delta", type=float, default=None, help="the largest delta a run may use (default 1/(2n))")
    g.add_argument(
        "--require-secure-aggregation",
        action="store_const",
        const=True,
        default=None,
        help="send updates only through secure aggregation",
    )
    g.add_argument("--min-secure-cohort", type=int, default=None, help="fewest holders of a secure round (default 3)")
    g.add_argument(
        "--allow-evaluations",
        type=int,
        default=None,
        dest="max_evaluations_per_run",
        metavar="N",
        help="answer up to N evaluation requests per run, each a DP release charged to the ledger (default 0: off)",
    )
    g.add_argument(
        "--evaluation-noise",
        type=float,
        default=None,
        help="standard deviation of the noise on each released count, in examples (default 20)",
    )


def policy_from_args(args: argparse.Namespace, state: Path) -> HolderPolicy:
    names = (
        "require_dp",
        "max_run_epsilon",
        "max_delta",
        "require_secure_aggregation",
        "min_secure_cohort",
        "max_evaluations_per_run",
        "evaluation_noise",
    )
    return HolderPolicy.load(state, **{name: getattr(args, name) for name in names})


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


def _aggregator(args: argparse.Namespace, ca: Path, key: Path):
    """Where secure rounds run, and this holder's TLS client certificate for it (beside its node key)."""
    from fedprompt.client.secure_round import AggregatorAccess

    address = args.aggregator or f"{args.superlink.rsplit(':', 1)[0]}:{DEFAULT_PORT}"
    cert, tls_key = key.parent / "client.crt", key.parent / "client.key"
    if not (cert.is_file() and tls_key.is_file()):
        if args.aggregator:
            raise FedPromptError(f"--aggregator needs this holder's TLS client certificate: {cert} and {tls_key}")
        return None  # no client certificate: the holder refuses secure rounds (and says so at start)
    return AggregatorAccess(address, ca, cert, tls_key)


def _roster(args: argparse.Namespace, key: Path) -> dict[str, Path]:
    """The holder's own copy of every node's public key (``fedprompt certs`` writes it as ``peers/``)."""
    # fedprompt certs puts it in peers/ beside the node key; a Kubernetes Secret holds it flat beside the key
    candidates = [Path(args.peers)] if args.peers else [key.parent / "peers", key.parent]
    if args.certs and not args.peers:
        candidates.append(Path(args.certs))
    for folder in candidates:
        found = certs_mod.node_public_keys(folder) if folder.is_dir() else {}
        if found:
            return found
    if args.peers:
        raise FedPromptError(f"--peers {args.peers}: no node.NAME.pub or NAME/node.pub files there")
    return {}


def cmd_client(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the runner polls the SuperNode every 0.2 s
    name, ca, key = _identity(args)
    state = Path(args.state).resolve()
    args.state = str(state)
    task = taskfile.read(args.task) if args.task else None
    data, n = _holder_data(args, task)
    policy = policy_from_args(args, state)
    ledger = open_ledger(args, default_delta=1.0 / (2 * n))
    if ledger.budget() is None:
        raise FedPromptError(f"{ledger.path}: no privacy budget yet; pass --budget-epsilon")
    budget, spent = ledger.budget(), ledger.spent()
    say = _announcer(name)
    say(
        f"{n} training examples; budget epsilon = {budget.epsilon:g} (delta = {budget.delta:g}), "
        f"spent {spent.epsilon:.3f}; ledger {ledger.path}"
    )
    say(f"policy: {policy.resolved(n).describe()}")
    peers = _roster(args, key)
    if peers:  # compare these with the other holders' out of band: a key the coordinator slipped in shows here
        say(
            f"roster ({len(peers)} node keys): "
            + ", ".join(f"{p} {certs_mod.fingerprint(f)}" for p, f in peers.items())
        )
    else:
        say("no roster of peer keys (--peers): secure rounds will be refused")
    aggregator = _aggregator(args, ca, key)
    if aggregator is None:
        say(f"no TLS client certificate beside {key}: secure rounds will be refused")
    else:
        say(f"secure rounds with the aggregation server at {aggregator.address}")
    from fedprompt.client.runner import ClientAppRunner, installed_app_sha256, write_secret
    from fedprompt.client.service import HolderService
    from fedprompt.client.threads import ThreadChoice

    threads = ThreadChoice(args.threads, say=say)
    threads.apply()
    service = HolderService(
        data=data,
        state_dir=state,
        name=name,
        num_examples=n,
        policy=policy,
        device=args.device,
        precision=args.precision,
        allowed_models=set(args.allow_model) if args.allow_model else None,
        signing_key=key,
        peers=peers,
        aggregator=aggregator,
        local_task=task,
        threads=threads,
    )
    port = args.port or fp.free_port()
    secret = write_secret(state)
    runner = ClientAppRunner(service, f"127.0.0.1:{port}", secret, app_sha256=installed_app_sha256())
    runner.start()
    cmd = [
        fp.flower_bin("flower-supernode"),
        "--superlink", args.superlink,
        "--root-certificates", ca,
        "--auth-supernode-private-key", key,
        "--host", "127.0.0.1",
        "--port", str(port),
        # the SuperNode runs no ClientApp itself: the runner above answers its tasks, with this version's code
        "--isolation", "process",
        "--superexec-auth-secret-file", secret,
    ]  # fmt: skip
    if args.health_listen:
        cmd += ["--health-server-address", args.health_listen]
    try:
        _run_supernode(cmd, state, args.superlink, say)
        return 0
    finally:
        runner.stop()
        total = ledger.spent()
        say(f"stopped; privacy spent: epsilon = {total.epsilon:.3f} ({total.method})")


def _announcer(name: str):
    def say(message: str) -> None:
        print(f"holder {name}: {message}", flush=True)

    return say


def _holder_data(args: argparse.Namespace, task) -> tuple[str, int]:
    """The holder's data (``--dataset``, ``--data``, or its task file's) and its number of training examples;
    loaded once here so that unusable data fails at start, not in the first round."""
    if args.dataset or args.data:
        data = args.dataset or str(Path(args.data).resolve())
    elif task is not None and task.data:
        data = task.data
    else:
        raise FedPromptError("give the holder's data: --data FILE, --dataset NAME, or a --task file that names it")
    dataset = ds_mod.load_task(task, data) if task is not None else ds_mod.load(data)
    return data, len(dataset.split("train"))


def _run_supernode(cmd: list, state: Path, superlink: str, say) -> None:
    """Run the SuperNode until SIGTERM or SIGINT. It exits when the coordinator is unreachable or does not know
    this node's key yet (a restart, a registration still under way): start it again, backing off."""
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log = state / "logs" / "supernode.log"
    supernode = None
    delay = RESTART_MIN_S / 2
    try:
        while not stopping:
            follower = SupernodeLog(log, superlink)
            supernode = fp.start(cmd, log, fp.flower_env(state / "flwr-home"))
            say(f"SuperNode connecting to {superlink}; log: {log}")
            started = time.monotonic()
            while not stopping and supernode.poll() is None:
                time.sleep(0.5)
                for message in follower.poll():
                    say(message)
            for message in follower.poll():
                say(message)
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
    finally:
        fp.stop(supernode)
