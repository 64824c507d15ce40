"""One-run privacy audit (Steinke, Nasr & Jagielski 2023) of fedprompt's DP-SGD, with a positive control.

    python benchmarks/privacy_audit.py [--model tiny-llama] [--canaries 1000] [--steps 300]

Prints one JSON object: the epsilon lower bound at 95 % confidence of a DP run at the target epsilon
(it must not exceed the accountant's epsilon), and of the same run without clipping and noise (it must
be large, showing the audit has the power to catch a broken mechanism). One run with m canaries can
certify only so much: 200 guesses all correct certify about 4.1 at delta = 1/(2n) here.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit

from fedprompt.dp.audit import audit_dp_sgd
from fedprompt.dp.engine import DPConfig, PrivacyPlan, plan
from fedprompt.runtime import Runtime
from fedprompt.training import Session, TuneConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny-llama", help="the audit targets the mechanism; any model works")
    ap.add_argument("--dataset", default="rotten-tomatoes")
    ap.add_argument("--target-epsilon", type=float, default=8.0)
    ap.add_argument("--canaries", type=int, default=1000)
    ap.add_argument("--guesses-per-side", type=int, default=100)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--prompt-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    session = Session(args.model, args.dataset, runtime=Runtime.create(precision="fp32"), max_length=64)
    cfg = TuneConfig(
        prompt_length=args.prompt_length,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_every=0,
        init="vocab",
        seed=args.seed,
    )
    n = len(session.dataset.split("train"))
    dp_plan = plan(
        DPConfig(target_epsilon=args.target_epsilon), num_examples=n, batch_size=cfg.batch_size, steps=cfg.steps
    )
    control = PrivacyPlan(
        noise_multiplier=0.0,
        sample_rate=dp_plan.sample_rate,
        steps=cfg.steps,
        delta=dp_plan.delta,
        epsilon=float("inf"),
        accountant="rdp",
        max_grad_norm=1e6,
        num_examples=n,
    )
    runs = {}
    # Without clipping one example may move the update arbitrarily far, and the control's canaries do
    # (norm 100); under DP a canary gets the clipping norm, the most clipping lets through.
    for name, p, canary_norm in (("dp", dp_plan, None), ("no_clip_no_noise", control, 100.0)):
        t0 = time.perf_counter()
        res = audit_dp_sgd(
            session,
            cfg,
            p,
            canaries=args.canaries,
            guesses_per_side=args.guesses_per_side,
            seed=args.seed,
            canary_norm=canary_norm,
        )
        runs[name] = {
            **res.as_dict(),
            "accountant_epsilon": p.epsilon,
            "noise_multiplier": p.noise_multiplier,
            "max_grad_norm": p.max_grad_norm,
            "seconds": round(time.perf_counter() - t0, 1),
        }
    emit(
        {
            "name": "privacy_audit_one_run",
            "value": runs["dp"]["epsilon_lower_bound"],
            "unit": "epsilon lower bound (95 % confidence)",
            "accountant_epsilon": dp_plan.epsilon,
            "bound_below_accountant": runs["dp"]["epsilon_lower_bound"] <= dp_plan.epsilon,
            "positive_control_lower_bound": runs["no_clip_no_noise"]["epsilon_lower_bound"],
            "runs": runs,
            "settings": {**vars(args), "sample_rate": dp_plan.sample_rate, "delta": dp_plan.delta, "train_examples": n},
        }
    )


if __name__ == "__main__":
    main()
