"""The privacy ledger: refusal before training, restarts, concurrent writers, composition, backups."""

from __future__ import annotations

import multiprocessing as mp
import os
import sqlite3
from pathlib import Path

import pytest

from fedprompt.cli import main
from fedprompt.dp.accounting import epsilon
from fedprompt.dp.ledger import LEDGER_FILE, PrivacyLedger
from fedprompt.dp.spend import Budget, compose
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
    ledger = PrivacyLedger.create(tmp_path, Budget(10.0, DELTA))
    for _ in range(3):
        _reserve(ledger)
    one = epsilon("rdp", [(1.0, 0.01, 100)], delta=DELTA)
    total = ledger.spent()
    assert total.epsilon == pytest.approx(epsilon("rdp", [(1.0, 0.01, 300)], delta=DELTA))
    assert total.epsilon < 3 * one
    assert "rdp accountant over 3" in total.method


def test_mixed_mechanisms_fall_back_to_basic_composition_and_say_so(tmp_path):
    ledger = PrivacyLedger.create(tmp_path, Budget(20.0, DELTA))
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
    budget = epsilon("rdp", [(1.0, 0.01, 150)], delta=DELTA)
    ledger = PrivacyLedger.create(tmp_path, Budget(budget, DELTA))
    _reserve(ledger, steps=100)
    with pytest.raises(BudgetExceededError, match=r"refused before any training.*left"):
        _reserve(ledger, steps=100)
    assert len(ledger.releases()) == 1


def test_no_ledger_no_release(tmp_path):
    # a ledger is never made implicitly: opening a folder without one is refused, naming how to make one
    with pytest.raises(FedPromptError, match=r"no privacy ledger here.*budget set"):
        _reserve(PrivacyLedger(tmp_path))
    assert not (tmp_path / LEDGER_FILE).exists()


def test_ledger_survives_a_restart_and_settles_reservations(tmp_path):
    ledger = PrivacyLedger.create(tmp_path, Budget(10.0, DELTA))
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
    ledger = PrivacyLedger.create(tmp_path, Budget(10.0, DELTA))
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
    # each job alone fits, both together do not
    PrivacyLedger.create(tmp_path, Budget(epsilon("rdp", [(1.0, 0.01, 150)], delta=DELTA), DELTA))
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
    ledger = PrivacyLedger.create(tmp_path / "a", Budget(10.0, DELTA))
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


def test_a_tune_stopped_before_its_artifact_is_written_is_charged_nothing(tmp_path, sentiment_file, monkeypatch):
    """Ctrl-C after the DP steps, while the prompt is being evaluated: nothing was released, nothing counts."""
    from fedprompt.training import Session

    state, out = tmp_path / "state", tmp_path / "prompt"
    args = ["tune", "--model", "tiny-llama", "--dataset", str(sentiment_file), "--steps", "3", "--eval-every", "0",
            "--prompt-length", "4", "--batch-size", "8", "--device", "cpu", "--precision", "fp32", "--dp",
            "--target-epsilon", "2", "--budget-epsilon", "5", "--state", str(state), "--out", str(out)]  # fmt: skip

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Session, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert not out.exists()
    (stopped,) = PrivacyLedger(state).releases(cancelled=True)
    assert stopped.status == "cancelled" and stopped.steps == 3  # its spend had been recorded, then cancelled
    assert PrivacyLedger(state).releases() == []
    monkeypatch.undo()
    assert main(args) == 0 and (out / "fedprompt.json").exists()
    assert [r.status for r in PrivacyLedger(state).releases()] == ["committed"]


def test_privacy_flags_without_dp_are_an_error_not_a_silent_non_private_run(tmp_path, sentiment_file, capsys):
    out = tmp_path / "prompt"
    code = main(
        ["tune", "--model", "tiny-llama", "--dataset", str(sentiment_file), "--out", str(out), "--target-epsilon", "8"]
    )
    assert code == 2
    assert "only make sense with --dp" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------ a ledger that cannot be reset


def _spent_ledger(state) -> PrivacyLedger:
    ledger = PrivacyLedger.create(state, Budget(8.0, DELTA))
    ledger.commit(_reserve(ledger, steps=200), steps=200, epsilon=epsilon("rdp", [(1.0, 0.01, 200)], delta=DELTA))
    return ledger


def _damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(bytes(range(256)) * 16)
    elif how == "schema-less":
        path.unlink()
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE notes (x TEXT)")


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage", "schema-less"])
def test_a_damaged_ledger_is_refused_naming_the_file_and_the_restore(tmp_path, capsys, how):
    state = tmp_path / "state"
    ledger = _spent_ledger(state)
    backup = ledger.backup(tmp_path / "backup.sqlite3")
    path = state / LEDGER_FILE
    with sqlite3.connect(path) as conn:  # fold the WAL in: the damage hits the one file that holds everything
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for extra in (f"{path}-wal", f"{path}-shm"):
        Path(extra).unlink(missing_ok=True)
    _damage(path, how)
    before = path.read_bytes()
    with pytest.raises(FedPromptError) as err:
        PrivacyLedger(state)
    assert str(path) in str(err.value) and "fedprompt budget restore" in str(err.value)
    # the CLI: one line naming the file, exit 2, and the file as it was
    assert main(["budget", "show", "--state", str(state)]) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and str(path) in message and "Traceback" not in message
    assert main(["budget", "set", "--budget-epsilon", "8", "--budget-delta", str(DELTA), "--state", str(state)]) == 2
    assert path.read_bytes() == before
    # the way back: move it aside, restore the backup; the spend is there again
    path.rename(tmp_path / "broken")
    assert main(["budget", "restore", str(backup), "--state", str(state)]) == 0
    restored = PrivacyLedger(state).spent().epsilon
    assert restored == pytest.approx(ledger.spent().epsilon) and restored > 1


def test_a_start_budget_can_lower_but_not_raise_the_ledgers(tmp_path, capsys):
    state = tmp_path / "state"
    _spent_ledger(state)
    shown = ["budget", "show", "--state", str(state)]
    assert main([*shown, "--budget-epsilon", "9"]) == 2  # what every daemon start passes: a raise is refused
    assert "would raise it" in capsys.readouterr().err and PrivacyLedger(state).budget().epsilon == 8.0
    assert main([*shown, "--budget-epsilon", "7.5"]) == 0  # lowering is always allowed
    assert PrivacyLedger(state).budget().epsilon == 7.5
    assert main(["budget", "set", "--budget-epsilon", "9", "--state", str(state)]) == 0  # raising, on purpose
    assert PrivacyLedger(state).budget().epsilon == 9.0


def _reserve_and_die(state_dir: str, mark_leaving: bool) -> None:
    ledger = PrivacyLedger(state_dir)
    rid = _reserve(ledger, steps=50)
    if mark_leaving:
        ledger.mark_releasing(rid)
    os._exit(0)  # killed: no commit, no cancel


def test_reservations_of_dead_jobs_are_cancelled_unless_something_may_have_left(tmp_path, capsys):
    state = tmp_path / "state"
    PrivacyLedger.create(state, Budget(8.0, DELTA))
    ctx = mp.get_context("spawn")
    for leaving in (False, True):
        p = ctx.Process(target=_reserve_and_die, args=(str(state), leaving))
        p.start()
        p.join(60)
    running = _reserve(PrivacyLedger(state), steps=10)  # this process's own job, still running
    assert [r.status for r in PrivacyLedger(state).releases()] == ["reserved", "releasing", "reserved"]
    assert main(["budget", "show", "--state", str(state)]) == 0
    out = capsys.readouterr()
    assert "its job stopped before releasing anything" in out.err  # said so
    statuses = {r.id: r.status for r in PrivacyLedger(state).releases(cancelled=True)}
    assert list(statuses.values()) == ["cancelled", "releasing", "reserved"] and statuses[running] == "reserved"
    assert "cancelled (the job stopped before releasing anything" in out.out
    # what may have left counts; the cancelled one does not
    spent = PrivacyLedger(state).spent().epsilon
    assert spent == pytest.approx(epsilon("rdp", [(1.0, 0.01, 60)], delta=DELTA))


def test_the_release_context_cancels_before_leaving_and_counts_after(tmp_path):
    ledger = PrivacyLedger.create(tmp_path, Budget(8.0, DELTA))
    args = {
        "task": "t", "run_id": "r", "mechanism": "dp-sgd", "delta": DELTA, "epsilon": 1.0, "accountant": "rdp",
        "noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10,
    }  # fmt: skip
    with pytest.raises(RuntimeError), ledger.release(**args):
        raise RuntimeError("crashed while training")
    with pytest.raises(RuntimeError), ledger.release(**args) as r:
        r.leaving()
        raise RuntimeError("crashed while sending")
    with ledger.release(**args) as r:
        r.settle(steps=5, epsilon=0.5)
    assert [(x.status, x.steps) for x in ledger.releases(cancelled=True)] == [
        ("cancelled", 10),
        ("committed", 10),
        ("committed", 5),
    ]


def test_a_release_whose_delta_does_not_fit_says_what_to_do(tmp_path):
    # DP-SGD at the budget's delta, then a DP-OPT release stating a delta larger than the budget's (1/(2 n_gen)
    # with n_gen < n): the old message was "epsilon = inf"
    ledger = PrivacyLedger.create(tmp_path, Budget(10.0, DELTA))
    _reserve(ledger, steps=50)
    with pytest.raises(BudgetExceededError, match=r"states delta = 2e-05.*--delta 1e-06.*budget set --budget-delta"):
        ledger.reserve(task="t", run_id="o", mechanism="dp-opt", delta=2 * DELTA, epsilon=3.0)
    assert len(ledger.releases()) == 1
    ledger.reserve(task="t", run_id="o", mechanism="dp-opt", delta=DELTA / 10, epsilon=3.0)  # the advice works
