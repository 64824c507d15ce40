"""The Flower App's ``pyproject.toml``, written from :class:`FederationConfig`: ``flwr run`` refuses run-config
keys an app does not declare, so the app declares every setting, with its default, and this file is derived
rather than kept in step by hand. The holders hash the same file (their runner accepts only this app), so it is
a file in the package, not made at submit time; a test fails when it differs from what this module writes.

    python -m fedprompt.server.coordinator.flower_app          # rewrite fedprompt/flower_app/pyproject.toml
    python -m fedprompt.server.coordinator.flower_app --check  # exit 1 when it is out of date
"""

from __future__ import annotations

import sys
from dataclasses import MISSING, fields

from fedprompt.flower_procs import app_dir, toml_value
from fedprompt.server.coordinator.config import FederationConfig

HEADER = """\
# The Flower App of fedprompt: a thin folder, shipped inside the installed package, whose components
# live in fedprompt itself. `fedprompt server` submits it with `flwr run`. Written by
# `python -m fedprompt.server.coordinator.flower_app` from FederationConfig's fields: do not edit.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedprompt-federation"
version = "0.1.0"
description = "Federated differentially private prompt tuning (fedprompt)"
license = {file = "LICENSE"}
dependencies = ["flwr>=1.41.0"]

[tool.flwr.app]
publisher = "fedprompt"

[tool.flwr.app.components]
serverapp = "fedprompt.server.coordinator.server_app:app"
clientapp = "fedprompt.client.app:app"

[tool.flwr.app.config]
"""


def render() -> str:
    """The app's pyproject.toml: every FederationConfig field with its default ("" where it has none)."""
    defaults = {f.name: ("" if f.default is MISSING else f.default) for f in fields(FederationConfig)}
    return HEADER + "".join(f"{name} = {toml_value(value)}\n" for name, value in defaults.items())


def main(argv: list[str]) -> int:
    target = app_dir() / "pyproject.toml"
    if argv == ["--check"]:
        if target.read_text() != render():
            print(f"{target} is out of date: run python -m fedprompt.server.coordinator.flower_app", file=sys.stderr)
            return 1
        return 0
    target.write_text(render())
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
