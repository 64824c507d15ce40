"""Training examples per second: fedprompt's prompt tuning against Hugging Face PEFT prompt tuning.

    python benchmarks/tune_throughput.py [--model smollm2-135m] [--steps 8] [--rounds 2]

Same model, data batches, batch size, prompt length, precision and number of steps; each variant runs in
its own process (so its peak memory is its own), alternating, `--rounds` times; the median counts.
fedprompt computes the logits of the label words at the answer position only; stock PEFT computes the
full-vocabulary logits of every position, as its causal-LM forward does. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from common import add_step_arguments, emit, fixed_batches

from fedprompt.runtime import Runtime
from fedprompt.training import Session
from fedprompt.tuning_settings import TuneConfig


def run_variant(args: argparse.Namespace) -> dict:
    runtime = Runtime.create(args.device, args.precision)
    session = Session(args.model, args.dataset, runtime=runtime)
    batches = fixed_batches(session, args.batch_size, args.steps + 1)
    if args.variant == "fedprompt":
        initial, _ = session.initial_prompt(TuneConfig(prompt_length=args.prompt_length))
        prompted = session.prompted(initial)
        params = list(prompted.prompt.parameters())

        def loss_of(batch):
            return prompted.classification_loss(batch, session.verbalizer)
    else:
        from peft import PromptTuningConfig, TaskType, get_peft_model

        model = get_peft_model(
            session.loaded.model,
            PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.prompt_length),
        )
        params = [p for p in model.parameters() if p.requires_grad]
        label_ids = [words[0][0] for words in session.verbalizer.token_ids]  # single-token words (bundled sets)

        def loss_of(batch):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return torch.nn.functional.cross_entropy(logits[:, -1, label_ids].float(), batch["labels"])

    opt = torch.optim.Adam(params, lr=3e-3)

    def step(batch):
        opt.zero_grad()
        with runtime.autocast():
            loss = loss_of(batch)
        loss.backward()
        opt.step()

    step(batches[0])  # warm-up (allocator, kernels)
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for b in batches[1:]:
        step(b)
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (
        torch.cuda.max_memory_allocated()
        if runtime.device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "examples_per_second": args.steps * args.batch_size / seconds,
        "seconds": seconds,
        "peak_memory_mib": peak / 2**20,
        "memory_kind": "cuda allocated" if runtime.device.type == "cuda" else "process peak RSS",
        "runtime": runtime.describe(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    add_step_arguments(ap, steps=8)
    ap.add_argument("--variant", choices=["fedprompt", "peft"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results: dict[str, list[dict]] = {"fedprompt": [], "peft": []}
    for _ in range(args.rounds):
        for variant in ("fedprompt", "peft"):
            cmd = [
                sys.executable,
                __file__,
                "--variant",
                variant,
                "--model",
                args.model,
                "--dataset",
                args.dataset,
                "--batch-size",
                str(args.batch_size),
                "--prompt-length",
                str(args.prompt_length),
                "--steps",
                str(args.steps),
                "--device",
                args.device,
                "--precision",
                args.precision,
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[variant].append(json.loads(out.strip().splitlines()[-1]))
    med = {v: statistics.median(r["examples_per_second"] for r in rs) for v, rs in results.items()}
    emit(
        {
            "name": "tune_throughput",
            "value": med["fedprompt"] / med["peft"],
            "unit": "ratio of training examples per second, fedprompt / PEFT (higher is better; target >= 1.0)",
            "fedprompt_examples_per_second": med["fedprompt"],
            "peft_examples_per_second": med["peft"],
            "fedprompt_peak_memory_mib": max(r["peak_memory_mib"] for r in results["fedprompt"]),
            "peft_peak_memory_mib": max(r["peak_memory_mib"] for r in results["peft"]),
            "runs": results,
            "settings": {k: v for k, v in vars(args).items() if k != "variant"},
        }
    )


if __name__ == "__main__":
    main()
