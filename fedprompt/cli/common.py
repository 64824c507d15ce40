"""What several commands share: the runtime flags, the demos' federation flags."""

from __future__ import annotations

import argparse


def add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="bf16 = autocast over float32 weights; auto picks it where the hardware has bf16 units",
    )


def add_demo_federation(p: argparse.ArgumentParser) -> None:
    """The flags of a demo's federation of local processes (``fedprompt demo``, ``fedprompt demo-post``)."""
    p.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    p.add_argument("--timeout", type=float, default=3600.0, help="give up on the federation after this many seconds")
    p.add_argument(
        "--no-secure-aggregation",
        action="store_true",
        help="holders send their updates in the clear to the coordinator (default: SecAgg+ via the aggregation server)",
    )
