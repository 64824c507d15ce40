"""A holder daemon's CPU threads when several share one machine (client/threads.py)."""

from __future__ import annotations

import pytest

from fedprompt.client import threads


@pytest.mark.parametrize(
    ("argv", "daemon"),
    [
        (["/usr/bin/python3", "/venv/bin/fedprompt", "client", "--data", "x"], True),
        (["/venv/bin/python", "-m", "fedprompt", "client", "--state", "s"], True),
        (["/venv/bin/fedprompt", "server", "--certs", "c"], False),
        (["/venv/bin/fedprompt", "demo", "--out", "client"], False),  # "client" as a value, not the command
        (["python", "-m", "fedprompt.cli", "client"], True),  # as the demo starts them
        (["bash", "-c", "fedprompt client"], False),
    ],
)
def test_a_holder_daemon_is_recognised_by_its_command_line(argv, daemon):
    assert threads.is_holder_daemon(argv) is daemon


def test_the_daemons_on_this_machine_are_counted_from_proc(tmp_path):
    for pid, argv in {"101": ["/v/bin/fedprompt", "client"], "102": ["/v/bin/fedprompt", "client", "--x"],
                      "103": ["/v/bin/fedprompt", "server"], "self": ["x"]}.items():  # fmt: skip
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "cmdline").write_bytes("\0".join(argv).encode() + b"\0")
    (tmp_path / "104").mkdir()  # a process that ended: no cmdline
    assert threads.holder_daemons(tmp_path) == 2


def test_each_daemon_takes_its_share_and_a_fixed_count_that_oversubscribes_is_warned(monkeypatch):
    import torch

    said = []
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    monkeypatch.setattr(threads, "holder_daemons", lambda: 3)
    before = torch.get_num_threads()
    try:
        assert threads.ThreadChoice(say=said.append).apply() == 2
        assert said == ["3 holder daemon(s) on 8 usable cores: training with 2 thread(s)"]
        assert torch.get_num_threads() == 2
        said.clear()
        assert threads.ThreadChoice(8, say=said.append).apply() == 8
        assert len(said) == 1 and "oversubscribe" in said[0] and "--threads 2" in said[0]
        said.clear()
        monkeypatch.setattr(threads, "holder_daemons", lambda: 12)  # more holders than cores: one thread each
        assert threads.ThreadChoice(1, say=said.append).apply() == 1 and said == []
    finally:
        torch.set_num_threads(before)
