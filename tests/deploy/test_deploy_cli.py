"""The command-line pieces the deployment stands on: probes, data splits, Secrets layout, flat node keys."""

from __future__ import annotations

import stat

import numpy as np
import pytest
from aggregator_harness import RunningAggregator

from fedprompt import certs
from fedprompt.cli import main as cli_main
from fedprompt.data.datasets import load
from fedprompt.flower_procs import free_port
from fedprompt.protocols.aggregator_client import AggregatorClient
from fedprompt.protocols.records import ModelRef

pytestmark = pytest.mark.deploy


def test_health_probe_command(tmp_path, capsys):
    d = tmp_path / "certs"
    certs.create(d, nodes=["holder-1"], hosts=["localhost"])
    probe = f"127.0.0.1:{free_port()}"
    with RunningAggregator(d, str(tmp_path / "r.sqlite"), health_listen=probe):
        assert cli_main(["health", "grpc", probe]) == 0
        assert "SERVING" in capsys.readouterr().out
        assert cli_main(["health", "grpc", probe, "--service", "fedprompt.v1.PromptRegistry"]) == 0
        assert cli_main(["health", "grpc", probe, "--service", "no.such.Service"]) == 1
    assert cli_main(["health", "grpc", f"127.0.0.1:{free_port()}", "--timeout", "1"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_datasets_split_writes_one_file_per_holder(sentiment_file, tmp_path, capsys):
    out = tmp_path / "split"
    assert cli_main(["datasets", "split", "--dataset", str(sentiment_file), "--holders", "3", "--out", str(out)]) == 0
    files = sorted(out.glob("holder-*.jsonl"))
    assert [f.name for f in files] == ["holder-1.jsonl", "holder-2.jsonl", "holder-3.jsonl"]
    total = sum(len(load(str(f)).split("train")) for f in files)
    assert total == len(load(str(sentiment_file)).split("train"))  # a partition: nothing lost or repeated
    assert cli_main(["datasets", "split", "--holders", "3", "--out", str(out)]) == 2  # no --dataset


def test_kustomize_layout_and_a_flat_certificate_folder(tmp_path):
    src, out = tmp_path / "certs", tmp_path / "secrets"
    assert (
        cli_main(["certs", "--out", str(src), "--node", "holder-1", "--node", "holder-2", "--kustomize", str(out)]) == 0
    )
    coord = out / "coordinator"
    assert sorted(p.name for p in coord.iterdir()) == sorted(
        [*certs.COORDINATOR_FILES, "node.holder-1.pub", "node.holder-2.pub", "kustomization.yaml"]
    )
    assert "ca.key" not in {p.name for p in out.rglob("*")}  # the CA's key never goes into a Secret
    for key in out.rglob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    node = out / "nodes" / "holder-1"
    assert sorted(p.name for p in node.iterdir()) == [
        "ca.crt",
        "client.crt",
        "client.key",
        "kustomization.yaml",
        "node.holder-1.pub",  # the holder's roster: every node's public key, for checking its neighbours
        "node.holder-2.pub",
        "node.key",
    ]
    assert (node / "node.key").read_bytes() == certs.node_files(src, "holder-1").private_key.read_bytes()
    assert list(certs.node_public_keys(node)) == ["holder-1", "holder-2"]  # a holder's daemon reads it flat
    # the flat folder (a mounted Secret) names the same nodes as the nested one
    assert list(certs.node_public_keys(coord)) == ["holder-1", "holder-2"] == list(certs.node_public_keys(src))
    # and an aggregation server run on it admits those holders
    with RunningAggregator(coord, str(tmp_path / "r.sqlite")) as agg:
        with AggregatorClient(agg.address, coord, "coordinator") as c:  # its certificate is in the flat folder
            v = c.publish_version(task="t", base_model=ModelRef("m", "a" * 64), embeddings=np.zeros((2, 3), np.float32))
        with AggregatorClient(agg.address, src, "holder-2") as holder:
            assert holder.get_version(v.version_id).version_id == v.version_id


def test_bundles_are_the_kustomize_folders_without_kustomizations(tmp_path):
    src, kust, bundles = tmp_path / "certs", tmp_path / "secrets", tmp_path / "bundles"
    args = ["certs", "--out", str(src), "--node", "holder-1", "--node", "holder-2"]
    assert cli_main([*args, "--kustomize", str(kust), "--bundles", str(bundles)]) == 0
    expected = {p.relative_to(kust) for p in kust.rglob("*") if p.is_file() and p.name != "kustomization.yaml"}
    assert {p.relative_to(bundles) for p in bundles.rglob("*") if p.is_file()} == expected
    for rel in expected:
        assert (bundles / rel).read_bytes() == (kust / rel).read_bytes()
        assert stat.S_IMODE((bundles / rel).stat().st_mode) == (0o600 if rel.suffix == ".key" else 0o644)
    assert not list(bundles.rglob("ca.key"))


def test_registry_backup_while_the_server_runs(tmp_path, capsys):
    from fedprompt.server.aggregation.registry import Registry, verify_version
    from fedprompt.server.aggregation.store import open_store

    d = tmp_path / "certs"
    certs.create(d, nodes=["holder-1"], hosts=["localhost"])
    store, dest = tmp_path / "registry.sqlite", tmp_path / "backups" / "registry-1.sqlite"
    with RunningAggregator(d, str(store)) as agg, agg.client() as c:
        v = c.publish_version(task="t", base_model=ModelRef("m", "a" * 64), embeddings=np.ones((2, 3), np.float32))
        assert cli_main(["registry", "backup", str(dest), "--store", str(store)]) == 0
    with open_store(str(dest)) as copy:
        (got,) = Registry(copy).list_versions()
    assert got.version_id == v.version_id and verify_version(got)
    assert cli_main(["registry", "backup", str(dest), "--store", "postgresql://u@h/db"]) == 2
    assert "pg_dump" in capsys.readouterr().err


def test_the_command_line_and_the_aggregation_server_load_no_torch():
    """The aggregator pod's memory limit (512 Mi) and the probes' start-up rely on it: torch alone is ~350 MB."""
    import subprocess
    import sys

    code = (
        "import sys; import fedprompt.cli as c; c.build_parser(); import fedprompt.server.aggregation.service; "
        "import fedprompt.protocols.health; "
        "print(sorted(m for m in ('torch', 'opacus', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
