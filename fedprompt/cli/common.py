"""What several commands share: the runtime flags."""

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
