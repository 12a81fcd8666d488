"""
Load any model -- a GPT-2 name, a checkpoint of any script (file or folder), a quantized checkpoint -- with the
tokenizer it was trained with, in one function: load_model. The trainers take float models only and start from
lib/checkpoint.load_float_model, the float half of it.
"""

from typing import Optional

from lib.checkpoint import checkpoint_path, float_model, load_checkpoint
from lib.quant import quantized_model_from_checkpoint
from lib.tokenizer import tokenizer_for
from model import GPT


def model_from_checkpoint(ckpt: dict, dropout: Optional[float] = None) -> GPT:
    """Build the GPT a checkpoint describes and load its weights (quantized checkpoints too)."""
    if ckpt.get("kind") == "quantized":
        return quantized_model_from_checkpoint(ckpt)
    return float_model(ckpt, dropout)


def load_model(init_from: str, out_dir: str = "", device: str = "cpu", dropout: Optional[float] = None,
               ckpt_name: str = "ckpt.pt", for_training: bool = False, meta: str = ""):
    """Load a model to use or to start a new run from -> (model on device, checkpoint dict, tokenizer).

    init_from: 'resume', a GPT-2 name ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl': converted once by
    load_openai.py, lib/checkpoint.pretrained_path), or the path of a checkpoint file or of a folder holding
    ckpt_name (e.g. 'out-sft'). Any kind of checkpoint is accepted; for_training refuses quantized ones (weights
    that cannot take gradients) naming the float file to use."""
    ckpt = load_checkpoint(checkpoint_path(init_from, out_dir, ckpt_name), map_location="cpu")
    model = float_model(ckpt, dropout) if for_training else model_from_checkpoint(ckpt, dropout)
    return model.to(device), ckpt, tokenizer_for(ckpt, meta)
