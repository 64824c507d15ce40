"""The privacy ledger: refusal before training, restarts, concurrent writers, composition, backups."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

import pytest

from fedprompt.cli import main
from fedprompt.dp.accounting import epsilon
from fedprompt.dp.ledger import LEDGER_FILE, Budget, PrivacyLedger, compose
from fedprompt.errors import BudgetExceededError, FedPromptError

DELTA = 1e-5


def _reserve(ledger: PrivacyLedger, steps: int = 100, sigma: float = 1.0, task: str = "t", **kw) -> int:
    return ledger.reserve(
        task=task,
        run_id="r",
        mechanism="dp-sgd",
        delta=DELTA,
        accountant=kw.pop("acc", "rdp"),
        epsilon=epsilon("rdp", [(sigma, 0.01, steps)], delta=DELTA),
        noise_multiplier=sigma,
        sample_rate=0.01,
        steps=steps,
        **kw,
    )


def test_composition_uses_the_accountant_not_the_sum(tmp_path):
    ledger = PrivacyLedger(tmp_path)
    ledger.set_budget(Budget(10.0, DELTA))
    for _ in range(3):
        _reserve(ledger)
    one = epsilon("rdp", [(1.0, 0.01, 100)], delta=DELTA)
    total = ledger.spent()
    assert total.epsilon == pytest.approx(epsilon("rdp", [(1.0, 0.01, 300)], delta=DELTA))
    assert total.epsilon < 3 * one
    assert "rdp accountant over 3" in total.method


def test_mixed_mechanisms_fall_back_to_basic_composition_and_say_so(tmp_path):
    ledger = PrivacyLedger(tmp_path)
    ledger.set_budget(Budget(20.0, DELTA))
    _reserve(ledger)
    _reserve(ledger, acc="prv")
    ledger.reserve(task="t", run_id="s", mechanism="exponential", delta=DELTA / 10, epsilon=0.5)
    s = ledger.spent()
    assert "basic composition" in s.method and "1 (epsilon, delta) release(s) added" in s.method
    expected = (
        0.5
        + epsilon("rdp", [(1.0, 0.01, 100)], delta=0.45 * DELTA)
        + epsilon("prv", [(1.0, 0.01, 100)], delta=0.45 * DELTA)
    )
    assert s.epsilon == pytest.approx(expected, rel=1e-6)


def test_refusal_names_what_is_left_and_records_nothing(tmp_path):
    ledger = PrivacyLedger(tmp_path)
    budget = epsilon("rdp", [(1.0, 0.01, 150)], delta=DELTA)
    ledger.set_budget(Budget(budget, DELTA))
    _reserve(ledger, steps=100)
    with pytest.raises(BudgetExceededError, match=r"refused before any training.*left"):
        _reserve(ledger, steps=100)
    assert len(ledger.releases()) == 1


def test_no_budget_no_release(tmp_path):
    with pytest.raises(FedPromptError, match="no privacy budget"):
        _reserve(PrivacyLedger(tmp_path))


def test_ledger_survives_a_restart_and_settles_reservations(tmp_path):
    ledger = PrivacyLedger(tmp_path)
    ledger.set_budget(Budget(10.0, DELTA))
    rid = _reserve(ledger, steps=100)
    before = ledger.spent().epsilon
    reopened = PrivacyLedger(tmp_path)  # a new process would see exactly this
    assert reopened.spent().epsilon == before and reopened.releases()[0].status == "reserved"
    with pytest.raises(FedPromptError, match="only 100 reserved"):
        reopened.commit(rid, steps=101, epsilon=9.0)
    reopened.commit(rid, steps=60, epsilon=epsilon("rdp", [(1.0, 0.01, 60)], delta=DELTA))
    assert PrivacyLedger(tmp_path).spent().epsilon < before
    with pytest.raises(FedPromptError, match="not an open reservation"):
        reopened.commit(rid, steps=60, epsilon=1.0)


def test_budget_cannot_be_lowered_below_the_spend(tmp_path):
    ledger = PrivacyLedger(tmp_path)
    ledger.set_budget(Budget(10.0, DELTA))
    _reserve(ledger, steps=500)
    with pytest.raises(BudgetExceededError, match="already spent"):
        ledger.set_budget(Budget(0.1, DELTA))
    assert ledger.budget() == Budget(10.0, DELTA)


def _writer(state_dir: str, steps: int, barrier, results) -> None:
    ledger = PrivacyLedger(state_dir)
    barrier.wait()
    try:
        _reserve(ledger, steps=steps)
        results.put("ok")
    except BudgetExceededError:
        results.put("refused")


def test_two_concurrent_writers_cannot_both_pass_the_budget(tmp_path):
    ledger = PrivacyLedger(tmp_path)
    # each job alone fits, both together do not
    ledger.set_budget(Budget(epsilon("rdp", [(1.0, 0.01, 150)], delta=DELTA), DELTA))
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), 100, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert outcomes == ["ok", "refused"]
    assert len(PrivacyLedger(tmp_path).releases()) == 1


def test_backup_and_restore(tmp_path):
    ledger = PrivacyLedger(tmp_path / "a")
    ledger.set_budget(Budget(10.0, DELTA))
    _reserve(ledger)
    backup = ledger.backup(tmp_path / "backup.sqlite3")
    restored = PrivacyLedger.restore(backup, tmp_path / "b")
    assert restored.releases() == ledger.releases() and restored.budget() == ledger.budget()
    with pytest.raises(FedPromptError, match="exists"):
        PrivacyLedger.restore(backup, tmp_path / "a")
    with sqlite3.connect(tmp_path / "a" / LEDGER_FILE) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_compose_of_nothing():
    assert compose([], DELTA).epsilon == 0.0


def test_cli_refuses_before_training_and_writes_nothing(tmp_path, sentiment_file, capsys):
    state, out = tmp_path / "state", tmp_path / "prompt"
    base = [
        "tune",
        "--model",
        "tiny-llama",
        "--dataset",
        str(sentiment_file),
        "--steps",
        "4",
        "--eval-every",
        "0",
        "--prompt-length",
        "4",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--dp",
        "--target-epsilon",
        "2",
        "--state",
        str(state),
    ]
    assert main([*base, "--out", str(out), "--budget-epsilon", "2.2"]) == 0
    meta = (out / "fedprompt.json").read_text()
    assert '"accountant": "rdp"' in meta and '"mechanism": "dp-sgd"' in meta
    capsys.readouterr()
    # a second job of epsilon 2 would compose (RDP) to about 2.31, past the budget of 2.2: refused up front
    assert main([*base, "--out", str(tmp_path / "second")]) == 2
    captured = capsys.readouterr()
    assert "refused before any training" in captured.err
    assert "DP tune" not in captured.err  # no training step ran
    assert not (tmp_path / "second").exists()
    assert len(PrivacyLedger(state).releases()) == 1
    assert main(["budget", "show", "--state", str(state)]) == 0
    shown = capsys.readouterr().out
    assert "budget: epsilon = 2.2" in shown and "left" in shown


def test_privacy_flags_without_dp_are_an_error_not_a_silent_non_private_run(tmp_path, sentiment_file, capsys):
    out = tmp_path / "prompt"
    code = main(
        ["tune", "--model", "tiny-llama", "--dataset", str(sentiment_file), "--out", str(out), "--target-epsilon", "8"]
    )
    assert code == 2
    assert "only make sense with --dp" in capsys.readouterr().err
    assert not out.exists()
