"""Time per training step with DP against the same step without DP, and against a generic per-sample path.

    python benchmarks/dp_overhead.py [--model smollm2-135m] [--steps 5] [--rounds 2]

Same model, batches, prompt and optimizer (Adam) for every variant, interleaved over `--rounds`:
- `no_dp`: ordinary prompt tuning step;
- `fedprompt_dp`: Opacus's DPOptimizer (per-example clipping + Gaussian noise) fed by fedprompt's SoftPrompt
  grad sampler (per-example gradients from the ordinary backward pass);
- `generic_per_sample`: what is left when a prompt is a raw parameter: Opacus's functorch path refuses an
  HF model (its layers carry buffers; the error is recorded), so per-example gradients come from one
  backward pass per example (microbatches), then the same clipping and noise.
Prints one JSON object; the headline is fedprompt_dp / no_dp (target <= 1.10).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from common import add_step_arguments, emit, fixed_batches
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from fedprompt.dp import grad_sample as _registered  # noqa: F401
from fedprompt.runtime import Runtime
from fedprompt.training import Session
from fedprompt.tuning_settings import TuneConfig


class RawPromptLM(nn.Module):
    """A prompt held as a bare nn.Parameter on the wrapper: the layout Opacus would need to handle generically."""

    def __init__(self, prompted) -> None:
        super().__init__()
        self.model = prompted.model
        self.prompt = nn.Parameter(prompted.prompt.weight.detach().clone())


def opacus_generic_error(prompted) -> str:
    try:
        GradSampleModule(RawPromptLM(prompted).train(), strict=False)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "accepted"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    add_step_arguments(ap, steps=5)
    args = ap.parse_args()

    runtime = Runtime.create(args.device, args.precision)
    session = Session(args.model, args.dataset, runtime=runtime)
    batches = fixed_batches(session, args.batch_size, args.steps)
    initial, _ = session.initial_prompt(TuneConfig(prompt_length=args.prompt_length))
    verb = session.verbalizer

    def loss(prompted, batch, reduction="mean"):
        with runtime.autocast():
            return prompted.classification_loss(batch, verb, reduction=reduction)

    def timed(fn) -> float:
        fn(batches[0])  # warm-up
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in batches:
            fn(b)
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / len(batches)

    def no_dp() -> float:
        prompted = session.prompted(initial)
        prompted.train()
        opt = torch.optim.Adam(prompted.prompt.parameters(), lr=3e-3)

        def step(batch):
            opt.zero_grad()
            loss(prompted, batch).backward()
            opt.step()

        return timed(step)

    def dp_optimizer(params):
        return DPOptimizer(
            torch.optim.Adam(params, lr=3e-3),
            noise_multiplier=0.5,
            max_grad_norm=1.0,
            expected_batch_size=args.batch_size,
        )

    def fedprompt_dp() -> float:
        prompted = session.prompted(initial)
        prompted.train()
        gsm = GradSampleModule(prompted)
        opt = dp_optimizer(list(prompted.prompt.parameters()))

        def step(batch):
            opt.zero_grad()
            loss(prompted, batch).backward()
            opt.step()

        seconds = timed(step)
        gsm.remove_hooks()
        return seconds

    def generic_per_sample() -> float:
        prompted = session.prompted(initial)
        prompted.train()
        w = prompted.prompt.weight
        opt = dp_optimizer([w])

        def step(batch):
            opt.zero_grad()
            rows = []
            for i in range(batch["labels"].shape[0]):
                one = {k: v[i : i + 1] for k, v in batch.items()}
                (g,) = torch.autograd.grad(loss(prompted, one, reduction="sum"), w)
                rows.append(g)
            w.grad_sample = torch.stack(rows)
            opt.step()

        return timed(step)

    variants = {"no_dp": no_dp, "fedprompt_dp": fedprompt_dp, "generic_per_sample": generic_per_sample}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            times[name].append(fn())
    med = {k: statistics.median(v) for k, v in times.items()}
    emit(
        {
            "name": "dp_overhead",
            "value": med["fedprompt_dp"] / med["no_dp"],
            "unit": "ratio of seconds per step, DP / no DP (target <= 1.10; floor 1.0)",
            "seconds_per_step": med,
            "generic_over_fedprompt_dp": med["generic_per_sample"] / med["fedprompt_dp"],
            "opacus_generic_path_on_raw_prompt": opacus_generic_error(session.prompted(initial)),
            "runs": times,
            "settings": {**vars(args), "runtime": runtime.describe()},
        }
    )


if __name__ == "__main__":
    main()
