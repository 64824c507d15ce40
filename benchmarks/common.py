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


def emit(result: dict) -> None:
    result["machine"] = machine()
    print(json.dumps(result, indent=2))
