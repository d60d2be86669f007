"""``trainq::lora_linear``: a LoRA layer's update as one op, the same eager and compiled, never stale."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm.lora.punica_wrapper.punica_cpu", reason="vLLM is not installed")

from inference_worker import vllm_lora_compile, vllm_plugin
from tests.support.punica import HIDDEN, LAYOUTS, MAPPINGS, punica_wrapper, set_mapping, stacked_weights


def _layer(token_ids: tuple[int, ...], layout: str = "qkv") -> SimpleNamespace:
    """What the op reads of a vLLM LoRA linear layer: its punica wrapper, stacked weights and slices."""
    slices = LAYOUTS[layout]
    a, b = stacked_weights(slices)
    layer = SimpleNamespace(punica_wrapper=punica_wrapper(token_ids), lora_a_stacked=a, lora_b_stacked=b,
                            output_slices=slices)
    vllm_lora_compile.register_layer(layer)
    return layer


def _expected(layer: SimpleNamespace, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What the fused kernel writes into a copy of ``y``, called directly."""
    out = y.clone()
    vllm_plugin.fused_add_lora_linear(layer.punica_wrapper, out, x, layer.lora_a_stacked, layer.lora_b_stacked,
                                      1.0, layer.output_slices)
    return out


def _inputs(layer: SimpleNamespace, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randn(rows, HIDDEN, dtype=torch.bfloat16),
            torch.randn(rows, sum(layer.output_slices), dtype=torch.bfloat16))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_op_is_the_layers_update_and_leaves_its_input_alone(layout: str) -> None:
    torch.manual_seed(6)
    layer = _layer(MAPPINGS["mixed"], layout)
    x, y = _inputs(layer, len(MAPPINGS["mixed"]))
    before = y.clone()

    got = torch.ops.trainq.lora_linear(y, x, layer._trainq_layer)

    torch.testing.assert_close(got, _expected(layer, x, y))
    assert torch.equal(y, before) and not torch.equal(got, y)


def test_a_compiled_graph_around_the_op_sees_new_adapters_and_new_batches() -> None:
    """Traced once, then the adapter in slot 0 and the batch's mapping change in place, as vLLM changes them."""
    torch.manual_seed(7)
    token_ids = MAPPINGS["mixed"]
    layer = _layer(token_ids)
    number = layer._trainq_layer

    @torch.compile(backend="aot_eager", fullgraph=True)  # fullgraph: the op must not break the graph
    def forward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.ops.trainq.lora_linear(y * 2, x, number) - 1

    x, y = _inputs(layer, len(token_ids))
    torch.testing.assert_close(forward(x, y), _expected(layer, x, y * 2) - 1)

    for a_slice, b_slice in zip(layer.lora_a_stacked, layer.lora_b_stacked):  # as set_lora writes a new adapter
        a_slice[0, 0, :4].copy_(torch.randn(4, HIDDEN))
        b_slice[0, 0, :, :4].copy_(torch.randn(b_slice.shape[2], 4))
    new_ids = (3, 3, 2, 1, 0, 1, 3, 3, 3, 0, 2, 1, 1, 1)
    set_mapping(layer.punica_wrapper, new_ids)
    x, y = _inputs(layer, len(new_ids))
    torch.testing.assert_close(forward(x, y), _expected(layer, x, y * 2) - 1)


def test_enable_routes_lora_layers_through_the_op_and_keeps_compilation(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.lora.layers import base_linear
    from vllm.platforms import cpu as cpu_platform

    layer_cls, platform_cls = base_linear.BaseLinearLayerWithLoRA, cpu_platform.CpuPlatform
    for cls, name in ((layer_cls, "__init__"), (layer_cls, "_apply_lora_to_output"),
                      (platform_cls, "check_and_update_config")):
        monkeypatch.setattr(cls, name, cls.__dict__[name])  # restored after the test
    monkeypatch.setattr(layer_cls, "_trainq_compiled", False, raising=False)

    assert vllm_lora_compile.enable()

    assert layer_cls._apply_lora_to_output is vllm_lora_compile._apply_lora_to_output
    assert platform_cls.__dict__["check_and_update_config"].__func__.__name__ == "check_and_update_config"
    assert platform_cls.__dict__["check_and_update_config"].__func__.__module__ == vllm_lora_compile.__name__


def test_the_supervisor_asks_for_compilation_only_when_told(monkeypatch: pytest.MonkeyPatch) -> None:
    from inference_worker.settings import InferenceSettings
    from inference_worker.supervisor import vllm_env

    monkeypatch.setenv(vllm_plugin.COMPILED_LORA_FLAG, "1")  # a stale value in the worker's environment
    common = {"redis_url": "redis://127.0.0.1:1/0", "base_model": "m", "checkpoint_root": "/tmp"}
    assert vllm_env(InferenceSettings(**common))[vllm_plugin.COMPILED_LORA_FLAG] == "0"
    assert vllm_env(InferenceSettings(**common, compile_lora=True))[vllm_plugin.COMPILED_LORA_FLAG] == "1"
