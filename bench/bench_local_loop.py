"""The yes/no/maybe loop in one process, no services: the floor for ``trainq demo``'s step time.

Sampling is ``transformers`` ``generate`` on the trainer's own model (the
LoRA adapter as trained so far), training is ``trainer_worker.core.trainer.Trainer``
called directly: no Redis, no Celery, no vLLM, no checkpoint reload by a second
process. The demo's step should stay within 1.5x of this.

    python bench/bench_local_loop.py [--steps 5] [--base-model trainq/smollm2-135m-instruct]
    python bench/bench_local_loop.py --with-stack   # then the demo's path, and the ratio of the two

Prints a table of seconds per step (sample, train, total) and the reward, then exits 0.
With ``--with-stack`` the same loop then runs through ``LocalBackend`` (Redis,
the Celery trainer worker and vLLM, as ``trainq demo`` does) in the same run,
and the ratio of seconds per step is printed, by phase, over the steps that
trained every group in each loop (after the first): once the reward
saturates, steps train less, and would favour whichever loop learned faster.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass

import _common  # noqa: F401 - puts the repository root on sys.path, for tests.support

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
                        help="then run the same loop through LocalBackend, as trainq demo does, and print the ratio")
    args = parser.parse_args(argv)
    in_process = run_in_process(example, args)
    print_steps("in process (generate + the training core)", in_process)
    if args.with_stack:
        through_stack = run_through_stack(example, args)
        print_steps("through LocalBackend (Redis, Celery trainer worker, vLLM)", through_stack)
        compare(in_process, through_stack, args.groups_per_step)
    return 0


@dataclass(frozen=True)
class StepTime:
    step: int
    reward: float
    sample_s: float
    train_s: float
    """The train call: in process ``Trainer.train``; through the stack submit to served, plus ``model.log``."""
    trainable_groups: int

    @property
    def total_s(self) -> float:
        return self.sample_s + self.train_s


def print_steps(title: str, steps: list[StepTime]) -> None:
    print(f"\n{title}")
    print(f"{'step':>4}  {'reward':>6}  {'trained groups':>14}  {'sample s':>8}  {'train s':>7}  {'total s':>7}")
    for s in steps:
        print(f"{s.step:>4}  {s.reward:>6.3f}  {s.trainable_groups:>14}  {s.sample_s:>8.1f}  {s.train_s:>7.1f}  {s.total_s:>7.1f}")


def like_for_like(steps: list[StepTime], groups_per_step: int) -> list[StepTime]:
    """Steps after the first (warm-up) that trained every group: the same work in both loops.

    Once the reward saturates a group's rewards are all equal, it has no
    advantage, and the step trains less or nothing; such steps would favour
    whichever loop learned faster.
    """
    later = steps[1:] or steps
    return [s for s in later if s.trainable_groups == groups_per_step] or later


def compare(in_process: list[StepTime], through_stack: list[StepTime], groups_per_step: int) -> None:
    a, b = like_for_like(in_process, groups_per_step), like_for_like(through_stack, groups_per_step)

    def mean(steps: list[StepTime], phase: str) -> float:
        return sum(getattr(s, phase) for s in steps) / len(steps)

    print(f"\nmean seconds per step over steps {[s.step for s in a]} in process and {[s.step for s in b]} "
          f"through the stack (after the first, every group trained):")
    if any(s.trainable_groups != groups_per_step for s in a + b):
        print("  (a loop had no such step: comparing all steps after the first, which did different work; "
              "rerun with a lower --learning-rate or more --steps)")
    print(f"{'phase':>8}  {'in process':>10}  {'stack':>7}  {'ratio':>6}")
    for phase in ("sample_s", "train_s", "total_s"):
        print(f"{phase[:-2]:>8}  {mean(a, phase):>10.1f}  {mean(b, phase):>7.1f}  {mean(b, phase) / mean(a, phase):>5.2f}x")
    ratio = mean(b, "total_s") / mean(a, "total_s")
    print(f"ratio {ratio:.2f}x (target <= 1.5x) -> {'met' if ratio <= 1.5 else 'MISSED'}")


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
            rows.append(StepTime(step, sum(rewards) / len(rewards), t1 - t0, t2 - t1, trainable))
            print(f"step {step}: reward {rows[-1].reward:.3f} sample {t1 - t0:.1f} s train {t2 - t1:.1f} s", flush=True)
    print(f"in-process loop: {torch.get_num_threads()} torch threads, setup {setup_s:.1f} s, "
          f"{args.groups_per_step}x{args.group_size} rollouts of <= {args.max_tokens} tokens per step")
    return rows


def run_through_stack(example, args: argparse.Namespace) -> list[StepTime]:  # noqa: ANN001
    """The demo's loop through a fresh LocalBackend (the stack's start is not counted)."""
    import asyncio

    from producer.local_backend import LocalBackend

    config = example.Config(
        steps=args.steps, groups_per_step=args.groups_per_step, group_size=args.group_size,
        learning_rate=args.learning_rate, max_tokens=args.max_tokens, temperature=args.temperature,
        base_model=args.base_model, seed=args.seed,
    )

    async def run() -> list:
        backend = LocalBackend(tempfile.mkdtemp(prefix="trainq-bench-"))
        try:
            return await example.main(backend, config)
        finally:
            await backend.close()

    records = asyncio.run(run())
    return [
        StepTime(r.step, r.reward, r.extra["sample_s"], r.seconds - r.extra["sample_s"], int(r.extra["num_groups_trainable"]))
        for r in records
    ]


if __name__ == "__main__":
    sys.exit(main())
