"""
LoRA: low-rank adapters on every attention and MLP linear of a Transformer (model.py), for
train.py --lora_rank. A run is saved as a plain model (each adapter folded into its weight) with
the adapters beside it, so sampling needs no LoRA code and a resumed run continues exactly.
"""

import math

import torch
import torch.nn as nn

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """base(x) + (alpha / rank) B A x, the base frozen; B starts at zero, so the model starts
    unchanged."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def delta(self):  # s B A, in float32 at least
        dt = torch.promote_types(self.lora_B.dtype, torch.float32)
        return self.scale * (self.lora_B.to(dt) @ self.lora_A.to(dt))


def add_lora(model, rank, alpha, train_others=True):
    """Wraps the LORA_TARGETS linears in LoRALinear and freezes them; the embeddings, norms and
    head stay trainable if train_others (the paper's choice), else frozen too."""
    for p in model.parameters():
        p.requires_grad_(train_others)
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in LORA_TARGETS:
                if not hasattr(parent, name):
                    continue
                base = getattr(parent, name)
                base.requires_grad_(False)
                setattr(parent, name, LoRALinear(base, rank, alpha))
    return model


def merged_state_dict(model):
    """The state dict of a plain Transformer: each LoRALinear folded into its weight (W + s B A)."""
    state = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            w = m.base.weight
            state[name + ".weight"] = (w + m.delta()).to(w.dtype).detach()
    return state


def lora_state_dict(model):
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


def load_lora(model, merged, lora):
    """Restores a LoRA run saved as merged weights and its adapters: the frozen weight is the
    merged one less the adapters' product (equal to the original up to float rounding)."""
    wrapped = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    state = dict(lora)
    for k, v in merged.items():
        prefix, _, leaf = k.rpartition(".")
        state[f"{prefix}.base.{leaf}" if prefix in wrapped else k] = v
    model.load_state_dict(state)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.base.weight.copy_((m.base.weight - m.delta()).to(m.base.weight.dtype))
