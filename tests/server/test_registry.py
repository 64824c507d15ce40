"""The registry on both store backends: versions, task vectors, composition, rounds; every rejection changes nothing.

Concurrency, asynchronous streams and crash safety are in ``test_registry_concurrency.py``.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedprompt.protocols.records import (
    ROUND_ABORTED,
    ROUND_FINALISED,
    ROUND_OPEN,
    AlreadyExists,
    Conflict,
    Forbidden,
    InvalidInput,
    ModelRef,
    NotFound,
    Round,
    TaskVector,
    Version,
)
from fedprompt.server.aggregation.registry import Registry, initial_prompt_id, verify_version, version_id
from fedprompt.server.aggregation.store import tensor_bytes

pytest_plugins = ["pg"]

MODEL = ModelRef("tiny-llama", "a" * 64)
OTHER = ModelRef("tiny-gpt2", "b" * 64)
SHAPE = (4, 8)


def emb(seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture
def reg(store) -> Registry:
    return Registry(store, max_elements=4096, clock=itertools.count(1000).__next__)


def rejected(reg: Registry, exc: type[Exception], fn, *args, match: str | None = None, **kwargs) -> Exception:
    """``fn`` raises ``exc`` and the store is exactly as before."""
    before = reg.store.dump()
    with pytest.raises(exc, match=match) as info:
        fn(*args, **kwargs)
    assert type(info.value) is exc
    assert reg.store.dump() == before
    return info.value


def publish(reg: Registry, seed: int = 0, *, model: ModelRef = MODEL, shape=SHAPE, **kw) -> Version:
    kw.setdefault("metadata", {})
    return reg.publish_version(task="sst2", base_model=model, embeddings=emb(seed, shape), created_by="alice", **kw)


# --- versions ---------------------------------------------------------------------------------------------------


def test_publish_get_list_prefix_and_idempotence(reg):
    v1 = publish(reg, 1, metadata={"privacy": {"epsilon": 8.0}, "b": [1, 2]})
    assert verify_version(v1) and v1.created_unix == 1000 and v1.created_by == "alice"
    v2 = reg.publish_version(task="sst2", base_model=MODEL, text="Classify: {x}", parent_id=v1.version_id[:10],
                             metadata={}, created_by="bob")  # fmt: skip
    assert v2.parent_id == v1.version_id and v2.embeddings is None and verify_version(v2)
    v3 = publish(reg, 3, model=OTHER)
    v3b = reg.publish_version(task="agnews", base_model=MODEL, embeddings=emb(4), created_by="carol")

    again = reg.publish_version(task="sst2", base_model=MODEL, embeddings=emb(1), created_by="mallory",
                                metadata={"b": [1, 2], "privacy": {"epsilon": 8.0}})  # fmt: skip
    assert again.version_id == v1.version_id and again.created_by == "alice"
    assert again.created_unix == v1.created_unix

    got = reg.get_version(v1.version_id[:8].upper())
    np.testing.assert_array_equal(got.embeddings, emb(1))
    assert got.embeddings.dtype == np.float32 and got.metadata == {"b": [1, 2], "privacy": {"epsilon": 8.0}}
    assert reg.get_version(v2.version_id).text == "Classify: {x}"

    assert [v.version_id for v in reg.list_versions()] == [v1.version_id, v2.version_id, v3.version_id, v3b.version_id]
    assert [v.version_id for v in reg.list_versions(task="sst2", model_id="tiny-llama")] == [
        v1.version_id,
        v2.version_id,
    ]
    assert [v.version_id for v in reg.list_versions(model_id="tiny-gpt2")] == [v3.version_id]
    light = reg.list_versions(task="agnews", include_content=False)
    assert [(v.version_id, v.embeddings, v.text) for v in light] == [(v3b.version_id, None, None)]


def test_version_id_covers_content_not_author_or_time():
    base = {"task": "t", "base_model": MODEL, "embeddings": emb(0), "text": None, "parent_id": None, "metadata": {}}
    vid = version_id(**base)
    assert vid == version_id(**{**base, "metadata": {}})
    flipped = emb(0)
    flipped.view(np.uint32)[0, 0] ^= 1
    for change in ({"task": "u"}, {"base_model": OTHER}, {"embeddings": flipped}, {"parent_id": "0" * 64},
                   {"metadata": {"a": 1}}, {"embeddings": emb(0).reshape(8, 4)}):  # fmt: skip
        assert version_id(**{**base, **change}) != vid, change
    text = {**base, "embeddings": None, "text": "hello"}
    assert version_id(**text) != version_id(**{**text, "text": "hello "})


def test_get_version_unknown_short_and_ambiguous_prefix(reg, store):
    publish(reg)
    rejected(reg, NotFound, reg.get_version, "f" * 64)
    rejected(reg, InvalidInput, reg.get_version, "abc", match="too short")
    rejected(reg, InvalidInput, reg.get_version, "xyz12345", match="not a hex")
    with store.transaction() as tx:  # two stored ids with one 8-digit prefix (hashes that collide on 32 bits)
        for tail in ("0" * 56, "1" * 56):
            tx.insert_version(Version("deadbeef" + tail, "t", MODEL, None, "x", None, {}, 1.0, "test"))
    rejected(reg, NotFound, reg.get_version, "deadbeef", match="ambiguous")
    assert reg.get_version("deadbeef1").version_id == "deadbeef" + "1" * 56


def test_publish_version_rejections(reg):
    parent = publish(reg)
    other_parent = publish(reg, 2, model=OTHER)
    good = {"task": "sst2", "base_model": MODEL, "embeddings": emb(5), "created_by": "alice", "metadata": {}}
    nan = emb(5)
    nan[1, 2] = np.nan
    cases = [
        ({"text": "x"}, InvalidInput, "exactly one"),
        ({"embeddings": None}, InvalidInput, "exactly one"),
        ({"embeddings": None, "text": "  "}, InvalidInput, "non-empty"),
        ({"embeddings": emb(5).astype(np.float64)}, InvalidInput, "float32"),
        ({"embeddings": emb(5).astype(np.float16)}, InvalidInput, "float32"),
        ({"embeddings": emb(5, (32,))}, InvalidInput, "2-D"),
        ({"embeddings": emb(5, (2, 4, 4))}, InvalidInput, "2-D"),
        ({"embeddings": nan}, InvalidInput, r"NaN or infinite .* \(1, 2\)"),
        ({"embeddings": np.full(SHAPE, np.inf, np.float32)}, InvalidInput, "NaN or infinite"),
        ({"embeddings": emb(5, (64, 65))}, InvalidInput, "4096"),
        ({"embeddings": [[1.0]]}, InvalidInput, "numpy array"),
        ({"task": ""}, InvalidInput, "task"),
        ({"created_by": ""}, InvalidInput, "created_by"),
        ({"base_model": ModelRef("m", "XYZ")}, InvalidInput, "XYZ"),
        ({"base_model": ModelRef("", "a" * 64)}, InvalidInput, "model id"),
        ({"metadata": {"eps": float("nan")}}, InvalidInput, "metadata"),
        ({"metadata": {"x": object()}}, InvalidInput, "metadata"),
        ({"metadata": [1]}, InvalidInput, "metadata"),
        ({"parent_id": "0" * 64}, NotFound, "0000"),
        ({"parent_id": other_parent.version_id}, Conflict, "tiny-gpt2"),
        ({"parent_id": parent.version_id[:5]}, InvalidInput, "too short"),
    ]
    for change, exc, match in cases:
        rejected(reg, exc, reg.publish_version, **{**good, **change}, match=match)
    assert reg.publish_version(**good, parent_id=parent.version_id).parent_id == parent.version_id


# --- task vectors and composition -------------------------------------------------------------------------------


def test_task_vectors_and_exact_composition(reg):
    origin = publish(reg, 0)
    t1 = publish(reg, 1, parent_id=origin.version_id, metadata={"privacy": {"epsilon": 3.0, "delta": 1e-5}})
    t2 = reg.publish_version(task="agnews", base_model=MODEL, embeddings=emb(2), created_by="bob")
    tv1 = reg.publish_task_vector(task="sst2", tuned_id=t1.version_id, origin_id=origin.version_id[:8], created_by="a")
    tv2 = reg.publish_task_vector(task="agnews", tuned_id=t2.version_id, origin_id=origin.version_id, created_by="b")
    np.testing.assert_array_equal(tv1.tau, emb(1) - emb(0))
    assert tv1.origin_id == origin.version_id and tv1.base_model == MODEL and tv1.tau.dtype == np.float32
    again = reg.publish_task_vector(task="sst2", tuned_id=t1.version_id, origin_id=origin.version_id, created_by="z")
    assert again.vector_id == tv1.vector_id and again.created_by == "a"
    assert [v.vector_id for v in reg.list_task_vectors()] == [tv1.vector_id, tv2.vector_id]
    assert [v.vector_id for v in reg.list_task_vectors(task="agnews")] == [tv2.vector_id]
    assert len(reg.list_task_vectors(origin_id=origin.version_id[:12])) == 2

    c = reg.compose(origin_id=origin.version_id, terms=[(tv1.vector_id, 0.5), (tv2.vector_id, -1.25)], task="mix",
                    created_by="carol")  # fmt: skip
    want = emb(0).astype(np.float64) + 0.5 * tv1.tau.astype(np.float64) - 1.25 * tv2.tau.astype(np.float64)
    np.testing.assert_array_equal(c.embeddings, want.astype(np.float32))
    assert c.parent_id == origin.version_id and c.task == "mix" and verify_version(c)
    terms = c.metadata["composed"]["terms"]
    assert terms[0] == {"vector_id": tv1.vector_id, "task": "sst2", "lambda": 0.5, "tuned_id": t1.version_id,
                        "privacy": {"epsilon": 3.0, "delta": 1e-5}}  # fmt: skip
    assert terms[1] == {"vector_id": tv2.vector_id, "task": "agnews", "lambda": -1.25, "tuned_id": t2.version_id}
    assert reg.get_version(c.version_id[:8]).metadata == c.metadata


def test_task_vector_rejections(reg):
    origin = publish(reg, 0)
    tuned = publish(reg, 1)
    other_model = publish(reg, 2, model=OTHER)
    other_shape = publish(reg, 3, shape=(2, 8))
    text = reg.publish_version(task="t", base_model=MODEL, text="prompt", created_by="a")
    ok = {"task": "sst2", "tuned_id": tuned.version_id, "origin_id": origin.version_id, "created_by": "a"}
    rejected(reg, Conflict, reg.publish_task_vector, **{**ok, "tuned_id": other_model.version_id}, match="tiny-gpt2")
    rejected(reg, Conflict, reg.publish_task_vector, **{**ok, "tuned_id": other_shape.version_id}, match="shape")
    rejected(reg, Conflict, reg.publish_task_vector, **{**ok, "origin_id": text.version_id}, match="text prompt")
    rejected(reg, InvalidInput, reg.publish_task_vector, **{**ok, "tuned_id": origin.version_id}, match="same")
    rejected(reg, NotFound, reg.publish_task_vector, **{**ok, "tuned_id": "1" * 64})
    rejected(reg, InvalidInput, reg.publish_task_vector, **{**ok, "task": ""})


def test_a_tuned_prompt_that_records_another_initial_prompt_is_refused(reg):
    import torch

    from fedprompt.prompt import origin_id

    origin, stranger = publish(reg, 0), publish(reg, 5)
    # the id fedprompt's artifacts record (torch) is the one the registry computes (numpy)
    assert initial_prompt_id(origin.embeddings) == origin_id(torch.from_numpy(origin.embeddings.copy()))
    claims = {"origin_id": origin_id(torch.from_numpy(stranger.embeddings.copy()))}
    tuned = reg.publish_version(task="t", base_model=MODEL, embeddings=emb(1), metadata=claims, created_by="a")
    ok = {"task": "sst2", "tuned_id": tuned.version_id, "created_by": "a"}
    rejected(reg, Conflict, reg.publish_task_vector, **ok, origin_id=origin.version_id, match="tuned from")
    assert reg.publish_task_vector(**ok, origin_id=stranger.version_id).origin_id == stranger.version_id


def test_compose_rejections(reg, store):
    origin = publish(reg, 0)
    origin2 = publish(reg, 10)
    tv = reg.publish_task_vector(task="a", tuned_id=publish(reg, 1).version_id, origin_id=origin.version_id,
                                 created_by="a")  # fmt: skip
    foreign = reg.publish_task_vector(task="b", tuned_id=publish(reg, 2).version_id, origin_id=origin2.version_id,
                                      created_by="a")  # fmt: skip
    # Vectors that claim this origin but another model or shape cannot be published; forge them in the store.
    with store.transaction() as tx:
        for vid, model, shape in (("e" * 64, OTHER, SHAPE), ("f" * 64, MODEL, (2, 8))):
            tau = np.ones(shape, np.float32)
            tx.insert_task_vector(TaskVector(vid, "x", origin.version_id, tv.tuned_id, model, tau, 1.0, "forger"))
    text = reg.publish_version(task="t", base_model=MODEL, text="prompt", created_by="a")
    ok = {"origin_id": origin.version_id, "terms": [(tv.vector_id, 1.0)], "task": "mix", "created_by": "c"}
    cases = [
        ({"terms": [(tv.vector_id, 1.0), (foreign.vector_id, 1.0)]}, Conflict, "origin"),
        ({"terms": [("e" * 64, 1.0)]}, Conflict, "tiny-gpt2"),
        ({"terms": [("f" * 64, 1.0)]}, Conflict, "shape"),
        ({"terms": []}, InvalidInput, "at least one"),
        ({"terms": [(tv.vector_id, float("nan"))]}, InvalidInput, "finite"),
        ({"terms": [(tv.vector_id, float("inf"))]}, InvalidInput, "finite"),
        ({"terms": [(tv.vector_id, 1.0), (tv.vector_id, 2.0)]}, InvalidInput, "more than once"),
        ({"terms": [("9" * 64, 1.0)]}, NotFound, "9999"),
        ({"terms": [(tv.vector_id, 1e300)]}, InvalidInput, "overflows"),
        ({"origin_id": text.version_id}, Conflict, "text prompt"),
        ({"task": ""}, InvalidInput, "task"),
    ]
    for change, exc, match in cases:
        rejected(reg, exc, reg.compose, **{**ok, **change}, match=match)


# --- rounds -----------------------------------------------------------------------------------------------------


PARTICIPANTS = ["c1", "c2", "c3", "c4"]


def open_plain(reg: Registry, base: Version | None = None, **kw) -> str:
    """A round of 3 expected updates (2 at least) to which ``PARTICIPANTS`` are invited, unless ``kw`` says."""
    args = {"task": "sst2", "base_model": MODEL, "shape": SHAPE, "expected_clients": 3, "min_clients": 2,
            "base_version_id": base.version_id if base else None, "participants": PARTICIPANTS,
            "created_by": "coord"}  # fmt: skip
    return reg.open_round(**{**args, **kw}).round_id


def test_round_mean_of_equally_weighted_updates_and_new_version(reg, store):
    base = publish(reg, 0)
    rid = open_plain(reg, base)
    deltas = {"c1": emb(11), "c2": emb(12), "c3": emb(13)}
    claimed = {"c1": 1.0, "c2": 2.0, "c3": 5.0}  # what the holders might say they are worth
    for i, client in enumerate(["c3", "c1", "c2"]):
        # the registry takes no weight at all: a caller cannot even say one
        rejected(reg, TypeError, reg.submit_update, round_id=rid, client=client, base_model=MODEL,
                 delta=deltas[client], weight=claimed[client], match="weight")  # fmt: skip
        assert reg.submit_update(round_id=rid, client=client, base_model=MODEL, delta=deltas[client]) == i + 1
    assert reg.get_round(rid).received == 3
    assert [u[3] for u in store.dump()["updates"]] == [1.0, 1.0, 1.0]  # every update weighs the same
    res = reg.finalise_round(round_id=rid, metadata={"note": "r1"}, created_by="coord")
    want = sum(deltas[c].astype(np.float64) for c in sorted(deltas)) / len(deltas)
    np.testing.assert_array_equal(res.mean_update, want.astype(np.float32))
    weighted = sum(claimed[c] * deltas[c].astype(np.float64) for c in deltas) / sum(claimed.values())
    assert not np.allclose(res.mean_update, weighted, atol=1e-3)  # the claimed weights had no effect
    assert res.contributors == 3 and res.round.state == ROUND_FINALISED and res.round.received == 3
    v = res.version
    np.testing.assert_array_equal(v.embeddings, emb(0) + want.astype(np.float32))
    assert v.parent_id == base.version_id and res.round.version_id == v.version_id and verify_version(v)
    assert v.metadata == {"note": "r1", "round_id": rid, "contributors": 3}
    assert reg.get_round(rid) == res.round and store.dump()["updates"] == []  # updates do not outlive the round
    rejected(reg, Conflict, reg.finalise_round, round_id=rid, created_by="coord", match="finalised")
    rejected(reg, Conflict, reg.submit_update, round_id=rid, client="c4", base_model=MODEL, delta=emb(1))

    plain = open_plain(reg, None, expected_clients=1, min_clients=1)
    reg.submit_update(round_id=plain, client="c1", base_model=MODEL, delta=emb(5))
    res2 = reg.finalise_round(round_id=plain, created_by="coord")
    assert res2.version is None and res2.round.version_id is None
    np.testing.assert_array_equal(res2.mean_update, emb(5))


def test_submit_update_rejections(reg):
    base = publish(reg, 0)
    rid = open_plain(reg, base, participants=["c1", "c2", "c3", "c4"])
    secure = open_plain(reg, base, secure=True, participants=["c1", "c2", "c3"], clip_range=1.0)
    aborted = open_plain(reg, base)
    reg.abort_round(round_id=aborted, reason="test")
    reg.submit_update(round_id=rid, client="c1", base_model=MODEL, delta=emb(1))
    ok = {"round_id": rid, "client": "c2", "base_model": MODEL, "delta": emb(2)}
    nan, inf = emb(2), emb(2)
    nan[0, 0], inf[3, 7] = np.nan, -np.inf
    cases = [
        ({"round_id": "0" * 32}, NotFound, "unknown round"),
        ({"round_id": aborted}, Conflict, "aborted"),
        ({"round_id": secure}, Conflict, "secure"),
        ({"base_model": OTHER}, Conflict, "tiny-gpt2"),
        ({"delta": emb(2, (8, 4))}, InvalidInput, "shape"),
        ({"delta": emb(2).astype(np.float64)}, InvalidInput, "float32"),
        ({"delta": nan}, InvalidInput, "NaN"),
        ({"delta": inf}, InvalidInput, r"\(3, 7\)"),
        # weights are the server's: the registry has no parameter a caller's weight, good or bad, could reach
        ({"weight": 0.0}, TypeError, "weight"),
        ({"weight": -1.0}, TypeError, "weight"),
        ({"weight": float("nan")}, TypeError, "weight"),
        ({"weight": float("inf")}, TypeError, "weight"),
        ({"weight": True}, TypeError, "weight"),
        ({"client": ""}, InvalidInput, "client"),
        ({"client": "c1"}, AlreadyExists, "c1"),
        ({"client": "eve"}, Forbidden, "eve"),
    ]
    for change, exc, match in cases:
        rejected(reg, exc, reg.submit_update, **{**ok, **change}, match=match)
    for c in ("c2", "c3"):
        reg.submit_update(**{**ok, "client": c})
    rejected(reg, Conflict, reg.submit_update, **{**ok, "client": "c4"}, match="full")


def test_open_round_rejections(reg):
    base = publish(reg, 0)
    text = reg.publish_version(task="t", base_model=MODEL, text="prompt", created_by="a")
    ok = {"task": "sst2", "base_model": MODEL, "shape": SHAPE, "expected_clients": 3, "min_clients": 2,
          "base_version_id": base.version_id, "participants": ["a", "b", "c"], "created_by": "coord"}  # fmt: skip
    sec = {**ok, "secure": True, "participants": ["a", "b", "c"], "clip_range": 2.0}
    cases = [
        ({"base_version_id": "1" * 64}, NotFound),
        ({"base_version_id": text.version_id}, Conflict),
        ({"base_model": OTHER}, Conflict),
        ({"shape": (8, 4)}, Conflict),
        ({"shape": (0, 4)}, InvalidInput),
        ({"shape": ()}, InvalidInput),
        ({"shape": (4096, 2)}, InvalidInput),
        ({"expected_clients": 0}, InvalidInput),
        ({"min_clients": 0}, InvalidInput),
        ({"min_clients": 4}, InvalidInput),
        ({"participants": ["a", "a", "b"]}, InvalidInput),
        ({"participants": ["a", "b"]}, InvalidInput),
        ({"participants": []}, InvalidInput),  # a plain round names its participants too
        ({"participants": ()}, InvalidInput),
        ({"participants": None}, InvalidInput),
        ({"participants": "abc"}, InvalidInput),  # a string is not a list of three names
        ({"participants": ["a", "b", ""]}, InvalidInput),
        ({"task": " "}, InvalidInput),
        ({**sec, "participants": []}, InvalidInput),
        ({**sec, "participants": ["a", "b"]}, InvalidInput),
        ({**sec, "participants": ["a", "b", "b"]}, InvalidInput),
        ({**sec, "clip_range": 0.0}, InvalidInput),
        ({**sec, "clip_range": float("nan")}, InvalidInput),
    ]
    for change, exc in cases:
        rejected(reg, exc, reg.open_round, **{**ok, **change})
    r = reg.open_round(**sec)
    assert (r.secure, r.participants, r.clip_range, r.state, r.min_clients) == (True, ("a", "b", "c"), 2.0, "open", 2)
    plain = reg.open_round(**{**ok, "participants": ["a", "b", "c", "d"]})  # more invited than expected: fine
    assert (plain.secure, plain.participants, plain.expected_clients) == (False, ("a", "b", "c", "d"), 3)


def test_a_plain_round_without_participants_is_refused(reg):
    """No round is open to every registered node: the coordinator names whom it invites."""
    base = publish(reg, 0)
    args = {"task": "sst2", "base_model": MODEL, "shape": SHAPE, "expected_clients": 2, "created_by": "coord",
            "base_version_id": base.version_id}  # fmt: skip
    err = rejected(reg, InvalidInput, reg.open_round, **args, match="participants")
    assert err.status == "INVALID_ARGUMENT"
    rejected(reg, InvalidInput, reg.open_round, **args, participants=[], match="participants")
    rejected(reg, InvalidInput, reg.open_round, **args, participants=["c1"], match="cannot send 2")
    assert reg.store.dump()["rounds"] == []
    rid = reg.open_round(**args, participants=["c1", "c2"]).round_id
    reg.submit_update(round_id=rid, client="c1", base_model=MODEL, delta=emb(1))
    err = rejected(reg, Forbidden, reg.submit_update, round_id=rid, client="c3", base_model=MODEL, delta=emb(3))
    assert err.status == "PERMISSION_DENIED" and "not a participant" in str(err)


def test_rounds_stored_by_an_older_server_keep_to_the_servers_rules(reg, store):
    """A round opened without participants admits no one; updates stored with callers' weights weigh the same."""
    base = publish(reg, 0)
    legacy = Round("1" * 32, "sst2", MODEL, SHAPE, 2, False, base.version_id, ROUND_OPEN, 0, None, 2, (), 0.0, "old")
    with store.transaction() as tx:
        tx.insert_round(legacy, 1.0)
    rejected(reg, Forbidden, reg.submit_update, round_id=legacy.round_id, client="c1", base_model=MODEL, delta=emb(1))
    rid = open_plain(reg, base, expected_clients=2, min_clients=2)
    with store.transaction() as tx:  # as an older server stored them: with the weights the callers sent
        tx.insert_update(rid, "c1", tensor_bytes(emb(1)), 1e30)
        tx.insert_update(rid, "c2", tensor_bytes(emb(2)), 1.0)
        tx.set_round_received(rid, 2)
    res = reg.finalise_round(round_id=rid, created_by="coord")
    np.testing.assert_array_equal(res.mean_update, ((emb(1).astype(np.float64) + emb(2)) / 2).astype(np.float32))


def test_finalise_needs_min_clients_and_keeps_round_open(reg):
    rid = open_plain(reg, publish(reg, 0))
    reg.submit_update(round_id=rid, client="c1", base_model=MODEL, delta=emb(1))
    rejected(reg, Conflict, reg.finalise_round, round_id=rid, created_by="coord", match="min_clients")
    assert reg.get_round(rid).state == ROUND_OPEN
    rejected(reg, InvalidInput, reg.finalise_round, round_id=rid, created_by="x", metadata={"round_id": 1})
    rejected(reg, NotFound, reg.finalise_round, round_id="nope", created_by="coord")
    reg.submit_update(round_id=rid, client="c2", base_model=MODEL, delta=emb(2))
    res = reg.finalise_round(round_id=rid, created_by="coord")
    assert res.contributors == 2 and res.round.state == ROUND_FINALISED
    np.testing.assert_array_equal(res.mean_update, ((emb(1).astype(np.float64) + emb(2)) / 2).astype(np.float32))


def test_secure_round_finalise_and_abort(reg):
    base = publish(reg, 0)
    rid = open_plain(reg, base, secure=True, participants=["a", "b", "c"], clip_range=1.0)
    plain = open_plain(reg, base)
    ok = {"round_id": rid, "mean_update": emb(7), "contributors": 2, "created_by": "coord"}
    nan = emb(7)
    nan[2, 2] = np.nan
    rejected(reg, Conflict, reg.finalise_round, round_id=rid, created_by="coord", match="secure")
    rejected(reg, Conflict, reg.finalise_secure_round, **{**ok, "round_id": plain}, match="not secure")
    rejected(reg, Conflict, reg.finalise_secure_round, **{**ok, "contributors": 1}, match="contributors")
    rejected(reg, Conflict, reg.finalise_secure_round, **{**ok, "contributors": 4}, match="contributors")
    rejected(reg, InvalidInput, reg.finalise_secure_round, **{**ok, "contributors": 0})
    rejected(reg, InvalidInput, reg.finalise_secure_round, **{**ok, "mean_update": emb(7, (8, 4))}, match="shape")
    rejected(reg, InvalidInput, reg.finalise_secure_round, **{**ok, "mean_update": nan}, match="NaN")
    res = reg.finalise_secure_round(**ok, metadata={"protocol": "secagg+"})
    np.testing.assert_array_equal(res.version.embeddings, emb(0) + emb(7))
    assert res.round.received == 2 and res.version.metadata == {"protocol": "secagg+", "round_id": rid,
                                                                "contributors": 2}  # fmt: skip
    rejected(reg, Conflict, reg.finalise_secure_round, **ok, match="finalised")

    aborted = reg.abort_round(round_id=plain, reason="holder offline")
    assert aborted.state == ROUND_ABORTED and aborted.version_id is None
    rejected(reg, Conflict, reg.abort_round, round_id=plain, reason="again")
    rejected(reg, Conflict, reg.finalise_round, round_id=plain, created_by="coord")
    rejected(reg, NotFound, reg.abort_round, round_id="0" * 32, reason="")
