"""Write peft LoRA adapters of the tiny model in the trainer's checkpoint layout.

Stands in for the trainer in inference tests: each adapter is ``r=8, alpha=16``
on every projection (as the trainer's defaults), with ``lora_B`` perturbed from
zero so that different seeds give different outputs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def checkpoint_dir(root: Path, project: str, name: str, step: int) -> Path:
    """``{root}/{project}/{name}/checkpoints/{step:04d}``: the trainer's layout."""
    return Path(root) / project / name / "checkpoints" / f"{step:04d}"


def write_adapter(base_model: Path, out_dir: Path, *, seed: int, scale: float = 0.5) -> Path:
    """Save a LoRA adapter of ``base_model`` whose ``lora_B`` weights are random (``scale`` std).

    A zero ``lora_B`` (peft's init) would leave the model unchanged; random
    ones make each seed's adapter answer with its own logprobs.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_model)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGET_MODULES, lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for param_name, param in peft_model.named_parameters():
            if "lora_B" in param_name:
                param.normal_(0.0, scale)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out_dir)
    (out_dir / "trainq.json").write_text(json.dumps({"seed": seed, "written_at": time.time()}))
    return out_dir
