"""The trainq command line against a real Redis (status, jobs) and a real history file (plot)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
import redis

from producer import keys
from producer.cli import main
from producer.history import write_log


def test_help_is_quick_and_imports_no_torch() -> None:
    code = "import sys, producer.cli; producer.cli.build_parser(); assert 'torch' not in sys.modules"
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", code], check=True)
    assert time.monotonic() - started < 10  # generous: the machine may be busy; ~0.4 s idle


def test_status_and_jobs_read_the_stack_from_redis(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    client = redis.Redis.from_url(redis_url)
    queue = keys.queue_name("cli-test/base")
    now = time.time()
    client.hset(keys.model_key("cliproj", "agent"), mapping={"base_model": "cli-test/base", "step": 7, "updated_at": now})
    for host, pid, ranks in (("trainer-cli@test", 4242, 1), ("standby-cli@test", 4343, 16), ("gone-cli@test", 4444, 1)):
        client.hset(keys.WORKERS_KEY, host, msgspec.msgpack.encode(
            {"base_model": "cli-test/base", "queue": queue, "pid": pid, "started_at": now - 30, "ready_at": now - 20,
             "worker_id": f"{host}:{pid}", "heartbeat_s": 5.0, "ranks": ranks, "nodes": 2 if ranks > 1 else 1}
        ))
        client.hset(keys.WORKER_HEARTBEATS_KEY, host, now - (3600 if host.startswith("gone") else 1))
    client.set(keys.queue_leader_key(queue), "7 trainer-cli@test:4242")
    client.hset(keys.job_key("clijob1"), mapping={
        "status": "failed", "kind": "train", "model": "cliproj/agent", "queue": queue, "submitted_at": now - 5,
        "started_at": now - 4, "finished_at": now - 3, "error_type": "ValueError", "error": "groups[0]: bad",
    })
    client.zadd(keys.queue_jobs_key(queue), {"clijob1": now - 5})
    client.rpush(queue, b"waiting-message")
    try:
        assert main(["status", "--redis-url", redis_url]) == 0
        out = capsys.readouterr().out
        assert queue in out and "trainer-cli@test" in out and "ready" in out
        lines = out.splitlines()
        assert any(queue in line and "trainer-cli@test" in line and " 7 " in line for line in lines), out
        for host, role in (("trainer-cli@test", "leader"), ("standby-cli@test", "standby"), ("gone-cli@test", "dead")):
            assert any(line.startswith(host) and f" {role} " in line for line in lines), out
        assert "in process" in out and "16 ranks on 2 nodes" in out
        assert "cliproj/agent" in out and " 7 " in out
        assert main(["jobs", "--redis-url", redis_url, "--queue", queue]) == 0
        out = capsys.readouterr().out
        assert "clijob1" in out and "failed" in out and "ValueError: groups[0]: bad" in out
    finally:
        client.delete(keys.model_key("cliproj", "agent"), keys.job_key("clijob1"), keys.queue_jobs_key(queue), queue)
        client.delete(keys.queue_leader_key(queue))
        for host in ("trainer-cli@test", "standby-cli@test", "gone-cli@test"):
            client.hdel(keys.WORKERS_KEY, host)
            client.hdel(keys.WORKER_HEARTBEATS_KEY, host)
        client.close()


def test_plot_writes_a_png_of_reward_and_loss(tmp_path: Path) -> None:
    for step in range(1, 4):
        write_log(tmp_path, None, split="train", step=step, metrics={"reward": step / 4, "loss": 1 / step})
    write_log(tmp_path, None, split="val", step=3, metrics={"reward": 0.5})

    assert main(["plot", str(tmp_path), "-o", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_history_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no history"):
        main(["plot", str(tmp_path)])
