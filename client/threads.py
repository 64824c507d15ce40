"""How many CPU threads a holder's daemon trains with when several holders share one machine.

torch's default takes every core; three holders on two cores with the default ran each DP step about 15 times
slower than one holder alone (they fight over the cores). A daemon that is not told its threads (``--threads``)
counts the fedprompt holder daemons it can see on this machine (``/proc``, its own included) and takes an equal
share of the cores it may use (its CPU affinity and its cgroup's quota), again before each request, so holders
started later are counted too.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CLIENT_COMMAND = "client"


def usable_cores() -> int:
    """The cores this process may run on: its affinity, capped by a cgroup v2 CPU quota (containers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def is_holder_daemon(argv: list[str]) -> bool:
    """``fedprompt client ...`` in a process's command line: the console script, or ``python -m fedprompt``
    (or ``fedprompt.cli``, as the demo starts its daemons)."""
    for i, arg in enumerate(argv):
        if os.path.basename(arg) == "fedprompt":
            rest = argv[i + 1 :]
        elif arg == "-m" and i + 1 < len(argv) and argv[i + 1] in ("fedprompt", "fedprompt.cli"):
            rest = argv[i + 2 :]
        else:
            continue
        return bool(rest) and rest[0] == CLIENT_COMMAND
    return False


def holder_daemons(proc: Path = Path("/proc")) -> int:
    """How many holder daemons run on this machine (at least this one)."""
    count = 0
    for entry in proc.glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue  # gone, or not ours to read
        if is_holder_daemon([a for a in argv if a]):
            count += 1
    return max(1, count)


def share(cores: int, holders: int) -> int:
    return max(1, cores // max(1, holders))


class ThreadChoice:
    """Sets torch's threads before each request: ``fixed`` when given, else a share of the usable cores."""

    def __init__(self, fixed: int = 0, *, say=print) -> None:
        self.fixed, self.say = fixed, say
        self.current: int | None = None

    def apply(self) -> int:
        import torch

        cores = usable_cores()
        holders = holder_daemons()
        wanted = self.fixed or share(cores, holders)
        if wanted != self.current:
            if self.fixed and self.fixed > share(cores, holders):
                self.say(
                    f"WARNING: --threads {self.fixed} with {holders} holder daemons on {cores} usable cores: they "
                    f"oversubscribe the CPU, which slows every one of them down many times; use --threads "
                    f"{share(cores, holders)} (or leave --threads out)"
                )
            elif not self.fixed:
                self.say(f"{holders} holder daemon(s) on {cores} usable cores: training with {wanted} thread(s)")
            torch.set_num_threads(wanted)
            self.current = wanted
        return wanted
