"""The pieces of multi-rank training that need no process group: shares, frames, settings, layouts."""

import socket
import threading

import msgspec
import pytest
import torch

from producer.types import ModelRef, TrainConfig
from trainer_worker.core.fsdp import optimizer_by_index, optimizer_by_name
from trainer_worker.core.packing import split_by_tokens
from trainer_worker.core.world import Phase
from trainer_worker.group.client import _rebuilt
from trainer_worker.group.launch import group_spec, torchrun_command
from trainer_worker.group.protocol import GroupCall, GroupSpec, Order, recv_frame, send_frame
from trainer_worker.settings import TrainerSettings


def test_split_by_tokens_deals_every_sequence_once_and_balances_tokens():
    lengths = [700, 30, 500, 20, 480, 90, 100, 60, 10, 300]
    shares = split_by_tokens(lengths, 3)
    assert sorted(i for share in shares for i in share) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= max(lengths[i] for share in shares for i in share[:1]) // 2 + 60
    assert loads == [760, 750, 780]
    assert split_by_tokens(lengths, 3) == shares  # every rank computes the same shares


def test_split_by_tokens_with_more_ranks_than_sequences_leaves_shares_empty():
    assert split_by_tokens([5, 9], 4) == [[1], [0], [], []]
    assert split_by_tokens([], 2) == [[], []]
    with pytest.raises(ValueError, match="parts must be >= 1"):
        split_by_tokens([1], 0)


def test_frames_round_trip_and_a_closed_peer_reads_as_none():
    left, right = socket.socketpair()
    big = bytes(range(256)) * 40_000  # 10 MB: more than one socket buffer
    sender = threading.Thread(target=lambda: (send_frame(left, b""), send_frame(left, big), left.close()))
    sender.start()
    with right:
        assert recv_frame(right) == b""
        assert recv_frame(right) == big
        sender.join()
        assert recv_frame(right) is None


def test_a_frame_cut_short_is_a_connection_error():
    left, right = socket.socketpair()
    left.sendall((100).to_bytes(8, "big") + b"only ten b")
    left.close()
    with right, pytest.raises(ConnectionError, match="closed 10 bytes into a 100-byte read"):
        recv_frame(right)


def test_a_job_order_carries_the_call_as_it_came():
    call = GroupCall(kind="train", model=ModelRef(project="p", name="m", base_model="b"), job_id="j1",
                     config=TrainConfig(learning_rate=1e-3, beta=0.1), payload=b"\x91\x80")
    raw = msgspec.msgpack.encode(call)
    order = msgspec.msgpack.decode(
        msgspec.msgpack.encode(Order(kind="job", call=raw, phase=Phase(latest=3, load=True))), type=Order
    )
    assert order.phase == Phase(latest=3, load=True, fresh_optimizer=False)
    assert msgspec.msgpack.decode(order.call, type=GroupCall) == call


def settings(**overrides):
    return TrainerSettings(**{"base_model": "org/model", "checkpoint_root": "/ckpt", **overrides})


def test_one_node_meets_on_a_free_local_port_and_several_at_node_0():
    spec = group_spec(settings(nproc_per_node=2), "/models/m", socket_path="/tmp/s.sock")
    one = torchrun_command(spec, nproc_per_node=2)
    assert "--rdzv-endpoint=localhost:0" in one and "--nproc-per-node=2" in one and "--max-restarts=0" in one
    assert msgspec.json.decode(one[-1], type=GroupSpec) == spec
    several = torchrun_command(spec, nproc_per_node=8, nnodes=3, node_rank=2, rdzv_endpoint="node0:29400")
    assert "--rdzv-backend=static" in several and "--rdzv-endpoint=node0:29400" in several
    assert "--node-rank=2" in several and "--nnodes=3" in several


def test_ranks_compare_only_what_every_node_shares():
    here = group_spec(settings(nproc_per_node=2), "/models/m", socket_path="/tmp/s.sock")
    there = group_spec(settings(nproc_per_node=2, checkpoint_root="/elsewhere"), "/other/path")
    assert here.shared() == there.shared()
    assert here.shared() != group_spec(settings(nproc_per_node=2, seed=1), "/models/m").shared()


def test_group_settings_are_checked_at_start():
    assert not settings().distributed
    assert settings(nproc_per_node=2).distributed
    assert settings(nnodes=2, rdzv_endpoint="h:29400").distributed
    with pytest.raises(ValueError, match="--nnodes 2 needs --rdzv-endpoint"):
        settings(nnodes=2)
    with pytest.raises(ValueError, match="--node-rank 2 must be below --nnodes 2"):
        settings(nnodes=2, node_rank=2, rdzv_endpoint="h:1")
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        settings(rdzv_endpoint="no-port")


def test_the_leaders_errors_keep_their_built_in_type():
    error = _rebuilt("ValueError", "groups[0]: bad")
    assert type(error) is ValueError and str(error) == "groups[0]: bad"
    assert type(_rebuilt("FileExistsError", "x")) is FileExistsError
    other = _rebuilt("OutOfMemoryError", "CUDA out of memory")
    assert type(other) is RuntimeError and str(other) == "OutOfMemoryError: CUDA out of memory"
    assert type(_rebuilt("SystemExit", "x")) is RuntimeError  # not an Exception: never raised as itself


def test_optimizer_layouts_convert_both_ways():
    names = ["a.lora_A.default.weight", "a.lora_B.default.weight", "b.lora_A.default.weight"]
    params = [torch.nn.Parameter(torch.ones(2)) for _ in names]
    optimizer = torch.optim.AdamW(params, lr=0.1)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    indexed = optimizer.state_dict()
    named = optimizer_by_name(indexed, names)
    assert list(named["state"]) == names and named["param_groups"][0]["params"] == names
    back = optimizer_by_index({"state": dict(reversed(named["state"].items())),
                               "param_groups": named["param_groups"]}, names)
    assert list(back["state"]) == [0, 1, 2]
    assert back["param_groups"] == indexed["param_groups"]
    for i in range(3):
        for key, value in indexed["state"][i].items():
            assert torch.equal(back["state"][i][key], value)


def test_the_celery_child_of_a_group_never_loads_torch():
    import subprocess
    import sys

    code = ("import sys, trainer_worker.app, trainer_worker.jobs, trainer_worker.group.client; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
