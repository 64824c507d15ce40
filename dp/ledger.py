"""A data holder's privacy ledger: every release of a DP mechanism, composed with its accountant.

One SQLite file (WAL mode) in the holder's state folder. A job first *reserves* its projected spend:
inside one ``BEGIN IMMEDIATE`` transaction the ledger composes everything already recorded with the
new release and refuses if the total would pass the budget, so two concurrent jobs can never both
squeeze under it. A reservation counts as spent until it is committed (with the actual steps) or
cancelled (only when nothing was released). Crashes therefore err on the side of over-counting.

Composition: releases of subsampled-Gaussian mechanisms are composed by their accountant over the
whole history (RDP or PRV: far tighter than adding epsilons). Releases that only state an (epsilon,
delta) are added up (basic composition), as are the groups of different accountants; the report
says when that happened.
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from fedprompt.cache import sqlite_backup
from fedprompt.dp.accounting import check_accountant, epsilon
from fedprompt.errors import BudgetExceededError, FedPromptError

LEDGER_FILE = "privacy-ledger.sqlite3"
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS releases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    task TEXT NOT NULL,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL DEFAULT 0,
    mechanism TEXT NOT NULL,
    accountant TEXT,                -- NULL: only (epsilon, delta) is known, composed by adding
    noise_multiplier REAL,
    sample_rate REAL,
    steps INTEGER,
    delta REAL NOT NULL,            -- the delta this release reported its own epsilon at
    epsilon REAL NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('reserved', 'committed'))
);
"""


def default_state_dir() -> Path:
    env = os.environ.get("FEDPROMPT_STATE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state") / "fedprompt"


@dataclass(frozen=True)
class Release:
    id: int
    created_at: float
    task: str
    run_id: str
    round: int
    mechanism: str
    accountant: str | None
    noise_multiplier: float | None
    sample_rate: float | None
    steps: int | None
    delta: float
    epsilon: float
    status: str


@dataclass(frozen=True)
class Spend:
    epsilon: float
    delta: float
    releases: int
    method: str  # how the releases were composed


@dataclass(frozen=True)
class Budget:
    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"budget epsilon must be positive and finite, got {self.epsilon!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"budget delta must be in (0, 1), got {self.delta!r}")


def compose(releases: list[Release], delta: float) -> Spend:
    """The (epsilon, delta) of all ``releases`` together, at total ``delta``."""
    if not releases:
        return Spend(0.0, 0.0, 0, "nothing released")
    pure = [r for r in releases if r.accountant is None]
    groups: dict[str, list[tuple[float, float, int]]] = {}
    for r in releases:
        if r.accountant is not None:
            groups.setdefault(r.accountant, []).append((r.noise_multiplier, r.sample_rate, r.steps))
    eps = sum(r.epsilon for r in pure)
    left = delta - sum(r.delta for r in pure)
    if groups and left <= 0:
        return Spend(math.inf, delta, len(releases), "the (epsilon, delta) releases use up all of delta")
    for name, hist in groups.items():
        eps += epsilon(name, hist, delta=left / len(groups))
    used_delta = delta if groups else delta - left
    parts = [f"{name} accountant over {len(h)} release(s)" for name, h in groups.items()]
    if pure:
        parts.append(f"{len(pure)} (epsilon, delta) release(s) added")
    method = "; ".join(parts)
    if len(groups) + bool(pure) > 1:
        method += "; groups added by basic composition"
    return Spend(eps, used_delta, len(releases), method)


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
        epsilon, "reserved",
    )  # fmt: skip


class PrivacyLedger:
    """The durable record of one data holder's privacy spend."""

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir).expanduser()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.state_dir / LEDGER_FILE
        with self._connect() as conn:
            conn.executescript(_SCHEMA)
            conn.execute("INSERT OR IGNORE INTO settings VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            version = int(conn.execute("SELECT value FROM settings WHERE key='schema_version'").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise FedPromptError(f"{self.path} was written by a newer fedprompt (schema {version})")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=60000")
            yield conn
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
        """Set the holder's total budget. Lowering it below what is already spent is refused."""
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
        sql = "SELECT * FROM releases" + (" WHERE task = ?" if task is not None else "") + " ORDER BY id"
        return [Release(*row) for row in conn.execute(sql, (task,) if task is not None else ())]

    def releases(self, task: str | None = None) -> list[Release]:
        with self._connect() as conn:
            return self._releases(conn, task)

    def spent(self, task: str | None = None) -> Spend:
        budget = self.budget()
        if budget is None:
            raise FedPromptError(f"{self.path}: no budget set (fedprompt budget set --epsilon E --delta D)")
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
                raise ValueError("an accounted release needs noise_multiplier, sample_rate and steps")
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

    def commit(self, release_id: int, *, steps: int | None, epsilon: float) -> None:
        """Settle a reservation with what was actually spent (never more than reserved)."""
        with self._write() as conn:
            row = conn.execute("SELECT steps, status FROM releases WHERE id = ?", (release_id,)).fetchone()
            if row is None or row[1] != "reserved":
                raise FedPromptError(f"release {release_id} is not an open reservation")
            if steps is not None and row[0] is not None and steps > row[0]:
                raise FedPromptError(f"release {release_id}: {steps} steps run, only {row[0]} reserved")
            conn.execute(
                "UPDATE releases SET status='committed', steps=COALESCE(?, steps), epsilon=? WHERE id=?",
                (steps, epsilon, release_id),
            )

    def cancel(self, release_id: int) -> None:
        """Drop a reservation whose mechanism released nothing (the job failed before any output)."""
        with self._write() as conn:
            conn.execute("DELETE FROM releases WHERE id = ? AND status = 'reserved'", (release_id,))

    # ------------------------------------------------------------------ backup

    def backup(self, dest: str | Path) -> Path:
        """A consistent copy of the ledger (SQLite online backup), safe while others write."""
        with self._connect() as conn:
            return sqlite_backup(conn, dest)

    @classmethod
    def restore(cls, backup: str | Path, state_dir: str | Path) -> PrivacyLedger:
        """Restore a backup into ``state_dir``, refusing to overwrite an existing ledger."""
        state_dir = Path(state_dir)
        if (state_dir / LEDGER_FILE).exists():
            raise FedPromptError(f"{state_dir / LEDGER_FILE} exists; restore into an empty state folder")
        state_dir.mkdir(parents=True, exist_ok=True)
        with (
            contextlib.closing(sqlite3.connect(backup)) as src,
            contextlib.closing(sqlite3.connect(state_dir / LEDGER_FILE)) as dst,
        ):
            src.backup(dst)
        return cls(state_dir)
