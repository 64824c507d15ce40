"""``fedprompt certs`` and ``fedprompt health``."""

from __future__ import annotations

import argparse


def cmd_health(args: argparse.Namespace) -> int:
    from fedprompt.protocols.health import check

    return check(args)


def cmd_certs(args: argparse.Namespace) -> int:
    from fedprompt import certs

    done = certs.create(args.out, nodes=args.node, hosts=args.host or [], days=args.days)
    print(f"{args.out}: created {', '.join(done['created']) or 'nothing'}; kept {', '.join(done['kept']) or 'nothing'}")
    every = [n.name for n in certs.registered_nodes(args.out) if n.private_key.exists()]
    if args.bundles:
        certs.write_bundles(args.out, args.bundles, nodes=every)
        print(f"{args.bundles}: coordinator/ and nodes/NAME/, one folder per party ({len(every)} node(s))")
    if args.kustomize:
        certs.write_bundles(args.out, args.kustomize, nodes=every, kustomize=True)
        print(f"{args.kustomize}: coordinator/ and nodes/NAME/ for the overlays' Secrets ({len(every)} node(s))")
    print("keep ca.key offline; give each holder ca.crt and its own nodes/NAME folder only")
    return 0


def add_certs_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("certs", help="create the federation's CA, server certificate and node keys")
    p.add_argument("--out", required=True, help="certificate folder (existing material is kept)")
    p.add_argument("--node", action="append", default=[], help="a data holder's node name (repeatable)")
    p.add_argument(
        "--host",
        action="append",
        default=None,
        help="a name or address the coordinator is reached at (repeatable; localhost and 127.0.0.1 are always in)",
    )
    p.add_argument("--days", type=int, default=365, help="validity of new certificates")
    p.add_argument(
        "--kustomize",
        default=None,
        metavar="DIR",
        help="also write the material as the Secrets the Kubernetes overlays include (DIR/coordinator, DIR/nodes/NAME)",
    )
    p.add_argument(
        "--bundles",
        default=None,
        metavar="DIR",
        help="also write what each party is given, one folder each: DIR/coordinator (mounted by the coordinator "
        "side's containers) and DIR/nodes/NAME (one holder's); ca.key is in none",
    )
    p.set_defaults(func=cmd_certs)


def add_health_parser(sub: argparse._SubParsersAction) -> None:
    from fedprompt.protocols.health import add_arguments as add_health_arguments

    p = sub.add_parser("health", help="check a plaintext grpc.health.v1 endpoint (container health checks)")
    add_health_arguments(p)
    p.set_defaults(func=cmd_health)
