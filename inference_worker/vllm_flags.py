"""The environment variables by which the inference worker configures trainq's vLLM-CPU plugin.

The supervisor sets them for the vLLM it starts (``supervisor.vllm_env``, from
``InferenceSettings``); the plugin (``inference_worker/vllm_cpu_lora``) reads
them in each of vLLM's processes. They are named here, outside the plugin,
because both sides need the names and the supervisor imports nothing of the
plugin. This module imports nothing heavy: every vLLM process imports it when
it loads the plugin.
"""

from __future__ import annotations

import os
from enum import StrEnum

__all__ = ["KERNEL_CACHE", "VLLMPluginFlag", "flag_on"]


class VLLMPluginFlag(StrEnum):
    """A switch of the plugin, ``"1"`` (on) or ``"0"`` (off), one per inference worker setting."""

    ENABLED = "TRAINQ_VLLM_PLUGIN"  # this vLLM is the inference worker's; one started by hand is left alone
    GROUPED_LORA = "TRAINQ_VLLM_GROUPED_LORA"  # --grouped-lora
    FUSED_LORA = "TRAINQ_VLLM_FUSED_LORA"  # --fused-lora
    LORA_KERNEL = "TRAINQ_VLLM_LORA_KERNEL"  # --lora-kernel
    COMPILED_LORA = "TRAINQ_VLLM_COMPILED_LORA"  # --compile-lora


# Where the plugin builds lora_rows.c and lora_op.cpp (InferenceSettings.kernel_cache).
KERNEL_CACHE = "TRAINQ_KERNEL_CACHE"


def flag_on(flag: VLLMPluginFlag, *, default: bool) -> bool:
    """Whether ``flag`` is on in this process's environment; ``default`` where it is not set."""
    value = os.environ.get(flag)
    return default if value is None else value == "1"
