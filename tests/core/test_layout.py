"""The direction of imports: core <- dp <- protocols <- client / server, read from the sources.

- ``fedprompt/`` (the prompt core: models, data, training, artifacts, errors) imports none of the four packages;
  its entry points (``fedprompt.cli`` and its modules, ``fedprompt.demo``) wire everything together and may import
  anything.
- ``dp/`` imports the core only; ``protocols/`` (what crosses the wire: the aggregation server's messages and
  client, Flower's array records, SecAgg+, the round settings) imports the core and ``dp/``; ``client/`` (the
  holders) and ``server/`` (the coordinator, the aggregation server) import anything below them, never each other.
- Flower only in ``client/``, ``server/`` and ``protocols/flower_records.py`` (the records both sides exchange);
  gRPC only in ``client/``, ``server/`` and ``protocols/`` (the service stubs, the aggregation server's client, the
  health check).
- No module imports another module's private name (``from fedprompt.x import _y``).

Every import counts, the lazy ones inside functions too.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"fedprompt": "core", "dp": "dp", "protocols": "protocols", "client": "client", "server": "server"}
RANK = {"core": 0, "dp": 1, "protocols": 2, "client": 3, "server": 3}
ENTRY_POINTS = ("fedprompt.cli", "fedprompt.demo")
FLOWER_ALLOWED = ("client", "server", "fedprompt.protocols.flower_records")
GRPC_ALLOWED = ("client", "server", "protocols")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    layer: str
    target: str  # what it imports, dotted (a module, or module.name for ``from m import name``)
    line: int


def module_name(folder: str, path: Path, root: Path) -> str:
    rel = path.relative_to(root / folder).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    base = "fedprompt" if folder == "fedprompt" else f"fedprompt.{folder}"
    return ".".join([base, *parts])


def imports(root: Path) -> list[Import]:
    found = []
    for folder, layer in FOLDERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue  # generated stubs: protoc writes their imports
            module = module_name(folder, path, root)
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    found += [Import(module, layer, a.name, node.lineno) for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found += [Import(module, layer, f"{node.module}.{a.name}", node.lineno) for a in node.names]
    return found


def layer_of(target: str) -> str | None:
    parts = target.split(".")
    if parts[0] != "fedprompt":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in RANK else "core"


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(found: list[Import]) -> list[str]:
    out = []
    for i in found:
        where = f"{i.module}:{i.line} imports {i.target}"
        top = i.target.split(".")[0]
        if top == "flwr" and not (i.layer in FLOWER_ALLOWED or under(i.module, FLOWER_ALLOWED)):
            out.append(f"{where}: Flower outside client/, server/ and protocols/flower_records.py")
        if top in ("grpc", "grpc_health") and i.layer not in GRPC_ALLOWED:
            out.append(f"{where}: gRPC outside client/, server/ and protocols/")
        last = i.target.rsplit(".", 1)[-1]
        if layer_of(i.target) and last.startswith("_") and not last.startswith("__"):
            out.append(f"{where}: a private name of another module")
        target_layer = layer_of(i.target)
        if target_layer is None or under(i.module, ENTRY_POINTS):
            continue
        upward = RANK[target_layer] > RANK[i.layer]
        sideways = {i.layer, target_layer} == {"client", "server"}
        if upward or sideways:
            out.append(f"{where}: {i.layer} may not import {target_layer}")
    return out


def test_imports_point_one_way():
    found = imports(ROOT)
    assert len(found) > 500, "the scan found almost no imports: is it reading the right folders?"
    problems = violations(found)
    assert not problems, "imports against the direction core <- dp <- protocols <- client / server:\n" + "\n".join(
        problems
    )


def test_a_wrong_import_of_each_kind_is_reported(tmp_path: Path):
    files = {
        "fedprompt/training.py": "from fedprompt.dp.engine import DPConfig\n",  # core -> dp
        "fedprompt/cli/__init__.py": "from fedprompt.server.coordinator.cli import main\n",  # an entry point
        "dp/ledger.py": "def f():\n    import fedprompt.protocols.records\n",  # dp -> protocols, lazily
        "protocols/rounds.py": "import flwr\n",  # Flower in protocols
        "protocols/flower_records.py": "from flwr.app import ArrayRecord\n",  # allowed
        "protocols/health.py": "import grpc\n",  # allowed
        "dp/audit.py": "import grpc\n",  # gRPC in dp
        "server/coordinator/config.py": "from fedprompt.client.dpopt.holder import dpopt_config\n",  # server -> client
        "client/app.py": "from fedprompt.cli import _check_out\n",  # client -> an entry point, a private name
        "server/coordinator/server_app.py": "from fedprompt.protocols.records import ModelRef\n",  # fine
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    problems = violations(imports(tmp_path))
    expected = [
        "fedprompt.training:1 imports fedprompt.dp.engine.DPConfig: core may not import dp",
        "fedprompt.dp.ledger:2 imports fedprompt.protocols.records: dp may not import protocols",
        "fedprompt.protocols.rounds:1 imports flwr: Flower outside",
        "fedprompt.dp.audit:1 imports grpc: gRPC outside",
        "fedprompt.server.coordinator.config:1 imports fedprompt.client.dpopt.holder.dpopt_config: server may not",
        "fedprompt.client.app:1 imports fedprompt.cli._check_out: a private name",
    ]
    for e in expected:
        assert any(p.startswith(e) for p in problems), (e, problems)
    assert len(problems) == len(expected), problems
