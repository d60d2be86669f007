"""ART's ``art.dev``: the typed dicts ART code configures models and servers with.

trainq's workers are services with their own settings (``python -m
trainer_worker --help``, ``python -m inference_worker --help``), shared by every
model on a base model, so a model's ``_internal_config`` changes nothing here:
each setting in it is reported once, with the flag that does the job where
there is one (``IGNORED``). ``TrainConfig`` is ``backend.train``'s keywords,
which trainq honours (``producer.backend.TrainOptions``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

from producer._warn import warn_once
from producer.backend import TrainOptions

__all__ = [
    "EngineArgs",
    "InitArgs",
    "InternalModelConfig",
    "OpenAIServerConfig",
    "PeftArgs",
    "ServerArgs",
    "TrainConfig",
    "TrainerArgs",
    "warn_ignored_internal_config",
]

TrainConfig = TrainOptions


class InitArgs(TypedDict, total=False):
    """How ART loads the base model for training (Unsloth's ``from_pretrained`` arguments)."""

    model_name: str
    max_seq_length: int
    dtype: str | None
    load_in_4bit: bool
    load_in_8bit: bool
    full_finetuning: bool
    fast_inference: bool
    gpu_memory_utilization: float
    max_lora_rank: int
    enable_prefix_caching: bool
    use_gradient_checkpointing: str | bool
    trust_remote_code: bool
    random_state: int


class EngineArgs(TypedDict, total=False):
    """vLLM engine arguments, as ART passes them to its in-process vLLM."""

    model: str
    max_model_len: int | None
    gpu_memory_utilization: float
    tensor_parallel_size: int
    enable_prefix_caching: bool | None
    enable_sleep_mode: bool
    enforce_eager: bool | None
    max_num_seqs: int | None
    generation_config: str
    seed: int
    dtype: str


class PeftArgs(TypedDict, total=False):
    """The LoRA adapter's shape."""

    r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: list[str]
    bias: str
    use_rslora: bool
    random_state: int


class TrainerArgs(TypedDict, total=False):
    """Optimizer and trainer settings (TRL's ``GRPOConfig`` arguments in ART)."""

    learning_rate: float
    adam_beta1: float
    adam_beta2: float
    weight_decay: float
    max_grad_norm: float
    lr_scheduler_type: str
    optim: str
    gradient_accumulation_steps: int
    per_device_train_batch_size: int
    logging_steps: int
    output_dir: str


class InternalModelConfig(TypedDict, total=False):
    """A model's engine, adapter and trainer settings in ART (``TrainableModel(_internal_config=...)``)."""

    init_args: InitArgs
    engine_args: EngineArgs
    peft_args: PeftArgs
    trainer_args: TrainerArgs


class ServerArgs(TypedDict, total=False):
    """Arguments of vLLM's OpenAI-compatible server."""

    api_key: str | None
    host: str | None
    port: int
    return_tokens_as_token_ids: bool
    enable_auto_tool_choice: bool
    tool_call_parser: str | None


class OpenAIServerConfig(TypedDict, total=False):
    """How ART starts its OpenAI-compatible server."""

    log_file: str
    server_args: ServerArgs
    engine_args: EngineArgs


IGNORED: dict[str, str] = {
    "init_args.max_seq_length": "the inference worker's --max-model-len and the trainer's model limit",
    "engine_args": "the inference worker's flags (--vllm-args passes any vLLM argument)",
    "init_args": "the trainer worker's flags (--device; bf16 on CUDA, float32 on CPU)",
    "peft_args": "the trainer's LoRA shape (r=8, alpha=16, every projection), the same for every model",
    "trainer_args.learning_rate": "backend.train(learning_rate=...)",
    "trainer_args": "backend.train's keywords; AdamW without weight decay, gradients clipped at norm 1.0",
}


def warn_ignored_internal_config(config: Mapping[str, Any]) -> None:
    """Warn once per setting of an ``InternalModelConfig`` that it changes nothing in trainq, and what does."""
    for section, values in config.items():
        keys = list(values) if isinstance(values, Mapping) else [""]
        for key in keys:
            path = f"{section}.{key}" if key else section
            instead = IGNORED.get(path) or IGNORED.get(section, "trainq's worker settings")
            warn_once(f"_internal_config {path} is ignored by trainq; set {instead}", stacklevel=4)
