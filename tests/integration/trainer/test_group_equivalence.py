"""Two ranks (torchrun, gloo, FSDP2) against one process, on the same jobs: the same steps.

Two models trained alternately, three steps each, over single-turn, multi-turn
and mixed batches, the CISPO, PPO-with-KL and sequence-level losses, and a
batch with an untrainable group; each step's checkpoint (LoRA weights and
AdamW state, as written) is compared with the single-process trainer's.
Micro-batches of 64 tokens give the ranks different numbers of micro-batches,
so the filler passes run too. A bad job between steps fails alone.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from producer.types import ModelRef, TrainConfig, TrajectoryGroup
from tests.unit.trainer.test_trainer_trainer import groups as mixed_groups
from tests.unit.trainer.test_trainer_trainer import trajectory
from trainer_worker.core.packing import build_microbatches, split_by_tokens
from trainer_worker.core.trainer import Trainer
from trainer_worker.group.client import GroupTrainer
from trainer_worker.settings import TrainerSettings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

BUDGET = 64  # tokens per micro-batch: several per rank, and a different count on each rank
LR = 1e-2
# (max |weight difference|, max |moment difference| / max |moment|, relative tolerance of the metrics).
# float32: the same step summed in other orders. AdamW's first steps divide each gradient by its own
# magnitude (+1e-8), so an entry with a gradient near 1e-8 moves by up to LR on a rounding.
BOUNDS = {"float64": (1e-12, 1e-12, 1e-9), "float32": (5e-5, 5e-5, 1e-4)}


def batch(turns: int, seed: int, sampled_step: int, *, flat_group: bool = False) -> list[TrajectoryGroup]:
    rng = random.Random(seed)
    out = []
    for g in range(3):
        rewards = [0.5] * 4 if flat_group and g == 0 else [rng.random() for _ in range(4)]
        trajectories = [
            trajectory(r, [rng.randrange(3, 300) for _ in range(rng.randint(2, 30))], turns=turns,
                       logprob=-rng.uniform(0.2, 4.0))
            for r in rewards
        ]
        out.append(TrajectoryGroup(trajectories, sampled_step=sampled_step))
    return out


# (model, step, config, groups): A and B alternately, three steps each.
JOBS = [
    ("a", 1, TrainConfig(learning_rate=LR), lambda: batch(1, 1, 0)),
    ("b", 1, TrainConfig(learning_rate=LR), lambda: batch(3, 2, 0)),
    ("a", 2, TrainConfig(learning_rate=LR, ppo=True, beta=0.05), lambda: batch(2, 3, 1)),
    ("b", 2, TrainConfig(learning_rate=LR, importance_sampling_level="sequence"), lambda: batch(1, 4, 1)),
    ("a", 3, TrainConfig(learning_rate=LR), lambda: mixed_groups(sampled_step=2)),
    ("b", 3, TrainConfig(learning_rate=LR), lambda: batch(2, 5, 2, flat_group=True)),
]


def ref(name: str) -> ModelRef:
    return ModelRef(project="equiv", name=name, base_model="tiny-llama")


@pytest.fixture(scope="module", params=["float64", "float32"])
def pair(request, tiny_model: Path, tmp_path_factory):
    dtype = request.param
    root = tmp_path_factory.mktemp(f"equiv-{dtype}")
    settings = TrainerSettings(base_model="tiny-llama", checkpoint_root=str(root / "group"), nproc_per_node=2,
                               dtype=dtype, max_tokens_per_microbatch=BUDGET, collective_timeout_s=120)
    group = GroupTrainer(settings, str(tiny_model), start_timeout_s=300)
    single = Trainer(str(tiny_model), str(root / "single"), max_tokens_per_microbatch=BUDGET, dtype=dtype)
    yield dtype, group, single
    group.close()


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a), default=0.0)


def compare(group_path: str, single_path: str, dtype: str) -> tuple[float, float]:
    weights = max_diff(load_file(f"{group_path}/adapter_model.safetensors"),
                       load_file(f"{single_path}/adapter_model.safetensors"))
    g = torch.load(Path(group_path) / "optimizer.pt", weights_only=True)
    s = torch.load(Path(single_path) / "optimizer.pt", weights_only=True)
    assert g["param_groups"] == s["param_groups"]
    assert g["state"].keys() == s["state"].keys()
    moments = 0.0
    for i, state in s["state"].items():
        assert float(g["state"][i]["step"]) == float(state["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            scale = max(float(state[key].abs().max()), 1e-30)
            moments = max(moments, float((g["state"][i][key] - state[key]).abs().max()) / scale)
    assert {t.dtype for t in load_file(f"{group_path}/adapter_model.safetensors").values()} == {
        getattr(torch, dtype)}
    return weights, moments


def test_two_ranks_make_the_single_process_steps(pair):
    dtype, group, single = pair
    weight_bound, moment_bound, tolerance = BOUNDS[dtype]
    for name in ("a", "b"):
        assert compare(group.register(ref(name)).checkpoint_path, single.register(ref(name)).checkpoint_path,
                       dtype) == (0.0, 0.0)
    uneven = False
    for name, step, config, make in JOBS:
        job_id = f"{name}-{step}"
        made = group.train(job_id, ref(name), config, make())
        expected = single.train(job_id, ref(name), config, make())
        assert made.step == expected.step == step
        weights, moments = compare(made.checkpoint_path, expected.checkpoint_path, dtype)
        print(f"{dtype} {job_id}: max |weight diff| {weights:.1e}, max moment diff / max moment {moments:.1e}")
        assert weights <= weight_bound and moments <= moment_bound, job_id
        for metric in ("loss", "grad_norm", "num_tokens", "num_sequence_tokens", "num_groups_trainable"):
            assert made.metrics[metric] == pytest.approx(expected.metrics[metric], rel=tolerance, abs=tolerance), metric
        assert made.metrics["num_ranks"] == 2
        uneven |= _microbatches_per_rank(single, config, make(), step - 1) not in ([0, 0], [1, 1], [2, 2], [3, 3])
        if step == 1:
            _a_bad_job_fails_alone(group, single, name)
    assert uneven, "no job gave the ranks different numbers of micro-batches: the filler path went untested"
    assert group.restarts == 0


def _a_bad_job_fails_alone(group: GroupTrainer, single: Trainer, name: str) -> None:
    bad = batch(1, 9, 1)
    bad[1].trajectories[2].messages_and_choices[-1].token_ids[0] = 100_000
    for trainer in (group, single):
        with pytest.raises(ValueError, match=r"groups\[1\]\.trajectories\[2\].*100000"):
            trainer.train(f"{name}-bad", ref(name), TrainConfig(learning_rate=LR), bad)
    with pytest.raises(ValueError, match="not registered"):
        group.train("ghost-1", ref("ghost"), TrainConfig(learning_rate=LR), bad)
    assert group.latest_step(ref(name)) == 1


def _microbatches_per_rank(single: Trainer, config: TrainConfig, groups: list[TrajectoryGroup], latest: int) -> list[int]:
    sequences = single._prepare(groups, latest, config).sequences
    shares = split_by_tokens([len(s.tokens) for s in sequences], 2)
    return [len(build_microbatches([sequences[i] for i in share], BUDGET)) for share in shares]
