"""torch.compile for vLLM-CPU with LoRA on: each LoRA layer's update as one opaque op.

vLLM's CPU platform turns compilation off whenever LoRA is enabled
(``CpuPlatform.check_and_update_config``): its CPU LoRA path is Python that
reads the batch's adapter mapping, which a traced graph would freeze. So the
base model of a LoRA server runs eager, 1.4x slower than the same model in a
vLLM without ``--enable-lora`` (bench/README.md, rollout section).

vLLM's GPU build keeps compilation with LoRA because its LoRA kernels are
custom ops, opaque to the tracer. This does the same on CPU: every LoRA linear
layer gets a number when vLLM builds it, and its ``_apply_lora_to_output``
calls ``trainq::lora_linear(output, x, number)``, a custom op that looks the
layer up and runs its punica wrapper's ``add_lora_linear`` (trainq's fused
layers, ``fused``) eagerly, on the mapping of the step being run. The
graph around it (base projections, attention, norms) is compiled with the
mode vLLM-CPU uses without LoRA.

Where a C++ compiler can build against torch's headers, the graph calls
``trainq_rows::lora_linear`` instead (lora_op.cpp, ``rows_op``):
the same update, but the layer's call into lora_rows.c made from C++ for as
long as the step and the layer this op last published (``_publish``) hold,
and this op otherwise. Python's ~10 us around each of a decode step's 120
calls was about as much as the kernel's arithmetic.

The cost is the compilation at each start (~70 s for SmolLM2-135M on 2 CPUs:
vLLM 0.32's compile cache did not load back here), so it is opt-in:
``--compile-lora`` on the inference worker (``TRAINQ_VLLM_COMPILED_LORA=1``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch  # only vLLM's processes import this module (registration.register)

from inference_worker.vllm_cpu_lora import fused, rows_kernel, rows_op
from inference_worker.vllm_cpu_lora.rows import step_rows

log = logging.getLogger("vllm.plugins.trainq")

__all__ = ["install", "lora_linear", "register_layer"]

# Every LoRA linear layer this process built, by the number its graph calls the op with.
_LAYERS: list[Any] = []
# What the graph calls: trainq_rows::lora_linear once lora_op.cpp is loaded (install), else trainq::lora_linear.
_op: Any = None
# The (buffer, version, rows) of the step last handed to trainq_rows, so that it is handed over once.
_published_step: tuple[int, int, int] | None = None
# The fused layer each layer number was last published with: C++ holds the addresses of its kernel struct
# and weights, so it lives until the next publication replaces it, even once the plugin's cache drops it.
_published_layers: dict[int, Any] = {}


def install() -> None:
    """Patch vLLM-CPU: keep compilation with LoRA, route LoRA linear layers through the op (once per process)."""
    from vllm.config import CompilationMode
    from vllm.lora.layers import base_linear
    from vllm.platforms import cpu as cpu_platform

    layer_cls: Any = base_linear.BaseLinearLayerWithLoRA  # its methods replaced: no longer the class mypy knows
    if getattr(layer_cls, "_trainq_compiled", False):
        return
    _use_rows_op(rows_op.load_op())
    _keep_compilation(cpu_platform.CpuPlatform, CompilationMode.DYNAMO_TRACE_ONCE)
    _number_layers(layer_cls)
    layer_cls._apply_lora_to_output = _apply_lora_to_output
    layer_cls._trainq_compiled = True
    log.info("trainq: vLLM-CPU compiles the model with LoRA on; each LoRA layer is one op (%s)", _op._name)


# Registered with the dispatcher directly rather than through torch.library.custom_op, whose Python
# wrapper cost ~12 us a call against ~5 (clone included), 120 calls a decode step of SmolLM2-135M.
# Not mutating: a mutating custom op goes through vLLM's defunctionalization pass, which names
# GPU-only ops and fails on the CPU build.
_LIBRARY = torch.library.Library("trainq", "DEF")  # process-wide: the op is defined once, at import
_LIBRARY.define("lora_linear(Tensor output, Tensor x, int layer) -> Tensor")


def lora_linear(output: torch.Tensor, x: torch.Tensor, layer: int) -> torch.Tensor:
    """``output`` plus LoRA layer number ``layer``'s update for ``x``, with the batch's current adapters."""
    module = _LAYERS[layer]
    result = output.clone()
    module.punica_wrapper.add_lora_linear(result, x, module.lora_a_stacked, module.lora_b_stacked, 1.0,
                                          module.output_slices)
    if _op is not _PYTHON_OP:
        _publish(module, layer, x.shape[0])
    return result


def _lora_linear_shape(output: torch.Tensor, x: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.empty_like(output)  # what the tracer sees: a new tensor shaped like output


_LIBRARY.impl("lora_linear", lora_linear, "CPU")
torch.library.register_fake("trainq::lora_linear", _lora_linear_shape, lib=_LIBRARY)
_PYTHON_OP = _op = torch.ops.trainq.lora_linear.default


def _use_rows_op(loaded: bool) -> None:
    """Route the graph's LoRA layers through trainq_rows::lora_linear, if lora_op.cpp ``loaded``."""
    global _op
    if not loaded or _op is not _PYTHON_OP:
        return
    torch.library.register_fake("trainq_rows::lora_linear", _lora_linear_shape)  # process-wide, once
    _op = torch.ops.trainq_rows.lora_linear.default
    log.info("trainq: the compiled graph's LoRA layers call lora_rows.c from C++ (trainq_rows::lora_linear)")


def _publish(module: Any, number: int, rows: int) -> None:
    """Hand trainq_rows this step and layer ``number``, where the layer's update just went through lora_rows.c.

    Only then: with vLLM's own ``add_lora_linear`` (``--no-fused-lora``), torch's
    ops, or a batch of ``SPLIT_ROWS`` rows or more, the C++ op keeps calling this one.
    """
    global _published_step
    wrapper = module.punica_wrapper
    if type(wrapper).add_lora_linear is not fused.fused_add_lora_linear or rows >= rows_kernel.SPLIT_ROWS:
        return
    indices, groups = step_rows(wrapper)
    if not groups or indices.numel() != rows or indices.is_inference() or indices.dtype != torch.int64:
        return
    layer = fused.fused_layer(wrapper, module.lora_a_stacked, module.lora_b_stacked, module.output_slices)
    if layer is None or layer.kernel is None or any(slot not in layer.kernel_slots for slot, _ in groups):
        return
    step = (indices.data_ptr(), indices._version, rows)
    if step != _published_step:
        torch.ops.trainq_rows.set_step(indices, indices._version, rows, [slot for slot, _ in groups])
        _published_step = step
    kernel = layer.kernel
    _published_layers[number] = layer
    torch.ops.trainq_rows.set_layer(number, kernel.address, kernel.in_features, kernel.width, list(layer.tensors),
                                    layer.versions, list(layer.kernel_slots))


def register_layer(layer: Any) -> int:
    """Give ``layer`` (a vLLM LoRA linear layer) its number for ``lora_linear``."""
    layer._trainq_layer = len(_LAYERS)
    _LAYERS.append(layer)
    return layer._trainq_layer


def _keep_compilation(platform_cls: Any, mode: Any) -> None:
    original = platform_cls.check_and_update_config.__func__

    def check_and_update_config(cls: Any, vllm_config: Any) -> None:
        original(cls, vllm_config)
        if vllm_config.lora_config is not None and not vllm_config.model_config.enforce_eager:
            vllm_config.compilation_config.mode = mode  # what vLLM-CPU uses without LoRA

    platform_cls.check_and_update_config = classmethod(check_and_update_config)


def _number_layers(layer_cls: Any) -> None:
    original = layer_cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        register_layer(self)

    layer_cls.__init__ = __init__


def _apply_lora_to_output(self: Any, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """vLLM's ``BaseLinearLayerWithLoRA._apply_lora_to_output``, the update through the op."""
    original_shape = output.shape if output.ndim == 3 else None
    if x.ndim == 3 and output.ndim == 3:  # the transformers backend's (1, tokens, hidden)
        output = output.flatten(0, 1)
        x = x.flatten(0, 1)
    output = _op(output, x, self._trainq_layer)
    if original_shape is not None:
        output = output.reshape(original_shape)
    return output
