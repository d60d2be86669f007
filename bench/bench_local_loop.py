"""The yes/no/maybe loop in one process and through the services, with where each step's seconds go.

In process: sampling is ``transformers`` ``generate`` on the trainer's own model
(the LoRA adapter as trained so far), training is
``trainer_worker.core.trainer.Trainer`` called directly: no Redis, no Celery, no
vLLM, no checkpoint reload by a second process. Through the stack (``--with-stack``):
the same loop through ``LocalBackend`` (Redis, the Celery trainer worker and
vLLM, as ``trainq demo`` runs it), serial, then pipelined (step n+1 sampled while
step n trains, ``producer.pipeline``).

    python bench/bench_local_loop.py [--steps 5] [--base-model trainq/smollm2-135m-instruct]
    python bench/bench_local_loop.py --with-stack   # then the stack's loops, and the ratios

Prints, for each loop, seconds per step by phase: the train call's own parts
(the trainer's prepare, load, forward and backward, optimizer, checkpoint save;
through the stack also submit, queue and worker, served, log), then the ratios
of the stack to in process over the steps that trained every group in both
(after the first): once the reward saturates, steps train less, and would
favour whichever loop learned faster. Exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field

from _common import machine_line, print_table, verdict

from tests.support.examples import load_example
from trainer_worker.settings import CPU_MICROBATCH_TOKENS


def sample_group(trainer, example, prompt: str, group_size: int, max_tokens: int, temperature: float, step: int):
    """``group_size`` completions of one prompt, as ``Trajectory`` s with the sampler's token ids and logprobs."""
    import torch

    from producer.types import Choice, ChoiceMessage, Trajectory

    tokenizer = trainer.tokenizer
    model = trainer._loaded.model  # the trainer's live model: base plus the current adapter
    messages = [{"role": "system", "content": example.SYSTEM_PROMPT}, *example.FEW_SHOT, {"role": "user", "content": prompt}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    inputs = {k: v.to(trainer._loaded.device) for k, v in inputs.items()}
    prompt_len = inputs["input_ids"].shape[1]
    model.eval()
    with torch.no_grad():
        out = model.generate(
            **inputs,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_tokens,
            num_return_sequences=group_size,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
        )
    # Logprobs under the sampling distribution (temperature applied), as vLLM reports them.
    scores = torch.stack(out.scores, dim=1).float()  # (G, T, V)
    logprobs = torch.log_softmax(scores, dim=-1)
    sampled = out.sequences[:, prompt_len:]  # (G, T)
    token_logprobs = logprobs.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)  # (G, T)
    eos = tokenizer.eos_token_id
    trajectories = []
    for g in range(group_size):
        ids = sampled[g].tolist()
        n = ids.index(eos) + 1 if eos in ids else len(ids)  # keep the end token, drop the padding after it
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        choice = Choice(
            token_ids=ids[:n],
            logprobs=[min(0.0, float(lp)) for lp in token_logprobs[g, :n]],
            message=ChoiceMessage(content=text),
            finish_reason="stop" if n < len(ids) or (ids and ids[-1] == eos) else "length",
            sampled_step=step,
        )
        trajectories.append(Trajectory([*messages, choice], reward=example.reward_for(text)))
    return trajectories


def main(argv: list[str] | None = None) -> int:
    example = load_example("yes_no_maybe")
    defaults = example.Config()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--base-model", default=defaults.base_model)
    parser.add_argument("--groups-per-step", type=int, default=defaults.groups_per_step)
    parser.add_argument("--group-size", type=int, default=defaults.group_size)
    # Not the demo's 1e-3: at that rate the reward saturates by step 2, after which steps train fewer
    # groups (equal rewards carry no advantage), at different steps in the two loops. At 1e-5 every
    # step of both trains every group: the same work, so the step times compare.
    parser.add_argument("--learning-rate", type=float, default=1e-5,
                        help="default 1e-5, so that every step trains every group in both loops")
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens-per-microbatch", type=int, default=CPU_MICROBATCH_TOKENS,
                        help="as the trainer worker uses on CPU")
    parser.add_argument("--with-stack", action="store_true",
                        help="then run the loop through LocalBackend, serial and pipelined, and print the ratios")
    args = parser.parse_args(argv)
    print(machine_line())
    in_process = run_in_process(example, args)
    print_steps("in process (generate + the training core)", in_process)
    if args.with_stack:
        serial, pipelined = asyncio.run(run_through_stack(example, args))
        print_steps("through LocalBackend, serial (Redis, Celery trainer worker, vLLM)", serial)
        print_steps("through LocalBackend, pipelined (step n+1 sampled while step n trains)", pipelined)
        compare(in_process, serial, pipelined, args.groups_per_step)
    return 0


# The train call's phases, in the order they happen.
TRAINER_PHASES = ("time_prepare_s", "time_load_s", "time_forward_backward_s", "time_optimizer_s",
                  "checkpoint_save_s")
# The work a train call did (its tokens, prompts included): equal in both loops for a like-for-like ratio.
WORK = ("num_sequence_tokens",)
STACK_PHASES = ("submit_s", "queue_s", "worker_s", "served_s", "log_s")


@dataclass(frozen=True)
class StepTime:
    step: int
    reward: float
    sample_s: float
    train_s: float
    """The train call: in process ``Trainer.train``; through the stack submit to served, plus ``model.log``;
    pipelined, the seconds between two steps less the sampling that did not overlap (see ``run_pipelined``)."""
    trainable_groups: int
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds by phase (``TRAINER_PHASES``, and through the stack ``STACK_PHASES``)."""

    @property
    def total_s(self) -> float:
        return self.sample_s + self.train_s


def print_steps(title: str, steps: list[StepTime]) -> None:
    print(f"\n{title}")
    names = [n for n in (*STACK_PHASES, *TRAINER_PHASES, *WORK) if any(n in s.phases for s in steps)]
    header = ["step", "reward", "groups", "sample s", "train s", "total s", *[n.removesuffix("_s") for n in names]]
    rows = [[s.step, f"{s.reward:.3f}", s.trainable_groups, f"{s.sample_s:.2f}", f"{s.train_s:.2f}",
             f"{s.total_s:.2f}", *[f"{s.phases.get(n, 0.0):.2f}" for n in names]] for s in steps]
    print_table(header, rows)


def like_for_like(steps: list[StepTime], groups_per_step: int) -> list[StepTime]:
    """Steps after the first (warm-up) that trained every group: the same work in both loops.

    Once the reward saturates a group's rewards are all equal, it has no
    advantage, and the step trains less or nothing; such steps would favour
    whichever loop learned faster.
    """
    later = steps[1:] or steps
    return [s for s in later if s.trainable_groups == groups_per_step] or later


def compare(in_process: list[StepTime], serial: list[StepTime], pipelined: list[StepTime], groups_per_step: int) -> None:
    a, b = like_for_like(in_process, groups_per_step), like_for_like(serial, groups_per_step)
    p = pipelined[1:] or pipelined

    def mean(steps: list[StepTime], phase: str) -> float:
        values = [s.phases.get(phase, 0.0) if phase in s.phases else getattr(s, phase, 0.0) for s in steps]
        return sum(values) / len(values)

    print(f"\nmean seconds per step over steps {[s.step for s in a]} in process and {[s.step for s in b]} "
          f"through the stack (after the first, every group trained):")
    if any(s.trainable_groups != groups_per_step for s in a + b):
        print("  (a loop had no such step: comparing all steps after the first, which did different work; "
              "rerun with a lower --learning-rate or more --steps)")
    rows = [[phase.removesuffix("_s"), f"{mean(a, phase):.2f}", f"{mean(b, phase):.2f}",
             f"{mean(b, phase) / mean(a, phase):.2f}x" if mean(a, phase) else "-"]
            for phase in ("sample_s", "train_s", "total_s", *TRAINER_PHASES, *WORK)]
    rows += [[phase.removesuffix("_s"), "-", f"{mean(b, phase):.2f}", "-"] for phase in STACK_PHASES]
    print_table(["phase", "in process", "stack", "ratio"], rows)
    train_ratio = mean(b, "train_s") / mean(a, "train_s")
    step_ratio = mean(b, "total_s") / mean(a, "total_s")
    print(f"train call through the stack / in process: {train_ratio:.2f}x (target <= 1.10) -> "
          f"{verdict(train_ratio <= 1.10)}")
    print(f"whole step, serial through the stack / in process: {step_ratio:.2f}x (target <= 1.00) -> "
          f"{verdict(step_ratio <= 1.00)}")
    serial_s, pipelined_s = mean(serial[1:] or serial, "total_s"), mean(p, "total_s")
    print(f"seconds per step through the stack after the first: serial {serial_s:.2f}, pipelined {pipelined_s:.2f} "
          f"({serial_s / pipelined_s:.2f}x the steps per second)")


def run_in_process(example, args: argparse.Namespace) -> list[StepTime]:  # noqa: ANN001
    """The loop with ``generate`` and the training core in this process."""

    import torch

    from producer.base_models import resolve_base_model
    from producer.types import ModelRef, TrainConfig, TrajectoryGroup
    from trainer_worker.core.trainer import Trainer

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    prompts = example.build_prompts()
    started = time.perf_counter()
    path = resolve_base_model(args.base_model)
    with tempfile.TemporaryDirectory() as root:
        trainer = Trainer(path, root, device="cpu", max_tokens_per_microbatch=args.max_tokens_per_microbatch)
        setup_s = time.perf_counter() - started
        ref = ModelRef(project="bench", name="yes-no-maybe", base_model=args.base_model)
        trainer.register(ref)
        config = TrainConfig(learning_rate=args.learning_rate)
        rows = []
        for step in range(args.steps):
            t0 = time.perf_counter()
            groups = [
                TrajectoryGroup(sample_group(trainer, example, p, args.group_size, args.max_tokens, args.temperature, step))
                for p in rng.sample(prompts, args.groups_per_step)
            ]
            t1 = time.perf_counter()
            outcome = trainer.train(uuid.uuid4().hex, ref, config, groups)
            t2 = time.perf_counter()
            rewards = [t.reward for g in groups for t in g.trajectories]
            trainable = int(outcome.metrics.get("num_groups_trainable", 0))
            rows.append(StepTime(step, sum(rewards) / len(rewards), t1 - t0, t2 - t1, trainable,
                                 _trainer_phases(outcome.metrics)))
            print(f"step {step}: reward {rows[-1].reward:.3f} sample {t1 - t0:.1f} s train {t2 - t1:.1f} s", flush=True)
    print(f"in-process loop: {torch.get_num_threads()} torch threads, setup {setup_s:.1f} s, "
          f"{args.groups_per_step}x{args.group_size} rollouts of <= {args.max_tokens} tokens per step")
    return rows


def _trainer_phases(metrics: dict[str, float]) -> dict[str, float]:
    return {name: metrics[name] for name in (*TRAINER_PHASES, *WORK) if name in metrics}


async def run_through_stack(example, args: argparse.Namespace) -> tuple[list[StepTime], list[StepTime]]:  # noqa: ANN001
    """The demo's loop through one fresh LocalBackend (its start not counted): serial, then pipelined,
    each on a model of its own."""
    from producer import TrainableModel
    from producer.local_backend import LocalBackend

    backend = LocalBackend(tempfile.mkdtemp(prefix="trainq-bench-"), base_model=args.base_model)
    try:
        await backend.start()
        serial = await run_serial(example, args, backend, TrainableModel("serial", "bench", base_model=args.base_model))
        pipelined = await run_pipelined(example, args, backend,
                                        TrainableModel("pipelined", "bench", base_model=args.base_model))
    finally:
        await backend.close()
    return serial, pipelined


def _sampler(example, args: argparse.Namespace, model, client):  # noqa: ANN001, ANN202
    from producer.gather import gather_trajectory_groups

    rng = random.Random(args.seed)
    prompts = example.build_prompts()

    def sample():  # noqa: ANN202
        return gather_trajectory_groups(
            ([example.rollout(client, model, p, max_tokens=args.max_tokens, temperature=args.temperature)
              for _ in range(args.group_size)] for p in rng.sample(prompts, args.groups_per_step)),
            pbar_desc=None,
        )

    return sample


async def run_serial(example, args: argparse.Namespace, backend, model) -> list[StepTime]:  # noqa: ANN001
    """Sample, then train through the queue and wait until served, then log: each part timed."""
    await model.register(backend)
    sample = _sampler(example, args, model, model.openai_client())
    rows = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        groups = await sample()
        t1 = time.perf_counter()
        job = await backend.submit_train(model, groups, learning_rate=args.learning_rate)
        t2 = time.perf_counter()
        result = await job.result()
        t3 = time.perf_counter()
        model._set_step(result.step)
        await backend.wait_served(model, result.step)
        t4 = time.perf_counter()
        logged = await model.log(groups, metrics=result.metrics, step=result.step, split="train")
        t5 = time.perf_counter()
        record = await job.record()
        worker_s = (record.finished_at or 0.0) - (record.started_at or 0.0)
        phases = {"submit_s": t2 - t1, "queue_s": t3 - t2 - worker_s, "worker_s": worker_s, "served_s": t4 - t3,
                  "log_s": t5 - t4, **_trainer_phases(result.metrics)}
        rows.append(StepTime(step, logged["reward"], t1 - t0, t5 - t1,
                             int(result.metrics.get("num_groups_trainable", 0)), phases))
        print(f"serial step {step}: reward {logged['reward']:.3f} sample {t1 - t0:.1f} s train {t5 - t1:.1f} s",
              flush=True)
    return rows


async def run_pipelined(example, args: argparse.Namespace, backend, model) -> list[StepTime]:  # noqa: ANN001
    """``train_pipelined`` with the default bound: a step's seconds are those between two results."""
    from producer.pipeline import train_pipelined

    await model.register(backend)
    sample = _sampler(example, args, model, model.openai_client())
    rows = []
    last = time.perf_counter()
    async for step in train_pipelined(backend, model, sample, steps=args.steps, learning_rate=args.learning_rate):
        logged = await model.log(step.groups, metrics=step.result.metrics, step=step.result.step, split="train")
        now = time.perf_counter()
        # The step's own sampling overlapped the step before it; what is left between results is the rest.
        rows.append(StepTime(step.result.step - 1, logged["reward"], step.sample_s, now - last - step.sample_s,
                             int(step.result.metrics.get("num_groups_trainable", 0)),
                             _trainer_phases(step.result.metrics)))
        last = now
    return rows


if __name__ == "__main__":
    sys.exit(main())
