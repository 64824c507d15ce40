"""``fedprompt aggregator`` (run the aggregation server) and ``fedprompt prompts`` (talk to it)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from fedprompt.bind import BIND_ENV, bind_host, health_default
from fedprompt.errors import ArtifactError, FedPromptError
from fedprompt.protocols.aggregator_client import DEFAULT_PORT

STORE_ENV = "FEDPROMPT_AGGREGATOR_STORE"  # lets a deployment pass a PostgreSQL URL from a secret

HEALTH_PORT = 9095  # the plaintext grpc.health.v1 port of the images and manifests


def cmd_aggregator(args: argparse.Namespace) -> int:
    from fedprompt.server.aggregation.service import Aggregator, AggregatorSettings

    store = args.store or os.environ.get(STORE_ENV)
    if not store:
        raise FedPromptError(f"give --store (a SQLite file or a postgresql:// URL) or set {STORE_ENV}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = AggregatorSettings(
        certs_dir=Path(args.certs),
        store=store,
        listen=args.listen,
        health_listen=args.health_listen,
        max_message_bytes=int(args.max_message_mb * 1024 * 1024),
        rate_per_second=args.rate,
        burst=args.burst,
        grace_seconds=args.grace,
    )

    def ready(agg: Aggregator) -> None:
        where = "PostgreSQL" if store.startswith(("postgresql://", "postgres://")) else store
        health = f", health on {settings.health_listen}" if settings.health_listen else ""
        print(f"aggregation server on {settings.listen} (mutual TLS, store {where}{health})", flush=True)

    asyncio.run(Aggregator(settings).serve_forever(ready))
    return 0


def add_aggregator_parser(sub) -> None:
    p = sub.add_parser("aggregator", help="run the aggregation server (prompt registry, rounds, secure aggregation)")
    p.add_argument("--certs", required=True, help="the folder of `fedprompt certs` (ca.crt, server.crt/key, nodes/)")
    p.add_argument("--store", default=None, help=f"SQLite file or postgresql:// URL (default: ${STORE_ENV})")
    p.add_argument(
        "--listen",
        default=f"{bind_host()}:{DEFAULT_PORT}",
        help=f"address of the mutual-TLS gRPC port (default: loopback; every interface where ${BIND_ENV} is set, as in "
        "the image)",
    )
    p.add_argument(
        "--health-listen",
        default=health_default(HEALTH_PORT),
        help=f"also serve grpc.health.v1 alone, without TLS, here (for probes; default: none, or port {HEALTH_PORT} "
        f"where ${BIND_ENV} is set)",
    )
    p.add_argument("--max-message-mb", type=float, default=16.0, help="largest request or reply")
    p.add_argument("--rate", type=float, default=50.0, help="calls per second allowed per client identity")
    p.add_argument("--burst", type=int, default=100, help="calls a client may make at once before the rate applies")
    p.add_argument("--grace", type=float, default=10.0, help="seconds calls in flight get at shutdown")
    p.set_defaults(func=cmd_aggregator)


def cmd_registry(args: argparse.Namespace) -> int:
    """A consistent copy of a SQLite registry while the aggregation server runs (PostgreSQL: use pg_dump)."""
    import contextlib
    import sqlite3

    from fedprompt.cache import sqlite_backup

    store = args.store or os.environ.get(STORE_ENV, "")
    if store.startswith(("postgresql://", "postgres://")):
        raise FedPromptError("a PostgreSQL registry is backed up with pg_dump (see deploy/README.md)")
    if not store or not Path(store).is_file():
        raise FedPromptError(f"no SQLite registry at {store!r}: give --store")
    with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as conn:
        print(sqlite_backup(conn, args.dest))
    return 0


def add_registry_parser(sub) -> None:
    p = sub.add_parser("registry", help="back up the aggregation server's SQLite registry (safe while it runs)")
    p.add_argument("action", choices=["backup"], help="backup: write a consistent copy of the registry to DEST")
    p.add_argument("dest", help="the backup file to write")
    p.add_argument("--store", default=None, help=f"the registry's SQLite file (default: ${STORE_ENV})")
    p.set_defaults(func=cmd_registry)


# ------------------------------------------------------------------ fedprompt prompts


def _client(args: argparse.Namespace):
    from fedprompt.protocols.aggregator_client import AggregatorClient

    return AggregatorClient(args.aggregator, args.certs, args.identity, timeout=args.timeout)


def _short(v) -> str:
    kind = "text" if v.WhichOneof("content") == "text" else "soft"
    return (
        f"{v.version_id[:16]}  {v.task:24} {v.base_model.model_id:20} {kind:4}  parent {v.parent_id[:16] or '-':16}"
        f"  by {v.created_by or '-'}"
    )


def cmd_prompts(args: argparse.Namespace) -> int:
    import torch

    from fedprompt import artifact

    with _client(args) as c:
        if args.action == "list":
            versions = c.list_versions(task=args.task or "", model_id=args.model or "")
            for v in versions:
                print(_short(v))
            print(f"{len(versions)} version(s)")
        elif args.action == "show":
            v = c.get_version(args.version)
            shape = list(v.embeddings.shape) if v.embeddings is not None else None
            print(
                json.dumps(
                    {
                        "version_id": v.version_id,
                        "task": v.task,
                        "base_model": asdict(v.base_model),
                        "shape": shape,
                        "text": v.text,
                        "parent_id": v.parent_id,
                        "created_by": v.created_by,
                        "created_unix": v.created_unix,
                        # the privacy spend and training settings are the author's word: the registry checks
                        # that the id hashes the content, nothing in the metadata
                        "metadata_claimed_by": v.created_by,
                        "checked_by_registry": "content hash only",
                        "metadata": v.metadata,
                    },
                    indent=2,
                )
            )
        elif args.action == "export":
            v = c.get_version(args.version)
            out = Path(args.out)
            if out.exists() and any(out.iterdir()):
                raise FedPromptError(f"{out} is not empty")
            if v.embeddings is None:
                out.mkdir(parents=True, exist_ok=True)
                (out / "prompt.txt").write_text(v.text or "")
                (out / "fedprompt.json").write_text(json.dumps(v.metadata, indent=2, sort_keys=True) + "\n")
            else:
                try:
                    meta = artifact.ArtifactMeta.from_record(v.metadata, ignore_unknown=True)
                except ArtifactError as exc:
                    raise FedPromptError(
                        f"version {v.version_id[:16]} lacks the artifact metadata (task template, label words): {exc}"
                    ) from exc
                meta.lineage = {**meta.lineage, "registry_version": v.version_id, "parent_version": v.parent_id}
                artifact.save(out, torch.from_numpy(np.array(v.embeddings)), meta)
            print(f"exported {v.version_id[:16]} to {out}")
        elif args.action == "publish":
            weight, meta = artifact.load(args.prompt)
            v = c.publish_artifact(weight.numpy(), asdict(meta), parent_id=args.parent)
            print(f"published {args.prompt} as {v.version_id}")
        elif args.action == "vector":
            t = c.publish_task_vector(task=args.task, tuned_id=args.tuned, origin_id=args.origin)
            print(f"task vector {t.vector_id[:16]}: {t.task}, origin {t.origin_id[:16]}, tuned {t.tuned_id[:16]}")
        elif args.action == "vectors":
            for t in c.list_task_vectors(origin_id=args.origin or "", task=args.task or ""):
                norm = float(np.linalg.norm(t.tau))
                print(f"{t.vector_id[:16]}  {t.task:24} origin {t.origin_id[:16]}  |tau| {norm:.4f}")
        elif args.action == "compose":
            terms = []
            for term in args.term:
                vector, _, weight = term.partition("=")
                try:
                    terms.append((vector, float(weight)))
                except ValueError:
                    raise FedPromptError(f"--term {term!r}: use VECTOR_ID=LAMBDA") from None
            v = c.compose(origin_id=args.origin, terms=terms, task=args.task)
            print(f"composed {len(terms)} task vector(s) onto {args.origin[:16]}: version {v.version_id}")
    return 0


def add_prompts_parser(sub) -> None:
    p = sub.add_parser("prompts", help="list, show, export, publish and compose prompts on the aggregation server")
    p.add_argument("--aggregator", default=f"127.0.0.1:{DEFAULT_PORT}", help="HOST:PORT of the aggregation server")
    p.add_argument("--certs", required=True, help="certificate folder (ca.crt and this caller's certificate)")
    p.add_argument("--as", dest="identity", default="coordinator", help="'coordinator' or a node name")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline of each call, seconds")
    acts = p.add_subparsers(dest="action", required=True)
    a = acts.add_parser("list", help="the versions, newest last, with who published each")
    a.add_argument("--task", help="only versions of this task")
    a.add_argument("--model", help="only versions for this base model id")
    a = acts.add_parser("show", help="one version's metadata (as claimed by its author)")
    a.add_argument("version", help="version id or a unique prefix (8+ hex digits)")
    a = acts.add_parser("export", help="write a version as a PEFT-loadable prompt artifact")
    a.add_argument("version", help="version id or a unique prefix (8+ hex digits)")
    a.add_argument("--out", required=True, help="the artifact folder to write (new or empty)")
    a = acts.add_parser("publish", help="store a prompt artifact folder as a version")
    a.add_argument("--prompt", required=True, help="the prompt artifact's folder")
    a.add_argument("--parent", default=None, help="version id of the prompt it derives from (default: none)")
    a = acts.add_parser("vector", help="publish tau = tuned - origin as a task prompt vector")
    a.add_argument("--task", required=True, help="the task the vector is published under")
    a.add_argument("--tuned", required=True, help="version id of the tuned prompt")
    a.add_argument("--origin", required=True, help="version id of the initial prompt it was tuned from")
    a = acts.add_parser("vectors", help="list task prompt vectors")
    a.add_argument("--origin", help="only vectors from this origin version id")
    a.add_argument("--task", help="only vectors of this task")
    a = acts.add_parser("compose", help="store origin + sum(lambda * tau) as a new version")
    a.add_argument("--origin", required=True, help="version id of the initial prompt the vectors are added to")
    a.add_argument("--term", action="append", required=True, help="VECTOR_ID=LAMBDA (repeatable)")
    a.add_argument("--task", required=True, help="the name of the composed prompt's task")
    p.set_defaults(func=cmd_prompts)
