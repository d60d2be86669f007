"""The inference worker's settings: each a ``--flag`` and a ``TRAINQ_*`` variable."""

from __future__ import annotations

import shlex
from typing import Literal

from pydantic import Field

from producer.settings import ServiceSettings

__all__ = ["InferenceSettings"]


class InferenceSettings(ServiceSettings):
    """vLLM's OpenAI server plus the checkpoint watcher, for one base model."""

    host: str = Field("127.0.0.1", description="Interface vLLM listens on (0.0.0.0 to serve other machines).")
    port: int = Field(8000, ge=1, le=65535, description="Port of vLLM's OpenAI-compatible API and its own /metrics.")
    api_key: str | None = Field(
        None, description="Bearer key every /v1 request must carry; unset serves without auth."
    )
    served_model_name: str | None = Field(
        None, description="Name of the base model in /v1/models; defaults to --base-model as given."
    )
    max_loras: int = Field(4, ge=1, description="Adapters vLLM runs in one batch (its --max-loras).")
    max_cpu_loras: int | None = Field(
        None, ge=1, description="Adapters vLLM caches in memory (its --max-cpu-loras); more are reloaded from disk."
    )
    max_lora_rank: int = Field(16, ge=1, description="Largest LoRA rank accepted (its --max-lora-rank).")
    max_model_len: int | None = Field(None, ge=16, description="Context length (its --max-model-len); the model's by default.")
    kv_cache_gib: int = Field(
        4, ge=1, description="KV cache size in whole GiB on CPU builds (VLLM_CPU_KVCACHE_SPACE); ignored on GPU."
    )
    grouped_lora: bool = Field(
        True,
        description="On vLLM's CPU build, apply LoRA with trainq's grouped kernels (inference_worker/vllm_cpu_lora) "
        "instead of vLLM's, which copy the adapter's weights once per token; no effect on GPU builds.",
    )
    fused_lora: bool = Field(
        True,
        description="With --grouped-lora, apply each LoRA layer's slices (q/k/v, gate/up) as one shrink and one "
        "expand instead of vLLM-CPU's two calls per slice; bench_rollout.py --kernels grouped fused compares the two.",
    )
    lora_kernel: bool = Field(
        True,
        description="With --fused-lora, apply each LoRA layer in one call of a C kernel built for this CPU on first "
        "use (inference_worker/vllm_cpu_lora/lora_rows.c; without a C compiler torch's ops serve) instead of torch's ops; "
        "bench_rollout.py --kernels fused-torch fused compares the two.",
    )
    compile_lora: bool = Field(
        False,
        description="On vLLM's CPU build, compile the model with LoRA on (LoRA layers as one opaque op, "
        "inference_worker/vllm_cpu_lora/compilation.py): faster decoding through adapters for a longer vLLM start "
        "(figures in bench/README.md).",
    )
    kernel_cache: str | None = Field(
        None, min_length=1,
        description="Folder where vLLM's CPU build gets trainq's LoRA kernel and op built, once per source, CPU and "
        "torch; ~/.cache/trainq/kernels by default.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="The weights' and activations' dtype in vLLM (its --dtype). auto: float32 on vLLM's CPU build, "
        "as the trainer trains on the CPU, so the sampler's logprobs are the trainer's (first-job k3 mismatch 0, "
        "against 7e-4 to 2e-3 in bfloat16), and on a CPU without bfloat16 arithmetic (AVX2) sampling is 3x faster "
        "than bfloat16, which torch emulates there; vLLM's own choice (the model's dtype) elsewhere.",
    )
    block_size: int | None = Field(
        None, ge=1,
        description="Tokens per block of vLLM's KV cache (its --block-size); unset: 32 on vLLM's CPU build, whose "
        "own default of 128 shares a cached prompt prefix only in whole 128-token blocks, so a group's rollouts "
        "recomputed their common system prompt and few-shot turns (demo step: 15-19 s of sampling against "
        "3.3 s at 32); vLLM's own choice elsewhere.",
    )
    float32_logits: bool = Field(
        True,
        description="Compute the logits in float32 (vLLM's head_dtype), whatever the model's dtype: bfloat16 logits "
        "round each logit to 1/128 of its size, which makes the sampler's logprobs differ from the trainer's "
        "(the training-inference mismatch); --no-float32-logits keeps the model's dtype.",
    )
    tool_call_parser: str = Field(
        "hermes",
        description="vLLM's parser of the tool calls in a model's answer to a request with tools= "
        "(its --tool-call-parser, with --enable-auto-tool-choice); hermes reads <tool_call>{json}</tool_call>, "
        "as Qwen-style and ChatML templates (the embedded model's included) write them; '' turns tool choice off.",
    )
    vllm_args: str = Field(
        "", description="Extra arguments for vLLM's api_server, shell-quoted, e.g. '--enforce-eager --dtype float32'."
    )
    startup_timeout_s: float = Field(600.0, gt=0, description="How long vLLM may take to answer /health after a start.")
    health_interval_s: float = Field(2.0, gt=0, description="Seconds between /health checks of a running vLLM.")
    restart_backoff_s: float = Field(1.0, gt=0, description="First wait before restarting a dead vLLM; doubles per failure.")
    restart_backoff_max_s: float = Field(60.0, gt=0, description="Longest wait between vLLM restarts.")

    def extra_vllm_args(self) -> list[str]:
        return shlex.split(self.vllm_args)
