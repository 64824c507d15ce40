"""The federation's plumbing without a SuperLink: the Flower App folder, certificates, the holder's service
and its handling of Flower messages (what the holder's runner hands it)."""

from __future__ import annotations

import json
import os
import stat
import tomllib
from dataclasses import MISSING, fields

import numpy as np
import pytest
from conftest import make_sentiment_rows, round_config
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedprompt import certs
from fedprompt.client import app as client_app
from fedprompt.client.policy import HolderPolicy
from fedprompt.client.service import HolderService
from fedprompt.dp.ledger import PrivacyLedger
from fedprompt.dp.spend import Budget
from fedprompt.errors import FedPromptError
from fedprompt.flower_procs import app_dir
from fedprompt.protocols.flower_records import from_record, to_record
from fedprompt.server.coordinator import flower_app
from fedprompt.server.coordinator.config import FederationConfig


def test_flower_app_is_a_thin_folder_whose_config_matches_the_federation_defaults(tmp_path, monkeypatch):
    folder = app_dir()
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("__")) == ["LICENSE", "pyproject.toml"]
    project = tomllib.loads((folder / "pyproject.toml").read_text())
    comps = project["tool"]["flwr"]["app"]["components"]
    assert comps == {
        "serverapp": "fedprompt.server.coordinator.server_app:app",
        "clientapp": "fedprompt.client.app:app",
    }
    config = project["tool"]["flwr"]["app"]["config"]
    # flwr run rejects run-config keys the app does not declare: every setting must be there, with its default
    expected = {f.name: ("" if f.default is MISSING else f.default) for f in fields(FederationConfig)}
    assert config == expected
    # the file is written from FederationConfig: a stale copy (a default changed by hand) is reported
    assert (folder / "pyproject.toml").read_text() == flower_app.render()
    assert flower_app.main(["--check"]) == 0
    stale = tmp_path / "pyproject.toml"
    stale.write_text(flower_app.render().replace("num_rounds = 5", "num_rounds = 6"))
    monkeypatch.setattr(flower_app, "app_dir", lambda: tmp_path)
    assert flower_app.main(["--check"]) == 1


def test_the_coordinator_flags_are_the_flagged_federation_settings():
    """Each flag of fedprompt server is declared on its setting: its type is the setting's, its value lands there."""
    from fedprompt.cli import build_parser
    from fedprompt.server.coordinator.cli import config_from_args

    flagged = [f.name for f in fields(FederationConfig) if f.metadata.get("flag")]
    assert {"num_rounds", "local_steps", "lr", "batch_size", "target_epsilon", "method"} <= set(flagged)
    args = build_parser().parse_args(
        ["server", "--certs", "c", "--state", "/tmp/s", "--num-rounds", "3", "--lr", "0.01", "--no-aggregator"]
    )
    cfg = config_from_args(args)
    assert (cfg.num_rounds, cfg.lr) == (3, 0.01) and isinstance(cfg.num_rounds, int)
    settings = cfg.local_settings(run_id="r", server_round=1)
    assert (settings.num_rounds, settings.lr, settings.batch_size) == (3, 0.01, cfg.batch_size)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["server", "--certs", "c", "--state", "s", "--num-rounds", "three"])


def test_certificates_chain_to_the_ca_and_keys_are_private(tmp_path):
    done = certs.create(tmp_path, nodes=["holder-a", "holder-b"], hosts=["coord.example.org"])
    assert "ca.key" in done["created"]
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["coord.example.org", "localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]  # the coordinator's own tools
    node = certs.node_files(tmp_path, "holder-a")
    private = load_ssh_private_key(node.private_key.read_bytes(), password=None)
    public = load_ssh_public_key(node.public_key.read_bytes())
    assert private.public_key().public_numbers() == public.public_numbers()
    x509.load_pem_x509_certificate(node.client_cert.read_bytes()).verify_directly_issued_by(ca)
    for secret in (tmp_path / "ca.key", tmp_path / "server.key", node.private_key, node.client_key):
        assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    # a second run keeps everything and adds only the new node
    before = node.private_key.read_bytes()
    again = certs.create(tmp_path, nodes=["holder-a", "holder-c"], hosts=["localhost"])
    assert again["created"] == ["nodes/holder-c"] and node.private_key.read_bytes() == before
    assert [n.name for n in certs.registered_nodes(tmp_path)] == ["holder-a", "holder-b", "holder-c"]
    with pytest.raises(FedPromptError, match="node name"):
        certs.create(tmp_path, nodes=["../evil"], hosts=["localhost"])


@pytest.fixture
def holder_files(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_sentiment_rows(80)))
    PrivacyLedger.create(tmp_path / "state", Budget(50.0, 1e-3))
    return data, tmp_path / "state"


def _config(tiny_llama, **kw) -> dict:
    return round_config(tiny_llama, **{"local_steps": 2, **kw})


def _service(data, state, **kw) -> HolderService:
    return HolderService(
        data=str(data), state_dir=state, name="h", num_examples=64, device="cpu", precision="fp32", **kw
    )


def test_service_trains_and_refuses_without_crashing(tiny_llama, holder_files):
    data, state = holder_files
    service = _service(data, state)
    prompt = np.random.default_rng(0).normal(0, 0.02, (4, tiny_llama.hidden_size)).astype(np.float32)
    header, delta = service.handle("train", _config(tiny_llama), prompt)
    assert header["ok"] and header["holder"] == "h" and delta.shape == prompt.shape
    # under DP only what the coordinator knows leaves: the run's target as the bound, the steps, a constant count
    assert header["metrics"] == {"num_examples": 1, "dp": 1, "epsilon": 8.0, "steps": 2}
    # a refusal is an answer, not a crash: the service goes on serving
    header, _ = service.handle("train", _config(tiny_llama), prompt[:, :3])
    assert not header["ok"] and header["code"] == "refused" and "shape" in header["reason"]
    header, _ = service.handle("evaluate", _config(tiny_llama), prompt)
    assert not header["ok"] and "rule max_evaluations_per_run" in header["reason"]
    assert service.handle("train", _config(tiny_llama), prompt)[0]["ok"]


def _train_and_stop(data: str, state: str, config: dict, prompt, stop_after_sending: bool) -> None:
    """A holder's process that trains a round and is killed just before its reply leaves (or just after)."""
    from fedprompt.client.trainer import RoundOutcome

    sent = RoundOutcome.sent

    def stop(outcome):
        if stop_after_sending:
            sent(outcome)
        os._exit(0)  # killed: no cancel, no commit

    RoundOutcome.sent = stop
    _service(data, state).handle("train", config, prompt)
    os._exit(1)  # not reached: the reply would have gone


def test_a_holder_stopped_before_its_update_left_is_charged_nothing_for_that_round(tiny_llama, holder_files, capsys):
    import multiprocessing as mp

    from fedprompt.cli import main

    data, state = holder_files
    prompt = np.random.default_rng(0).normal(0, 0.02, (4, tiny_llama.hidden_size)).astype(np.float32)
    config = _config(tiny_llama)
    ctx = mp.get_context("spawn")
    for after in (False, True):
        proc = ctx.Process(target=_train_and_stop, args=(str(data), str(state), config, prompt, after))
        proc.start()
        proc.join(300)
        assert proc.exitcode == 0
    # trained both times, its spend recorded; neither settled by the process
    assert [r.status for r in PrivacyLedger(state).releases()] == ["reserved", "committed"]
    assert main(["budget", "show", "--state", str(state)]) == 0  # what the daemon's next start runs first
    out = capsys.readouterr()
    assert "its job stopped before releasing anything" in out.err
    stopped, sent = PrivacyLedger(state).releases(cancelled=True)
    assert (stopped.status, sent.status) == ("cancelled", "committed")
    # only the round whose update may have left counts
    assert PrivacyLedger(state).spent().epsilon == pytest.approx(PrivacyLedger(state).run_epsilon(sent.run_id, 1e-3))
    assert [r.id for r in PrivacyLedger(state).releases()] == [sent.id]


def test_answer_turns_refusals_into_error_replies(tiny_llama, holder_files, as_serverapp):
    data, state = holder_files
    PrivacyLedger(state).set_budget(Budget(0.5, 1e-3))  # too small for one round
    service = _service(data, state, policy=HolderPolicy(max_evaluations_per_run=2))
    prompt = np.zeros((4, tiny_llama.hidden_size), np.float32)
    content = RecordDict({"prompt": to_record(weight=prompt), "config": ConfigRecord(_config(tiny_llama))})
    msg = Message(content, dst_node_id=7, message_type="train")
    reply = client_app.answer(service, msg)
    assert reply.has_error() and reply.error.code == client_app.BUDGET_EXCEEDED
    # the coordinator learns which rule, not the holder's budget or spend
    assert "rule budget" in reply.error.reason and "0.5" not in reply.error.reason
    assert PrivacyLedger(state).releases() == []
    # an evaluation is a DP release: noisy counts, charged first, at most as often as the policy allows
    evaluate = Message(content, dst_node_id=7, message_type="evaluate")
    for _ in range(2):
        metrics = client_app.answer(service, evaluate).content["metrics"]
        assert set(metrics) == {"correct", "examples", "dp", "noise"} and metrics["noise"] == 20.0
    assert [r.mechanism for r in PrivacyLedger(state).releases()] == ["gaussian-counts"] * 2
    third = client_app.answer(service, evaluate)
    assert third.has_error() and "rule max_evaluations_per_run" in third.error.reason
    assert len(PrivacyLedger(state).releases()) == 2
    wrong = RecordDict({"prompt": to_record(weight=prompt), "config": ConfigRecord({})})
    assert client_app.answer(service, Message(wrong, dst_node_id=7, message_type="train")).has_error()
    unknown = Message(content, dst_node_id=7, message_type="query.run_this")
    assert "unknown message type" in client_app.answer(service, unknown).error.reason
    # the ClientApp a stock SuperNode would load from the bundle refuses everything
    stock = client_app.app(msg, Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={}))
    assert stock.has_error() and "fedprompt client" in stock.error.reason


def test_prompt_records_refuse_other_dtypes():
    from flwr.app import Array, ArrayRecord

    rec = ArrayRecord({"weight": Array(np.zeros((2, 3), np.float64))})
    with pytest.raises(ValueError, match="float32"):
        from_record(rec, "weight")
    with pytest.raises(ValueError, match="missing"):
        from_record(to_record(weight=np.zeros((2, 3), np.float32)), "delta")


def test_service_refuses_models_that_are_not_allowed(tiny_llama, holder_files, tmp_path):
    data, state = holder_files
    config = _config(tiny_llama)
    config["task_model"] = str(tmp_path)  # a path on the holder's machine chosen by the coordinator
    prompt = np.zeros((4, tiny_llama.hidden_size), np.float32)
    header, _ = _service(data, state).handle("train", config, prompt)
    assert not header["ok"] and "allows" in header["reason"]
    narrow = _service(data, state, allowed_models={"smollm2-135m"})
    header, _ = narrow.handle("train", _config(tiny_llama), prompt)
    assert not header["ok"] and "tiny-llama" in header["reason"]


def _npy_claiming(shape: tuple[int, ...], payload: bytes = b"\0" * 16) -> bytes:
    header = repr({"descr": "<f4", "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + payload


def test_hostile_messages_are_refused_and_the_service_keeps_answering(tiny_llama, holder_files, as_serverapp):
    """What a malicious coordinator can put in a message (its ServerApp is its own code, whatever the bundle):
    each is refused with an error reply before anything is allocated or trained, and the next request is served."""
    from flwr.app import Array, ArrayRecord

    data, state = holder_files
    service = _service(data, state)
    good = np.zeros((4, tiny_llama.hidden_size), np.float32)

    def message(prompt_record, config=None, kind="train") -> Message:
        records = {"config": ConfigRecord(config if config is not None else _config(tiny_llama))}
        if prompt_record is not None:
            records["prompt"] = prompt_record
        return Message(RecordDict(records), dst_node_id=7, message_type=kind)

    def npy(blob: bytes) -> ArrayRecord:
        return ArrayRecord({"weight": Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=blob)})

    hostile = {
        "4e12 values claimed": message(npy(_npy_claiming((2_000_000, 2_000_000)))),
        "a shape the bytes do not hold": message(npy(_npy_claiming((4, tiny_llama.hidden_size)))),
        "float64": message(ArrayRecord({"weight": Array(good.astype(np.float64))})),
        "JSON nested 200,000 deep": message(
            to_record(weight=good), {**_config(tiny_llama), "task_label_names": "[" * 200_000 + "]" * 200_000}
        ),
        "JSON nested 30,000 deep": message(
            to_record(weight=good), {**_config(tiny_llama), "task_label_names": "[" * 30_000 + "]" * 30_000}
        ),
        "the old relay's secure-aggregation stage": message(None, {"run_id": "r", "server_round": 1}, "train.secagg"),
        "a secure round with no round on the aggregation server": message(
            to_record(weight=good), {**_config(tiny_llama), "secure_aggregation": True}
        ),
        "an unknown message type": message(to_record(weight=good), kind="query.shell"),
        "no config": Message(RecordDict({"prompt": to_record(weight=good)}), dst_node_id=7, message_type="train"),
    }
    for what, msg in hostile.items():
        reply = client_app.answer(service, msg)
        assert reply.has_error(), what
        assert client_app.answer(service, message(to_record(weight=good))).content["metrics"]["dp"] == 1, what
