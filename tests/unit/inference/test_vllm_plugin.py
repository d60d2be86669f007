"""The grouped LoRA kernels give what vLLM's per-token-gather CPU kernels give, on the same inputs."""

from __future__ import annotations

import os

import pytest
import torch

from inference_worker import vllm_lora_kernel, vllm_plugin
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

lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops", reason="vLLM is not installed")

SLOTS, IN, OUT, RANK, TOKENS = 4, 48, 40, 8, 37


def _indices(kind: str) -> torch.Tensor:
    if kind == "one adapter":
        return torch.full((TOKENS,), 2, dtype=torch.long)
    if kind == "mixed":  # several adapters and the last slot by -1, as a batch of mixed requests
        return torch.tensor([0, 2, -1, 1, 2, 2, 0][: TOKENS] * 6, dtype=torch.long)[:TOKENS]
    return torch.zeros((1,), dtype=torch.long)  # a single token


def _weights(shape: tuple[int, ...], four_d: bool) -> torch.Tensor:
    w = torch.randn(SLOTS, *shape, dtype=torch.bfloat16)
    return w.unsqueeze(1) if four_d else w


@pytest.mark.parametrize("kind", ["one adapter", "mixed", "single token"])
@pytest.mark.parametrize("four_d", [False, True])
def test_shrink_matches_vllm(kind: str, four_d: bool) -> None:
    torch.manual_seed(0)
    indices = _indices(kind)
    x = torch.randn(indices.numel(), IN, dtype=torch.bfloat16)
    a = _weights((RANK, IN), four_d)
    expected, got = torch.zeros(indices.numel(), RANK), torch.zeros(indices.numel(), RANK)
    lora_ops.bgmv_shrink(x, a, expected, indices, 0.5)
    vllm_plugin.bgmv_shrink(x, a, got, indices, 0.5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["one adapter", "mixed", "single token"])
@pytest.mark.parametrize("add_inputs", [False, True])
@pytest.mark.parametrize("padded_out", [0, 8])
def test_expand_matches_vllm(kind: str, add_inputs: bool, padded_out: int) -> None:
    torch.manual_seed(1)
    indices = _indices(kind)
    x = torch.randn(indices.numel(), RANK)
    b = _weights((OUT + padded_out, RANK), four_d=True)
    start = torch.randn(indices.numel(), OUT, dtype=torch.bfloat16)
    expected, got = start.clone(), start.clone()
    lora_ops.bgmv_expand(x, b, expected, indices, add_inputs)
    vllm_plugin.bgmv_expand(x, b, got, indices, add_inputs)
    torch.testing.assert_close(got, expected)


def test_expand_broadcasts_one_row_like_vllm() -> None:
    x = torch.randn(1, RANK)
    b = _weights((OUT, RANK), four_d=False)
    indices = torch.tensor([3])
    expected, got = torch.ones(5, OUT, dtype=torch.bfloat16), torch.ones(5, OUT, dtype=torch.bfloat16)
    lora_ops.bgmv_expand(x, b, expected, indices, True)
    vllm_plugin.bgmv_expand(x, b, got, indices, True)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("add_inputs", [False, True])
def test_expand_slice_matches_vllm(add_inputs: bool) -> None:
    torch.manual_seed(2)
    indices = _indices("mixed")
    x = torch.randn(TOKENS, RANK)
    b = _weights((OUT, RANK), four_d=True)
    start = torch.randn(TOKENS, 3 * OUT, dtype=torch.bfloat16)
    expected, got = start.clone(), start.clone()
    lora_ops.bgmv_expand_slice(x, b, expected, indices, OUT, OUT, add_inputs)
    vllm_plugin.bgmv_expand_slice(x, b, got, indices, OUT, OUT, add_inputs)
    torch.testing.assert_close(got, expected)


def test_register_swaps_the_cpu_kernels_only_for_the_workers_vllm_and_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    punica_cpu = pytest.importorskip("vllm.lora.punica_wrapper.punica_cpu")
    for module in (lora_ops, punica_cpu):
        for kind in ("bgmv", "sgmv"):
            for op in ("shrink", "expand", "expand_slice"):
                name = f"{kind}_{op}"
                monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    wrapper_cls = punica_cpu.PunicaWrapperCPU
    vllm_add_lora_linear = wrapper_cls.add_lora_linear
    monkeypatch.setattr(wrapper_cls, "add_lora_linear", vllm_add_lora_linear)
    monkeypatch.setattr(wrapper_cls, "_trainq_vllm_add_lora_linear", None, raising=False)
    monkeypatch.delenv(vllm_plugin.FUSED_LORA_FLAG, raising=False)
    monkeypatch.setenv(vllm_plugin.GROUPED_LORA_FLAG, "1")
    monkeypatch.delenv(vllm_plugin.ENABLE_FLAG, raising=False)
    vllm_plugin.register()  # not a vLLM the inference worker started
    assert punica_cpu.bgmv_shrink is lora_ops.bgmv_shrink is not vllm_plugin.bgmv_shrink

    monkeypatch.setenv(vllm_plugin.ENABLE_FLAG, "1")
    monkeypatch.setenv(vllm_plugin.GROUPED_LORA_FLAG, "0")
    vllm_plugin.register()  # --no-grouped-lora
    assert punica_cpu.bgmv_shrink is lora_ops.bgmv_shrink is not vllm_plugin.bgmv_shrink

    monkeypatch.setenv(vllm_plugin.GROUPED_LORA_FLAG, "1")
    vllm_plugin.register()
    assert punica_cpu.bgmv_shrink is vllm_plugin.bgmv_shrink
    assert punica_cpu.bgmv_expand is vllm_plugin.bgmv_expand
    assert lora_ops.bgmv_expand_slice is vllm_plugin.bgmv_expand_slice
    # The sequence variants go through the swapped per-token ones.
    assert punica_cpu.sgmv_expand_slice is lora_ops.sgmv_expand_slice
    assert wrapper_cls.add_lora_linear is vllm_plugin.fused_add_lora_linear
    assert wrapper_cls._trainq_vllm_add_lora_linear is vllm_add_lora_linear
    vllm_plugin.register()  # twice in one process: vLLM's method stays the one to fall back on
    assert wrapper_cls._trainq_vllm_add_lora_linear is vllm_add_lora_linear


def test_register_keeps_vllms_add_lora_linear_for_the_ab_run(monkeypatch: pytest.MonkeyPatch) -> None:
    punica_cpu = pytest.importorskip("vllm.lora.punica_wrapper.punica_cpu")
    for module in (lora_ops, punica_cpu):
        for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
            monkeypatch.setattr(module, name, getattr(module, name))
    vllm_add_lora_linear = punica_cpu.PunicaWrapperCPU.add_lora_linear
    monkeypatch.setattr(punica_cpu.PunicaWrapperCPU, "add_lora_linear", vllm_add_lora_linear)
    monkeypatch.setenv(vllm_plugin.ENABLE_FLAG, "1")
    monkeypatch.setenv(vllm_plugin.GROUPED_LORA_FLAG, "1")
    monkeypatch.setenv(vllm_plugin.FUSED_LORA_FLAG, "0")
    vllm_plugin.register()
    assert punica_cpu.bgmv_shrink is vllm_plugin.bgmv_shrink
    assert punica_cpu.PunicaWrapperCPU.add_lora_linear is vllm_add_lora_linear


@pytest.mark.parametrize("grouped_lora", [True, False])
@pytest.mark.parametrize("fused_lora", [True, False])
@pytest.mark.parametrize("lora_kernel", [True, False])
def test_the_supervisor_tells_vllm_which_kernels_to_use(grouped_lora: bool, fused_lora: bool, lora_kernel: bool,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from inference_worker.settings import InferenceSettings
    from inference_worker.supervisor import vllm_env

    monkeypatch.setenv(vllm_plugin.GROUPED_LORA_FLAG, "1")  # a stale value in the worker's environment is overridden
    monkeypatch.setenv(vllm_plugin.FUSED_LORA_FLAG, "1")
    settings = InferenceSettings(redis_url="redis://127.0.0.1:1/0", base_model="m", checkpoint_root="/tmp",
                                 grouped_lora=grouped_lora, fused_lora=fused_lora, lora_kernel=lora_kernel)
    env = vllm_env(settings)
    assert env[vllm_plugin.ENABLE_FLAG] == "1"
    assert env[vllm_plugin.GROUPED_LORA_FLAG] == ("1" if grouped_lora else "0")
    assert env[vllm_plugin.FUSED_LORA_FLAG] == ("1" if fused_lora else "0")
    assert env[vllm_lora_kernel.KERNEL_FLAG] == ("1" if lora_kernel else "0")


def test_the_command_without_lora_leaves_every_lora_flag_out() -> None:
    from inference_worker.settings import InferenceSettings
    from inference_worker.supervisor import vllm_command

    settings = InferenceSettings(redis_url="redis://127.0.0.1:1/0", base_model="m", checkpoint_root="/tmp",
                                 max_loras=3, max_lora_rank=8, max_cpu_loras=6)
    with_lora, without = vllm_command(settings, "/m"), vllm_command(settings, "/m", lora=False)

    assert " ".join(with_lora).endswith("--enable-lora --max-loras 3 --max-lora-rank 8 --max-cpu-loras 6")
    assert without == with_lora[: with_lora.index("--enable-lora")]


# --- one shrink and one expand per layer, against vLLM's PunicaWrapperCPU.add_lora_linear on the same wrapper ---


def _both(wrapper, a, b, slices, x, y):  # type: ignore[no-untyped-def]
    """(vLLM's result, ours) on copies of ``y``."""
    expected, got = y.clone(), y.clone()
    original_add_lora_linear()(wrapper, expected, x, a, b, 1.0, slices)
    vllm_plugin.fused_add_lora_linear(wrapper, got, x, a, b, 1.0, slices)
    return expected, got


@pytest.fixture(params=["kernel", "torch"])
def rows_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Each test twice: through lora_rows.c (the default), then through torch's ops (no kernel built).

    Returns what each call of ``_apply_rows_kernel`` returned (True: the kernel did the layer).
    """
    if request.param == "torch":
        monkeypatch.setattr(vllm_lora_kernel, "load", lambda: None)
        return []
    assert vllm_lora_kernel.load() is not None, "lora_rows.c did not build: is a C compiler (cc) installed?"
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
    vllm_plugin.fused_add_lora_linear(wrapper, got, x, a, b, 0.5, slices)
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
    assert vllm_lora_kernel.load() is not None, "lora_rows.c did not build: is a C compiler (cc) installed?"
    token_ids, slices, a, b, x, y = _rounding_case()
    by_kernel, by_torch = y.clone(), y.clone()
    vllm_plugin.fused_add_lora_linear(punica_wrapper(token_ids), by_kernel, x, a, b, 1.0, slices)
    monkeypatch.setattr(vllm_lora_kernel, "load", lambda: None)
    vllm_plugin.fused_add_lora_linear(punica_wrapper(token_ids), by_torch, x, a, b, 1.0, slices)
    assert by_kernel[7].isnan().all() and by_torch[7].isnan().all()
    assert torch.equal(by_kernel[200:300], y[200:300])  # the base model's rows
    differ = (by_kernel != by_torch) & ~by_torch.isnan()
    assert differ.float().mean() < 0.005, f"{int(differ.sum())} of {differ.numel()} outputs differ"
    torch.testing.assert_close(by_kernel, by_torch, equal_nan=True)


def test_cpus_without_a_bfloat16_instruction_round_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """lora_rows.c rounds with AVX512-BF16's instruction where the CPU has it, else with its own code: same bits."""
    if b"avx512_bf16" not in vllm_lora_kernel._cpu_flags():
        pytest.skip("this CPU has no AVX512-BF16: the other tests run the portable rounding")
    library = vllm_lora_kernel.load()
    assert library is not None, "lora_rows.c did not build: is a C compiler (cc) installed?"
    portable = vllm_lora_kernel.open_library(vllm_lora_kernel._build(
        os.environ.get("CC", "cc"), vllm_lora_kernel.SOURCE, (*vllm_lora_kernel.CFLAGS, "-mno-avx512bf16")))
    token_ids, slices, a, b, x, y = _rounding_case()
    outputs = []
    for build in (library, portable):
        monkeypatch.setattr(vllm_lora_kernel, "load", lambda build=build: build)
        outputs.append(y.clone())
        vllm_plugin.fused_add_lora_linear(punica_wrapper(token_ids), outputs[-1], x, a, b, 1.0, slices)
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
    vllm_plugin.fused_add_lora_linear(wrapper, got, x, a, b, 1.0, slices)
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
        vllm_plugin.fused_add_lora_linear(wrapper, y, x, a, b, 1.0, slices)
    assert True not in rows_path


def test_a_wrapper_without_vllms_index_buffer_still_gets_its_rows() -> None:
    """Another vLLM layout: the rows come from the ``token_lora_indices`` property, as they used to."""
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
    vllm_plugin.fused_add_lora_linear(OtherLayout(), got, x, a, b, 1.0, slices)
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
    vllm_plugin.fused_add_lora_linear(wrapper, y.clone(), x, a, b, 1.0, slices, buffer=buffer)
    assert buffer[0].abs().sum() > 0
    three_d = tuple(t.squeeze(1) for t in a), tuple(t.squeeze(1) for t in b)
    got = y.clone()
    vllm_plugin.fused_add_lora_linear(wrapper, got, x, *three_d, 1.0, slices)
    assert not torch.equal(got, y) and not vars(wrapper).get("_trainq_fused")


def test_row_groups() -> None:
    indices = torch.tensor([0, 0, -1, 2, 2, 0, -1, -1, 1])
    groups = dict(vllm_plugin.row_groups(indices))
    assert set(groups) == {0, 1, 2}
    assert groups[0].tolist() == [0, 1, 5]
    assert groups[2] == slice(3, 5) and groups[1] == slice(8, 9)
    assert vllm_plugin.row_groups(torch.full((4,), -1)) == []
    assert vllm_plugin.row_groups(torch.zeros(0, dtype=torch.long)) == []


# --- prompt logprobs of several requests through LoRA: vLLM-CPU's add_lora_logits gets every prompt row ---

VOCAB = 32


def _logits_case(lm_head_b: float) -> tuple[object, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two requests (5 prompt rows) with adapters 1 and 2; lm_head LoRA A random, B filled with ``lm_head_b``."""
    from vllm.lora.layers import LoRAMapping

    wrapper = punica_wrapper(MAPPINGS["one adapter"])
    wrapper.update_metadata(LoRAMapping((1, 1, 1, 2, 2), (1, 2), is_prefill=True), [1, 2, 3, None], MAX_LORAS, VOCAB)
    wrapper._trainq_vllm_add_lora_logits = type(wrapper).__dict__.get(
        "_trainq_vllm_add_lora_logits", type(wrapper).add_lora_logits).__get__(wrapper)
    a = torch.randn(MAX_LORAS, 1, MAX_RANK, HIDDEN, dtype=torch.bfloat16)
    b = torch.full((MAX_LORAS, 1, VOCAB, MAX_RANK), lm_head_b, dtype=torch.bfloat16)
    return wrapper, torch.randn(5, HIDDEN, dtype=torch.bfloat16), torch.randn(5, VOCAB, dtype=torch.bfloat16), a, b


def test_prompt_rows_of_several_requests_pass_when_no_adapter_updates_lm_head() -> None:
    wrapper, x, y, a, b = _logits_case(lm_head_b=0.0)
    before = y.clone()
    with pytest.raises(RuntimeError):  # vLLM's own method: one index per request against 5 rows
        wrapper._trainq_vllm_add_lora_logits(y.clone(), x, a, b, 1.0)

    vllm_plugin.add_lora_logits(wrapper, y, x, a, b, 1.0)

    assert torch.equal(y, before)  # nothing to add: every lm_head B is zero


def test_an_adapter_that_updates_lm_head_still_gets_vllms_method() -> None:
    wrapper, x, y, a, b = _logits_case(lm_head_b=0.5)
    with pytest.raises(RuntimeError):  # as vLLM's own: rows and indices disagree, and there is something to add
        vllm_plugin.add_lora_logits(wrapper, y, x, a, b, 1.0)

    set_mapping(wrapper, (1, 1, 2, 2, 1))  # one row per request, as when sampling: they agree
    before, expected = y.clone(), y.clone()
    wrapper._trainq_vllm_add_lora_logits(expected, x, a, b, 1.0)
    vllm_plugin.add_lora_logits(wrapper, y, x, a, b, 1.0)
    torch.testing.assert_close(y, expected)
    assert not torch.equal(y, before)


def test_a_zero_lm_head_skips_vllms_method_on_every_step_until_an_adapter_writes_one() -> None:
    wrapper, x, y, a, b = _logits_case(lm_head_b=0.0)
    set_mapping(wrapper, (1, 1, 2, 2, 1))  # one row per request, as when sampling
    calls = []
    vllms = wrapper._trainq_vllm_add_lora_logits
    wrapper._trainq_vllm_add_lora_logits = lambda *args, **kwargs: calls.append(1) or vllms(*args, **kwargs)
    before = y.clone()
    for _ in range(3):
        vllm_plugin.add_lora_logits(wrapper, y, x, a, b, 1.0)
    assert torch.equal(y, before) and not calls

    b[1, 0, :, :4] = 0.5  # an adapter with an lm_head update written into slot 1, in place
    expected = y.clone()
    vllms(expected, x, a, b, 1.0)
    vllm_plugin.add_lora_logits(wrapper, y, x, a, b, 1.0)
    assert calls == [1]
    torch.testing.assert_close(y, expected)
    assert not torch.equal(y, before)
