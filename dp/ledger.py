"""A data holder's privacy ledger: every release of a DP mechanism, composed with its accountant.

One SQLite file (WAL mode) in the holder's state folder, made only by ``PrivacyLedger.create`` with its budget
and never implicitly: an empty, truncated or foreign file is refused, not taken for a fresh ledger
(``dp/ledger_file.py``). A job first *reserves* its projected spend: inside one ``BEGIN IMMEDIATE`` transaction
the ledger composes everything already recorded with the new release and refuses if the total would pass the
budget, so two concurrent jobs can never both squeeze under it. Then, in two phases:

- ``reserved``: nothing has left the holder. A job that fails cancels it; a job killed in this state leaves it
  behind, and the next start (``cancel_stale``) cancels it once its owner process is gone, and says so.
- ``releasing``: the result may have left (``mark_releasing`` comes before anything is sent). Counted as spent
  whatever happens next; ``commit`` settles it with what was actually spent (never more than reserved).

A job that knows its actual spend before its result leaves (``amend``) stays ``reserved`` until it sends: a
holder stopped between its training and its reply is charged nothing for that round.

:meth:`PrivacyLedger.release` wraps one job in these steps. Cancelled reservations stay in the file for the
record (``budget show`` lists them) and are never counted.

Composition: releases of subsampled-Gaussian mechanisms are composed by their accountant over the whole history
(RDP or PRV: far tighter than adding epsilons). Releases that only state an (epsilon, delta) are added up (basic
composition), as are the groups of different accountants; the report says when that happened.
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import astuple, fields
from pathlib import Path

from fedprompt.cache import sqlite_backup
from fedprompt.dp import ledger_file as lf
from fedprompt.dp.accounting import check_accountant
from fedprompt.dp.spend import Budget, Release, Spend, compose
from fedprompt.errors import BudgetExceededError, ConfigError, FedPromptError

LEDGER_FILE = lf.LEDGER_FILE
LedgerError = lf.LedgerError


def default_state_dir() -> Path:
    env = os.environ.get("FEDPROMPT_STATE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state") / "fedprompt"


def _release(
    *,
    task: str,
    run_id: str,
    mechanism: str,
    delta: float,
    epsilon: float,
    round: int = 0,
    accountant: str | None = None,
    noise_multiplier: float | None = None,
    sample_rate: float | None = None,
    steps: int | None = None,
) -> Release:
    return Release(
        0, time.time(), task, run_id, round, mechanism, accountant, noise_multiplier, sample_rate, steps, delta,
        epsilon, "reserved", lf.this_process(),
    )  # fmt: skip


def _delta_exhausted(existing: list[Release], new: Release, budget: Budget) -> str:
    """Why a release that states its own (ε, δ) does not fit, and what to do: its δ and the others' are paid out of
    the budget's δ, and the accountant-composed releases need some δ left over."""
    pure = sum(r.delta for r in existing if r.accountant is None and r.status != "cancelled")
    return (
        f"refused before any work: this {new.mechanism} release states delta = {new.delta:.3g}, and the releases "
        f"that state their own delta would then take {pure + new.delta:.3g} of the ledger's budget delta "
        f"{budget.delta:.3g}, leaving none for the accountant-composed ones (epsilon would be infinite). Give this "
        f"job a smaller delta (e.g. --delta {budget.delta / 10:.1g}), or raise the budget's delta on purpose "
        f"(fedprompt budget set --budget-delta D)"
    )


class PrivacyLedger:
    """The durable record of one data holder's privacy spend. Opening refuses a missing or untrustworthy file:
    make a new ledger with :meth:`create`."""

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir).expanduser()
        self.path = self.state_dir / LEDGER_FILE
        version = lf.check(self.path)
        if version < lf.SCHEMA_VERSION:
            with self._write() as conn:
                lf.migrate(conn, version)

    @classmethod
    def create(cls, state_dir: str | Path, budget: Budget) -> PrivacyLedger:
        """A new ledger with ``budget``, where none is; refuses to write over any file."""
        path = Path(state_dir).expanduser() / LEDGER_FILE
        lf.create(path, {"budget_epsilon": repr(budget.epsilon), "budget_delta": repr(budget.delta)})
        return cls(state_dir)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=rw", uri=True, timeout=60, isolation_level=None)
        except sqlite3.OperationalError as exc:  # the file vanished since it was opened
            raise LedgerError(f"{self.path} cannot be opened ({exc}); {lf.restore_hint(self.path)}") from None
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=60000")
            yield conn
        except sqlite3.DatabaseError as exc:
            # a file damaged after it was opened; constraint or programming errors are bugs and keep their traceback
            damaged = type(exc) is sqlite3.DatabaseError or (
                isinstance(exc, sqlite3.OperationalError) and any(w in str(exc) for w in ("malformed", "disk I/O"))
            )
            if not damaged:
                raise
            raise LedgerError(f"{self.path} failed a read or write ({exc}); {lf.restore_hint(self.path)}") from None
        finally:
            conn.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # ------------------------------------------------------------------ budget

    @staticmethod
    def _budget(conn: sqlite3.Connection) -> Budget | None:
        rows = dict(conn.execute("SELECT key, value FROM settings WHERE key LIKE 'budget_%'").fetchall())
        if not rows:
            return None
        return Budget(float(rows["budget_epsilon"]), float(rows["budget_delta"]))

    def budget(self) -> Budget | None:
        with self._connect() as conn:
            return self._budget(conn)

    def set_budget(self, budget: Budget) -> None:
        """Set the holder's total budget (``fedprompt budget set``). Lowering it below what is already spent is
        refused."""
        with self._write() as conn:
            spent = compose(self._releases(conn), budget.delta)
            if spent.epsilon > budget.epsilon:
                raise BudgetExceededError(
                    f"already spent epsilon = {spent.epsilon:.3f} at delta = {budget.delta:g}, "
                    f"more than the new budget {budget.epsilon}"
                )
            conn.execute("INSERT OR REPLACE INTO settings VALUES ('budget_epsilon', ?)", (repr(budget.epsilon),))
            conn.execute("INSERT OR REPLACE INTO settings VALUES ('budget_delta', ?)", (repr(budget.delta),))

    # ------------------------------------------------------------------ releases

    @staticmethod
    def _releases(conn: sqlite3.Connection, task: str | None = None) -> list[Release]:
        cols = ", ".join(lf.COLUMNS)
        sql = f"SELECT {cols} FROM releases" + (" WHERE task = ?" if task is not None else "") + " ORDER BY id"
        return [Release(*row) for row in conn.execute(sql, (task,) if task is not None else ())]

    def releases(self, task: str | None = None, *, cancelled: bool = False) -> list[Release]:
        """Every release (of ``task``), in order; cancelled reservations only with ``cancelled=True``."""
        with self._connect() as conn:
            return [r for r in self._releases(conn, task) if cancelled or r.status != "cancelled"]

    def spent(self, task: str | None = None) -> Spend:
        budget = self.budget()
        if budget is None:
            raise FedPromptError(f"{self.path}: no budget set (fedprompt budget set --budget-epsilon E)")
        return compose(self.releases(task), budget.delta)

    def run_epsilon(self, run_id: str, delta: float, *, adding: dict | None = None) -> float:
        """The ε of one run's releases composed at ``delta`` (plus a projected release given as ``adding``,
        the keyword arguments of :meth:`reserve` without task and run)."""
        releases = [r for r in self.releases() if r.run_id == run_id]
        if adding is not None:
            releases.append(_release(task="", run_id=run_id, **adding))
        return compose(releases, delta).epsilon

    def reserve(
        self,
        *,
        task: str,
        run_id: str,
        mechanism: str,
        delta: float,
        epsilon: float,
        accountant: str | None = None,
        noise_multiplier: float | None = None,
        sample_rate: float | None = None,
        steps: int | None = None,
        round: int = 0,
    ) -> int:
        """Record a release before it happens; refuse it if the total would pass the budget."""
        if accountant is not None:
            check_accountant(accountant)
            if noise_multiplier is None or sample_rate is None or steps is None:
                raise ConfigError("an accounted release needs noise_multiplier, sample_rate and steps")
        new = _release(
            task=task,
            run_id=run_id,
            round=round,
            mechanism=mechanism,
            accountant=accountant,
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=steps,
            delta=delta,
            epsilon=epsilon,
        )
        with self._write() as conn:
            budget = self._budget(conn)
            if budget is None:
                raise FedPromptError(
                    f"{self.path}: no privacy budget set; set one with --budget-epsilon or fedprompt budget set"
                )
            existing = self._releases(conn)
            before = compose(existing, budget.delta)
            after = compose([*existing, new], budget.delta)
            if math.isinf(after.epsilon) and not math.isinf(before.epsilon):
                raise BudgetExceededError(_delta_exhausted(existing, new, budget))
            if after.epsilon > budget.epsilon:
                left = max(0.0, budget.epsilon - before.epsilon)
                raise BudgetExceededError(
                    f"refused before any training: this job would bring the total privacy spend to "
                    f"epsilon = {after.epsilon:.3f} (delta = {budget.delta:g}), above the budget of "
                    f"{budget.epsilon:g}; spent so far {before.epsilon:.3f}, left {left:.3f}"
                )
            columns = [f.name for f in fields(Release)][1:]  # every column but the id
            cur = conn.execute(
                f"INSERT INTO releases ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                astuple(new)[1:],
            )
            return int(cur.lastrowid)

    def mark_releasing(self, release_id: int) -> None:
        """Before anything of the job leaves the holder: from here on the release counts whatever happens."""
        with self._write() as conn:
            changed = conn.execute(
                "UPDATE releases SET status = 'releasing' WHERE id = ? AND status = 'reserved'", (release_id,)
            ).rowcount
            if changed != 1:
                raise FedPromptError(f"release {release_id} is not an open reservation")

    def commit(self, release_id: int, *, steps: int | None = None, epsilon: float | None = None) -> None:
        """Settle a reservation with what was actually spent (never more than reserved; None: as reserved)."""
        with self._write() as conn:
            row = conn.execute("SELECT steps, status FROM releases WHERE id = ?", (release_id,)).fetchone()
            if row is None or row[1] not in ("reserved", "releasing"):
                raise FedPromptError(f"release {release_id} is not an open reservation")
            if steps is not None and row[0] is not None and steps > row[0]:
                raise FedPromptError(f"release {release_id}: {steps} steps run, only {row[0]} reserved")
            conn.execute(
                "UPDATE releases SET status='committed', steps=COALESCE(?, steps), epsilon=COALESCE(?, epsilon) "
                "WHERE id=?",
                (steps, epsilon, release_id),
            )

    def amend(self, release_id: int, *, steps: int | None, epsilon: float) -> None:
        """Record a reserved job's actual spend (at most what was reserved) while nothing has left yet: the
        reservation stays open, to be cancelled if the job stops before sending, or committed once it sent."""
        with self._write() as conn:
            row = conn.execute("SELECT steps, epsilon, status FROM releases WHERE id = ?", (release_id,)).fetchone()
            if row is None or row[2] != "reserved":
                raise FedPromptError(f"release {release_id} is not an open reservation")
            if steps is not None and row[0] is not None and steps > row[0]:
                raise FedPromptError(f"release {release_id}: {steps} steps run, only {row[0]} reserved")
            if epsilon > row[1] * (1 + 1e-9):
                raise FedPromptError(f"release {release_id}: epsilon {epsilon:.4f} spent, only {row[1]:.4f} reserved")
            conn.execute(
                "UPDATE releases SET steps = COALESCE(?, steps), epsilon = ? WHERE id = ?", (steps, epsilon, release_id)
            )

    def cancel(self, release_id: int) -> None:
        """Cancel a reservation whose mechanism released nothing (the job failed before any output). A release
        marked as leaving is never cancelled: what may have left stays counted."""
        with self._write() as conn:
            conn.execute("UPDATE releases SET status = 'cancelled' WHERE id = ? AND status = 'reserved'", (release_id,))

    def cancel_stale(self) -> list[Release]:
        """Cancel the reservations of jobs that died before releasing anything (their process is gone); returns
        them. Releases that may have left (``releasing``) stay counted."""
        with self._write() as conn:
            stale = [r for r in self._releases(conn) if r.status == "reserved" and not lf.alive(r.owner)]
            for r in stale:
                conn.execute("UPDATE releases SET status = 'cancelled' WHERE id = ?", (r.id,))
        return stale

    @contextlib.contextmanager
    def release(self, **reservation) -> Iterator[Reservation]:
        """One job's release: reserve (refused past the budget), run the body, settle. If the body fails before
        it called ``leaving()``, nothing left and the reservation is cancelled (whether or not it recorded its
        spend with ``settle``); after, or when the body ends, it is committed at what the body settled, else at
        what was reserved. Takes :meth:`reserve`'s arguments."""
        handle = self.open(**reservation)
        try:
            yield handle
        except BaseException:
            handle.close(failed=True)
            raise
        handle.close(failed=False)

    def open(self, **reservation) -> Reservation:
        """Reserve (refused past the budget) and return the open :class:`Reservation`, for a job whose result
        leaves after the call that reserved it returns; its owner must ``close`` it."""
        return Reservation(self, self.reserve(**reservation))

    # ------------------------------------------------------------------ backup

    def backup(self, dest: str | Path) -> Path:
        """A consistent copy of the ledger (SQLite online backup), safe while others write."""
        with self._connect() as conn:
            return sqlite_backup(conn, dest)

    @classmethod
    def restore(cls, backup: str | Path, state_dir: str | Path) -> PrivacyLedger:
        """Restore a backup into ``state_dir``, refusing to overwrite an existing ledger and to restore a file
        that is not a sound ledger itself."""
        state_dir, backup = Path(state_dir), Path(backup)
        target = state_dir / LEDGER_FILE
        if target.exists():
            raise LedgerError(f"{target} exists; move it aside first (mv {target} {target}.broken)")
        lf.check(backup)
        for orphan in (Path(f"{target}-wal"), Path(f"{target}-shm")):  # the moved-aside ledger's, useless alone
            if orphan.exists():
                orphan.rename(orphan.with_name(orphan.name + ".broken"))
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.restore")
        with (
            contextlib.closing(sqlite3.connect(f"file:{backup}?mode=ro", uri=True)) as src,
            contextlib.closing(sqlite3.connect(tmp)) as dst,
        ):
            src.backup(dst)
        os.link(tmp, target)
        tmp.unlink()
        return cls(state_dir)


class Reservation:
    """An open release: ``settle`` records the spend, ``leaving`` comes before anything is sent, ``close`` ends it
    (cancelled if it failed before leaving, else committed)."""

    def __init__(self, ledger: PrivacyLedger, release_id: int) -> None:
        self.ledger, self.id = ledger, release_id
        self.state = "reserved"

    def leaving(self) -> None:
        """Call before any output of the job leaves the holder: from here on it counts whatever happens."""
        if self.state == "reserved":
            self.ledger.mark_releasing(self.id)
            self.state = "releasing"

    def settle(self, *, steps: int | None, epsilon: float) -> None:
        """The job's actual spend (at most what was reserved). Before ``leaving`` it is recorded and the
        reservation stays open (a stop before sending still cancels it); after, it is committed."""
        if self.state == "reserved":
            self.ledger.amend(self.id, steps=steps, epsilon=epsilon)
        else:
            self.ledger.commit(self.id, steps=steps, epsilon=epsilon)
            self.state = "committed"

    def sent(self) -> None:
        """The result is leaving (or left): mark it and commit it."""
        self.leaving()
        self.close(failed=False)

    def close(self, *, failed: bool) -> None:
        if self.state in ("committed", "cancelled"):
            return
        if self.state == "reserved" and failed:
            self.ledger.cancel(self.id)  # nothing left the holder
            self.state = "cancelled"
            return
        self.ledger.commit(self.id)  # something may have left, or the job ended: at what was settled or reserved
        self.state = "committed"
