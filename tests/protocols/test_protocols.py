"""The committed gRPC stubs are what the .proto files compile to, and the conversions round-trip."""

from __future__ import annotations

import numpy as np
import pytest

from fedprompt.protocols import aggregator_pb2 as pb
from fedprompt.protocols import convert, generate
from fedprompt.protocols.records import (
    FinaliseResult,
    InvalidInput,
    ModelRef,
    PushResult,
    Round,
    Stream,
    TaskVector,
    Version,
)

MODEL = ModelRef("tiny-llama", "c" * 64)


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    fresh = {p.name: p.read_bytes() for p in generate.generate(tmp_path)}
    committed = {p.name: p.read_bytes() for p in generate.committed()}
    assert set(fresh) == set(committed), "stubs missing or extra: run python -m fedprompt.protocols.generate"
    stale = sorted(n for n in fresh if fresh[n] != committed[n])
    assert not stale, f"stale stubs {stale}: run python -m fedprompt.protocols.generate"
    assert generate.main(["--check"]) == 0


def test_the_check_notices_an_edited_stub(tmp_path, monkeypatch):
    for p in generate.committed():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    for p in generate.proto_files():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    target = tmp_path / "aggregator_pb2.pyi"
    target.write_text(target.read_text() + "\n# edited by hand\n")
    monkeypatch.setattr(generate, "HERE", tmp_path)
    assert generate.main(["--check"]) == 1


def test_tensor_decoding_refuses_wrong_dtype_shape_and_size():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(convert.tensor_from_proto(convert.tensor_to_proto(x)), x)
    msg = convert.tensor_to_proto(x)
    for field, value, words in (
        ("dtype", pb.BFLOAT16, "bfloat16"),
        ("data", b"\0" * 20, "24"),
        ("shape", [2, 0], "positive"),
    ):
        bad = pb.Tensor()
        bad.CopyFrom(msg)
        if field == "shape":
            del bad.shape[:]
            bad.shape.extend(value)
        else:
            setattr(bad, field, value)
        with pytest.raises(InvalidInput, match=words):
            convert.tensor_from_proto(bad)
    with pytest.raises(InvalidInput, match="limit"):
        convert.tensor_from_proto(msg, max_elements=5)


def test_records_round_trip_through_their_messages():
    emb = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    v = Version("a" * 64, "sst", MODEL, emb, None, "b" * 64, {"privacy": {"epsilon": 8.0}}, 12.5, "coordinator")
    back = convert.version_from_proto(convert.version_to_proto(v))
    assert back.metadata == v.metadata and back.parent_id == v.parent_id and back.created_by == "coordinator"
    np.testing.assert_array_equal(back.embeddings, emb)
    text = Version("d" * 64, "sst", MODEL, None, "Classify:", None, {}, 1.0, "alice")
    assert convert.version_from_proto(convert.version_to_proto(text)).text == "Classify:"
    t = TaskVector("e" * 64, "sst", "a" * 64, "b" * 64, MODEL, emb, 2.0, "bob")
    t2 = convert.task_vector_from_proto(convert.task_vector_to_proto(t))
    assert (t2.vector_id, t2.origin_id, t2.tuned_id) == (t.vector_id, t.origin_id, t.tuned_id)
    r = Round("f" * 32, "sst", MODEL, (3, 4), 5, True, None, "finalised", 4, "a" * 64, 3)
    r2 = convert.round_from_proto(convert.round_to_proto(r))
    assert (r2.shape, r2.state, r2.secure, r2.version_id, r2.min_clients) == ((3, 4), "finalised", True, "a" * 64, 3)
    f = convert.finalise_result_from_proto(convert.finalise_result_to_proto(FinaliseResult(r, emb, 4, v)))
    assert f.contributors == 4 and f.version.version_id == v.version_id
    s = Stream("9" * 32, "sst", MODEL, "a" * 64, 2, 1, 4, 0.5, 1.0)
    p = convert.push_result_from_proto(convert.push_result_to_proto(PushResult(s, 1, None)))
    assert p.stream == s and p.staleness == 1 and p.merged_version_id is None
