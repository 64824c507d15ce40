"""What every benchmark prints beside its figures: the machine and the software."""

from __future__ import annotations

import json
import os
import platform
import sys

import torch


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }


def add_step_arguments(ap, *, steps: int) -> None:
    """The settings every training-step benchmark shares (model, data, batch, prompt, precision)."""
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="rotten-tomatoes")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--prompt-length", type=int, default=20)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")


def fixed_batches(session, batch_size: int, count: int) -> list[dict[str, torch.Tensor]]:
    """The same `count` training batches for every variant of a benchmark (seeded, no replacement)."""
    train = session.encode_split("train")
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(train), generator=gen)[: batch_size * count].tolist()
    return [session.collate([train[i] for i in idx[k * batch_size : (k + 1) * batch_size]]) for k in range(count)]


def emit(result: dict) -> None:
    result["machine"] = machine()
    print(json.dumps(result, indent=2))
