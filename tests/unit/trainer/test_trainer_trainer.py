"""``Trainer`` on the tiny model: steps, exactly once, no-signal jobs, restarts, bad input."""

import pytest
import torch
from safetensors.torch import load_file

from producer.types import Choice, ChoiceMessage, ModelRef, TrainConfig, Trajectory, TrajectoryGroup
from trainer_worker.core.trainer import Trainer

pytestmark = pytest.mark.slow

LR = TrainConfig(learning_rate=1e-2)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def trainer(tiny_model, root):
    return Trainer(str(tiny_model), str(root), device="cpu", max_tokens_per_microbatch=128, seed=0)


def model_ref(name):
    return ModelRef(project="unit", name=name, base_model="tiny-llama")


def trajectory(reward, token_ids, *, logprob=-2.0, turns=1):
    items = [{"role": "user", "content": "Guess the number between 1 and 100."}]
    for turn in range(turns):
        if turn:
            items.append({"role": "tool", "content": "Higher!"})
        choice = Choice(token_ids=list(token_ids), logprobs=[logprob] * len(token_ids), message=ChoiceMessage(content="x"))
        items.append(choice)
    return Trajectory(items, reward=reward)


def groups(sampled_step=0, rewards=(1.0, 0.0, 0.5)):
    token_sets = ([40, 41, 42, 2], [50, 51, 2], [60, 61, 62, 63, 64])
    return [
        TrajectoryGroup([trajectory(r, ids, turns=1 + g % 2) for r, ids in zip(rewards, token_sets)], sampled_step=sampled_step)
        for g in range(3)
    ]


def adapter(path):
    return load_file(str(path / "adapter_model.safetensors"))


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_register_then_train_makes_steps_0_and_1(trainer, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = model_ref("first")
    registered = trainer.register(model)
    assert registered.step == 0
    assert trainer.register(model).step == 0  # idempotent
    outcome = trainer.train("job-first-1", model, LR, groups())
    assert outcome.step == 1
    for key in ("loss", "num_groups_submitted", "num_groups_trainable", "num_trajectories", "num_tokens",
                "grad_norm", "learning_rate", "staleness_mean", "reward", "reward_std_dev", "clip_fraction"):
        assert isinstance(outcome.metrics[key], float), key
    assert outcome.metrics["num_groups_trainable"] == 3 and outcome.metrics["num_trajectories"] == 9
    assert outcome.metrics["num_tokens"] > 0 and outcome.metrics["grad_norm"] > 0

    ids = torch.tensor([[1, 292, 201, 74, 75, 2, 201, 1, 67, 85, 288, 306, 201]])
    logits = []
    for path in (registered.checkpoint_path, outcome.checkpoint_path):
        base = AutoModelForCausalLM.from_pretrained(tiny_model)
        with torch.no_grad():
            logits.append(PeftModel.from_pretrained(base, path).eval()(input_ids=ids).logits)
    assert not torch.allclose(logits[0], logits[1])


def test_same_job_id_makes_no_second_step(trainer):
    model = model_ref("once")
    trainer.register(model)
    first = trainer.train("job-once", model, LR, groups())
    again = trainer.train("job-once", model, LR, groups())
    assert again.step == first.step == 1
    assert again.metrics == pytest.approx({k: v for k, v in first.metrics.items() if k != "checkpoint_save_s"})
    assert trainer.latest_step(model) == 1


def test_a_step_beyond_the_committed_one_is_this_jobs_to_commit_or_another_jobs_to_set_aside(trainer, root):
    from trainer_worker.core import checkpoints

    model = model_ref("leftover")
    trainer.register(model)
    made = trainer.train("job-left-1", model, LR, groups(), base_step=0)  # its commit never happened
    again = trainer.train("job-left-1", model, LR, groups(), base_step=0)
    assert (made.step, again.step) == (1, 1) and again.checkpoint_path == made.checkpoint_path
    assert trainer.latest_step(model) == 1, "not trained a second time"

    other = trainer.train("job-left-2", model, LR, groups(sampled_step=0), base_step=0)
    assert other.step == 1
    assert checkpoints.read_info(root, model.project, model.name, 1).job_id == "job-left-2"
    assert trainer.latest_step(model) == 1


def test_all_equal_rewards_still_make_a_step_with_unchanged_weights(trainer):
    from pathlib import Path

    model = model_ref("flat")
    trainer.register(model)
    trained = trainer.train("job-flat-1", model, LR, groups())
    flat = trainer.train("job-flat-2", model, LR, groups(rewards=(0.5, 0.5, 0.5)))
    assert flat.step == 2
    assert flat.metrics["num_groups_trainable"] == 0 and flat.metrics["num_tokens"] == 0
    assert flat.metrics["loss"] == 0.0 and flat.metrics["reward_std_dev"] == 0.0
    assert_same_tensors(adapter(Path(trained.checkpoint_path)), adapter(Path(flat.checkpoint_path)))
    before = torch.load(Path(trained.checkpoint_path) / "optimizer.pt", weights_only=True)
    after = torch.load(Path(flat.checkpoint_path) / "optimizer.pt", weights_only=True)
    assert after["state"][0]["step"] == before["state"][0]["step"]


def test_unregistered_model_is_an_error(trainer):
    with pytest.raises(ValueError, match="not registered"):
        trainer.train("job-ghost", model_ref("ghost"), LR, groups())


def test_bad_input_is_a_value_error_and_the_trainer_goes_on(trainer):
    model = model_ref("bad")
    trainer.register(model)
    bad = groups()
    bad[1].trajectories[2].messages_and_choices[-1].token_ids[0] = 100_000
    with pytest.raises(ValueError, match=r"groups\[1\].trajectories\[2\].*100000.*vocabulary"):
        trainer.train("job-bad-1", model, LR, bad)
    too_long = [TrajectoryGroup([trajectory(1.0, [40] * 3000), trajectory(0.0, [41])])]
    with pytest.raises(ValueError, match="2048 positions"):
        trainer.train("job-bad-2", model, LR, too_long)
    assert trainer.train("job-bad-3", model, LR, groups()).step == 1


def test_stale_groups_are_dropped_and_counted(trainer):
    model = model_ref("stale")
    trainer.register(model)
    trainer.train("job-stale-1", model, LR, groups())
    trainer.train("job-stale-2", model, LR, groups(sampled_step=1))
    config = TrainConfig(learning_rate=1e-2, max_staleness=1)
    outcome = trainer.train("job-stale-3", model, config, groups(sampled_step=0) + groups(sampled_step=2)[:1])
    assert outcome.metrics["num_groups_stale_dropped"] == 3
    assert outcome.metrics["num_groups_trainable"] == 1
    assert outcome.metrics["staleness_mean"] == pytest.approx((2 + 2 + 2 + 0) / 4)


def test_ppo_sequence_level_with_kl_and_missing_logprobs(trainer):
    model = model_ref("variants")
    trainer.register(model)
    trainer.train("job-var-1", model, LR, groups())
    no_logprobs = groups()
    for group in no_logprobs:
        for t in group.trajectories:
            for c in t.choices():
                c.logprobs = []
    config = TrainConfig(learning_rate=1e-2, ppo=True, beta=0.1, importance_sampling_level="sequence",
                         allow_training_without_logprobs=True)
    outcome = trainer.train("job-var-2", model, config, no_logprobs)
    assert outcome.step == 2
    assert outcome.metrics["kl"] > 0  # the step-1 adapter differs from the base model
    assert outcome.metrics["ratio_mean"] == pytest.approx(1.0)
    assert outcome.metrics["clip_fraction"] == 0.0


def test_restarted_trainer_resumes_exactly(trainer, tiny_model, root):
    # Two models get identical step 1s; one continues in memory, the other in a new Trainer.
    in_memory, restarted = model_ref("resume-a"), model_ref("resume-b")
    for model in (in_memory, restarted):
        trainer.register(model)
        trainer.train(f"job-{model.name}-1", model, LR, groups())
    continued = trainer.train("job-resume-a-2", in_memory, LR, groups(sampled_step=1))

    fresh = Trainer(str(tiny_model), str(root), device="cpu", max_tokens_per_microbatch=128, seed=0)
    assert fresh.latest_step(restarted) == 1
    resumed = fresh.train("job-resume-b-2", restarted, LR, groups(sampled_step=1))
    assert resumed.step == continued.step == 2
    from pathlib import Path

    a, b = adapter(Path(continued.checkpoint_path)), adapter(Path(resumed.checkpoint_path))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    optimizer = torch.load(Path(resumed.checkpoint_path) / "optimizer.pt", weights_only=True)
    assert float(optimizer["state"][0]["step"]) == 2.0  # AdamW's moments came back from disk


def test_delete_checkpoints_keeps_the_latest(trainer):
    model = model_ref("prune")
    trainer.register(model)
    for i in range(1, 4):
        trainer.train(f"job-prune-{i}", model, LR, groups())
    assert trainer.delete_checkpoints(model, keep_steps=[1]) == [0, 2]
    assert trainer.delete_checkpoints(model, keep_steps=[]) == [1]
    assert trainer.latest_step(model) == 3
    assert trainer.train("job-prune-4", model, LR, groups()).step == 4


def test_register_refuses_another_base_model(trainer):
    model = model_ref("based")
    trainer.register(model)
    with pytest.raises(ValueError, match="registered with base model 'tiny-llama'"):
        trainer.register(ModelRef(project="unit", name="based", base_model="other"))


# ------------------------------------- the sampler's distribution, measured per job


def perfect_sampler_choice(trainer, prompt_ids, token_ids, temperature):
    """A choice as an exact sampler would report it: log softmax(logits / T) of each token under the
    model it sampled from (the base model: a fresh model's step 0 adds nothing to it)."""
    model = trainer._loaded.model
    ids = torch.tensor([prompt_ids + token_ids])
    with torch.no_grad(), model.disable_adapter():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].double() / temperature
    logprobs = torch.log_softmax(logits, -1).gather(-1, torch.tensor(token_ids)[:, None]).squeeze(-1)
    return Choice(token_ids=token_ids, logprobs=logprobs.tolist(), prompt_token_ids=prompt_ids,
                  temperature=temperature, message=ChoiceMessage(content="x"))


def sampler_groups(trainer, temperature, report_temperature=True):
    prompts = ([1, 292, 201, 74, 75, 2, 201, 1, 67, 85, 288, 306, 201], [1, 292, 201, 80, 81, 82, 2, 201, 1, 67, 85, 201])
    groups_ = []
    for g, prompt in enumerate(prompts):
        trajectories = []
        for t, tokens in enumerate(([40, 41, 42, 2], [50, 51, 2], [60, 61, 62, 63])):
            choice = perfect_sampler_choice(trainer, prompt, tokens, temperature)
            if not report_temperature:
                choice.temperature = None
            trajectories.append(Trajectory([{"role": "user", "content": "-"}, choice], reward=float((t + g) % 3)))
        groups_.append(TrajectoryGroup(trajectories, sampled_step=0))
    return groups_


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_an_exact_samplers_tokens_show_no_mismatch_at_its_temperature(trainer, temperature):
    model = model_ref(f"exact-{temperature}")
    trainer.register(model)

    metrics = trainer.train(f"job-exact-{temperature}", model, LR, sampler_groups(trainer, temperature)).metrics

    assert metrics["num_tokens"] > 0 and metrics["num_trajectories_rendered"] == 0
    assert metrics["mismatch_context_fraction"] == 0.0
    assert metrics["mismatch_kl_k3"] < 1e-9
    assert metrics["mismatch_logprob_abs_diff"] < 1e-5
    assert metrics["mismatch_ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["mismatch_ratio_max"] == pytest.approx(1.0, abs=1e-5)


def test_a_temperature_left_out_shows_as_mismatch(trainer):
    model = model_ref("untempered")
    trainer.register(model)

    metrics = trainer.train("job-untempered", model, LR, sampler_groups(trainer, 0.5, report_temperature=False)).metrics

    # Scored at 1.0 what was sampled at 0.5: the logprobs differ by far more than float error.
    assert metrics["mismatch_logprob_abs_diff"] > 0.1 and metrics["mismatch_kl_k3"] > 1e-3
