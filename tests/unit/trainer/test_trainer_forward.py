"""per_token_logps: only trained tokens, and exactly log_softmax of the full logits there."""

from array import array

import torch

from trainer_worker.core.forward import per_token_logps
from trainer_worker.core.packing import TrainSequence, build_microbatches
from trainer_worker.core.tokenize import TokenizedTrajectory


def _sequence(ids: list[int], trained: list[bool]) -> TrainSequence:
    return TrainSequence(TokenizedTrajectory(ids, trained, [-1.0] * len(ids), trained, array('f', [1.0]) * len(ids)), advantage=1.0)


def test_trained_positions_match_full_log_softmax_and_the_rest_is_zero(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    # A long prompt and a short sampled answer, as in RL rollouts, packed two to a row.
    first = _sequence(list(range(10, 40)), [False] * 27 + [True] * 3)
    second = _sequence(list(range(50, 70)), [False] * 18 + [True] * 2)
    (batch,) = build_microbatches([first, second], 64)

    with torch.no_grad():
        logps = per_token_logps(model, batch, "cpu")  # (1, 50)
        # use_cache=False as in the core: with a cache, transformers does not detect packed rows.
        full = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits.float()
    expected = torch.log_softmax(full[:, :-1], dim=-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)

    trained = batch.loss_mask[0].nonzero().squeeze(-1)
    assert trained.tolist() == [27, 28, 29, 48, 49]
    torch.testing.assert_close(logps[0, trained], expected[0, trained - 1], rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(logps[0, ~batch.loss_mask[0]]) == 0
