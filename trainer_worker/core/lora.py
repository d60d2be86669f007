"""The base model with one resident LoRA adapter, and that adapter's state on disk."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer_worker.core.attention import ATTENTION
from trainer_worker.core.attention import register as register_attention
from trainer_worker.core.checkpoints import OPTIMIZER_FILE

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "DTYPES",
    "LoadedModel",
    "LoraSettings",
    "TrainingState",
    "resolve_dtype",
    "setup_model",
]

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ADAPTER_WEIGHTS = "adapter_model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
"""The base model's dtypes by name. float64 exists to check that two ways of taking a step agree to 1e-12."""


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``"auto"``: bfloat16 on CUDA, float32 on the CPU; else the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    # No dropout: it would make the trainer's log-probs differ from the sampler's
    # for the same weights, and the importance ratio would then measure noise.
    dropout: float = 0.0


@dataclass(frozen=True)
class TrainingState:
    """One checkpoint's trainable state, as the files hold it."""

    adapter: dict[str, torch.Tensor]
    """peft's saved layout: keys without the adapter's name (``...lora_A.weight``)."""
    optimizer: dict[str, Any] | None
    """``optimizer.state_dict()`` (parameters by index); ``None``: a fresh AdamW."""

    @property
    def fresh_optimizer(self) -> bool:
        """No AdamW moments yet (step 0, or no step has trained a token)."""
        return self.optimizer is None or not self.optimizer.get("state")


@dataclass
class LoadedModel:
    tokenizer: Any
    model: Any  # peft.PeftModel
    device: torch.device
    initial_adapter: dict[str, torch.Tensor] = field(repr=False)
    """The untrained adapter (seeded), reused as step 0 of every model."""

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().num_embeddings)

    @property
    def max_positions(self) -> int | None:
        value = getattr(self.model.config, "max_position_embeddings", None)
        return int(value) if value else None

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def set_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, state)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise ValueError(f"adapter does not fit this base model: unexpected keys {unexpected[:3]}")

    def save(self, folder: Path, optimizer: torch.optim.Optimizer) -> None:
        """Write the adapter in peft's standard layout and the optimizer state into ``folder``."""
        self.write(folder, optimizer.state_dict())

    def write(
        self, folder: Path, optimizer_state: dict[str, Any], model_state: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Write a checkpoint's files: ``model_state`` (the model's own keys, adapter names included;
        ``None``: the live model's) through peft's ``save_pretrained``, and ``optimizer_state``."""
        self.model.save_pretrained(str(folder), state_dict=model_state)
        torch.save(optimizer_state, folder / OPTIMIZER_FILE)

    def read(self, folder: Path) -> TrainingState:
        """A checkpoint's adapter and optimizer state; ``ValueError`` if the adapter is not this model's shape."""
        from safetensors.torch import load_file

        adapter = load_file(str(folder / _ADAPTER_WEIGHTS), device=str(self.device))
        if adapter.keys() != self.initial_adapter.keys():
            unexpected = sorted(adapter.keys() - self.initial_adapter.keys())
            missing = sorted(self.initial_adapter.keys() - adapter.keys())
            raise ValueError(
                f"adapter in {folder} does not fit this base model: unexpected keys {unexpected[:3]}, "
                f"missing keys {missing[:3]}"
            )
        optimizer = torch.load(folder / OPTIMIZER_FILE, map_location=self.device, weights_only=True)
        return TrainingState(adapter=adapter, optimizer=optimizer)


def setup_model(
    base_model_path: str,
    device: str,
    lora: LoraSettings,
    seed: int,
    attn_implementation: str = ATTENTION,
    dtype: torch.dtype | None = None,
) -> LoadedModel:
    """Load tokenizer and base model and wrap it with a LoRA adapter, on ``device``.

    ``dtype``: the base model's (default bf16 on CUDA, fp32 on CPU); peft keeps a
    bf16 base's adapter in fp32. ``attn_implementation``: per-sequence causal
    attention by default (see ``attention``); any of transformers' names
    (``"sdpa"``, ``"eager"``) for comparison.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    torch_device = torch.device(device)
    dtype = dtype or resolve_dtype("auto", device)
    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"the tokenizer of {base_model_path} has no chat template")
    if attn_implementation == ATTENTION:
        register_attention()
    base = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=dtype, attn_implementation=attn_implementation)
    # The adapter is initialised on the CPU and moved with the model: the same seed then
    # gives the same step 0 on every device (CUDA's generator draws other numbers).
    torch.manual_seed(seed)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config).to(torch_device)
    loaded = LoadedModel(tokenizer=tokenizer, model=model, device=torch_device, initial_adapter={})
    loaded.initial_adapter = loaded.adapter_state()
    return loaded
