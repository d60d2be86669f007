"""The losses against numbers computed by hand, token by token, on one fixed batch.

Two sequences, one per row; position 0 is never trained (nothing predicts it).
    seq 0 (A=+1): log-ratios  0.2, 0.0, -1.0   logps -1.0, -0.5, -2.0
    seq 1 (A=-1): log-ratios -0.2, -0.5        logps -0.3, -1.5
"""

from math import exp

import pytest
import torch

from trainer_worker.core.loss import CISPO, LossConfig, LossInputs, PPOClip, compute_loss, k3_kl

N = 5  # trained tokens
LOGPS = [[0.0, -1.0, -0.5, -2.0], [0.0, -0.3, -1.5, 0.0]]
OLD = [[0.0, -1.2, -0.5, -1.0], [0.0, -0.1, -1.0, 0.0]]
REF = [[0.0, -1.0, -1.0, -1.5], [0.0, -0.3, -1.0, 0.0]]
MASK = [[False, True, True, True], [False, True, True, False]]


def make_inputs(with_ref: bool = False, old=OLD) -> LossInputs:
    return LossInputs(
        per_token_logps=torch.tensor(LOGPS, dtype=torch.float64, requires_grad=True),
        old_per_token_logps=torch.tensor(old, dtype=torch.float64),
        advantages=torch.tensor([[1.0] * 4, [-1.0] * 4], dtype=torch.float64),
        loss_mask=torch.tensor(MASK),
        sequence_ids=torch.tensor([[0] * 4, [1] * 4]),
        num_sequences=2,
        ref_per_token_logps=torch.tensor(REF, dtype=torch.float64) if with_ref else None,
    )


def test_ppo_token_level():
    out = compute_loss(make_inputs(), LossConfig(objective=PPOClip(0.2, 0.2)))
    # A>0: -min(r, clip r); A<0: -min(-r, -clip r) = max(r, clip r)
    seq0 = [-min(exp(0.2), 1.2), -1.0, -exp(-1.0)]  # 1st clipped at 1.2; 3rd below 0.8 but min keeps r
    seq1 = [exp(-0.2), max(exp(-0.5), 0.8)]  # 2nd clipped at 0.8
    expected = (sum(seq0) + sum(seq1)) / N  # = -0.1898296
    assert out.loss.item() == pytest.approx(expected)
    assert out.metrics["loss"] == pytest.approx(expected)
    assert out.metrics["clip_fraction"] == pytest.approx(2 / N)
    ratios = [exp(0.2), 1.0, exp(-1.0), exp(-0.2), exp(-0.5)]
    assert out.metrics["ratio_mean"] == pytest.approx(sum(ratios) / N)
    assert out.metrics["kl"] == 0.0


def test_ppo_clipped_tokens_get_no_gradient():
    inputs = make_inputs()
    compute_loss(inputs, LossConfig(objective=PPOClip(0.2, 0.2))).loss.backward()
    grad = inputs.per_token_logps.grad
    assert grad[0, 1] == 0.0 and grad[1, 2] == 0.0  # the two clipped tokens
    # d(-A r)/d logp = -A r / N on unclipped tokens
    assert grad[0, 3].item() == pytest.approx(-exp(-1.0) / N)
    assert grad[1, 1].item() == pytest.approx(exp(-0.2) / N)


def test_cispo_token_level():
    out = compute_loss(make_inputs(), LossConfig(objective=CISPO(epsilon_high=0.28)))
    weights = [exp(0.2), 1.0, exp(-1.0), exp(-0.2), exp(-0.5)]  # none above 1.28
    terms = [-weights[0] * -1.0, -weights[1] * -0.5, -weights[2] * -2.0, weights[3] * -0.3, weights[4] * -1.5]
    assert out.loss.item() == pytest.approx(sum(terms) / N)  # = 0.2603494
    assert out.metrics["clip_fraction"] == 0.0


def test_cispo_truncates_the_weight_but_keeps_the_gradient():
    inputs = make_inputs()
    out = compute_loss(inputs, LossConfig(objective=CISPO(epsilon_high=0.1)))
    weights = [1.1, 1.0, exp(-1.0), exp(-0.2), exp(-0.5)]  # exp(0.2) = 1.22 truncated to 1.1
    terms = [1.1 * 1.0, 1.0 * 0.5, weights[2] * 2.0, -weights[3] * 0.3, -weights[4] * 1.5]
    assert out.loss.item() == pytest.approx(sum(terms) / N)
    assert out.metrics["clip_fraction"] == pytest.approx(1 / N)
    out.loss.backward()
    # The weight is detached: d/d logp of -w A logp is -w A / N, even where truncated.
    assert inputs.per_token_logps.grad[0, 1].item() == pytest.approx(-1.1 / N)


def test_sequence_level_ratio_is_exp_of_mean_log_ratio():
    s0, s1 = exp((0.2 + 0.0 - 1.0) / 3), exp((-0.2 - 0.5) / 2)  # 0.765928, 0.704688
    ppo = compute_loss(make_inputs(), LossConfig(objective=PPOClip(0.2, 0.2), importance_sampling_level="sequence"))
    # seq0: min(s0, 0.8) = s0 (not clipped); seq1: max(s1, 0.8) = 0.8 (clipped)
    assert ppo.loss.item() == pytest.approx((3 * -s0 + 2 * 0.8) / N)  # = -0.139557
    assert ppo.metrics["clip_fraction"] == pytest.approx(2 / N)
    assert ppo.metrics["ratio_mean"] == pytest.approx((3 * s0 + 2 * s1) / N)
    cispo = compute_loss(make_inputs(), LossConfig(objective=CISPO(0.28), importance_sampling_level="sequence"))
    assert cispo.loss.item() == pytest.approx((-s0 * (-3.5) + s1 * (-1.8)) / N)  # = 0.282462


def test_k3_kl_is_added_with_beta():
    deltas = [-0.5, 0.5, 0.5]  # ref - logp on the trained tokens that differ
    kl = sum(exp(d) - d - 1 for d in deltas) / N  # = 0.0807946
    plain = compute_loss(make_inputs(), LossConfig(objective=CISPO(0.28)))
    with_kl = compute_loss(make_inputs(with_ref=True), LossConfig(objective=CISPO(0.28), beta=0.1))
    assert with_kl.metrics["kl"] == pytest.approx(kl)
    assert with_kl.loss.item() == pytest.approx(plain.loss.item() + 0.1 * kl)
    assert with_kl.metrics["policy_loss"] == pytest.approx(plain.loss.item())


def test_k3_is_zero_at_equal_policies_and_positive_elsewhere():
    logps = torch.tensor([-1.0, -2.0, -0.1])
    assert torch.equal(k3_kl(logps, logps), torch.zeros(3))
    assert (k3_kl(logps, logps + torch.tensor([0.3, -0.3, 1.0])) > 0).all()


def test_beta_without_reference_is_an_error():
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        compute_loss(make_inputs(), LossConfig(beta=0.1))


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("objective", [PPOClip(0.2, 0.2), CISPO(0.28)])
def test_only_sampled_tokens_get_gradient(objective, level):
    # Off the mask, old logps are garbage on purpose: they must not leak into loss or gradient.
    garbage_old = [[50.0, -1.2, -0.5, -1.0], [-80.0, -0.1, -1.0, 99.0]]
    inputs = make_inputs(with_ref=True, old=garbage_old)
    out = compute_loss(inputs, LossConfig(objective=objective, importance_sampling_level=level, beta=0.05))
    out.loss.backward()
    grad = inputs.per_token_logps.grad
    off_mask = ~torch.tensor(MASK)
    assert torch.isfinite(out.loss)
    assert (grad[off_mask] == 0).all()
    assert (grad[torch.tensor(MASK)] != 0).any()


def test_token_normalizer_splits_the_step_mean_across_microbatches():
    whole = compute_loss(make_inputs(), LossConfig())
    halves = []
    for row in (0, 1):
        full = make_inputs()
        halves.append(
            compute_loss(
                LossInputs(
                    per_token_logps=full.per_token_logps[row : row + 1],
                    old_per_token_logps=full.old_per_token_logps[row : row + 1],
                    advantages=full.advantages[row : row + 1],
                    loss_mask=full.loss_mask[row : row + 1],
                    sequence_ids=torch.zeros(1, 4, dtype=torch.long),
                    num_sequences=1,
                    token_normalizer=N,
                ),
                LossConfig(),
            )
        )
    assert sum(h.loss.item() for h in halves) == pytest.approx(whole.loss.item())
    assert sum(h.metrics["ratio_mean"] for h in halves) == pytest.approx(whole.metrics["ratio_mean"])


def test_train_config_defaults_map_to_loss_config():
    from producer.types import TrainConfig
    from trainer_worker.core.loss import CISPO_EPSILON_HIGH, loss_config_from_train_config

    assert loss_config_from_train_config(TrainConfig()).objective == CISPO(CISPO_EPSILON_HIGH)
    assert loss_config_from_train_config(TrainConfig(ppo=True)).objective == PPOClip(0.2, 0.2)
    ppo = loss_config_from_train_config(TrainConfig(ppo=True, epsilon=0.1, epsilon_high=0.3, beta=0.2))
    assert ppo.objective == PPOClip(0.1, 0.3) and ppo.beta == 0.2
    seq = loss_config_from_train_config(TrainConfig(importance_sampling_level="sequence"))
    assert seq.importance_sampling_level == "sequence"


# ------------------------------------------------ ART's options, by hand again

LOG_RATIOS = [0.2, 0.0, -1.0, -0.2, -0.5]  # trained tokens, in order (seq 0 then seq 1)
ADVANTAGES = [1.0, 1.0, 1.0, -1.0, -1.0]
TRAINED_LOGPS = [-1.0, -0.5, -2.0, -0.3, -1.5]


def cispo_terms(weights, advantages=ADVANTAGES):
    return [-w * a * lp for w, a, lp in zip(weights, advantages, TRAINED_LOGPS, strict=True)]


def test_negative_advantage_ratios_are_capped_and_positive_ones_are_not():
    config = LossConfig(objective=CISPO(epsilon_high=10.0), max_negative_advantage_weight=0.75)
    out = compute_loss(make_inputs(), config)
    # seq 1 (A<0) ratios exp(-0.2)=0.819, exp(-0.5)=0.607 -> 0.75, 0.607; seq 0 untouched.
    weights = [exp(0.2), 1.0, exp(-1.0), 0.75, exp(-0.5)]
    assert out.loss.item() == pytest.approx(sum(cispo_terms(weights)) / N)


def test_mask_prob_ratio_drops_the_tokens_outside_the_clip_range():
    config = LossConfig(objective=PPOClip(0.2, 0.2), mask_prob_ratio=True)
    out = compute_loss(make_inputs(), config)
    # Inside (0.8, 1.2): exp(0.0)=1.0 (A=+1) and exp(-0.2)=0.819 (A=-1); the other three drop out.
    assert out.loss.item() == pytest.approx((-1.0 + exp(-0.2)) / N)


def test_truncated_importance_sampling_weighs_by_the_capped_mismatch_and_ratios_against_the_trainer():
    inputs = make_inputs()
    out = compute_loss(inputs, LossConfig(objective=CISPO(0.28), truncated_importance_sampling=1.1))
    tis = [min(exp(r), 1.1) for r in LOG_RATIOS]  # the sampler-to-trainer ratio, capped
    assert out.loss.item() == pytest.approx(sum(cispo_terms(tis)) / N)  # the policy weight is 1
    assert out.metrics["ratio_mean"] == pytest.approx(1.0)
    out.loss.backward()
    # d/d logp of -w A logp, w detached
    expected = [-w * a / N for w, a in zip(tis, ADVANTAGES, strict=True)]
    assert inputs.per_token_logps.grad[torch.tensor(MASK)].tolist() == pytest.approx(expected)


def test_kimi_k2_tau_lowers_each_advantage_by_tau_times_the_log_ratio():
    out = compute_loss(make_inputs(), LossConfig(objective=CISPO(epsilon_high=10.0), kimi_k2_tau=0.5))
    advantages = [a - 0.5 * r for a, r in zip(ADVANTAGES, LOG_RATIOS, strict=True)]
    weights = [exp(r) for r in LOG_RATIOS]
    assert out.loss.item() == pytest.approx(sum(cispo_terms(weights, advantages)) / N)


@pytest.mark.parametrize("level", ["average", "geometric_average"])
def test_average_levels_mix_the_token_and_the_sequence_ratio(level):
    s0, s1 = (0.2 + 0.0 - 1.0) / 3, (-0.2 - 0.5) / 2
    sequence = [s0, s0, s0, s1, s1]
    if level == "average":
        weights = [(exp(r) + exp(s)) / 2 for r, s in zip(LOG_RATIOS, sequence, strict=True)]
    else:
        weights = [exp((r + s) / 2) for r, s in zip(LOG_RATIOS, sequence, strict=True)]
    out = compute_loss(make_inputs(), LossConfig(objective=CISPO(epsilon_high=10.0), importance_sampling_level=level))
    assert out.loss.item() == pytest.approx(sum(cispo_terms(weights)) / N)


def test_cispo_with_epsilon_clips_the_weight_from_below_too():
    out = compute_loss(make_inputs(), LossConfig(objective=CISPO(epsilon_high=0.28, epsilon=0.2)))
    weights = [exp(0.2), 1.0, 0.8, exp(-0.2), 0.8]  # exp(-1.0), exp(-0.5) raised to 0.8
    assert out.loss.item() == pytest.approx(sum(cispo_terms(weights)) / N)
    assert out.metrics["clip_fraction"] == pytest.approx(2 / N)


def test_mismatch_metrics_compare_the_trainer_with_the_sampler_on_known_tokens_only():
    inputs = make_inputs()
    known = torch.tensor([[False, True, True, False], [False, True, True, False]])  # seq 0's last token: no logprob
    out = compute_loss(LossInputs(**{**inputs.__dict__, "sampler_logps_known": known}), LossConfig())
    diffs = [0.2, 0.0, -0.2, -0.5]  # log pi_trainer - log pi_sampler of the 4 known tokens
    assert out.metrics["mismatch_kl_k3"] == pytest.approx(sum(exp(d) - 1 - d for d in diffs) / 4)
    assert out.metrics["mismatch_logprob_abs_diff"] == pytest.approx(sum(abs(d) for d in diffs) / 4)
    assert out.metrics["mismatch_ratio_mean"] == pytest.approx(sum(exp(d) for d in diffs) / 4)
    assert out.max_metrics["mismatch_ratio_max"] == pytest.approx(exp(0.2))


def test_loss_config_takes_arts_options_from_the_train_config():
    from producer.types import TrainConfig
    from trainer_worker.core.loss import loss_config_from_train_config

    config = loss_config_from_train_config(TrainConfig(
        epsilon=0.3, max_negative_advantage_importance_sampling_weight=2.0, mask_prob_ratio=True,
        truncated_importance_sampling=1.5, kimi_k2_tau=0.1, importance_sampling_level="average",
    ))
    assert config.objective == CISPO(epsilon_high=0.28, epsilon=0.3)
    assert (config.max_negative_advantage_weight, config.mask_prob_ratio, config.truncated_importance_sampling,
            config.kimi_k2_tau, config.importance_sampling_level) == (2.0, True, 1.5, 0.1, "average")
