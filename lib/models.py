"""
Load any model -- a GPT-2 name, a checkpoint of any script (file or folder), a quantized checkpoint -- with the
tokenizer it was trained with, in one function: load_model.
"""

import os
from typing import Optional

from lib.checkpoint import GPT2_NAMES, checkpoint_path, load_checkpoint
from lib.gpt2_weights import load_pretrained
from lib.quant import quantized_model_from_checkpoint
from lib.runtime import print0
from lib.tokenizer import CharTokenizer, load_tokenizer
from model import GPT, GPTConfig


def model_from_checkpoint(ckpt: dict, dropout: Optional[float] = None) -> GPT:
    """Build the GPT a checkpoint describes and load its weights (quantized checkpoints too)."""
    if ckpt.get("kind") == "quantized":
        return quantized_model_from_checkpoint(ckpt)
    model_args = dict(ckpt["model_args"])
    if dropout is not None:
        model_args["dropout"] = dropout
    known = set(GPTConfig.__dataclass_fields__)
    model = GPT(GPTConfig(**{k: v for k, v in model_args.items() if k in known}))
    model.load_state_dict(ckpt["model"])
    return model


def tokenizer_for(ckpt: Optional[dict], meta: str = "", dataset_dir: str = ""):
    """The tokenizer a checkpoint was trained with, and say which source gave it: the one stored in the
    checkpoint, else --meta=PATH, else a meta.pkl next to the checkpoint (nanoGPT's layout), else the meta.pkl of
    its dataset folder, else GPT-2's."""
    path = (ckpt or {}).get("path", "")
    stored = (ckpt or {}).get("tokenizer")
    if stored is not None and "itos" not in stored and ckpt["model_args"].get("vocab_size", 50257) < 50257:
        stored = None  # 'gpt2' recorded for a table too small for GPT-2's ids (imported files name no tokenizer)
    if stored is not None:
        if meta:
            print0(f"WARNING: --meta={meta!r} is ignored: {path!r} stores its own tokenizer")
        return load_tokenizer(stored)
    candidates = [(meta, "--meta")] if meta else []
    if path:
        candidates.append((os.path.join(os.path.dirname(path), "meta.pkl"), "next to the checkpoint"))
    config = (ckpt or {}).get("config") or {}
    if dataset_dir or config.get("data_dir") or config.get("dataset"):
        folder = dataset_dir or config.get("data_dir") or os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "data", config["dataset"])
        candidates.append((os.path.join(folder, "meta.pkl"), "of its dataset"))
    for p, why in candidates:
        if os.path.isfile(p):
            print0(f"tokenizer: characters from {p} ({why})")
            return CharTokenizer.load(p)
        if why == "--meta":
            raise FileNotFoundError(f"--meta={meta!r} does not exist; pass the meta.pkl that the dataset's prepare "
                                    f"script wrote (e.g. data/shakespeare_char/meta.pkl)")
    if ckpt is not None:
        print0("tokenizer: GPT-2's (the checkpoint names none; for a character-level model pass --meta=meta.pkl)")
    return load_tokenizer(None)


def load_model(init_from: str, out_dir: str = "", device: str = "cpu", dropout: Optional[float] = None,
               ckpt_name: str = "ckpt.pt", for_training: bool = False, meta: str = ""):
    """Load a model to use or to start a new run from -> (model on device, checkpoint dict or None, tokenizer).

    init_from: 'resume', a GPT-2 name ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl'), or the path of a
    checkpoint file or of a folder holding ckpt_name (e.g. 'out-sft'). Any kind of checkpoint is accepted;
    for_training refuses quantized ones (weights that cannot take gradients) naming the float file to use."""
    if init_from in GPT2_NAMES:
        model = load_pretrained(init_from, dropout=dropout or 0.0)
        return model.to(device), None, tokenizer_for(None)
    ckpt = load_checkpoint(checkpoint_path(init_from, out_dir, ckpt_name), map_location="cpu")
    if for_training and ckpt["kind"] == "quantized":
        q = ckpt.get("quantization") or {}
        source = q.get("source") or "the float checkpoint it was made from"
        raise ValueError(f"{ckpt['path']!r} is {q.get('mode', 'quantized')}-quantized: its weights are for inference "
                         f"only (sample.py, eval.py, attention_viz.py) and cannot be trained. Train from the float "
                         f"checkpoint instead: --init_from={source}")
    model = model_from_checkpoint(ckpt, dropout)
    return model.to(device), ckpt, tokenizer_for(ckpt, meta)
