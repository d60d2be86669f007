"""How a train job's groups travel: ``encode_groups`` and the worker's typed decoder."""

from __future__ import annotations

import array
import struct

import msgspec
import pytest

from producer.types import Choice, TrajectoryGroup
from producer.validation import encode_groups
from tests.support.groups import make_groups
from trainer_worker.jobs import decode_groups


def first_choice(groups: list[TrajectoryGroup]) -> Choice:
    return groups[0].trajectories[0].choices()[0]


def as_float32(values: list[float]) -> list[float]:
    return [struct.unpack("<f", struct.pack("<f", v))[0] for v in values]


def test_logprobs_travel_as_little_endian_float32_and_come_back_as_floats() -> None:
    groups = make_groups(2, n_trajectories=3, n_tokens=5)
    sent = first_choice(groups).logprobs

    payload = encode_groups(groups)

    # The raw tree: group -> trajectories -> trajectory -> messages_and_choices -> the tagged choice.
    wire_choice = msgspec.msgpack.decode(payload)[0][0][0][0][-1]
    assert wire_choice[0] == "choice"
    assert wire_choice[2] == struct.pack("<5f", *sent)
    received = first_choice(decode_groups(payload)).logprobs
    # Decoded as an array("f"): the floats never become Python objects on the way to a tensor.
    assert isinstance(received, array.array) and received.typecode == "f"
    assert received.tolist() == as_float32(sent)
    assert list(received) == pytest.approx(sent, rel=1e-6)


def test_encoding_leaves_the_callers_records_alone() -> None:
    groups = make_groups(1, n_trajectories=2, n_tokens=4)
    choice = first_choice(groups)
    logprobs = choice.logprobs

    encode_groups(groups)

    assert first_choice(groups) is choice and choice.logprobs is logprobs and type(logprobs) is list


def test_float32_exact_logprobs_round_trip_unchanged() -> None:
    # vLLM's logprobs are float32 values: they arrive exactly as sampled.
    groups = make_groups(1, n_trajectories=2, n_tokens=6)
    for trajectory in groups[0].trajectories:
        choice = trajectory.choices()[0]
        choice.logprobs = as_float32(choice.logprobs)

    decoded = decode_groups(encode_groups(groups))

    assert [c.logprobs.tolist() for t in decoded[0].trajectories for c in t.choices()] == [
        c.logprobs for t in groups[0].trajectories for c in t.choices()
    ]
    assert encode_groups(decoded) == encode_groups(groups)  # and they go on as they came


def test_packed_logprobs_are_smaller_than_msgpack_doubles() -> None:
    groups = make_groups(4, n_trajectories=4, n_tokens=200)
    n_logprobs = sum(len(c.logprobs) for g in groups for t in g.trajectories for c in t.choices())

    saved = len(msgspec.msgpack.encode(groups)) - len(encode_groups(groups))

    # 9 bytes a double against 4 a float32, less one bin header per choice.
    assert saved >= 5 * n_logprobs - 8 * 16


def test_a_payload_with_float_lists_still_decodes() -> None:
    groups = make_groups(1, n_trajectories=2, n_tokens=4)

    decoded = decode_groups(msgspec.msgpack.encode(groups))

    assert first_choice(decoded).logprobs == first_choice(groups).logprobs


def test_a_choice_accepts_packed_logprobs() -> None:
    choice = Choice(token_ids=[1, 2], logprobs=struct.pack("<2f", -0.5, -2.0))

    assert choice.logprobs == array.array("f", [-0.5, -2.0])


def test_packed_logprobs_of_a_broken_length_are_refused_naming_where() -> None:
    with pytest.raises(ValueError, match="multiple of 4 bytes, got 7"):
        Choice(token_ids=[1, 2], logprobs=b"\x00" * 7)
    tree = msgspec.msgpack.decode(encode_groups(make_groups(1, n_trajectories=1, n_tokens=2)))
    tree[0][0][0][0][-1][2] = b"\x00" * 7

    with pytest.raises(ValueError, match=r"multiple of 4 bytes, got 7.*\$\[0\]\[0\]\[0\]\[0\]\[2\]"):
        decode_groups(msgspec.msgpack.encode(tree))



def test_a_logprob_beyond_float32_is_refused_naming_it() -> None:
    groups = make_groups(2, n_trajectories=2, n_tokens=3)
    groups[1].trajectories[1].messages_and_choices[-1].logprobs[1] = -1e39  # finite as a double only

    with pytest.raises(ValueError, match=r"groups\[1\]\.trajectories\[1\]\.messages_and_choices\[2\]\.logprobs: cannot be sent as float32"):
        encode_groups(groups)
