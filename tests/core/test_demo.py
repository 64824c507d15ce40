"""`fedprompt demo` end to end with the tiny model: the federation's real processes, every comparison of the
report, and the intervals it states."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedprompt.dp.ledger import PrivacyLedger
from fedprompt.stats import accuracy_interval, gain_interval

METHODS = {"zero-shot", "untuned prompt", "federated", "holder-1 alone", "holder-2 alone", "holder-3 alone"}


@pytest.mark.integration
def test_the_demo_reports_every_comparison_with_its_interval(tmp_path: Path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "fedprompt.cli", "demo", "--out", str(out), "--model", "tiny-llama"]
    cmd += ["--rounds", "2", "--local-steps", "1", "--batch-size", "4", "--prompt-length", "2", "--lr", "0.05"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((out / "report" / "results.json").read_text())
    summary = results["results"]
    assert set(summary) == METHODS | {"centralised DP"}
    for name, r in summary.items():
        a, g = r["accuracy"], r["gain_over_zero_shot"]
        assert r["examples"] == 500  # the bundled test split
        assert 0 <= a["low"] <= a["value"] <= a["high"] <= 1, name
        assert g["low"] <= g["value"] <= g["high"], name
    assert summary["zero-shot"]["gain_over_zero_shot"]["value"] == 0
    # the seconds of each part, and they account for the whole
    seconds = results["settings"]["seconds"]
    assert {"federation", "holders alone", "centralised DP", "evaluation", "total"} <= set(seconds)
    assert sum(v for k, v in seconds.items() if k != "total") <= seconds["total"]
    report = (out / "report" / "report.md").read_text()
    for name in summary:
        assert f"| {name} |" in report or f"| **{name}** |" in report
    # the holders spent what the run targets, no more, through the real daemons' ledgers; the report's
    # per-round figures are those ledgers' own
    assert set(results["spend"]) == {"holder-1", "holder-2", "holder-3"}
    for i in (1, 2, 3):
        spent = PrivacyLedger(out / "holders" / f"holder-{i}").spent()
        assert 0 < spent.epsilon <= 8.0 + 1e-6
        per_round = results["spend"][f"holder-{i}"]
        assert len(per_round) == 2 and 0 < per_round[0] < per_round[1] <= 8.0 + 1e-6


def test_a_gpu_gets_more_rounds_and_larger_batches_unless_the_user_chose():
    import argparse

    from fedprompt.demo import DEMO_DEFAULTS, GPU_DEFAULTS, resolve_defaults

    a = argparse.Namespace(rounds=None, batch_size=None)
    resolve_defaults(a, gpu=False)
    assert (a.rounds, a.batch_size) == (DEMO_DEFAULTS["rounds"], DEMO_DEFAULTS["batch_size"])
    a = argparse.Namespace(rounds=None, batch_size=None)
    resolve_defaults(a, gpu=True)
    assert (a.rounds, a.batch_size) == (GPU_DEFAULTS["rounds"], GPU_DEFAULTS["batch_size"])
    assert GPU_DEFAULTS["rounds"] > DEMO_DEFAULTS["rounds"] and GPU_DEFAULTS["batch_size"] > DEMO_DEFAULTS["batch_size"]
    a = argparse.Namespace(rounds=3, batch_size=None)
    resolve_defaults(a, gpu=True)
    assert a.rounds == 3


def test_accuracy_intervals():
    a = accuracy_interval([True] * 80 + [False] * 20)
    assert a.value == 0.8 and a.low == pytest.approx(0.7111, abs=1e-4) and a.high == pytest.approx(0.8666, abs=1e-4)
    perfect = accuracy_interval([True] * 50)
    assert perfect.high == pytest.approx(1.0) and perfect.low < 1.0  # Wilson's never collapses at 0 or 1


def test_gain_intervals_are_paired():
    base = [True] * 400 + [False] * 100
    assert gain_interval(base, base).as_dict() == {"value": 0.0, "low": 0.0, "high": 0.0}
    # 20 more right, nothing else different: a tight interval that excludes zero, unlike an unpaired one
    better = [True] * 420 + [False] * 80
    g = gain_interval(better, base)
    assert g.value == pytest.approx(0.04) and g.low > 0.02
    unpaired = 1.96 * (0.84 * 0.16 / 500 + 0.8 * 0.2 / 500) ** 0.5
    assert g.high - g.value < unpaired / 2
    with pytest.raises(ValueError):
        gain_interval(better, base[:-1])
