"""Decoding checkpoint stream entries (all fields strings) into ``CheckpointEvent``."""

from __future__ import annotations

import pytest

from inference_worker.watcher import decode_event

ENTRY = {
    "kind": "saved",
    "project": "proj",
    "model": "agent",
    "step": "7",
    "path": "/ckpt/proj/agent/checkpoints/0007",
    "job_id": "j1",
    "base_model": "trainq/smollm2-135m-instruct",
    "created_at": "1795676526.25",
}


def test_string_fields_are_converted_to_their_types():
    event = decode_event(ENTRY)
    assert (event.step, event.created_at, event.inference_name) == (7, 1795676526.25, "agent@7")


def test_optional_fields_may_be_missing():
    event = decode_event({k: ENTRY[k] for k in ("kind", "project", "model", "step", "path")})
    assert (event.base_model, event.job_id) == ("", "")


@pytest.mark.parametrize(
    "change",
    [
        {"kind": "renamed"},
        {"step": "seven"},
        {"step": "-1"},
        {"model": "../etc"},
        {"project": ""},
        {"created_at": "yesterday"},
    ],
)
def test_malformed_entries_are_a_value_error(change):
    with pytest.raises(ValueError):
        decode_event({**ENTRY, **change})


def test_a_missing_field_is_named():
    with pytest.raises(ValueError, match="model"):
        decode_event({k: v for k, v in ENTRY.items() if k != "model"})
