"""What the holder's SuperNode is doing, said in the daemon's own output.

Flower's SuperNode writes its connection attempts to its log file only; a holder pointed at the wrong port saw
"SuperNode connecting to ..." and nothing more. The daemon follows the log and prints what a holder needs to
know: connected, retrying (and why), given up (and Flower's reason), each message of a run received.
"""

from __future__ import annotations

import re
from pathlib import Path

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RULES: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"SuperNode ID: (\d+)"), "connected to {superlink} (SuperNode id {0})"),
    (
        re.compile(r"Connection attempt failed, retrying in ([0-9.]+) seconds"),
        "cannot reach the coordinator at {superlink} yet (nothing answers there, or TLS fails); retrying in {0} s",
    ),
    (re.compile(r"Giving up reconnection after ([0-9.]+) seconds and (\d+) tries"), "gave up after {1} tries"),
    (re.compile(r"\[RUN (\d+), ROUND (\d+)\]"), "run {0}: round {1} request received"),
)
# Flower's explanation follows its "Exit Code" line; these lines are the reason worth repeating
_REASONS = re.compile(r"(Failed|could not|not registered|denied|UNAUTHENTICATED|PERMISSION|certificate)", re.I)


class SupernodeLog:
    """Follows a SuperNode log file from where it was when created; ``poll()`` returns new messages."""

    def __init__(self, path: Path, superlink: str) -> None:
        self.path, self.superlink = path, superlink
        self.offset = path.stat().st_size if path.exists() else 0
        self.last: str | None = None

    def poll(self) -> list[str]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except OSError:
            return []
        complete = chunk.rfind(b"\n") + 1  # a line still being written waits for the next poll
        self.offset += complete
        out = []
        for raw in chunk[:complete].decode(errors="replace").splitlines():
            message = self.message(_ANSI.sub("", raw).strip())
            if message and message != self.last:  # Flower repeats itself; the holder reads each thing once
                out.append(message)
                self.last = message
        return out

    def message(self, line: str) -> str | None:
        for pattern, text in _RULES:
            m = pattern.search(line)
            if m:
                return text.format(*m.groups(), superlink=self.superlink)
        if _REASONS.search(line) and not line.startswith("INFO"):
            return f"SuperNode: {line}"
        return None
