"""``--compile-lora`` end to end: a compiled vLLM applies each adapter as the eager one does, also in mixed batches.

Compiled and eager kernels round differently, so answers are compared by the
logprob of the first answer token to a set of prompts: the compiled server
must sit much closer to the eager server's logprobs for the same adapter than
the two adapters sit to each other. A graph that froze the adapter mapping,
or skipped LoRA, would be as far off as another adapter is.
"""

from __future__ import annotations

import asyncio
import statistics

import openai
import pytest

from tests.integration.inference.worker import API_KEY, InferenceWorker

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(600)]

QUESTIONS = ("Is the sky green?", "Can fish fly?", "Is seven odd?", "Do cats bark?", "Is ice cold?", "Can you swim?")
ADAPTERS = ("gamma@0", "gamma@1")


async def first_logprobs(worker: InferenceWorker, model: str) -> list[float]:
    """The greedy first answer token's logprob for each question, all questions in flight at once."""
    async with openai.AsyncOpenAI(base_url=f"{worker.base_url}/v1", api_key=API_KEY, max_retries=0) as client:
        completions = await asyncio.gather(*(
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}], max_tokens=1,
                                           temperature=0.0, logprobs=True)
            for q in QUESTIONS
        ))
    return [c.choices[0].logprobs.content[0].logprob for c in completions]


def distance(a: list[float], b: list[float]) -> float:
    return statistics.mean(abs(x - y) for x, y in zip(a, b, strict=True))


async def test_a_compiled_server_applies_each_adapter_as_the_eager_one_does(start_worker, make_adapter, publish):
    for step, seed in ((0, 60), (1, 61)):
        publish("saved", "gamma", step, make_adapter("gamma", step, seed=seed))
    eager = start_worker()
    compiled = start_worker({"--compile-lora": None})
    for worker in (eager, compiled):
        await worker.wait_models(set(ADAPTERS), timeout=480)  # two vLLMs, one compiling, on two cores

    expected = {name: await first_logprobs(eager, name) for name in ADAPTERS}
    apart = distance(*expected.values())
    alone = {name: await first_logprobs(compiled, name) for name in ADAPTERS}
    # Both adapters' requests in flight at once: the compiled graph reads each step's mapping.
    together = dict(zip(ADAPTERS, await asyncio.gather(*(first_logprobs(compiled, n) for n in ADAPTERS)), strict=True))

    assert apart > 0.05, expected  # the adapters answer differently at all
    for name in ADAPTERS:
        assert distance(alone[name], expected[name]) < 0.25 * apart, (name, apart, alone, expected)
        assert distance(together[name], expected[name]) < 0.25 * apart, (name, apart, together, expected)
    assert "compiles the model with LoRA on" in compiled.log_path.read_text()
