"""DP-OPT generation speed: released tokens per second with the teachers' shared head computed once, against
recomputing every teacher's full meta-prompt at every token.

    python benchmarks/dpopt_speed.py [--model smollm2-135m] [--preset cpu] [--tokens 6] [--rounds 2]

Arms, in one process, on the same model, precision, data, labelled examples and preset:
  cached        fedprompt: one batched forward per token over each teacher's own tokens, attending to the
                head's keys and values computed once for the run
  recompute     the same batches, each teacher's whole meta-prompt recomputed at every token (DP-OPT's code)
  one_by_one    every teacher's whole meta-prompt recomputed alone (no batching)
Every arm writes the same candidate from the same seeded subsamples with greedy teachers and a plain vote
(the release mechanism's cost is nothing beside the forwards, and greedy votes make the arms' work equal).
Arms alternate, `--rounds` times; the median tokens per second counts. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit

from fedprompt.client.dpopt import generation as dpopt
from fedprompt.data import datasets
from fedprompt.models import zoo
from fedprompt.protocols.dpopt_settings import PRESETS
from fedprompt.runtime import Runtime
from fedprompt.task import Verbalizer

ARMS = ("cached", "recompute", "one_by_one")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="rotten-tomatoes")
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--tokens", type=int, default=6, help="tokens written per arm and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()

    runtime = Runtime.create(args.device, args.precision)
    loaded = zoo.load(args.model, device=runtime.device, attention="sdpa")
    ds = datasets.load(args.dataset)
    verbalizer = Verbalizer.build(loaded.tokenizer, ds.label_words)
    cfg = replace(
        PRESETS[args.preset],
        private=False,
        temperature=0.0,
        min_new_tokens=args.tokens,
        max_new_tokens=args.tokens,
        seed=0,
    )
    words = [w[0] for w in ds.label_words]
    gen = dpopt.DPOPTGenerator(loaded, runtime, verbalizer, ds.template, words, ds.init_text, ds.split("train"), cfg)
    ensembles = {
        "cached": gen.ensemble,
        "recompute": dpopt.TeacherEnsemble(
            loaded, runtime, gen.meta.head_ids, reuse_head=False, batch_size=cfg.teacher_batch_size
        ),
        "one_by_one": dpopt.TeacherEnsemble(loaded, runtime, gen.meta.head_ids, reuse_head=False, batch_size=1),
    }

    own_lengths: list[int] = []  # each teacher's tokens after the head, as the cached arm sees them
    measured = ensembles["cached"].next_token_logits

    def recording(bodies):
        own_lengths.extend(len(b) for b in bodies)
        return measured(bodies)

    ensembles["cached"].next_token_logits = recording

    def write(arm: str) -> tuple[float, list[int]]:
        gen.ensemble = ensembles[arm]
        gen.draws = dpopt.Draws(0)  # the same subsamples in every arm
        started = time.perf_counter()
        ids, _ = gen.candidate()
        return time.perf_counter() - started, ids

    write("cached")  # warm-up; it also labels the examples every arm samples (same seed, same subsamples)
    rates: dict[str, list[float]] = {a: [] for a in ARMS}
    written: dict[str, list[int]] = {}
    for _ in range(args.rounds):
        for arm in ARMS:
            seconds, ids = write(arm)
            rates[arm].append(len(ids) / seconds)
            written[arm] = ids
    median = {a: statistics.median(r) for a, r in rates.items()}
    emit(
        {
            "name": "dpopt_generation_speed",
            "value": median["cached"] / median["recompute"],
            "unit": "x tokens/s, shared head cached vs every meta-prompt recomputed (batched)",
            "target": 5.0,
            "tokens_per_second": median,
            "speedup_vs_one_by_one": median["cached"] / median["one_by_one"],
            "same_tokens_written": written["cached"] == written["recompute"] == written["one_by_one"],
            "head_tokens": len(gen.meta.head_ids),
            "teacher_own_tokens_mean": statistics.mean(own_lengths),
            "settings": {
                "model": loaded.model_id,
                "dataset": ds.name,
                "preset": args.preset,
                "teachers": cfg.teachers,
                "shots": cfg.shots,
                "teacher_batch_size": cfg.teacher_batch_size,
                "tokens": args.tokens,
                "rounds": args.rounds,
                "precision": runtime.precision,
                "device": str(runtime.device),
            },
        }
    )


if __name__ == "__main__":
    main()
