"""``fedprompt server`` (the coordinator: the processes of ``processes.py`` from the command line),
``fedprompt front`` and ``fedprompt superlink``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from dataclasses import fields
from pathlib import Path

from fedprompt import certs as certs_mod
from fedprompt import flower_procs as fp
from fedprompt.bind import BIND_ENV, bind_host, health_default
from fedprompt.cache import write_json_atomic
from fedprompt.errors import FedPromptError
from fedprompt.protocols.aggregator_client import DEFAULT_PORT
from fedprompt.server.aggregation.cli import STORE_ENV
from fedprompt.server.coordinator.config import FederationConfig
from fedprompt.server.coordinator.processes import Coordinator, loopback, wait_reachable
from fedprompt.settings_checks import flagged

SUPERLINK_HEALTH_PORT = 9096


# ------------------------------------------------------------------ CLI


def _add_listen_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--host",
        default=bind_host(),
        help=f"address of the fleet front, the only listener data holders reach (default: loopback only; every "
        f"interface where ${BIND_ENV} is set, as in the image)",
    )
    p.add_argument("--port", type=int, default=9093, help="port of the fleet front (Fleet API only)")
    p.add_argument(
        "--superlink-port",
        type=int,
        default=0,
        help="the SuperLink's own port, always on 127.0.0.1 (default: a free one)",
    )
    p.add_argument(
        "--operator-listen",
        default=None,
        metavar="HOST:PORT",
        help="also forward the Control API here, to the coordinator's client certificate only (mutual TLS); "
        "for a federation submitted from elsewhere (fedprompt server --superlink)",
    )


def add_server_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("server", help="the coordinator: a Flower SuperLink with TLS and node auth, and the federation")
    p.add_argument("--certs", required=True, help="folder made by fedprompt certs")
    p.add_argument("--state", required=True, help="coordinator state: SuperLink database, checkpoints, logs")
    _add_listen_arguments(p)
    p.add_argument("--checkpoint-dir", default=None, help="default: STATE/checkpoints (a restart resumes from it)")
    for f in flagged(FederationConfig):  # a setting's flag and its help are declared with the setting
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None, help=f.metadata["flag"])
    p.add_argument("--no-dp", action="store_true", help="holders tune without DP (for comparisons only)")
    p.add_argument("--client-dp", action="store_true", help="also clip and noise each holder's update (user-level DP)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other run setting of fedprompt.server.coordinator.config.FederationConfig (JSON value)",
    )
    p.add_argument(
        "--aggregator-listen",
        default=None,
        help="address of the aggregation server started beside the SuperLink (prompt registry, secure rounds; "
        f"mutual TLS; holders reach it for secure rounds) (default: --host, port {DEFAULT_PORT})",
    )
    p.add_argument(
        "--aggregator-store",
        default=None,
        help=f"its SQLite file or PostgreSQL URL (default: ${STORE_ENV} or STATE/registry.sqlite)",
    )
    p.add_argument("--aggregator-health-listen", default=None, help="plaintext health-check address for probes")
    p.add_argument("--no-aggregator", action="store_true", help="run without the aggregation server (no registry)")
    p.add_argument(
        "--superlink",
        default=None,
        metavar="HOST:PORT",
        help="submit to the operator listener of a SuperLink that runs elsewhere (fedprompt superlink "
        "--operator-listen) instead of starting one; needs coordinator.crt/.key in --certs",
    )
    p.add_argument(
        "--aggregator",
        default=None,
        metavar="HOST:PORT",
        help="use an aggregation server that runs elsewhere (fedprompt aggregator) instead of starting one",
    )
    p.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="SecAgg+ through the aggregation server: the coordinator sees only the mean of the updates",
    )
    p.add_argument(
        "--secure-rounds",
        default=None,
        metavar="HOST:PORT",
        help="the aggregation server process that runs the secure rounds, when --aggregator has several replicas "
        "(a round's protocol lives in one process's memory; the holders' --aggregator must reach the same one)",
    )
    p.add_argument("--keep-running", action="store_true", help="keep the SuperLink up after the federation")
    g = p.add_argument_group("POST (the federation tuned a prompt on a distilled student)")
    g.add_argument("--post-teacher", default=None, help="afterwards, transfer the global prompt to this large model")
    g.add_argument("--post-public", default=None, help="the public dataset the transfer reads inputs from")
    g.add_argument("--post-alpha", type=float, default=None, help="weight of the shift term (default 0.5)")
    g.add_argument("--post-steps", type=int, default=None, help="transfer steps (default 200)")
    p.set_defaults(func=cmd_server)


def aggregator_listen(args: argparse.Namespace) -> str:
    """Where the aggregation server started here listens: beside the fleet front, since holders reach both."""
    return args.aggregator_listen or f"{args.host}:{DEFAULT_PORT}"


def config_from_args(args: argparse.Namespace) -> FederationConfig:
    state = Path(args.state).resolve()
    values: dict = {"checkpoint_dir": str(Path(args.checkpoint_dir or state / "checkpoints").resolve())}
    for name in (f.name for f in flagged(FederationConfig)):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if values.get("task", "").endswith(".toml"):  # a task file: sent in full, its data stays here
        from fedprompt import taskfile

        values.update(FederationConfig.task_fields(taskfile.read(values["task"])))
    if args.no_dp:
        values["dp"] = False
    if args.client_dp:
        values["client_dp"] = True
    if args.aggregator:
        values["aggregator"] = args.aggregator
    elif not args.no_aggregator and not args.superlink:
        values["aggregator"] = loopback(aggregator_listen(args))
    if "aggregator" in values:
        values["aggregator_certs"] = str(Path(args.certs).resolve())
    if args.secure_aggregation:
        values["secure_aggregation"] = True
    if args.secure_rounds:
        values["secure_rounds"] = args.secure_rounds
    known = {f.name for f in fields(FederationConfig)}
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep or key not in known:
            raise FedPromptError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(known))}")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            if "\\" in raw:  # a shell keeps \n as two characters: say so rather than send them
                raise FedPromptError(
                    f"--set {key}=...: a bare value keeps backslashes as they are ({raw!r}); quote it as JSON "
                    f"(--set '{key}=\"...\\n...\"') or put the task in a task file (--task FILE.toml)"
                ) from None
            values[key] = raw  # a bare string
        if isinstance(values[key], dict | list):
            values[key] = raw  # a JSON object setting (dpopt_settings) travels as its text
    try:
        return FederationConfig(**values)
    except (TypeError, ValueError) as exc:
        raise FedPromptError(f"invalid federation settings: {exc}") from exc


def post_transfer_settings(args: argparse.Namespace, cfg: FederationConfig):
    """The transfer to run after the federation, or None; checked before anything starts."""
    if not (args.post_teacher or args.post_public):
        if args.post_alpha is not None or args.post_steps is not None:
            raise FedPromptError("--post-alpha/--post-steps belong to a transfer: add --post-teacher and --post-public")
        return None
    if not (args.post_teacher and args.post_public):
        raise FedPromptError("a transfer needs both --post-teacher and --post-public")
    if not cfg.coordinator_side().soft_prompt:
        raise FedPromptError(
            f"POST transfers a soft prompt; --method {cfg.method} writes a text prompt, usable on any model"
        )
    from fedprompt.data import datasets as ds_mod
    from fedprompt.models import zoo
    from fedprompt.server.post.transfer import TransferConfig

    ds_mod.load(args.post_public)  # a bad public set or teacher fails now, not after the federation
    if not zoo.locate(args.post_teacher)[2]:
        raise FedPromptError(f"--post-teacher {args.post_teacher!r} is neither a known model name nor a folder")
    values = {"alpha": args.post_alpha, "steps": args.post_steps}
    return TransferConfig(**{k: v for k, v in values.items() if v is not None})


def run_post_transfer(args: argparse.Namespace, cfg: FederationConfig, transfer_cfg, final: Path) -> None:
    """Transfer the federation's global prompt (tuned on the student) to the teacher; store it in the registry."""
    from fedprompt.server.post.cli import transfer_and_save

    out = Path(cfg.checkpoint_dir) / "post-transfer"
    print(
        f"POST: transferring {final} to {args.post_teacher} with public inputs of {args.post_public} "
        f"({transfer_cfg.steps} steps; progress on stderr)",
        flush=True,
    )
    try:
        report = transfer_and_save(
            final, args.post_teacher, args.post_public, out, transfer_cfg,
            aggregator=cfg.aggregator or None, certs=cfg.aggregator_certs or None,
        )  # fmt: skip
    except FedPromptError as exc:
        raise FedPromptError(
            f"the federation completed (global prompt {final}) but its transfer failed: {exc}; "
            f"retry with fedprompt post transfer --prompt {final} --teacher {args.post_teacher} ..."
        ) from exc
    write_json_atomic(Path(cfg.checkpoint_dir) / "post-transfer.json", report)
    where = f"; registry version {report['version_id']}" if "version_id" in report else ""
    if "registry_error" in report:
        where = f"; {report['registry_error']}"
    print(f"POST complete: teacher prompt {out} (checkpoint of step {report['chosen_step']}){where}", flush=True)


def _coordinator(args: argparse.Namespace, superlink: str | None = None) -> Coordinator:
    state = Path(args.state).resolve()
    state.mkdir(parents=True, exist_ok=True)
    return Coordinator(
        certs=Path(args.certs).resolve(),
        state=state,
        host=args.host,
        port=args.port,
        superlink=superlink,
        superlink_port=args.superlink_port,
        operator_listen=args.operator_listen,
    )


def check_task(cfg: FederationConfig) -> None:
    """Refuse a task whose label words cannot work on the model, before any process starts."""
    from transformers import AutoTokenizer

    from fedprompt.models import zoo
    from fedprompt.task import Verbalizer

    task = cfg.task_definition()
    folder, _, local = zoo.locate(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=local, trust_remote_code=False)
    try:
        Verbalizer.build(tokenizer, task.label_words, scoring=task.scoring, label_names=list(task.labels))
    except ValueError as exc:
        raise FedPromptError(f"task {task.name!r} on {cfg.model}: {exc}") from exc
    print(
        f"task {task.name}: labels {', '.join(task.labels)}; template {task.template!r}; scoring {task.scoring}",
        flush=True,
    )


def cmd_server(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if cfg.coordinator_side().soft_prompt:  # its label words are scored on the run's model
        check_task(cfg)
    transfer_cfg = post_transfer_settings(args, cfg)
    if transfer_cfg is not None and args.superlink:
        raise FedPromptError("--post-teacher needs the global prompt here: run the transfer where the SuperLink runs")
    coord = _coordinator(args, superlink=args.superlink)
    state = coord.state
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        if args.superlink:
            wait_reachable(args.superlink, "SuperLink")
        else:
            coord.start()
        if args.aggregator:
            wait_reachable(args.aggregator, "aggregation server")
        if args.secure_rounds:
            wait_reachable(args.secure_rounds, "aggregation server for secure rounds")
        if not (args.no_aggregator or args.aggregator or args.superlink):
            store = args.aggregator_store or os.environ.get(STORE_ENV) or str(state / "registry.sqlite")
            coord.start_aggregator(aggregator_listen(args), store, args.aggregator_health_listen)
        coord.register_nodes()
        expected = [n.name for n in certs_mod.registered_nodes(coord.certs)]
        print(
            f"holders with node keys: {', '.join(expected)}; the first round starts once {cfg.min_available_nodes} "
            f"are online (--min-available-nodes) and each round needs {cfg.min_train_nodes} replies "
            "(--min-train-nodes)",
            flush=True,
        )
        if cfg.min_available_nodes < len(expected):
            print(
                f"note: rounds may start without {len(expected) - cfg.min_available_nodes} of these holders; pass "
                f"--min-available-nodes {len(expected)} to wait for all of them",
                flush=True,
            )
        run_id = coord.submit(cfg)
        print(f"federation submitted: run {run_id}; checkpoints in {cfg.checkpoint_dir}", flush=True)
        coord.follow(run_id, cfg)
        where = "on the SuperLink's machine" if args.superlink else ""
        final, what = cfg.coordinator_side().result(cfg)
        print(f"{what} {final} {where}".rstrip(), flush=True)
        if transfer_cfg is not None:
            run_post_transfer(args, cfg, transfer_cfg, final)
        if args.keep_running and coord.superlink is not None:
            print("SuperLink keeps running (Ctrl-C to stop)", flush=True)
            while coord.superlink.poll() is None:
                time.sleep(1)
    except KeyboardInterrupt:
        print("stopping; a restart with the same --state resumes from the last checkpoint", flush=True)
        return 130
    finally:
        coord.stop()
    return 0


def add_front_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "front",
        help="the coordinator's network front: forwards only the Fleet API (and, with mutual TLS, the operator's)",
    )
    p.add_argument("--certs", required=True, help="the folder of fedprompt certs (ca.crt, server.crt/key)")
    p.add_argument("--superlink", required=True, help="the SuperLink's loopback HOST:PORT")
    p.add_argument("--listen", required=True, help="HOST:PORT of the fleet listener (what data holders reach)")
    p.add_argument(
        "--operator-listen",
        default=None,
        help="HOST:PORT of the operator listener (mutual TLS, CN coordinator; Control API only); default: none",
    )
    p.set_defaults(func=cmd_front)


def cmd_front(args: argparse.Namespace) -> int:
    from fedprompt.server.coordinator.front import run_front

    run_front(
        certs=Path(args.certs), superlink=args.superlink, listen=args.listen, operator_listen=args.operator_listen
    )
    return 0


def add_superlink_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "superlink", help="only the Flower SuperLink (TLS, node auth, the holders' keys registered), in the foreground"
    )
    p.add_argument("--certs", required=True, help="folder made by fedprompt certs (ca.crt, server.crt/key, nodes/)")
    p.add_argument("--state", required=True, help="the SuperLink's database, its runs' checkpoints, logs")
    _add_listen_arguments(p)
    p.add_argument(
        "--health-listen",
        default=health_default(SUPERLINK_HEALTH_PORT),
        help=f"HOST:PORT of a plaintext gRPC health service (probes; default: none, or port {SUPERLINK_HEALTH_PORT} "
        f"where ${BIND_ENV} is set)",
    )
    p.set_defaults(func=cmd_superlink)


def cmd_superlink(args: argparse.Namespace) -> int:
    """The SuperLink of a deployment where the federation is submitted separately (``fedprompt server
    --superlink``); the ServerApp runs here, started by the SuperLink for each run."""
    coord = _coordinator(args)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    try:
        coord.start(health_listen=args.health_listen)
        coord.register_nodes()
        print("SuperLink ready; SIGTERM stops it", flush=True)
        while not stopping and coord.superlink.poll() is None:
            time.sleep(0.5)
        if not stopping:
            raise FedPromptError(f"the SuperLink exited:\n{fp.tail(coord.logs / 'superlink.log')}")
    finally:
        coord.stop()
    return 0
