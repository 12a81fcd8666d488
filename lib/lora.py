"""
LoRA (Hu et al. 2021, arXiv:2106.09685) for finetune.py and align.py: model.py's own nn.Linear layers inside the
blocks are wrapped (model.py is unchanged), the pre-trained weights frozen, and only a low-rank update B A trains
(with norms=True the LayerNorms too). Saved checkpoints hold the merged plain weights W + (alpha / r) B A, so every
script reads them through the one checkpoint contract; what trained, the settings and a hash of the frozen base go
beside them ('lora' entry), so an exact resume re-reads the base from where the run started and continues from the
same unmerged weights (merging rounds: W + s B A - s B A is not W in floating point).
"""

import hashlib
import math
from typing import Optional

import torch
import torch.nn as nn

from lib.checkpoint import load_float_model

TARGETS = ("c_attn", "c_proj", "c_fc")  # the Linear layers of model.py's blocks (attn.c_proj and mlp.c_proj alike)


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * B A dropout(x), base frozen. A (r, in) starts random, B (out, r) at zero, so at
    step 0 the layer is exactly base (Hu et al. 2021, section 4.1)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as PEFT's LoRA layers
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, in) @ (in, r) @ (r, out) -> (B, T, out): never forms the (out, in) product while training
        return self.base(x) + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scale

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A in W's dtype (the sum in float32)."""
        w = self.base.weight
        return (w.float() + self.scale * (self.lora_B.float() @ self.lora_A.float())).to(w.dtype).detach()


def parse_targets(targets: str) -> list:
    """'c_attn,c_proj' -> ['c_attn', 'c_proj'], each one of TARGETS."""
    names = [t.strip() for t in targets.split(",") if t.strip()]
    bad = [t for t in names if t not in TARGETS]
    if bad or not names:
        raise ValueError(f"lora_targets names model.py's Linear layers, comma-separated, from {list(TARGETS)}; got "
                         f"{targets!r}; e.g. --lora_targets=c_attn,c_proj,c_fc")
    return names


def check_settings(rank: int, alpha: float, dropout: float, targets: str, fsdp: bool = False):
    """Refuse bad LoRA keys before any model is built (rank 0 = LoRA off: nothing else is checked)."""
    if not isinstance(rank, int) or rank < 0:
        raise ValueError(f"lora_rank must be an int >= 0 (0 = full fine-tuning), got {rank!r}; e.g. --lora_rank=8")
    if rank:
        if not alpha > 0:
            raise ValueError(f"lora_alpha must be > 0 (the update is scaled by lora_alpha / lora_rank), got "
                             f"{alpha!r}; e.g. --lora_alpha={2 * rank}")
        if not 0 <= dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {dropout!r}; e.g. --lora_dropout=0.05")
        parse_targets(targets)
        if fsdp:
            raise ValueError(f"LoRA (lora_rank={rank}) is not offered with fsdp=True: its adapters are small, and the "
                             f"frozen model it adapts is what FSDP would shard; use LoRA with DDP (--fsdp=False)")


def add_lora(gpt, rank: int, alpha: float, dropout: float, targets: str, norms: bool = False) -> int:
    """Freeze every weight of gpt and wrap the named Linear layers of its blocks in LoRALinear, in place ->
    the number of layers wrapped. The LM head (tied to the token embeddings) is left alone. norms: the LayerNorms'
    gains and biases train too (whole, a few thousand numbers): with the LM head frozen, ln_f's gain is what sets
    how confident the logits can be."""
    names = parse_targets(targets)
    gpt.requires_grad_(False)
    if norms:
        for m in gpt.modules():
            if isinstance(m, nn.LayerNorm):
                m.requires_grad_(True)
    n = 0
    for block in gpt.transformer.h:
        for parent in (block.attn, block.mlp):
            for name in names:
                layer = getattr(parent, name, None)
                if isinstance(layer, nn.Linear):
                    setattr(parent, name, LoRALinear(layer, rank, alpha, dropout).to(layer.weight.device))
                    n += 1
    return n


def lora_layers(gpt) -> dict:
    """{module name: LoRALinear} of gpt."""
    return {name: m for name, m in gpt.named_modules() if isinstance(m, LoRALinear)}


def merged_state_dict(gpt) -> dict:
    """gpt's state dict as model.py names it, each LoRA layer's weight merged: a plain GPT loads it."""
    out = {k.replace(".base.", "."): v for k, v in gpt.state_dict().items() if ".lora_" not in k}
    for name, m in lora_layers(gpt).items():
        out[f"{name}.weight"] = m.merged_weight()
    return out


class Merged:
    """What lib/lifecycle.save_run reads of a model (state_dict() and config), with the adapters merged."""

    def __init__(self, gpt):
        self.gpt, self.config = gpt, gpt.config

    def state_dict(self) -> dict:
        return merged_state_dict(self.gpt)


def adapter_state(gpt) -> dict:
    """Every parameter of gpt that trains, by state-dict name: each LoRA layer's 'NAME.lora_A' and 'NAME.lora_B',
    and the LayerNorms with norms=True (an adapter-only file holds just this)."""
    return {k: p.detach().clone() for k, p in gpt.named_parameters() if p.requires_grad}


def load_adapters(gpt, state: dict):
    """Put saved adapters back into a gpt that add_lora wrapped with the same settings."""
    own = {k: p for k, p in gpt.named_parameters() if p.requires_grad}
    assert set(own) == set(state), f"adapter keys differ: {sorted(set(own) ^ set(state))[:4]}"
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def weights_hash(gpt) -> str:
    """sha256 of every tensor of gpt's state dict (names, dtypes, shapes, bytes): which base a run adapted."""
    h = hashlib.sha256()
    for k, v in gpt.state_dict().items():
        t = v.detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}:{t.dtype}:{tuple(v.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def lora_entry(gpt, base: str, base_hash: str, rank: int, alpha: float, dropout: float, targets: str,
               norms: bool = False) -> dict:
    """The checkpoint's 'lora' entry: what an exact resume needs beside the merged weights."""
    return {"base": base, "base_sha256": base_hash, "rank": rank, "alpha": alpha, "dropout": dropout,
            "targets": targets, "norms": norms, "adapters": adapter_state(gpt)}


def load_base(entry: dict, dropout: Optional[float], block_size: Optional[int] = None):
    """The frozen base of a LoRA run, re-read from where it started (cropped to block_size, as the run cropped it)
    and checked against its hash -> GPT (cpu)."""
    gpt = load_float_model(entry["base"], dropout=dropout)[0]
    if block_size is not None and block_size < gpt.config.block_size:
        gpt.crop_block_size(block_size)
    if weights_hash(gpt) != entry["base_sha256"]:
        raise ValueError(f"the base model of this LoRA run, {entry['base']!r}, has changed since the run started "
                         f"(sha256 of its weights differs), so the run cannot continue exactly. Restore that "
                         f"checkpoint, or start a new run from this one: --init_from=OUT_DIR --out_dir=NEW_DIR")
    return gpt
