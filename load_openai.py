"""
OpenAI's GPT-2 weights in our GPT, and our GPT in Hugging Face's format.

The map is one-to-one because model.py uses OpenAI's names. Hugging Face's GPT2LMHeadModel stores the four
projection matrices (c_attn, c_proj, c_fc, mlp.c_proj) as Conv1D weights of shape (in, out): they are
transposed to nn.Linear's (out, in). Everything else is copied as is; lm_head is tied to wte.
"""

import json
import os

import torch

from model import GPT, GPTConfig

# ----------------------------------------------------------------------------------------------
# Hugging Face <-> ours

TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def config_from_hf(hf_config: dict) -> GPTConfig:
    """GPTConfig from a Hugging Face GPT-2 config.json dict."""
    missing = [k for k in ("n_layer", "n_head", "n_embd", "vocab_size") if k not in hf_config]
    if missing:
        raise ValueError(f"not a GPT-2 config.json: missing {missing}")
    act = hf_config.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation_function {act!r} is not GPT-2's tanh GELU ('gelu_new'); model.py has no other")
    eps = hf_config.get("layer_norm_epsilon", 1e-5)
    if abs(eps - 1e-5) > 1e-12:
        raise ValueError(f"layer_norm_epsilon {eps!r} differs from GPT-2's 1e-5, which model.py uses")
    return GPTConfig(block_size=hf_config.get("n_positions", hf_config.get("n_ctx", 1024)),
                     vocab_size=hf_config["vocab_size"], n_layer=hf_config["n_layer"],
                     n_head=hf_config["n_head"], n_embd=hf_config["n_embd"], dropout=0.0, bias=True)


def config_to_hf(config: GPTConfig) -> dict:
    """A config.json that transformers' GPT2LMHeadModel opens."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
            "n_positions": config.block_size, "n_ctx": config.block_size, "n_embd": config.n_embd,
            "n_head": config.n_head, "n_layer": config.n_layer, "vocab_size": config.vocab_size,
            "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout, "resid_pdrop": config.dropout, "tie_word_embeddings": True,
            "bos_token_id": 50256, "eos_token_id": 50256}


def state_dict_from_hf(hf_sd: dict, config: GPTConfig) -> dict:
    """Our state dict from a GPT2LMHeadModel's (keys 'transformer.h.0...') or a GPT2Model's / the Hub's
    model.safetensors (keys 'h.0...'). Every shape is checked; unused or missing names are an error."""
    sd = {}
    for k, v in hf_sd.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of older transformers versions, not weights
        if not k.startswith(("transformer.", "lm_head.")):
            k = "transformer." + k
        if k.endswith(TRANSPOSED):
            v = v.t()
        sd[k] = v.contiguous()
    sd.setdefault("lm_head.weight", sd.get("transformer.wte.weight"))  # tied: the Hub file omits it
    expected = _expected_shapes(config)
    unused = sorted(set(sd) - set(expected))
    missing = sorted(set(expected) - set(sd))
    if unused or missing:
        raise ValueError(f"weights do not match GPT-2's layout: missing {missing[:8]}, unused {unused[:8]}")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != tuple(shape):
            raise ValueError(f"shape mismatch for {k}: file has {tuple(sd[k].shape)}, the config needs {tuple(shape)}")
    return sd


def _expected_shapes(config: GPTConfig) -> dict:
    """Our parameter shapes for a config, without allocating the model (matters for gpt2-xl)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in GPT(config).state_dict().items()}


def state_dict_to_hf(sd: dict) -> dict:
    """GPT2LMHeadModel state dict (Conv1D layout) from ours."""
    out = {}
    for k, v in sd.items():
        out[k] = (v.t() if k.endswith(TRANSPOSED) else v).contiguous()
    return out


def load_hf_dir(path: str) -> GPT:
    """Our GPT from a Hugging Face folder with config.json + model.safetensors (any GPT-2 shape)."""
    from safetensors.torch import load_file
    cfg_path, st_path = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
    for p in (cfg_path, st_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p!r} not found: a Hugging Face GPT-2 folder has config.json and "
                                    f"model.safetensors")
    with open(cfg_path) as f:
        config = config_from_hf(json.load(f))
    model = GPT(config)
    model.load_state_dict(state_dict_from_hf(load_file(st_path), config))
    return model


def export_hf(model: GPT, out_dir: str):
    """Write out_dir/config.json + model.safetensors that transformers' GPT2LMHeadModel.from_pretrained opens."""
    from safetensors.torch import save_file
    if not model.config.bias:
        raise ValueError("GPT-2's Hugging Face format has biases everywhere; a bias=False model cannot be exported")
    os.makedirs(out_dir, exist_ok=True)
    sd = state_dict_to_hf({k: v.detach().cpu() for k, v in model.state_dict().items()})
    del sd["lm_head.weight"]  # tied to wte; safetensors refuses shared storage and HF re-ties it on load
    tmp = os.path.join(out_dir, "model.safetensors.tmp")
    save_file(sd, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config_to_hf(model.config), f, indent=2)
