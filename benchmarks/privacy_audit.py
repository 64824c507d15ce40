"""Audit fedprompt's DP-SGD with many gradient canaries (``dp/audit.py``), and show the audit can fail.

    python benchmarks/privacy_audit.py [--claimed-epsilon 2] [--canaries 200000] [--repeats 10]

The real pipeline (tiny-llama, a full batch of real rotten-tomatoes snippets, Opacus's clipping and noise,
fedprompt's Poisson sampler) runs with the noise the RDP accountant calibrates to the claimed ε, and again with the
smaller noise that the same accountant says gives twice that ε: a mechanism that claims ε but spends 2ε. Each is
audited ``--repeats`` times against the claim. Prints one JSON object: the ceiling (the largest bound the canaries
can give; it must exceed the claim), the correct mechanism's bounds (each must stay at or below the claim), and
the share of the under-noised mechanism's audits that exceed the claim (target: at least 9 of 10).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit

from fedprompt.data import datasets
from fedprompt.dp.accounting import calibrate_noise
from fedprompt.dp.audit import audit_dp_sgd
from fedprompt.dp.engine import DPConfig, plan
from fedprompt.runtime import Runtime
from fedprompt.training import Session
from fedprompt.tuning_settings import TuneConfig


def small_dataset(folder: Path, examples: int) -> Path:
    """The first ``examples`` training snippets of rotten-tomatoes (and a few held-out ones the session needs)."""
    full = datasets.load("rotten-tomatoes")
    rows = [
        {"text": e.text, "label": full.label_names[e.label], "split": "train"} for e in full.split("train")[:examples]
    ]
    rows += [{"text": e.text, "label": full.label_names[e.label], "split": "test"} for e in full.split("test")[:8]]
    rows += [
        {"text": e.text, "label": full.label_names[e.label], "split": "validation"} for e in full.split("test")[8:16]
    ]
    path = folder / "audit.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-llama", help="the audit targets the mechanism; any model works")
    ap.add_argument("--claimed-epsilon", type=float, default=2.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--canaries", type=int, default=200_000, help="included canaries (and as many excluded) per audit")
    ap.add_argument("--repeats", type=int, default=10, help="audits of each mechanism")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--examples", type=int, default=16, help="real examples, all in every batch (sample rate 1)")
    ap.add_argument("--prompt-length", type=int, default=256, help="canary coordinates per run: length x hidden")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = small_dataset(Path(tmp), args.examples)
        session = Session(args.model, str(data), runtime=Runtime.create(precision="fp32"), max_length=64)
        cfg = TuneConfig(
            prompt_length=args.prompt_length, steps=args.steps, batch_size=args.examples, eval_every=0, init="vocab"
        )
        n = len(session.dataset.split("train"))
        claimed = plan(
            DPConfig(target_epsilon=args.claimed_epsilon, delta=args.delta),
            num_examples=n,
            batch_size=n,
            steps=cfg.steps,
        )
        sigma_broken = calibrate_noise(
            target_epsilon=2 * args.claimed_epsilon,
            delta=args.delta,
            sample_rate=1.0,
            steps=cfg.steps,
            accountant="rdp",
        )
        broken = replace(claimed, noise_multiplier=sigma_broken, epsilon=2 * args.claimed_epsilon)
        results = {}
        for name, mechanism in (("correct", claimed), ("under-noised (true epsilon 2x the claim)", broken)):
            started = time.perf_counter()
            audits = [
                audit_dp_sgd(session, cfg, mechanism, claimed=claimed, canaries_per_side=args.canaries, seed=k)
                for k in range(args.repeats)
            ]
            results[name] = {
                "noise_multiplier": mechanism.noise_multiplier,
                "accountant_epsilon": mechanism.epsilon,
                "lower_bounds": [round(a.epsilon_lower_bound, 4) for a in audits],
                "flagged": sum(a.epsilon_lower_bound > args.claimed_epsilon for a in audits),
                "seconds": round(time.perf_counter() - started, 1),
            }
    correct, under = results["correct"], results["under-noised (true epsilon 2x the claim)"]
    emit(
        {
            "name": "privacy_audit_many_canaries",
            "claimed_epsilon": args.claimed_epsilon,
            "delta": args.delta,
            "ceiling": audits[0].ceiling,
            "ceiling_above_claim": audits[0].ceiling > args.claimed_epsilon,
            "correct_max_bound": max(correct["lower_bounds"]),
            "correct_never_above_claim": correct["flagged"] == 0,
            "under_noised_detection_rate": under["flagged"] / args.repeats,
            "target": "ceiling > claim; correct bound <= claim every time; under-noised flagged in >= 9 of 10",
            "mechanisms": results,
            "settings": {**vars(args), "sample_rate": claimed.sample_rate, "train_examples": n, "confidence": 0.95},
        }
    )


if __name__ == "__main__":
    main()
