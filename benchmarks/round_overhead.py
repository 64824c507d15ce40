"""Coordination overhead of a federation round on loopback, and bytes on the wire per holder per round.

For 2, 4 and 8 holders (tiny model, real `fedprompt server` + `fedprompt client` processes, TLS and node
authentication), a round's wall time on the coordinator (send the prompt, wait for every reply) minus the
slowest holder's training compute is Flower's and fedprompt's overhead. Flower counts the bytes of every
message of the run (fleet API payloads, before TLS and HTTP framing); divided by holders and rounds, they
stand beside the size of the prompt itself.

Flower starts a new ClientApp process for every message. fedprompt's daemons keep the model in a worker
and the ClientApp only forwards to it; `--in-process` holders instead load the model in every ClientApp
process. Both are measured (the latter at 2 holders), and the cold cost of loading a holder (imports,
model, data) in a fresh process is measured directly for the tiny model and, when cached, smollm2-135m.

    python benchmarks/round_overhead.py [--holders 2 4 8] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import emit

from fedprompt import zoo
from fedprompt.local_federation import HolderSpec, LocalFederation

ROOT = Path(__file__).resolve().parents[1]
PROMPT_LENGTH = 20
SETTINGS = (
    "--model", "tiny-llama",
    "--task", "rotten-tomatoes",
    "--local-steps", "2",
    "--batch-size", "8",
    "--prompt-length", str(PROMPT_LENGTH),
    "--set", "evaluate=false",
    "--no-dp",  # holders report their compute time only without DP (under DP it would leak)
    "--set", "wait_for_nodes_s=300",
)  # fmt: skip

COLD_LOAD = """
import sys, time
t = time.perf_counter()
from fedprompt import zoo
from fedprompt.client.trainer import Holder
from fedprompt.dp.ledger import Budget, PrivacyLedger
from fedprompt.rounds import TaskSpec
loaded = zoo.load(sys.argv[1])
words = ((" negative",), (" positive",))
task = TaskSpec("t", "{text}\\nAnswer:", ("negative", "positive"), words, "x", sys.argv[1], loaded.weights_sha256)
PrivacyLedger(sys.argv[3]).set_budget(Budget(1.0, 1e-5))
Holder(data=sys.argv[2], state_dir=sys.argv[3], model=loaded, task=task)
print(time.perf_counter() - t)
"""
LIGHT_IMPORT = """
import time
t = time.perf_counter()
import fedprompt.client.app
print(time.perf_counter() - t)
"""


def write_data(folder: Path, n: int) -> list[Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_sentiment_rows

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"holder-{i + 1}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in make_sentiment_rows(120, seed=i)))
        paths.append(p)
    return paths


def run(n: int, rounds: int, folder: Path, *, in_process: bool = False) -> dict:
    holders = [HolderSpec(f"holder-{i + 1}", p, 1000.0) for i, p in enumerate(write_data(folder / "data", n))]
    with LocalFederation(folder / "fed", holders) as fed:
        fed.start_server(
            *SETTINGS, "--num-rounds", str(rounds), "--min-available-nodes", str(n), "--min-train-nodes", str(n)
        )
        for h in holders:
            fed.start_holder(h, *(["--in-process"] if in_process else []))
        history = fed.wait(1800)
        traffic = fed.run_traffic()
    per_round = []
    for rec in history[1:]:
        compute = max(m["train_seconds"] for m in rec["holders"].values())
        per_round.append({"round": rec["round"], "wall_s": rec["train_seconds"], "max_train_s": compute})
    steady = per_round[1:] or per_round  # round 1 also loads the model into each holder's worker
    prompt_bytes = PROMPT_LENGTH * zoo.load("tiny-llama").hidden_size * 4
    per_holder_round = traffic["total-bytes"] / (n * rounds)
    return {
        "holders": n,
        "mode": "in-process (model loaded per message)" if in_process else "worker (model loaded once)",
        "rounds": per_round,
        "overhead_s_median": statistics.median(r["wall_s"] - r["max_train_s"] for r in steady),
        "first_round_overhead_s": per_round[0]["wall_s"] - per_round[0]["max_train_s"],
        "bytes_per_holder_per_round": per_holder_round,
        "prompt_bytes": prompt_bytes,
        "wire_to_prompt_ratio": per_holder_round / prompt_bytes,
    }


def cold(code: str, *args: str) -> float:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--holders", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n in a.holders:
            results.append(run(n, a.rounds, tmp / f"worker-{n}"))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        results.append(run(2, a.rounds, tmp / "in-process-2", in_process=True))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        data = write_data(tmp / "cold", 1)[0]
        load = {"clientapp_import_s (worker mode)": cold(LIGHT_IMPORT)}
        for model in ("tiny-llama", "smollm2-135m"):
            if model == "tiny-llama" or (zoo.model_folder(model) / zoo.MANIFEST).exists():
                load[f"holder_cold_load_s {model}"] = cold(COLD_LOAD, model, str(data), str(tmp / f"st-{model}"))
    worker2 = next(r for r in results if r["holders"] == 2 and r["mode"].startswith("worker"))
    emit(
        {
            "benchmark": "round_overhead",
            "results": results,
            "cold_start": load,
            "in_process_vs_worker_overhead_ratio": results[-1]["overhead_s_median"] / worker2["overhead_s_median"],
        }
    )


if __name__ == "__main__":
    main()
