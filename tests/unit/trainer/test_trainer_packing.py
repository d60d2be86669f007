"""Packing: budgets hold, and packed rows give the same log-probs as one sequence at a time."""

from array import array

import pytest
import torch

from trainer_worker.core.attention import ATTENTION, row_segments
from trainer_worker.core.attention import register as register_attention
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
        sequences.append(TrainSequence(TokenizedTrajectory(ids, mask, [-1.0] * n, mask, array('f', [1.0]) * n), advantage=float(i)))
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


NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# On CUDA, sdpa picks other kernels for a masked packed row than for one sequence.
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, NEEDS_CUDA])])
@pytest.mark.parametrize("attn_implementation", [ATTENTION, "sdpa", "eager"])
@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_packed_logprobs_equal_unpacked(tiny_model, attn_implementation, mode, device):
    from transformers import AutoModelForCausalLM

    register_attention()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attn_implementation).eval().to(device)
    sequences = make_sequences()
    tolerance = 1e-5 if device == "cpu" else 1e-4  # float32 either way; GPU kernels sum in other orders
    with torch.no_grad():
        alone = {tuple(s.tokens.input_ids): per_token_logps(model, build_microbatches([s], 64)[0], device)[0].cpu()
                 for s in sequences}
        batches = build_microbatches(sequences, 20, mode=mode)
        assert any(b.num_sequences > 1 for b in batches)
        for batch in batches:
            logps = per_token_logps(model, batch, device).cpu()  # (B, T)
            for row in range(batch.input_ids.shape[0]):
                for seq in range(batch.num_sequences):
                    where = batch.sequence_ids[row] == seq
                    if where.any():
                        expected = alone[tuple(batch.input_ids[row][where].tolist())]
                        torch.testing.assert_close(logps[row][where], expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, NEEDS_CUDA])])
@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_segment_attention_equals_transformers_masked_sdpa(tiny_model, mode, device):
    from transformers import AutoModelForCausalLM

    register_attention()
    ours, reference = (
        AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=name).eval().to(device)
        for name in (ATTENTION, "sdpa")
    )
    tolerance = 1e-5 if device == "cpu" else 1e-4
    with torch.no_grad():
        for batch in build_microbatches(make_sequences(), 20, mode=mode):
            torch.testing.assert_close(per_token_logps(ours, batch, device), per_token_logps(reference, batch, device),
                                       rtol=tolerance, atol=tolerance)


def test_segment_attention_equals_sdpa_with_left_padding_and_when_generating(tiny_model):
    from transformers import AutoModelForCausalLM

    register_attention()
    ours, reference = (AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=name).eval()
                       for name in (ATTENTION, "sdpa"))
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # left padding: the explicit-mask path
    with torch.no_grad():
        logits = [m(input_ids=ids, attention_mask=mask, use_cache=False).logits for m in (ours, reference)]
        torch.testing.assert_close(logits[0][mask.bool()], logits[1][mask.bool()], rtol=1e-5, atol=1e-5)
        # Greedy decoding runs every step through the KV cache: against the padded prompt (an
        # explicit mask), and with no padding (the new token sees every cached one, no mask).
        for prompt_mask in (mask, torch.ones_like(mask)):
            generated = [m.generate(input_ids=ids, attention_mask=prompt_mask, max_new_tokens=6, do_sample=False,
                                    pad_token_id=0, output_scores=True, return_dict_in_generate=True)
                         for m in (ours, reference)]
            assert torch.equal(generated[0].sequences, generated[1].sequences)
            torch.testing.assert_close(torch.stack(generated[0].scores), torch.stack(generated[1].scores),
                                       rtol=1e-4, atol=1e-4)


def test_row_segments_start_where_positions_restart():
    assert row_segments(torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])) == [[(0, 3), (3, 5), (5, 6)], [(0, 6)]]
    assert row_segments(torch.tensor([[4, 5, 0, 1]])) == [[(0, 2), (2, 4)]]  # a row that continues a sequence
    positions = torch.tensor([[0, 1, 2, 3]])
    assert row_segments(positions) == [[(0, 4)]]
    positions[0, 2] = 0  # read once per tensor, and again once it changes
    assert row_segments(positions) == [[(0, 2), (2, 4)]]
