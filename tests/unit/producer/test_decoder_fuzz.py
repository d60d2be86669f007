"""The trainer's job decoder against mutated and random input.

Whatever bytes arrive as a job, the decoding path (``decode_request`` for the
Celery argument, ``decode_groups`` and then ``validate_groups``, which
``Trainer.train`` runs, for the claim-checked payload) either gives
back a fully valid job or raises its own clean rejection that says where the
problem is; nothing else escapes.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer import keys
from producer.types import ModelRef, TrainConfig, TrainRequest
from producer.validation import encode_groups, validate_groups
from tests.support.groups import make_groups
from trainer_worker.jobs import JobRejected, decode_groups, decode_request

BASE_MODEL = "/models/tiny"
JOB_ID = "0123456789abcdef0123456789abcdef"

VALID_REQUEST = msgspec.msgpack.encode(
    TrainRequest(
        job_id=JOB_ID,
        kind="train",
        model=ModelRef(project="proj", name="agent", base_model=BASE_MODEL),
        config=TrainConfig(learning_rate=1e-5, max_staleness=2),
        payload_key=keys.payload_key(JOB_ID),
        payload_bytes=100,
        submitted_at=1.0,
        keep_steps=[1, 2],
    )
)
# As producers send them (logprobs packed as float32), and as older producers did (a float list).
VALID_GROUPS = encode_groups(make_groups(2, n_trajectories=2, n_tokens=4))
FLOAT_LIST_GROUPS = msgspec.msgpack.encode(make_groups(2, n_trajectories=2, n_tokens=4))

FUZZ = settings(
    max_examples=1500,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Any value msgpack can carry, including the awkward ones: huge and negative ints, NaN, bytes, nesting.
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["..", "../x", "/etc", "a/b", "", "choice", "assistant", "train", BASE_MODEL])
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


# ----------------------------------------------------------------- mutations


def _paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    """Every location in a decoded msgpack tree, as a tuple of keys and indexes."""
    found = [prefix]
    if isinstance(tree, dict):
        for key, value in tree.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            found += _paths(value, (*prefix, index))
    return found


def _parent(tree: Any, path: tuple) -> Any:
    for key in path[:-1]:
        tree = tree[key]
    return tree


@st.composite
def structural_mutations(draw: st.DrawFn, valid: bytes) -> tuple[bytes, tuple]:
    """``valid`` decoded, one location replaced, deleted or given an extra key, re-encoded; and that location."""
    tree = msgspec.msgpack.decode(valid)
    path = draw(st.sampled_from(_paths(tree)[1:]))
    parent = _parent(tree, path)
    action = draw(st.sampled_from(["replace", "delete", "add_key"]))
    if action == "replace":
        parent[path[-1]] = draw(msgpack_values)
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent[path[-1]], dict):
        parent[path[-1]][draw(st.text(min_size=1, max_size=10))] = draw(msgpack_values)
    else:
        parent[path[-1]] = [parent[path[-1]], draw(msgpack_values)]
    return msgspec.msgpack.encode(tree), path


@st.composite
def byte_mutations(draw: st.DrawFn, valid: bytes) -> bytes:
    """``valid`` with a few bytes flipped, inserted, deleted, or cut short."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if op == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            del data[at:]
    return bytes(data)


# ------------------------------------------------------------------ verdicts


def _names_the_location(message: str, path: tuple) -> bool:
    """The error points at the mutated field: one of its keys (``base_model`` or ``base model``) or indexes."""
    for part in path:
        if isinstance(part, str) and part and (part in message or part.replace("_", " ") in message):
            return True
        if isinstance(part, int) and f"[{part}]" in message:
            return True
    return False


def _request_verdict(raw: bytes) -> str | None:
    """``None`` if ``raw`` decodes to a valid job for this worker, else the rejection's message."""
    try:
        request = decode_request(raw, base_model=BASE_MODEL)
    except JobRejected as exc:
        assert str(exc)
        return str(exc)
    request.model.validate()
    assert request.model.base_model == BASE_MODEL
    assert request.kind in ("train", "register", "delete_checkpoints")
    return None


def _groups_verdict(raw: bytes) -> str | None:
    """``None`` if ``raw`` decodes to valid groups, else the ``ValueError``'s message.

    The worker's two checks in turn: the schema as it decodes, the rest in ``Trainer.train``.
    """
    try:
        groups = decode_groups(raw)
        validate_groups(groups)
    except ValueError as exc:
        assert str(exc)
        return str(exc)
    assert all(math.isfinite(t.reward) for g in groups for t in g.trajectories)
    return None


# --------------------------------------------------------------------- tests


def test_the_valid_payloads_decode() -> None:
    assert _request_verdict(VALID_REQUEST) is None
    assert _groups_verdict(VALID_GROUPS) is None
    assert _groups_verdict(FLOAT_LIST_GROUPS) is None


@FUZZ
@given(structural_mutations(VALID_REQUEST))
def test_a_mutated_request_is_valid_or_rejected_naming_the_field(case: tuple[bytes, tuple]) -> None:
    raw, path = case
    message = _request_verdict(raw)
    assert message is None or _names_the_location(message, path), (path, message)


@FUZZ
@given(structural_mutations(VALID_GROUPS))
def test_mutated_groups_are_valid_or_rejected_naming_the_field(case: tuple[bytes, tuple]) -> None:
    raw, path = case
    message = _groups_verdict(raw)
    assert message is None or _names_the_location(message, path), (path, message)


@FUZZ
@given(byte_mutations(VALID_REQUEST))
def test_a_request_with_corrupted_bytes_is_valid_or_rejected(raw: bytes) -> None:
    _request_verdict(raw)


@FUZZ
@given(byte_mutations(VALID_GROUPS))
def test_groups_with_corrupted_bytes_are_valid_or_rejected(raw: bytes) -> None:
    _groups_verdict(raw)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_are_rejected_cleanly(raw: bytes) -> None:
    _request_verdict(raw)
    _groups_verdict(raw)


@pytest.mark.parametrize("name", ["../x", "..", "a/b", "/abs", ".hidden", "x" * 65])
def test_a_raw_request_whose_name_would_escape_the_checkpoint_root_is_rejected(name: str) -> None:
    tree = msgspec.msgpack.decode(VALID_REQUEST)
    tree["model"]["name"] = name
    with pytest.raises(JobRejected, match="invalid model name"):
        decode_request(msgspec.msgpack.encode(tree), base_model=BASE_MODEL)


def test_a_request_over_the_size_limit_is_rejected_before_decoding() -> None:
    with pytest.raises(JobRejected, match="over the limit of 64"):
        decode_request(VALID_REQUEST + b"\x00" * 64, base_model=BASE_MODEL, max_bytes=64)
