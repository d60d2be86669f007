"""The inference worker end to end on the tiny model: events in, ``name@step`` servable out.

One worker serves the whole module (vLLM takes 20-70 s to start on 2 CPU
cores, mostly imports in its three processes); a second replica and a vLLM
restart are the two other starts. Tests run in file order: the replica first,
so both vLLMs start together, and the restart last, as it takes the shared
vLLM down.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import statistics
import time
from collections.abc import Callable

import httpx
import openai
import pytest

from producer.types import Choice
from tests.integration.inference.worker import API_KEY, InferenceWorker

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(240)]

MESSAGES = [{"role": "user", "content": "Answer with yes, no or maybe."}]


def client_of(worker: InferenceWorker, api_key: str = API_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{worker.base_url}/v1", api_key=api_key, max_retries=0)


async def sample(client: openai.AsyncOpenAI, model: str, max_tokens: int = 8) -> Choice:
    completion = await client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=max_tokens,
        temperature=0.0,
        logprobs=True,
        extra_body={"return_tokens_as_token_ids": True},
    )
    return Choice.from_openai(completion)


@pytest.mark.timeout(480)
async def test_late_replica_serves_every_retained_checkpoint(worker, start_worker, make_adapter, publish):
    """Runs first: the replica's vLLM starts while the main worker's does (each start is mostly imports)."""
    for step in range(4):
        publish("saved", "beta", step, make_adapter("beta", step, seed=40 + step))
    # What the replay must skip: a malformed entry, a vanished folder, another base model's checkpoint.
    publish("saved", "beta", 4, "/nonexistent/0004", project="")
    gone = make_adapter("beta", 5, seed=45)
    publish("saved", "beta", 5, gone)
    shutil.rmtree(gone)
    publish("saved", "beta", 6, make_adapter("beta", 6, seed=46), base_model="some/other-model")

    replica = start_worker()
    # Two vLLMs start at once on two cores: allow for a slow machine.
    ids = await replica.wait_models({f"beta@{step}" for step in range(4)}, timeout=360)

    assert not {"beta@4", "beta@5", "beta@6"} & ids
    async with client_of(replica) as client:
        choice = await sample(client, "beta@3", max_tokens=2)
    assert choice.sampled_step == 3
    assert replica.metrics()[("trainq_checkpoint_events_total", (("kind", "invalid"),))] == 1.0
    await replica.aclose()


async def test_saved_event_makes_name_at_step_servable_with_token_ids(worker, make_adapter, publish):
    for step, seed in ((0, 10), (1, 11)):
        publish("saved", "alpha", step, make_adapter("alpha", step, seed=seed))

    await worker.wait_models({"alpha@0", "alpha@1"})

    async with client_of(worker) as client:
        first, second = await sample(client, "alpha@0"), await sample(client, "alpha@1")
    for choice, step in ((first, 0), (second, 1)):
        assert len(choice.token_ids) == len(choice.logprobs) > 0
        assert all(lp <= 0.0 for lp in choice.logprobs)
        assert choice.sampled_step == step
    assert (first.token_ids, first.logprobs) != (second.token_ids, second.logprobs)


async def test_unknown_name_at_step_is_a_404(worker):
    await worker.wait_ready()
    async with client_of(worker) as client:
        with pytest.raises(openai.NotFoundError, match="alpha@99"):
            await sample(client, "alpha@99")


async def test_requests_without_the_api_key_are_refused(worker):
    await worker.wait_ready()
    async with httpx.AsyncClient(base_url=worker.base_url) as anonymous:
        assert (await anonymous.get("/v1/models")).status_code == 401
    async with client_of(worker, api_key="wrong-key") as client:
        with pytest.raises(openai.AuthenticationError):
            await sample(client, "any-model")


async def test_checkpoint_to_servable_latency_is_recorded(worker, make_adapter, publish):
    """Each event is published once the previous one is servable, so each sum delta is one latency."""
    paths = [make_adapter("delta", step, seed=20 + step) for step in range(5)]
    await worker.wait_ready()  # else the first latency is vLLM's start
    key = ("trainq_checkpoint_to_servable_seconds", (("model", "inftest/delta"),))
    latencies = []
    for step, path in enumerate(paths):
        before = worker.metrics()
        publish("saved", "delta", step, path, created_at=time.time())
        await worker.wait_models({f"delta@{step}"})
        latencies.append(await _next_observation(worker, key, before))
    print(f"checkpoint-to-servable latencies (s): {[round(x, 3) for x in latencies]}, "
          f"median {statistics.median(latencies):.3f}")
    assert all(0.0 < latency < 30.0 for latency in latencies)
    metrics = worker.metrics()
    assert metrics[("trainq_adapters_loaded", ())] >= 5
    assert metrics[("trainq_vllm_up", ())] == 1.0
    assert metrics[("trainq_checkpoint_events_total", (("kind", "saved"),))] >= 5


async def _next_observation(worker: InferenceWorker, key, before, timeout: float = 10.0) -> float:
    count_key = (key[0] + "_count", key[1])
    sum_key = (key[0] + "_sum", key[1])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = worker.metrics()
        if now.get(count_key, 0.0) > before.get(count_key, 0.0):
            return now[sum_key] - before.get(sum_key, 0.0)
        await asyncio.sleep(0.05)
    raise TimeoutError(f"no new {key} observation\n{worker.log_tail()}")


async def test_deleted_event_unloads_the_adapter(worker, make_adapter, publish):
    path = make_adapter("eps", 0, seed=30)
    publish("saved", "eps", 0, path)
    await worker.wait_models({"eps@0"})

    publish("deleted", "eps", 0, path)
    await worker.wait_models(set(), absent={"eps@0"}, timeout=30)

    async with client_of(worker) as client:
        with pytest.raises(openai.NotFoundError):
            await sample(client, "eps@0")


@pytest.mark.chaos
async def test_killed_vllm_is_restarted_and_its_adapters_reloaded(worker, make_adapter, publish):
    publish("saved", "zeta", 0, make_adapter("zeta", 0, seed=50))
    await worker.wait_models({"zeta@0"})
    loaded = await worker.model_ids()
    async with client_of(worker) as client:
        before = await sample(client, "zeta@0")
    old_pid = worker.vllm_pid()
    assert old_pid is not None

    os.kill(old_pid, signal.SIGKILL)
    await _wait(lambda: worker.metrics()[("trainq_vllm_up", ())] == 0.0, timeout=15)
    await worker.wait_models(loaded, timeout=180)

    assert worker.vllm_pid() not in (None, old_pid)
    metrics = worker.metrics()
    assert metrics[("trainq_vllm_restarts_total", ())] == 1.0
    assert metrics[("trainq_vllm_up", ())] == 1.0
    async with client_of(worker) as client:
        after = await sample(client, "zeta@0")
    assert after.token_ids == before.token_ids  # same adapter, greedy: same answer


async def _wait(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.05)

