"""Packing: budgets hold, and packed rows give the same log-probs as one sequence at a time."""

import pytest
import torch

from trainer_worker.core.forward import per_token_logps
from trainer_worker.core.packing import TrainSequence, build_microbatches
from trainer_worker.core.tokenize import TokenizedTrajectory

LENGTHS = [5, 9, 3, 12, 1, 7, 4]


def make_sequences(lengths=LENGTHS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sequences = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, 400, (n,), generator=generator).tolist()
        mask = [False] + [True] * (n - 1)
        sequences.append(TrainSequence(TokenizedTrajectory(ids, mask, [-1.0] * n, mask), advantage=float(i)))
    return sequences


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_microbatches_respect_the_budget_and_keep_every_token(mode):
    sequences = make_sequences()
    batches = build_microbatches(sequences, 16, mode=mode)
    assert all(b.num_tokens <= 16 for b in batches)
    assert sum(int(b.loss_mask.sum()) for b in batches) == sum(s.tokens.num_trained_tokens for s in sequences)
    assert sum(b.num_sequences for b in batches) == len(sequences)
    if mode == "packed":
        assert all(b.attention_mask is None and b.input_ids.shape[0] == 1 for b in batches)
        assert sum(b.num_tokens for b in batches) == sum(LENGTHS)  # no padding at all


def test_packed_row_restarts_positions_per_sequence():
    batch = build_microbatches(make_sequences([3, 2]), 8)[0]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert batch.sequence_ids.tolist() == [[0, 0, 0, 1, 1]]
    assert batch.advantages.tolist() == [[0.0, 0.0, 0.0, 1.0, 1.0]]


def test_sequence_over_budget_gets_its_own_microbatch():
    batches = build_microbatches(make_sequences([20, 3]), 8)
    assert sorted(b.num_tokens for b in batches) == [3, 20]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_packed_logprobs_equal_unpacked(tiny_model, attn_implementation, mode):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attn_implementation).eval()
    sequences = make_sequences()
    with torch.no_grad():
        alone = {tuple(s.tokens.input_ids): per_token_logps(model, build_microbatches([s], 64)[0], "cpu")[0] for s in sequences}
        batches = build_microbatches(sequences, 20, mode=mode)
        assert any(b.num_sequences > 1 for b in batches)
        for batch in batches:
            logps = per_token_logps(model, batch, "cpu")  # (B, T)
            for row in range(batch.input_ids.shape[0]):
                for seq in range(batch.num_sequences):
                    where = batch.sequence_ids[row] == seq
                    if where.any():
                        expected = alone[tuple(batch.input_ids[row][where].tolist())]
                        torch.testing.assert_close(logps[row][where], expected, rtol=1e-5, atol=1e-5)
