"""``trainq::lora_linear`` and ``trainq_rows::lora_linear`` (C++): a LoRA layer's update as one op, the same
eager and compiled, never stale."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm.lora.punica_wrapper.punica_cpu", reason="vLLM is not installed")

from inference_worker.vllm_cpu_lora import compilation, fused, rows_kernel, rows_op
from tests.support.punica import (
    HIDDEN,
    LAYOUTS,
    MAPPINGS,
    original_add_lora_linear,
    punica_wrapper,
    rows_kernel_calls,
    set_mapping,
    stacked_weights,
)


@pytest.fixture(params=["python", "c++"])
def op(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Each test through trainq::lora_linear, then through trainq_rows::lora_linear (lora_op.cpp)."""
    if request.param == "python":
        return torch.ops.trainq.lora_linear.default
    return _rows_op(monkeypatch)


def _rows_op(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """trainq_rows::lora_linear, with the fused method installed as register() installs it (else it never publishes)."""
    from vllm.lora.punica_wrapper import punica_cpu

    assert rows_op.load_op(), "lora_op.cpp did not build: is a C++ compiler (c++) installed?"
    monkeypatch.setattr(compilation, "_op", compilation._op)  # the graph's op, as it was after the test
    compilation._use_rows_op(True)
    wrapper_cls = punica_cpu.PunicaWrapperCPU  # as register() leaves it: vLLM's method kept beside the fused one
    monkeypatch.setattr(wrapper_cls, "_trainq_vllm_add_lora_linear", original_add_lora_linear(), raising=False)
    monkeypatch.setattr(wrapper_cls, "add_lora_linear", fused.fused_add_lora_linear)
    return torch.ops.trainq_rows.lora_linear.default


def _layer(token_ids: tuple[int, ...], layout: str = "qkv") -> SimpleNamespace:
    """What the op reads of a vLLM LoRA linear layer: its punica wrapper, stacked weights and slices."""
    slices = LAYOUTS[layout]
    a, b = stacked_weights(slices)
    layer = SimpleNamespace(punica_wrapper=punica_wrapper(token_ids), lora_a_stacked=a, lora_b_stacked=b,
                            output_slices=slices)
    compilation.register_layer(layer)
    return layer


def _expected(layer: SimpleNamespace, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What the fused kernel writes into a copy of ``y``, called directly."""
    out = y.clone()
    fused.fused_add_lora_linear(layer.punica_wrapper, out, x, layer.lora_a_stacked, layer.lora_b_stacked,
                                      1.0, layer.output_slices)
    return out


def _inputs(layer: SimpleNamespace, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randn(rows, HIDDEN, dtype=torch.bfloat16),
            torch.randn(rows, sum(layer.output_slices), dtype=torch.bfloat16))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_op_is_the_layers_update_and_leaves_its_input_alone(layout: str, op) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(6)
    layer = _layer(MAPPINGS["mixed"], layout)
    x, y = _inputs(layer, len(MAPPINGS["mixed"]))
    before = y.clone()

    for _ in range(2):  # the C++ op's first call of a step goes through Python, the second does not
        got = op(y, x, layer._trainq_layer)
        torch.testing.assert_close(got, _expected(layer, x, y))
        assert torch.equal(y, before) and not torch.equal(got, y)


def test_a_compiled_graph_around_the_op_sees_new_adapters_and_new_batches(op) -> None:  # type: ignore[no-untyped-def]
    """Traced once, then the adapter in slot 0 and the batch's mapping change in place, as vLLM changes them."""
    torch.manual_seed(7)
    token_ids = MAPPINGS["mixed"]
    layer = _layer(token_ids)
    number = layer._trainq_layer

    @torch.compile(backend="aot_eager", fullgraph=True)  # fullgraph: the op must not break the graph
    def forward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return op(y * 2, x, number) - 1

    x, y = _inputs(layer, len(token_ids))
    torch.testing.assert_close(forward(x, y), _expected(layer, x, y * 2) - 1)
    torch.testing.assert_close(forward(x, y), _expected(layer, x, y * 2) - 1)

    for a_slice, b_slice in zip(layer.lora_a_stacked, layer.lora_b_stacked):  # as set_lora writes a new adapter
        a_slice[0, 0, :4].copy_(torch.randn(4, HIDDEN))
        b_slice[0, 0, :, :4].copy_(torch.randn(b_slice.shape[2], 4))
    new_ids = (3, 3, 2, 1, 0, 1, 3, 3, 3, 0, 2, 1, 1, 1)
    set_mapping(layer.punica_wrapper, new_ids)
    x, y = _inputs(layer, len(new_ids))
    torch.testing.assert_close(forward(x, y), _expected(layer, x, y * 2) - 1)
    torch.testing.assert_close(forward(x, y), _expected(layer, x, y * 2) - 1)


def test_the_cpp_op_stays_in_cpp_until_the_step_or_the_adapter_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    rows_op = _rows_op(monkeypatch)
    python = rows_kernel_calls(monkeypatch)  # the C++ op's own calls are not there
    torch.manual_seed(8)
    layer = _layer(MAPPINGS["one adapter"], "gate_up")
    number = layer._trainq_layer
    x, y = _inputs(layer, len(MAPPINGS["one adapter"]))

    def check(python_calls: int) -> None:
        assert torch.equal(rows_op(y, x, number), _expected(layer, x, y))  # _expected: one more Python call
        assert len(python) == python_calls + 1 and all(python)

    check(1)  # published
    check(2)  # C++ alone: only _expected's call is new
    for a_slice in layer.lora_a_stacked:  # vLLM writes another adapter into the slot
        a_slice[0, 0, :2].copy_(torch.randn(2, HIDDEN))
    check(4)
    check(5)
    set_mapping(layer.punica_wrapper, MAPPINGS["one adapter"])  # the next step, same rows
    check(7)
    check(8)


@pytest.mark.parametrize("case", ["float32", "long batch", "vLLM's add_lora_linear"])
def test_the_cpp_op_hands_what_the_kernel_does_not_do_to_python(monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    from vllm.lora.punica_wrapper import punica_cpu

    vllm_method = original_add_lora_linear()
    rows_op = _rows_op(monkeypatch)
    torch.manual_seed(9)
    rows = rows_kernel.SPLIT_ROWS if case == "long batch" else 9
    layer = _layer((1,) * rows)
    x, y = _inputs(layer, rows)
    if case == "float32":
        x, y = x.float(), y.float()
    if case == "vLLM's add_lora_linear":  # --no-fused-lora: the layer must not go through the fused kernel
        monkeypatch.setattr(punica_cpu.PunicaWrapperCPU, "add_lora_linear", vllm_method)
    python = rows_kernel_calls(monkeypatch)  # the C++ op's own calls are not there
    for _ in range(2):
        torch.testing.assert_close(rows_op(y, x, layer._trainq_layer), _expected(layer, x, y))
    # Python's every time (the op's, then _expected's); vLLM's method makes none of the first.
    assert len(python) == (2 if case == "vLLM's add_lora_linear" else 4)


def test_the_cpp_op_keeps_each_wrappers_steps_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two wrappers whose index buffers share a version, a length and slots: each layer must read its own."""
    rows_op = _rows_op(monkeypatch)
    torch.manual_seed(10)
    first, second = _layer((1, 1, 1, 2, 2, 2)), _layer((2, 2, 2, 1, 1, 1))
    assert first.punica_wrapper._token_lora_indices._version == second.punica_wrapper._token_lora_indices._version
    x, y = _inputs(first, 6)
    for layer in (first, second, first, second):
        assert torch.equal(rows_op(y, x, layer._trainq_layer), _expected(layer, x, y))


def test_install_routes_lora_layers_through_the_op_and_keeps_compilation(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.lora.layers import base_linear
    from vllm.platforms import cpu as cpu_platform

    layer_cls, platform_cls = base_linear.BaseLinearLayerWithLoRA, cpu_platform.CpuPlatform
    for cls, name in ((layer_cls, "__init__"), (layer_cls, "_apply_lora_to_output"),
                      (platform_cls, "check_and_update_config")):
        monkeypatch.setattr(cls, name, cls.__dict__[name])  # restored after the test
    monkeypatch.setattr(layer_cls, "_trainq_compiled", False, raising=False)

    compilation.install()

    assert layer_cls._apply_lora_to_output is compilation._apply_lora_to_output
    assert platform_cls.__dict__["check_and_update_config"].__func__.__name__ == "check_and_update_config"
    assert platform_cls.__dict__["check_and_update_config"].__func__.__module__ == compilation.__name__


def test_the_cpp_op_leaves_an_output_of_other_rows_to_torchs_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """C writes where the addresses say: with the step and layer published, a short output still fails in torch."""
    rows_op = _rows_op(monkeypatch)
    torch.manual_seed(11)
    layer = _layer(MAPPINGS["one adapter"])
    x, y = _inputs(layer, len(MAPPINGS["one adapter"]))
    rows_op(y, x, layer._trainq_layer)  # publishes the step and the layer
    with pytest.raises(RuntimeError):
        rows_op(y[:-1], x, layer._trainq_layer)
