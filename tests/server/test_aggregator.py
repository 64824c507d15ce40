"""The aggregation server over real gRPC with mutual TLS: identities, bad input, rounds, secure rounds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from aggregator_harness import RunningAggregator
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedprompt import certs
from fedprompt.cli import main as cli_main
from fedprompt.protocols import aggregator_pb2 as pb
from fedprompt.protocols import aggregator_pb2_grpc as pb_grpc
from fedprompt.protocols import convert
from fedprompt.protocols.aggregator_client import AggregatorClient, AggregatorError
from fedprompt.protocols.records import ModelRef
from fedprompt.protocols.secagg.client import ClientIdentity, SecAggClient
from fedprompt.server.aggregation.store import open_store

MODEL = ModelRef("tiny-llama", "a" * 64)
OTHER = ModelRef("tiny-llama", "b" * 64)
SHAPE = (4, 8)
HOLDERS = ["alice", "bob", "carol", "dave"]


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    certs.create(d, nodes=HOLDERS, hosts=["localhost"])
    return d


@pytest.fixture
def agg(cert_dir, tmp_path):
    # a holder that goes silent mid-round is a dropout after 2 s (the deployed default waits a minute)
    with RunningAggregator(cert_dir, str(tmp_path / "registry.sqlite"), secagg_stage_timeout_s=2.0) as running:
        yield running


def _code(exc_info) -> grpc.StatusCode:
    return exc_info.value.code


def _origin(c: AggregatorClient, seed: int = 0):
    rng = np.random.default_rng(seed)
    return c.publish_version(task="sst", base_model=MODEL, embeddings=rng.normal(size=SHAPE).astype(np.float32))


def test_health_on_the_tls_port_and_the_probe_port(cert_dir, tmp_path):
    from fedprompt.flower_procs import free_port

    probe = f"127.0.0.1:{free_port()}"
    with RunningAggregator(cert_dir, str(tmp_path / "r.sqlite"), health_listen=probe) as running:
        with running.client() as c:
            stub = health_pb2_grpc.HealthStub(c.channel)
            for service in ("", "fedprompt.v1.RoundAggregation", "fedprompt.v1.PromptRegistry"):
                assert stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == 1
        with grpc.insecure_channel(probe) as ch:  # what a kubelet gRPC probe does: no TLS
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as e:  # and nothing else is served there
                pb_grpc.PromptRegistryStub(ch).ListVersions(pb.ListVersionsRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_clients_without_a_certificate_of_the_ca_are_refused_at_the_handshake(agg, cert_dir, tmp_path):
    ca = (cert_dir / "ca.crt").read_bytes()
    with grpc.secure_channel(agg.address, grpc.ssl_channel_credentials(root_certificates=ca)) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.PromptRegistryStub(ch).ListVersions(pb.ListVersionsRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake failed: no RPC happened
    other = tmp_path / "other-ca"
    certs.create(other, nodes=["alice"], hosts=["localhost"])  # same name, another CA
    files = certs.node_files(other, "alice")
    creds = grpc.ssl_channel_credentials(ca, files.client_key.read_bytes(), files.client_cert.read_bytes())
    with grpc.secure_channel(agg.address, creds) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.PromptRegistryStub(ch).ListVersions(pb.ListVersionsRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_removed_node_is_refused_and_holders_cannot_run_rounds(agg, cert_dir, tmp_path):
    with agg.client("alice") as alice:
        assert alice.list_versions() == []
        with pytest.raises(AggregatorError) as e:
            alice.open_round(task="sst", base_model=MODEL, shape=SHAPE, expected_clients=2)
        assert _code(e) == grpc.StatusCode.PERMISSION_DENIED
    # a node whose folder is gone (revoked) still has a certificate the CA signed, and is refused
    keep = tmp_path / "dave"
    shutil.copytree(cert_dir / "nodes" / "dave", keep)
    with agg.client("dave") as dave:
        dave.list_versions()
        shutil.rmtree(cert_dir / "nodes" / "dave")  # no cache to clear: the very next call sees it
        try:
            with pytest.raises(AggregatorError) as e:
                dave.list_versions()
            assert _code(e) == grpc.StatusCode.UNAUTHENTICATED
        finally:
            shutil.copytree(keep, cert_dir / "nodes" / "dave")


def test_rate_limit_per_identity(cert_dir, tmp_path):
    with RunningAggregator(cert_dir, str(tmp_path / "r.sqlite"), rate_per_second=0.01, burst=3) as running:
        with running.client("alice") as alice, running.client("bob") as bob:
            for _ in range(3):
                alice.list_versions()
            with pytest.raises(AggregatorError) as e:
                alice.list_versions()
            assert _code(e) == grpc.StatusCode.RESOURCE_EXHAUSTED
            bob.list_versions()  # another identity has its own bucket


def test_registry_publish_get_prefix_export_and_cli(agg, cert_dir, tmp_path, capsys):
    from fedprompt import artifact

    meta = {
        "task": "sst",
        "template": "Review: {text}\nSentiment:",
        "label_names": ["negative", "positive"],
        "label_words": [[" negative"], [" positive"]],
        "base_model_id": MODEL.model_id,
        "base_model_sha256": MODEL.weights_sha256,
        "origin_id": "0" * 16,
        "init": {"method": "text"},
        "privacy": {"epsilon": 8.0, "delta": 1e-5, "accountant": "rdp"},
    }
    values = np.arange(32, dtype=np.float32).reshape(SHAPE) / 10
    with agg.client() as c:
        v = c.publish_version(task="sst", base_model=MODEL, embeddings=values, metadata=meta)
        again = c.publish_version(task="sst", base_model=MODEL, embeddings=values, metadata=meta)
        assert again.version_id == v.version_id and len(c.list_versions()) == 1  # content-addressed
        got = c.get_version(v.version_id[:10])
        np.testing.assert_array_equal(got.embeddings, values)
        text = c.publish_version(task="sst", base_model=MODEL, text="Classify the review.", parent_id=v.version_id)
        assert c.get_version(text.version_id).text == "Classify the review."
    common = ["prompts", "--aggregator", agg.address, "--certs", str(cert_dir)]
    assert cli_main([*common, "list"]) == 0
    listed = capsys.readouterr().out
    assert "2 version(s)" in listed and listed.count("by coordinator") == 2  # who published each
    assert cli_main([*common, "--as", "bob", "show", v.version_id[:12]]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["metadata"]["privacy"]["epsilon"] == 8.0
    # the privacy spend is shown as its author's claim: the registry checked the content hash only
    assert shown["metadata_claimed_by"] == "coordinator" and shown["checked_by_registry"] == "content hash only"
    out = tmp_path / "exported"
    assert cli_main([*common, "export", v.version_id, "--out", str(out)]) == 0
    weight, loaded = artifact.load(out)
    np.testing.assert_array_equal(weight.numpy(), values)
    assert loaded.privacy["epsilon"] == 8.0 and loaded.lineage["registry_version"] == v.version_id
    assert cli_main([*common, "show", "ffffffffffff"]) == 2  # a clear error, no traceback
    assert "NOT_FOUND" in capsys.readouterr().err


def test_task_vectors_compose_over_grpc(agg):
    with agg.client() as c:
        origin = _origin(c)
        tuned_a = c.publish_version(task="a", base_model=MODEL, embeddings=origin.embeddings + 1.0, parent_id=None)
        tuned_b = c.publish_version(task="b", base_model=MODEL, embeddings=origin.embeddings - 0.5)
        ta = c.publish_task_vector(task="a", tuned_id=tuned_a.version_id, origin_id=origin.version_id)
        tb = c.publish_task_vector(task="b", tuned_id=tuned_b.version_id, origin_id=origin.version_id)
        composed = c.compose(origin_id=origin.version_id, terms=[(ta.vector_id, 0.5), (tb.vector_id, 2.0)], task="a+b")
        np.testing.assert_allclose(composed.embeddings, origin.embeddings + 0.5 * 1.0 + 2.0 * -0.5, atol=1e-6)
        stranger = c.publish_version(task="x", base_model=OTHER, embeddings=origin.embeddings)
        with pytest.raises(AggregatorError) as e:
            c.publish_task_vector(task="x", tuned_id=stranger.version_id, origin_id=origin.version_id)
        assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION
        other_origin = _origin(c, seed=1)
        with pytest.raises(AggregatorError) as e:
            c.compose(origin_id=other_origin.version_id, terms=[(ta.vector_id, 1.0)], task="bad")
        assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION


def test_plain_round_every_bad_input_is_refused_and_changes_nothing(agg, tmp_path):
    with agg.client() as coord:
        base = _origin(coord)
        r = coord.open_round(
            task="sst", base_model=MODEL, shape=SHAPE, expected_clients=3, base_version_id=base.version_id,
            participants=HOLDERS,
        )  # fmt: skip
        ok = np.full(SHAPE, 0.25, np.float32)
        with agg.client("alice") as alice:
            alice.submit_update(round_id=r.round_id, base_model=MODEL, delta=ok)
            before = agg.server.store.dump()
            nan, inf = ok.copy(), ok.copy()
            nan[0, 0], inf[1, 1] = np.nan, np.inf
            bad = {
                "nan": (dict(delta=nan), grpc.StatusCode.INVALID_ARGUMENT),
                "inf": (dict(delta=inf), grpc.StatusCode.INVALID_ARGUMENT),
                "shape": (dict(delta=np.zeros((4, 9), np.float32)), grpc.StatusCode.INVALID_ARGUMENT),
                "model": (dict(base_model=OTHER), grpc.StatusCode.FAILED_PRECONDITION),
                "twice": ({}, grpc.StatusCode.ALREADY_EXISTS),
                "unknown round": (dict(round_id="0" * 32), grpc.StatusCode.NOT_FOUND),
            }
            for name, (change, code) in bad.items():
                kw = dict(round_id=r.round_id, base_model=MODEL, delta=ok) | change
                with pytest.raises(AggregatorError) as e:
                    alice.submit_update(**kw)
                assert _code(e) == code, name
            # a weight on the wire, even a bad one, is not looked at: refused as a second update, not for it
            req = pb.SubmitUpdateRequest(
                round_id=r.round_id, base_model=convert.model_ref_to_proto(MODEL), delta=convert.tensor_to_proto(ok),
                weight=-1.0,
            )  # fmt: skip
            with pytest.raises(grpc.RpcError) as e:
                alice.rounds.SubmitUpdate(req, timeout=5)
            assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
            # float64 on the wire: refused before it becomes an array
            req = pb.SubmitUpdateRequest(
                round_id=r.round_id,
                base_model=convert.model_ref_to_proto(MODEL),
                delta=pb.Tensor(shape=list(SHAPE), dtype=pb.FLOAT64, data=ok.astype(np.float64).tobytes()),
                weight=1.0,
            )
            with pytest.raises(grpc.RpcError) as e:
                alice.rounds.SubmitUpdate(req, timeout=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "float64" in e.value.details()
            assert agg.server.store.dump() == before
        for name, delta, w in (("bob", 0.5, 1.0), ("carol", -0.25, 2.0)):  # w: the weight each one claims
            with agg.client(name) as h:
                req = pb.SubmitUpdateRequest(
                    round_id=r.round_id, base_model=convert.model_ref_to_proto(MODEL),
                    delta=convert.tensor_to_proto(np.full(SHAPE, delta, np.float32)), weight=w,
                )  # fmt: skip
                assert h.rounds.SubmitUpdate(req, timeout=5).received in (2, 3)
        done = coord.finalise_round(r.round_id, {"note": "test"})
        expected = (0.25 + 0.5 + -0.25) / 3  # every update weighs the same
        np.testing.assert_allclose(done.mean_update, expected, atol=1e-7)
        claimed = (0.25 * 1 + 0.5 * 1 + -0.25 * 2) / 4
        assert not np.allclose(done.mean_update, claimed, atol=1e-3)  # carol's claimed weight 2 had no effect
        assert done.version is not None and done.version.parent_id == base.version_id
        np.testing.assert_allclose(done.version.embeddings, base.embeddings + expected, atol=1e-6)
        before = agg.server.store.dump()
        with agg.client("dave") as dave, pytest.raises(AggregatorError) as e:
            dave.submit_update(round_id=r.round_id, base_model=MODEL, delta=ok)
        assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION  # closed round
        with pytest.raises(AggregatorError) as e:
            coord.finalise_round(r.round_id)
        assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION
        assert agg.server.store.dump() == before


def test_oversized_messages_are_refused_by_the_server(cert_dir, tmp_path):
    with RunningAggregator(cert_dir, str(tmp_path / "r.sqlite"), max_message_bytes=64 * 1024) as running:
        with running.client() as c:
            r = c.open_round(task="sst", base_model=MODEL, shape=(64, 512), expected_clients=2, participants=HOLDERS)
            before = running.server.store.dump()
            with running.client("alice") as alice, pytest.raises(AggregatorError) as e:
                alice.submit_update(round_id=r.round_id, base_model=MODEL, delta=np.zeros((64, 512), np.float32))
            assert _code(e) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert running.server.store.dump() == before


def _submit_claiming(client: AggregatorClient, round_id: str, delta: np.ndarray, weight: float) -> int:
    """SubmitUpdate with a weight of the caller's choosing on the wire (AggregatorClient sends none of its own)."""
    req = pb.SubmitUpdateRequest(
        round_id=round_id, base_model=convert.model_ref_to_proto(MODEL), delta=convert.tensor_to_proto(delta),
        weight=weight,
    )  # fmt: skip
    return client.rounds.SubmitUpdate(req, timeout=5).received


def test_a_huge_weight_from_a_holder_does_not_change_the_mean(agg):
    """A holder that claims 1e30 examples (the weight once dictated the mean) counts as one update, like the others."""
    with agg.client() as coord:
        base = _origin(coord)
        r = coord.open_round(
            task="sst", base_model=MODEL, shape=SHAPE, expected_clients=3, base_version_id=base.version_id,
            participants=["alice", "bob", "carol"],
        )  # fmt: skip
        with agg.client("alice") as alice, agg.client("bob") as bob, agg.client("carol") as carol:
            assert _submit_claiming(alice, r.round_id, np.full(SHAPE, 3.0, np.float32), 1e30) == 1
            assert _submit_claiming(bob, r.round_id, np.zeros(SHAPE, np.float32), 1.0) == 2
            assert carol.submit_update(round_id=r.round_id, base_model=MODEL, delta=np.zeros(SHAPE, np.float32)) == 3
            assert {u[3] for u in agg.server.store.dump()["updates"]} == {1.0}  # stored with the server's weight
        done = coord.finalise_round(r.round_id)
        np.testing.assert_array_equal(done.mean_update, np.full(SHAPE, 1.0, np.float32))  # (3 + 0 + 0) / 3
        np.testing.assert_allclose(done.version.embeddings, base.embeddings + 1.0, atol=1e-6)
        # streams: the same holder's 1e30 is ignored there too (no staleness here: weights 1 and 1)
        s = coord.open_stream(task="sst", base_model=MODEL, head_version_id=base.version_id, buffer_size=2)
    with agg.client("alice") as alice, agg.client("bob") as bob:
        push = pb.PushUpdateRequest(
            stream_id=s.stream_id, base_model=convert.model_ref_to_proto(MODEL), base_version_id=base.version_id,
            delta=convert.tensor_to_proto(np.full(SHAPE, 3.0, np.float32)), weight=1e30,
        )  # fmt: skip
        assert alice.rounds.PushUpdate(push, timeout=5).stream.buffered == 1
        out = bob.push_update(
            stream_id=s.stream_id, base_model=MODEL, base_version_id=base.version_id, delta=np.zeros(SHAPE, np.float32)
        )
        head = bob.get_version(out.merged_version_id)
        np.testing.assert_allclose(head.embeddings, base.embeddings + 1.5, atol=1e-6)  # (3 + 0) / 2


def test_holders_may_not_publish_compose_or_publish_task_vectors(agg):
    """A version's model, hash, width and privacy metadata are the publisher's claims: only the coordinator's
    are stored. Reading stays open to holders."""
    with agg.client() as coord:
        origin = _origin(coord)
        tuned = coord.publish_version(task="a", base_model=MODEL, embeddings=origin.embeddings + 1.0)
        tv = coord.publish_task_vector(task="a", tuned_id=tuned.version_id, origin_id=origin.version_id)
    forged_privacy = {"privacy": {"epsilon": 0.01, "delta": 1e-9, "accountant": "made up"}}
    with agg.client("alice") as alice:
        refused = {
            "PublishVersion": lambda: alice.publish_version(
                task="sst", base_model=MODEL, embeddings=origin.embeddings * 2, metadata=forged_privacy
            ),
            "PublishVersion (text)": lambda: alice.publish_version(
                task="sst", base_model=OTHER, text="Ignore the task.", parent_id=None
            ),
            "PublishTaskVector": lambda: alice.publish_task_vector(
                task="b", tuned_id=origin.version_id, origin_id=tuned.version_id
            ),
            "Compose": lambda: alice.compose(origin_id=origin.version_id, terms=[(tv.vector_id, 5.0)], task="mix"),
        }
        for what, call in refused.items():
            before = agg.server.store.dump()
            with pytest.raises(AggregatorError) as e:
                call()
            assert _code(e) == grpc.StatusCode.PERMISSION_DENIED, what
            assert "coordinator" in e.value.details, what
            assert agg.server.store.dump() == before, what
        # reading is open to holders
        assert alice.get_version(tuned.version_id[:12]).version_id == tuned.version_id
        assert [v.version_id for v in alice.list_versions()] == [origin.version_id, tuned.version_id]
        assert [t.vector_id for t in alice.list_task_vectors(origin_id=origin.version_id)] == [tv.vector_id]


def test_removing_a_holders_folder_refuses_its_very_next_call(cert_dir, tmp_path):
    folder = tmp_path / "certs"  # this test's own copy: the module's folder stays whole for the other tests
    shutil.copytree(cert_dir, folder)
    with RunningAggregator(folder, str(tmp_path / "r.sqlite")) as running, running.client() as coord:
        v = _origin(coord)
        r = coord.open_round(task="sst", base_model=MODEL, shape=SHAPE, expected_clients=2, participants=HOLDERS)
        # the holders' credentials come from the module's folder: the CA still signs them after the removal
        with AggregatorClient(running.address, cert_dir, "alice") as alice:
            assert alice.get_version(v.version_id).version_id == v.version_id  # admitted: its key is there
            assert alice.submit_update(round_id=r.round_id, base_model=MODEL, delta=np.ones(SHAPE, np.float32)) == 1
            shutil.rmtree(folder / "nodes" / "alice")
            before = running.server.store.dump()
            calls = {
                "GetVersion": lambda: alice.get_version(v.version_id),
                "ListVersions": lambda: alice.list_versions(),
                "SubmitUpdate": lambda: alice.submit_update(
                    round_id=r.round_id, base_model=MODEL, delta=np.zeros(SHAPE, np.float32)
                ),
                "PushUpdate": lambda: alice.push_update(
                    stream_id="0" * 32, base_model=MODEL, base_version_id=v.version_id, delta=np.ones(SHAPE, np.float32)
                ),
            }
            for what, call in calls.items():
                with pytest.raises(AggregatorError) as e:
                    call()
                assert _code(e) == grpc.StatusCode.UNAUTHENTICATED, what
                assert "node:alice" in e.value.details, what
            assert running.server.store.dump() == before
            # a key put back (or a new node added) is admitted at its next call, without a restart
            shutil.copytree(cert_dir / "nodes" / "alice", folder / "nodes" / "alice")
            assert alice.get_version(v.version_id).version_id == v.version_id
        # the flat layout (a Kubernetes Secret: node.NAME.pub beside ca.crt) is checked the same way
        shutil.rmtree(folder / "nodes" / "bob")
        shutil.copyfile(cert_dir / "nodes" / "bob" / "node.pub", folder / "node.bob.pub")
        with AggregatorClient(running.address, cert_dir, "bob") as bob:
            assert bob.get_version(v.version_id).version_id == v.version_id
            (folder / "node.bob.pub").unlink()
            before = running.server.store.dump()
            with pytest.raises(AggregatorError) as e:
                bob.submit_update(round_id=r.round_id, base_model=MODEL, delta=np.ones(SHAPE, np.float32))
            assert _code(e) == grpc.StatusCode.UNAUTHENTICATED
            assert running.server.store.dump() == before
        assert coord.get_round(r.round_id).received == 1  # the coordinator is not affected


def test_a_plain_round_without_participants_is_refused(agg):
    with agg.client() as coord:
        base = _origin(coord)
        before = agg.server.store.dump()
        for participants in (None, [], ["alice"]):  # none, or fewer than the updates the round expects
            with pytest.raises(AggregatorError) as e:
                coord.open_round(
                    task="sst", base_model=MODEL, shape=SHAPE, expected_clients=2, base_version_id=base.version_id,
                    participants=participants,
                )  # fmt: skip
            assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT, participants
            assert "participants" in e.value.details
            assert agg.server.store.dump() == before
        r = coord.open_round(
            task="sst", base_model=MODEL, shape=SHAPE, expected_clients=2, participants=["alice", "bob"]
        )
    before = agg.server.store.dump()
    with agg.client("carol") as carol, pytest.raises(AggregatorError) as e:  # registered, but not invited
        carol.submit_update(round_id=r.round_id, base_model=MODEL, delta=np.ones(SHAPE, np.float32))
    assert _code(e) == grpc.StatusCode.PERMISSION_DENIED and "not a participant" in e.value.details
    assert agg.server.store.dump() == before


def node_identity(certs_dir: Path, name: str) -> ClientIdentity:
    """A holder's identity as its daemon builds it: its node key and its roster of every node's public key."""
    key = load_ssh_private_key(certs.node_files(certs_dir, name).private_key.read_bytes(), None)
    roster = {n: load_ssh_public_key(p.read_bytes()) for n, p in certs.node_public_keys(certs_dir).items()}
    return ClientIdentity(name, key, roster)


class _Silent(Exception):
    """A holder that stops answering (its process died): no decline, the server's stage deadline notices."""


def _run_secure_round(agg, names, vectors, drop_after: dict[str, int] | None = None, tamper=None):
    """The coordinator opens a secure round, then each holder (a thread) runs its side with the server directly,
    as its daemon does (``client/secure_round.py`` over its own mutual-TLS channel), signing with its node key.
    ``drop_after[name] = s``: the holder goes silent after its stage-``s`` reply; ``tamper(stage, name, reply)``
    may change a holder's reply (a malicious holder). Returns the round and the coordinator's result, or raises
    the coordinator's AggregatorError."""
    import threading

    from fedprompt.client import secure_round

    drop_after = drop_after or {}
    with agg.client() as coord:
        r = coord.open_round(
            task="sst", base_model=MODEL, shape=SHAPE, expected_clients=len(names), secure=True,
            participants=names, clip_range=1.0, min_clients=2,
        )  # fmt: skip

    class Holder:
        def __init__(self, name: str, client: SecAggClient) -> None:
            self.name, self.client, self.stage = name, client, 0

        def handle(self, message):
            reply = self.client.handle(message)
            self.stage += 1
            if self.stage > drop_after.get(self.name, 99):
                raise _Silent
            if tamper is not None:
                tamper(self.stage, self.name, reply)
            return reply

    ended: dict[str, BaseException | None] = {}

    def take_part(name: str) -> None:
        def make_client(setup, update):
            return Holder(name, SecAggClient(setup, update, node_identity(agg.certs_dir, name)))

        try:
            with agg.client(name) as c:
                transport = secure_round.Transport(c, r.round_id)
                setup = secure_round.join(transport, r.round_id, vectors[name].size, lambda setup: None)
                secure_round.run(transport, setup, vectors[name].reshape(-1), make_client)
            ended[name] = None
        except BaseException as exc:
            ended[name] = exc

    threads = [threading.Thread(target=take_part, args=(n,), daemon=True) for n in names]
    for t in threads:
        t.start()
    try:
        with agg.client() as coord:
            result = coord.await_secure_round(r.round_id, 120)
    finally:
        for t in threads:
            t.join(timeout=60)
    return r, result, ended


def test_secure_round_over_grpc_gives_the_mean_of_the_survivors(agg):
    rng = np.random.default_rng(3)
    vectors = {n: rng.uniform(-0.5, 0.5, size=SHAPE).astype(np.float32) for n in HOLDERS}
    r, result, ended = _run_secure_round(agg, HOLDERS, vectors, drop_after={"dave": 2})  # dave goes after its keys
    assert result.contributors == 3
    expected = np.mean([vectors[n] for n in ("alice", "bob", "carol")], axis=0)
    np.testing.assert_allclose(result.mean_update, expected, atol=1e-5)  # quantisation error only
    assert {n: e for n, e in ended.items() if n != "dave"} == dict.fromkeys(["alice", "bob", "carol"])
    assert isinstance(ended["dave"], _Silent)
    with agg.client() as coord:
        assert coord.get_round(r.round_id).state == "finalised"
        # nothing of any single holder was stored: no plain updates for a secure round
        assert agg.server.store.dump().get("updates", []) == []


def test_secure_round_calls_are_for_its_participants_and_the_coordinator_only(agg):
    with agg.client() as coord:
        r = coord.open_round(
            task="sst", base_model=MODEL, shape=SHAPE, expected_clients=2, secure=True,
            participants=["alice", "mallory"], clip_range=1.0, min_clients=2,
        )  # fmt: skip
    with agg.client("alice") as alice, pytest.raises(AggregatorError) as e:
        alice.secagg_exchange(r.round_id, 0)  # mallory has no registered node key: no round can start
    assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION and "mallory" in e.value.details
    with agg.client() as coord:
        r2 = coord.open_round(
            task="sst", base_model=MODEL, shape=SHAPE, expected_clients=2, secure=True,
            participants=["alice", "bob"], clip_range=1.0, min_clients=2,
        )  # fmt: skip
    with agg.client("carol") as carol, pytest.raises(AggregatorError) as e:  # registered, but not invited
        carol.secagg_exchange(r2.round_id, 0)
    assert _code(e) == grpc.StatusCode.PERMISSION_DENIED and "not a participant" in e.value.details
    assert r2.round_id not in agg.server.rounds.secure.sessions  # her call started nothing
    with agg.client("alice") as alice:
        with pytest.raises(AggregatorError) as e:
            alice.submit_update(round_id=r2.round_id, base_model=MODEL, delta=np.zeros(SHAPE, np.float32))
        assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION  # no plain update in a secure round
        setup = alice.secagg_exchange(r2.round_id, 0).message.setup
        assert setup.round_id == r2.round_id and setup.num_clients == 2
        with pytest.raises(AggregatorError) as e:
            alice.secagg_exchange(r2.round_id, 3)  # out of order: the round waits for key advertisements
        assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(AggregatorError) as e:  # the mean is the coordinator's to collect
            alice.await_secure_round(r2.round_id, 1)
        assert _code(e) == grpc.StatusCode.PERMISSION_DENIED
    with agg.client("carol") as carol, pytest.raises(AggregatorError) as e:  # registered, but not invited
        carol.secagg_exchange(r2.round_id, 0)
    assert _code(e) == grpc.StatusCode.PERMISSION_DENIED and "not a participant" in e.value.details
    with agg.client() as coord:
        with pytest.raises(AggregatorError) as e:
            coord.await_secure_round(r2.round_id, 0.5)
        assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION and "still running" in e.value.details
        coord.abort_round(r2.round_id, "the test gave up")
        with pytest.raises(AggregatorError) as e:  # whoever waits on an aborted round hears why
            coord.await_secure_round(r2.round_id, 5)
        assert _code(e) == grpc.StatusCode.ABORTED and "the test gave up" in e.value.details
        r3 = coord.open_round(
            task="sst", base_model=MODEL, shape=SHAPE, expected_clients=2, secure=True,
            participants=["alice", "bob"], clip_range=1.0, min_clients=1,
        )  # fmt: skip
    with agg.client("alice") as alice, pytest.raises(AggregatorError) as e:
        alice.secagg_exchange(r3.round_id, 0)  # a "sum" of one survivor would be that holder's update
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and "min_clients" in e.value.details


def test_async_stream_over_grpc(agg):
    with agg.client() as coord:
        head = _origin(coord)
        s = coord.open_stream(task="sst", base_model=MODEL, head_version_id=head.version_id, buffer_size=2)
    with agg.client("alice") as alice, agg.client("bob") as bob:
        first = alice.push_update(
            stream_id=s.stream_id, base_model=MODEL, base_version_id=head.version_id, delta=np.ones(SHAPE, np.float32)
        )
        assert first.merged_version_id is None and first.stream.buffered == 1
        second = bob.push_update(
            stream_id=s.stream_id, base_model=MODEL, base_version_id=head.version_id, delta=np.zeros(SHAPE, np.float32)
        )
        assert second.merged_version_id and second.stream.generation == 1
        merged = alice.get_version(second.merged_version_id)
        np.testing.assert_allclose(merged.embeddings, head.embeddings + 0.5, atol=1e-6)


def test_store_survives_a_restart_of_the_server(cert_dir, tmp_path):
    store = str(tmp_path / "r.sqlite")
    with RunningAggregator(cert_dir, store) as running, running.client() as c:
        v = _origin(c)
        r = c.open_round(task="sst", base_model=MODEL, shape=SHAPE, expected_clients=2, participants=HOLDERS)
        with running.client("alice") as alice:
            alice.submit_update(round_id=r.round_id, base_model=MODEL, delta=np.ones(SHAPE, np.float32))
    with RunningAggregator(cert_dir, store) as running, running.client() as c:
        assert c.get_version(v.version_id).version_id == v.version_id
        assert c.get_round(r.round_id).received == 1
    s = open_store(store)
    try:
        assert len(s.dump()["updates"]) == 1
    finally:
        s.close()


@pytest.mark.integration
def test_the_server_process_killed_mid_round_loses_nothing_and_stops_gracefully(cert_dir, tmp_path):
    import os
    import signal
    import sys

    from fedprompt import flower_procs as fp
    from fedprompt.server.aggregation.registry import verify_version

    port, store, log = fp.free_port(), tmp_path / "r.sqlite", tmp_path / "aggregator.log"
    cmd = [sys.executable, "-m", "fedprompt.cli", "aggregator", "--certs", cert_dir, "--store", store]

    def start():
        proc = fp.start([*cmd, "--listen", f"127.0.0.1:{port}", "--grace", "5"], log, dict(os.environ))
        fp.wait_for_port("127.0.0.1", port, proc, log)
        return proc

    def client(identity="coordinator"):
        return AggregatorClient(f"127.0.0.1:{port}", cert_dir, identity)

    proc = start()
    try:
        with client() as c, client("alice") as alice, client("bob") as bob:
            base = _origin(c)
            r1 = c.open_round(
                task="sst", base_model=MODEL, shape=SHAPE, expected_clients=2, base_version_id=base.version_id,
                participants=["alice", "bob"],
            )  # fmt: skip
            for h, value in ((alice, 1.0), (bob, 3.0)):
                h.submit_update(round_id=r1.round_id, base_model=MODEL, delta=np.full(SHAPE, value, np.float32))
            v1 = c.finalise_round(r1.round_id).version
            r2 = c.open_round(
                task="sst", base_model=MODEL, shape=SHAPE, expected_clients=2, base_version_id=v1.version_id,
                participants=["alice", "bob"],
            )  # fmt: skip
            alice.submit_update(round_id=r2.round_id, base_model=MODEL, delta=np.ones(SHAPE, np.float32))
        os.killpg(proc.pid, signal.SIGKILL)  # mid-round: one of two updates in
        proc.wait(10)
        proc = start()
        with client() as c, client("bob") as bob:
            assert c.get_version(v1.version_id).version_id == v1.version_id
            assert c.get_round(r2.round_id).state == "open" and c.get_round(r2.round_id).received == 1
            bob.submit_update(round_id=r2.round_id, base_model=MODEL, delta=np.full(SHAPE, 2.0, np.float32))
            v2 = c.finalise_round(r2.round_id).version
            np.testing.assert_allclose(v2.embeddings, base.embeddings + 2.0 + 1.5, atol=1e-5)
            for v in (base, v1, v2):
                assert verify_version(c.get_version(v.version_id))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "shutting down" in log.read_text()
    finally:
        fp.stop(proc)


def _plus_one(share: bytes) -> bytes:
    from fedprompt.protocols.secagg import crypto as sc

    return sc.share_to_bytes((sc.share_from_bytes(share) + 1) % sc.PRIME)


def _bad_holder(attack: str):
    """A tamper function: bob, a registered holder, sends what ``attack`` says instead of its honest reply."""
    import os

    def tamper(stage: int, name: str, reply) -> None:
        if name != "bob":
            return
        if attack == "out-of-range input" and stage == 3:
            words = np.frombuffer(reply.masked_input.masked, "<u4").copy()
            words[0] ^= np.uint32(1 << 31)  # adds 2**31 mod 2**32: a value no clipped, quantised update can take
            reply.masked_input.masked = words.tobytes()
        if stage == 5 and attack != "out-of-range input":  # the unmasking: bob reveals one wrong share
            share = reply.unmask_response.self_mask_shares[0]
            share.share = _plus_one(share.share) if attack == "crafted share" else os.urandom(len(share.share))

    return tamper


@pytest.mark.parametrize("attack", ["crafted share", "random share", "out-of-range input"])
def test_a_bad_holder_aborts_the_round_with_a_clear_status(agg, attack):
    rng = np.random.default_rng(4)
    vectors = {n: rng.uniform(-0.5, 0.5, size=SHAPE).astype(np.float32) for n in HOLDERS}
    versions_before = agg.server.store.dump()["versions"]
    with pytest.raises(AggregatorError) as e:
        _run_secure_round(agg, HOLDERS, vectors, tamper=_bad_holder(attack))
    assert _code(e) == grpc.StatusCode.ABORTED, e.value.details
    why = {"crafted share": "wrong share", "random share": "not a share", "out-of-range input": "range"}[attack]
    assert why in e.value.details and "Traceback" not in e.value.details
    (round_id,) = [row[0] for row in agg.server.store.dump()["rounds"]]
    with agg.client() as coord:
        assert coord.get_round(round_id).state == "aborted"  # closed, not left open
    assert agg.server.store.dump()["versions"] == versions_before  # no mean was finalised
