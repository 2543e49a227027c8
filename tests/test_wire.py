"""The wire format: arrays in float32, float16 or bfloat16 through Flower's own serialisation, and deltas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedprime_core.method.federated import ClientUpdate, validate_update
from fedprime_core.wire import (
    LARGEST,
    UNIT_ROUNDOFF,
    WIRE_DTYPES,
    WireRangeError,
    apply_delta,
    decode_array,
    encode_array,
    state_delta,
)
from fedprime_protocol.messages import (
    ARRAYS,
    METRICS,
    WIRE,
    encode_arrays,
    parse_train_reply,
    read_arrays,
    state_to_record,
    train_reply_content,
)
from tests.loopback import through_flower


@pytest.fixture(autouse=True)
def a_flower_task():
    """Flower's Message needs the identity of the task that creates it (a SuperLink sets it)."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def a_state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "pools.inter.prompts": (rng.standard_normal((6, 1, 16)) * 0.05).astype(np.float32),
        "pools.inter.keys": (rng.standard_normal((6, 16)) * 0.05).astype(np.float32),
        "head.0.weight": (rng.standard_normal((32, 16)) * np.logspace(-6, 3, 16)).astype(np.float32),
        "head.0.bias": np.zeros(32, dtype=np.float32),
        "head.1.weight": np.ones(32, dtype=np.float32),
    }


@pytest.mark.parametrize("dtype", WIRE_DTYPES)
def test_round_trip_keeps_names_shapes_and_values_within_the_dtypes_precision(dtype):
    state = a_state()
    arrived = read_arrays(through_flower(RecordDict(encode_arrays(state, dtype))))
    assert list(arrived) == list(state)
    smallest_normal = {"float32": 1.2e-38, "float16": 6.2e-5, "bfloat16": 1.2e-38}[dtype]
    for name, value in state.items():
        got = arrived[name]
        assert got.dtype == np.float32 and got.shape == value.shape, name
        # Relative error at most the unit roundoff in the normal range; absolute below it.
        bound = UNIT_ROUNDOFF[dtype] * np.maximum(np.abs(value), smallest_normal)
        assert np.all(np.abs(got - value) <= bound), name
    if dtype == "float32":
        for name, value in state.items():
            np.testing.assert_array_equal(arrived[name], value)


def test_bfloat16_is_rounded_to_nearest_even_exactly_as_torch_does():
    rng = np.random.default_rng(1)
    values = np.concatenate(
        [
            rng.standard_normal(4000).astype(np.float32) * np.float32(10.0) ** rng.integers(-30, 30, 4000),
            np.array([0.0, -0.0, 1.0, -1.0, 1 + 2**-8, 1 + 3 * 2**-8, 3.0e38, -3.0e38, 1e-40], dtype=np.float32),
        ]
    ).astype(np.float32)
    encoded = encode_array("x", values, "bfloat16")
    assert encoded.dtype == np.uint16
    ours = decode_array("x", encoded, "bfloat16")
    reference = torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_records_are_half_the_bytes(dtype):
    state = a_state()
    full = state_to_record(state, "float32").count_bytes()
    half = state_to_record(state, dtype).count_bytes()
    payload = sum(v.nbytes for v in state.values())
    assert full - half == pytest.approx(payload / 2, abs=16 * len(state))


def test_a_finite_value_beyond_float16_is_refused_by_the_sender_naming_the_array():
    state = {"head.0.weight": np.array([1.0, -70000.0, 3.0], dtype=np.float32)}
    with pytest.raises(WireRangeError, match=r"'head.0.weight' holds 1 finite value\(s\) beyond float16's range"):
        encode_arrays(state, "float16")
    # 65504 is float16's largest finite value; bfloat16 keeps float32's range.
    assert np.isfinite(read_arrays(RecordDict(encode_arrays({"x": np.array([65504.0], np.float32)}, "float16")))["x"])
    assert read_arrays(RecordDict(encode_arrays(state, "bfloat16")))["head.0.weight"][1] == -70144.0
    with pytest.raises(WireRangeError, match="bfloat16"):
        encode_array("x", np.array([np.finfo(np.float32).max], np.float32), "bfloat16")
    assert LARGEST["bfloat16"] == float(torch.finfo(torch.bfloat16).max)


def reply(state, dtype="float32", reference=None, num_examples=10) -> Message:
    usage = {"inter": np.ones(6, dtype=np.int64)}
    content = train_reply_content(
        state, {"num-examples": num_examples}, usage, {"client-id": "0"}, wire_dtype=dtype, reference=reference
    )
    content = through_flower(content)
    return Message(content=content, dst_node_id=0, message_type="train")


def shapes(state):
    return {k: v.shape for k, v in state.items()}


@pytest.mark.parametrize("dtype", WIRE_DTYPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_after_the_cast_are_still_rejected_and_the_reason_says_how_they_travelled(dtype, bad):
    state = a_state()
    state["pools.inter.keys"][2, 3] = bad
    update, _, reasons = parse_train_reply(reply(state, dtype))
    assert reasons == [] and update is not None
    reasons = validate_update(update, shapes(a_state()), ["inter"], 1e4)
    suffix = "" if dtype == "float32" else f" (sent as {dtype})"
    assert reasons == [f"array 'pools.inter.keys' contains NaN or Inf{suffix}"]


def test_a_valid_16_bit_reply_passes_the_validator_as_float32():
    update, _, reasons = parse_train_reply(reply(a_state(), "float16"))
    assert reasons == [] and all(v.dtype == np.float32 for v in update.state.values())
    assert validate_update(update, shapes(a_state()), ["inter"], 1e4) == []


def test_arrays_that_do_not_match_their_wire_tag_are_rejected_as_undecodable():
    content = RecordDict(
        {
            ARRAYS: state_to_record(a_state(), "float32"),
            WIRE: ConfigRecord({"dtype": "float16", "delta": False}),
            METRICS: MetricRecord({"num-examples": 10}),
        }
    )
    update, _, reasons = parse_train_reply(Message(content=content, dst_node_id=0, message_type="train"))
    assert update is None and "arrived as float32 but the record says float16" in reasons[0]
    content[WIRE] = ConfigRecord({"dtype": "int8", "delta": False})
    _, _, reasons = parse_train_reply(Message(content=content, dst_node_id=0, message_type="train"))
    assert "wire dtype 'int8' is not one of" in reasons[0]


def test_a_float64_array_beyond_float32_is_rejected_by_name_not_cast_to_inf():
    import warnings

    huge = {**a_state(), "head.0.bias": np.full(32, 1e300)}
    content = RecordDict(
        {
            ARRAYS: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in huge.items()}),
            WIRE: ConfigRecord({"dtype": "float32", "delta": False}),
            METRICS: MetricRecord({"num-examples": 10}),
        }
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning from a cast: the value is refused before it
        update, _, reasons = parse_train_reply(Message(content=content, dst_node_id=0, message_type="train"))
    assert (
        update is None and "array 'head.0.bias' (float64) holds 32 finite value(s) beyond float32's range" in reasons[0]
    )
    # float64 inside float32's range is cast as before
    assert decode_array("x", np.array([1.5, -LARGEST["float32"]]), "float32").dtype == np.float32


@pytest.mark.parametrize("dtype", WIRE_DTYPES)
def test_a_delta_upload_rebuilds_the_trained_arrays_from_what_the_server_sent(dtype):
    sent = a_state(0)
    received = read_arrays(RecordDict(encode_arrays(sent, dtype)))  # what the client starts from
    rng = np.random.default_rng(5)
    trained = {k: v + (rng.standard_normal(v.shape) * 1e-4).astype(np.float32) for k, v in received.items()}
    trained["pools.inter.prompts"][3] = received["pools.inter.prompts"][3]  # an unused prompt does not move
    update, _, reasons = parse_train_reply(reply(trained, dtype, reference=received), sent=sent)
    assert reasons == [] and update.wire == f"{dtype} delta"
    for name in sent:
        change = trained[name] - received[name]
        rebuilt_change = update.state[name] - sent[name]
        # The server applies the client's change to its own float32 arrays; the cast rounds only the change.
        assert np.all(np.abs(rebuilt_change - change) <= UNIT_ROUNDOFF[dtype] * np.abs(change) + 1e-7), name
    np.testing.assert_array_equal(update.state["pools.inter.prompts"][3], sent["pools.inter.prompts"][3])


def test_a_delta_keeps_updates_that_rounding_the_weights_would_lose():
    sent = {"keys": np.full(1000, 0.05, dtype=np.float32)}
    received = read_arrays(RecordDict(encode_arrays(sent, "float16")))
    trained = {"keys": received["keys"] + np.float32(4e-6)}  # float16's spacing at 0.05 is 3.1e-5
    as_weights, _, _ = parse_train_reply(reply(trained, "float16"))
    as_delta, _, _ = parse_train_reply(reply(trained, "float16", reference=received), sent=sent)
    assert np.all(as_weights.state["keys"] == received["keys"])  # the update rounded away
    np.testing.assert_allclose(as_delta.state["keys"] - sent["keys"], 4e-6, atol=2**-24)  # float16 subnormal spacing


def test_a_delta_with_a_wrong_shape_or_without_what_was_sent_is_rejected():
    sent = a_state()
    trained = dict(sent)
    trained["pools.inter.prompts"] = sent["pools.inter.prompts"][:-1]  # cannot be a delta: sent as it is
    delta = state_delta(trained, sent)
    assert delta["pools.inter.prompts"].shape == (5, 1, 16)
    rebuilt = apply_delta(sent, delta)
    update = ClientUpdate(rebuilt, 10, {"inter": np.ones(6, dtype=np.int64)})
    assert validate_update(update, shapes(sent), ["inter"], 1e4) == [
        "array 'pools.inter.prompts' has shape (5, 1, 16), expected (6, 1, 16)"
    ]
    update, _, reasons = parse_train_reply(reply(a_state(), "float16", reference=a_state()), sent=None)
    assert update is None and "delta" in reasons[0]
