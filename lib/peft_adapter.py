"""
lib/peft_adapter.py: a LoRA run's adapters as a PEFT LoRA adapter for its base model, so that
`peft.PeftModel.from_pretrained(base, DIR)` computes what our model computes:

    export_peft_adapter(adapters, lora, cfg, "export/adapter", base_name)   # adapter_config.json,
                                                                            # adapter_model.safetensors
    base = AutoModelForCausalLM.from_pretrained("export/base")              # then, with transformers and peft
    model = PeftModel.from_pretrained(base, "export/adapter")

`python export.py --ckpt RUN --out DIR --peft-adapter DIR2 --peft-base DIR3` writes it beside the merged
model, and the base model to DIR3 (docs/finetuning.md). base_name goes into adapter_config.json as
base_model_name_or_path, where AutoPeftModelForCausalLM.from_pretrained(DIR2) looks for the base: a Hub id
or a folder's absolute path (PEFT reads a relative one from the current folder, not the adapter's); None
writes null, and the base must then be given to PeftModel.from_pretrained by hand.

Our fused qkv adapter (one A, B of (r, (nh + 2 nkv) hs)) is q_proj, k_proj and v_proj adapters that share
A: each gets A, and its columns of B (narrower for k and v under grouped-query attention). PEFT stores
lora_A.weight as (r, in) and lora_B.weight as (out, r), torch's Linear layout: A.T and B.T here. The module
names are Hugging Face's Llama names (lib/hf.py).
"""

from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

import gpt_numpy as gn
from lib.hf import qkv_columns, write_json

# Hugging Face's module names for each of our LoRA targets (qkv is three)
PEFT_MODULES = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "proj": ("self_attn.o_proj",),
                "gate": ("mlp.gate_proj",), "up": ("mlp.up_proj",), "down": ("mlp.down_proj",)}


def to_peft_tensors(adapters, lora, cfg):
    """Our adapters -> {PEFT name: float32 array}: lora_A.weight (r, in) = A.T, lora_B.weight (out, r) = B.T.

    Example: blocks.0.attn.qkv.lora_B (r, C + 2 nkv hs) -> base_model.model.model.layers.0.self_attn.
    {q,k,v}_proj.lora_B.weight of shapes (C, r), (nkv hs, r), (nkv hs, r), each with the same lora_A.
    """
    host = {k: gn.to_host(v) for k, v in adapters.items()}
    out = {}
    for i in range(cfg.n_layer):
        for t in lora.targets:
            ours = f"blocks.{i}.{gn.LORA_TARGETS[t][0]}"
            A, B = host[ours + ".lora_A"], host[ours + ".lora_B"]           # (in, r), (r, out)
            cols = qkv_columns(cfg) if t == "qkv" else [slice(None)]
            for module, c in zip(PEFT_MODULES[t], cols):
                p = f"base_model.model.model.layers.{i}.{module}"
                out[p + ".lora_A.weight"] = np.ascontiguousarray(A.T, dtype=np.float32)
                out[p + ".lora_B.weight"] = np.ascontiguousarray(B[:, c].T, dtype=np.float32)
    return out


def peft_config(lora, base_name=None):
    """adapter_config.json of a PEFT LoRA adapter with our rank, alpha (scale alpha / r) and targets."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout, "target_modules": sorted(m.split(".")[1] for t in lora.targets
                                                                    for m in PEFT_MODULES[t]),
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": "gaussian", "modules_to_save": None, "inference_mode": True,
            "base_model_name_or_path": base_name}


def export_peft_adapter(adapters, lora, cfg, out_dir, base_name=None):
    """Write adapter_config.json and adapter_model.safetensors, a PEFT LoRA adapter, to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(to_peft_tensors(adapters, lora, cfg), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    write_json(out / "adapter_config.json", peft_config(lora, base_name))
    return out
