"""
OpenAI's GPT-2 weights in our GPT (all four sizes, from OpenAI's TensorFlow release or Hugging Face's
safetensors, no TensorFlow needed), and our GPT in Hugging Face's format. load_openai.py is the command line.

The map is one-to-one because model.py uses OpenAI's names. Hugging Face's GPT2LMHeadModel stores the four
projection matrices (c_attn, c_proj, c_fc, mlp.c_proj) as Conv1D weights of shape (in, out): they are
transposed to nn.Linear's (out, in). Everything else is copied as is; lm_head is tied to wte. OpenAI's
checkpoint has the same Conv1D layout with a leading 1 ([1, in, out], a 1x1 convolution).
"""

import glob
import json
import os

import numpy as np
import torch

from lib.download import download
from lib.runtime import cache_root
from lib.tf_checkpoint import read_tf_checkpoint
from lib.tokenizer import BPE_FILES
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
            # GPT-2's <|endoftext|>, for GPT-2's vocabulary (padded or not); a smaller one has no such id
            "bos_token_id": 50256 if config.vocab_size > 50256 else None,
            "eos_token_id": 50256 if config.vocab_size > 50256 else None}


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
    """GPT2LMHeadModel state dict (Conv1D layout) from ours. A bias=False model gets zero biases: GPT-2's
    format has them everywhere, and a Linear or LayerNorm without a bias is exactly one with a zero bias."""
    out = {}
    for k, v in sd.items():
        out[k] = (v.t() if k.endswith(TRANSPOSED) else v).contiguous()
        if k.endswith(".weight") and k.split(".")[-2] in ("ln_1", "ln_2", "ln_f", "c_attn", "c_proj", "c_fc"):
            bias = k[:-len("weight")] + "bias"
            if bias not in sd:  # ours is (out, in) or (C,): the bias has the first dimension
                out[bias] = torch.zeros(v.shape[0], dtype=v.dtype)
    return out


def load_hf_dir(path: str, dropout: float = 0.0) -> GPT:
    """Our GPT from a Hugging Face folder with config.json + model.safetensors (any GPT-2 shape)."""
    from safetensors.torch import load_file
    cfg_path, st_path = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
    for p in (cfg_path, st_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p!r} not found: a Hugging Face GPT-2 folder has config.json and "
                                    f"model.safetensors")
    with open(cfg_path) as f:
        config = config_from_hf(json.load(f))
    config.dropout = dropout
    return model_from_state_dict(config, state_dict_from_hf(load_file(st_path), config))


def model_from_state_dict(config: GPTConfig, sd: dict) -> GPT:
    """A GPT that takes over sd's tensors: built on the meta device (no random init, no second copy in
    memory: gpt2-xl would need 6 GB more and ~10 s of init), then given the tensors and re-tied."""
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(sd, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True gives each name its own Parameter
    return model


def export_hf(model: GPT, out_dir: str):
    """Write out_dir/config.json + model.safetensors that transformers' GPT2LMHeadModel.from_pretrained opens
    (any shape; bias=False models with zero biases)."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    sd = state_dict_to_hf({k: v.detach().cpu() for k, v in model.state_dict().items()})
    del sd["lm_head.weight"]  # tied to wte; safetensors refuses shared storage and HF re-ties it on load
    tmp = os.path.join(out_dir, "model.safetensors.tmp")
    save_file(sd, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
    tmp = os.path.join(out_dir, "config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(config_to_hf(model.config), f, indent=2)
    os.replace(tmp, os.path.join(out_dir, "config.json"))

# ----------------------------------------------------------------------------------------------
# OpenAI's names -> ours


def config_from_openai(hparams: dict) -> GPTConfig:
    """GPTConfig from OpenAI's hparams.json (n_vocab, n_ctx, n_embd, n_head, n_layer); no vocab padding."""
    missing = [k for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer") if k not in hparams]
    if missing:
        raise ValueError(f"not a GPT-2 hparams.json: missing {missing}, found {sorted(hparams)}")
    return GPTConfig(block_size=hparams["n_ctx"], vocab_size=hparams["n_vocab"], n_layer=hparams["n_layer"],
                     n_head=hparams["n_head"], n_embd=hparams["n_embd"], dropout=0.0, bias=True)


def openai_shapes(config: GPTConfig) -> dict:
    """OpenAI's variable names and shapes for a config (openai/gpt-2 src/model.py)."""
    C = config.n_embd
    shapes = {"model/wte": (config.vocab_size, C), "model/wpe": (config.block_size, C),
              "model/ln_f/g": (C,), "model/ln_f/b": (C,)}
    for i in range(config.n_layer):
        for ln in ("ln_1", "ln_2"):
            shapes[f"model/h{i}/{ln}/g"] = shapes[f"model/h{i}/{ln}/b"] = (C,)
        for name, (nx, nf) in {"attn/c_attn": (C, 3 * C), "attn/c_proj": (C, C),
                               "mlp/c_fc": (C, 4 * C), "mlp/c_proj": (4 * C, C)}.items():
            shapes[f"model/h{i}/{name}/w"] = (1, nx, nf)  # conv1d with a 1-wide kernel
            shapes[f"model/h{i}/{name}/b"] = (nf,)
    return shapes


def state_dict_from_openai(arrays: dict, config: GPTConfig) -> dict:
    """Our state dict from OpenAI's arrays ({'model/h0/attn/c_attn/w': [1, C, 3C], ...}); every name and
    shape is checked against the config, and unused or missing names are reported by their OpenAI names."""
    expected = openai_shapes(config)
    missing, unused = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or unused:
        raise ValueError(f"the checkpoint does not match GPT-2's variables for {config}: "
                         f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                         f"unused {unused[:8]}{' ...' if len(unused) > 8 else ''}")
    hf = {}
    for name, shape in expected.items():
        a = arrays[name]
        if tuple(a.shape) != shape:
            raise ValueError(f"shape mismatch for {name}: the checkpoint has {tuple(a.shape)}, "
                             f"hparams.json implies {shape}")
        # model/h0/attn/c_attn/w -> h.0.attn.c_attn.weight: the Hub's names, so state_dict_from_hf maps the rest
        parts = name.split("/")[1:]
        if parts[0].startswith("h"):
            parts[0] = "h." + parts[0][1:]
        leaf = {"g": "weight", "b": "bias", "w": "weight"}.get(parts[-1])
        key = ".".join(parts[:-1] + [leaf]) if leaf else ".".join(parts) + ".weight"
        hf[key] = torch.from_numpy((a[0] if len(shape) == 3 else a).astype(np.float32, copy=False))
    return state_dict_from_hf(hf, config)


def load_openai_dir(path: str, dropout: float = 0.0, verify: bool = True) -> GPT:
    """Our GPT from a folder in OpenAI's layout: hparams.json + model.ckpt.index + model.ckpt.data-*."""
    hp_path = os.path.join(path, "hparams.json")
    indexes = sorted(glob.glob(os.path.join(path, "*.index")))
    if not os.path.exists(hp_path) or len(indexes) != 1:
        raise FileNotFoundError(f"{path!r} is not in OpenAI's layout: expected hparams.json and one "
                                f"model.ckpt.index, found {sorted(os.listdir(path))}")
    with open(hp_path) as f:
        config = config_from_openai(json.load(f))
    sd = state_dict_from_openai(read_tf_checkpoint(indexes[0][:-len(".index")], verify=verify), config)
    config.dropout = dropout
    return model_from_state_dict(config, sd)


def load_dir(path: str, dropout: float = 0.0, verify: bool = True) -> GPT:
    """Our GPT from a folder in either layout: OpenAI's (hparams.json + model.ckpt.*) or Hugging Face's
    (config.json + model.safetensors), of any shape its config describes."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"from_dir {path!r} is not a folder; give the folder holding the downloaded files")
    names = set(os.listdir(path))
    if "hparams.json" in names and any(n.endswith(".index") for n in names):
        return load_openai_dir(path, dropout, verify)
    if {"config.json", "model.safetensors"} <= names:
        return load_hf_dir(path, dropout)
    raise FileNotFoundError(f"{path!r} holds neither OpenAI's layout (hparams.json, model.ckpt.index, "
                            f"model.ckpt.data-00000-of-00001) nor Hugging Face's (config.json, model.safetensors); "
                            f"it has {sorted(names)}")

# ----------------------------------------------------------------------------------------------
# the four released sizes, where to get them, and downloads

PRETRAINED = {  # name: (OpenAI's folder, Hugging Face repo, n_layer, n_head, n_embd); all: 1024 ctx, 50257 vocab
    "gpt2": ("124M", "openai-community/gpt2", 12, 12, 768),
    "gpt2-medium": ("355M", "openai-community/gpt2-medium", 24, 16, 1024),
    "gpt2-large": ("774M", "openai-community/gpt2-large", 36, 20, 1280),
    "gpt2-xl": ("1558M", "openai-community/gpt2-xl", 48, 25, 1600),
}
OPENAI_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
HF_URL = "https://huggingface.co"
OPENAI_FILES = ("hparams.json", "encoder.json", "vocab.bpe", "model.ckpt.index", "model.ckpt.data-00000-of-00001")
HF_FILES = ("config.json", "model.safetensors")


def _check_name(name: str):
    if name not in PRETRAINED:
        raise ValueError(f"unknown GPT-2 model {name!r}; valid: {', '.join(PRETRAINED)}")


def pretrained_config(name: str) -> GPTConfig:
    """The GPTConfig of a released size (vocab 50257, unpadded, as in the files)."""
    _check_name(name)
    _, _, n_layer, n_head, n_embd = PRETRAINED[name]
    return GPTConfig(block_size=1024, vocab_size=50257, n_layer=n_layer, n_head=n_head, n_embd=n_embd)


def pretrained_urls(name: str, source: str = "openai", openai_url: str = OPENAI_URL, hf_url: str = HF_URL) -> dict:
    """File name -> URL of a released size from OpenAI's bucket or the Hugging Face Hub."""
    _check_name(name)
    if source == "openai":
        return {f: f"{openai_url.rstrip('/')}/{PRETRAINED[name][0]}/{f}" for f in OPENAI_FILES}
    if source == "hf":
        return {f: f"{hf_url.rstrip('/')}/{PRETRAINED[name][1]}/resolve/main/{f}" for f in HF_FILES}
    raise ValueError(f"source must be 'openai' (OpenAI's TensorFlow release) or 'hf' (Hugging Face), got {source!r}")


def cache_folder(name: str, source: str, cache_dir: str = "") -> str:
    """Where a released size is kept: CACHE/openai/124M/ or CACHE/hf/gpt2/."""
    return os.path.join(cache_root(cache_dir), source, PRETRAINED[name][0] if source == "openai" else name)


def fetch_pretrained(name: str, source: str = "openai", cache_dir: str = "", openai_url: str = OPENAI_URL,
                     hf_url: str = HF_URL, **download_kwargs):
    """Download a released size into the cache (only the files it lacks) -> (folder, downloaded anything?)."""
    folder, fresh = cache_folder(name, source, cache_dir), False
    urls = pretrained_urls(name, source, openai_url, hf_url)
    for fname, url in urls.items():
        target = os.path.join(folder, fname)
        fresh |= not os.path.exists(target)
        try:
            download(url, target, sha256=BPE_FILES.get(fname), hint="Copy the files by hand (from a machine that "
                     "has a connection) and convert them offline: python load_openai.py --from_dir=DIR "
                     "--out_dir=OUT", **download_kwargs)
        except ConnectionError as e:
            raise ConnectionError(f"{e}\n{name} is these files, put in one folder: {' '.join(urls.values())}\n"
                                  f"then: python load_openai.py --from_dir=DIR --out_dir=out-{name}, and use "
                                  f"--init_from=out-{name}") from e
    return folder, fresh


def load_pretrained(name: str, dropout: float = 0.0, source: str = "openai", cache_dir: str = "",
                    openai_url: str = OPENAI_URL, hf_url: str = HF_URL, **download_kwargs) -> GPT:
    """A released GPT-2 ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl') with OpenAI's weights, from the
    cache, downloading what is missing. When only the other source's copy is complete in the cache, that
    one is used, so an offline machine needs no network once either copy is there."""
    pretrained_urls(name, source)  # validates name and source
    complete = lambda src: all(os.path.exists(os.path.join(cache_folder(name, src, cache_dir), f))
                               for f in (OPENAI_FILES if src == "openai" else HF_FILES))
    other = "hf" if source == "openai" else "openai"
    if not complete(source) and complete(other):
        source = other
    folder, fresh = fetch_pretrained(name, source, cache_dir, openai_url, hf_url, **download_kwargs)
    try:
        model = load_dir(folder, dropout, verify=fresh)  # tensor CRCs: checked once, after downloading
    except ValueError:
        if fresh and source == "openai":  # corrupt data must not stay in the cache, to be taken as good later
            os.remove(os.path.join(folder, OPENAI_FILES[-1]))
        raise
    want, got = pretrained_config(name), model.config
    if (want.n_layer, want.n_head, want.n_embd, want.vocab_size, want.block_size) != \
            (got.n_layer, got.n_head, got.n_embd, got.vocab_size, got.block_size):
        raise ValueError(f"the files in {folder!r} describe {got}, not {name} ({want}); delete the folder and retry")
    return model
