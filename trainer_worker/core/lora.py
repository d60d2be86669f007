"""The base model with one resident LoRA adapter, and that adapter's state on disk."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer_worker.core.attention import ATTENTION
from trainer_worker.core.attention import register as register_attention
from trainer_worker.core.checkpoints import OPTIMIZER_FILE

__all__ = ["DEFAULT_LORA_TARGETS", "LoraSettings", "LoadedModel", "setup_model"]

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    # No dropout: it would make the trainer's log-probs differ from the sampler's
    # for the same weights, and the importance ratio would then measure noise.
    dropout: float = 0.0


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
        self.model.save_pretrained(str(folder))
        torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)

    def load(self, folder: Path, optimizer: torch.optim.Optimizer) -> None:
        from safetensors.torch import load_file

        self.set_adapter_state(load_file(str(folder / _ADAPTER_WEIGHTS), device=str(self.device)))
        state = torch.load(folder / OPTIMIZER_FILE, map_location=self.device, weights_only=True)
        optimizer.load_state_dict(state)


def setup_model(
    base_model_path: str, device: str, lora: LoraSettings, seed: int, attn_implementation: str = ATTENTION
) -> LoadedModel:
    """Load tokenizer and base model (bf16 on CUDA, fp32 on CPU) and wrap it with a LoRA adapter.

    ``attn_implementation``: per-sequence causal attention by default (see ``attention``);
    any of transformers' names (``"sdpa"``, ``"eager"``) for comparison.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    torch_device = torch.device(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
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
