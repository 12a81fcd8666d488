"""
Our GPT as a GGUF file for llama.cpp (its 'gpt2' architecture), in f32, f16 or q8_0, written with the gguf
package of the ggml project (pip install gguf). load_openai.py --export_gguf=FILE is the command line.

llama.cpp's gpt2 graph is ours: learned positions, pre-LayerNorm blocks with one fused qkv projection, tanh
GELU, a final LayerNorm and the head tied to the token embedding. Only the names change (below); nn.Linear's
(out, in) weights are already in ggml's layout, so nothing is transposed. llama.cpp needs every bias, so a
bias=False model is written with zero biases (exactly the same function). The vocabulary is GPT-2's byte-level
BPE: its 50257 token strings and its merges (OpenAI's encoder.json and vocab.bpe, lib/tokenizer.py), with
<|endoftext|> as the end-of-text token. A table padded to 50304 rows is cut to the 50257 real ones: our
generate never picks a padding id (vocab_limit), and so llama.cpp cannot either.

Character-level models are refused: every llama.cpp tokenizer has an end-of-text id (11 by default for 'gpt2'),
and a character vocabulary has none, so llama.cpp would stop generating at the character numbered 11.
"""

import json
import os

import numpy as np
import torch

from lib.tokenizer import EOT, _bpe_file
from model import GPT, GPT2_VOCAB_SIZE

OUT_TYPES = ("f32", "f16", "q8_0")

# ours -> llama.cpp's names (gguf's MODEL_TENSORS[MODEL_ARCH.GPT2]); the head is tied: no 'output.weight'
NAMES = {"transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm",
         "ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
         "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("--export_gguf needs the package gguf (ggml's GGUF writer): pip install gguf") from None
    return gguf


def gguf_tensors(model: GPT, n_vocab: int) -> dict:
    """llama.cpp's name -> float32 array, in our (out, in) layout; zero biases for a bias=False model, the
    embedding cut to n_vocab rows."""
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if not torch.equal(sd.pop("lm_head.weight"), sd["transformer.wte.weight"]):
        raise ValueError("lm_head is not tied to wte: llama.cpp's gpt2 head would be the embedding")
    sd["transformer.wte.weight"] = sd["transformer.wte.weight"][:n_vocab]
    out = {}
    for k, v in sd.items():
        module, kind = k.rsplit(".", 1)
        if module.startswith("transformer.h."):
            _, _, layer, name = module.split(".", 3)
            name = f"blk.{layer}.{NAMES[name]}"
        else:
            name = NAMES[module]
        out[f"{name}.{kind}"] = v.numpy()
        if kind == "weight" and module not in ("transformer.wte", "transformer.wpe") and f"{module}.bias" not in sd:
            out[f"{name}.bias"] = np.zeros(v.shape[0], dtype=np.float32)  # no bias == a zero bias
    return out


def gpt2_vocab() -> tuple:
    """GPT-2's tokens (byte-level strings, by id), their types and its merges, from OpenAI's files."""
    encoder = json.loads(_bpe_file("encoder.json"))
    tokens = [t for t, _ in sorted(encoder.items(), key=lambda kv: kv[1])]
    assert len(tokens) == GPT2_VOCAB_SIZE and tokens[-1] == EOT
    types = [1] * (len(tokens) - 1) + [3]  # gguf.TokenType: NORMAL, and CONTROL for <|endoftext|>
    lines = _bpe_file("vocab.bpe").decode("utf-8").split("\n")
    merges = [m for m in lines[1:] if m]  # the first line is '#version: 0.2'
    return tokens, types, merges


def export_gguf(model: GPT, path: str, tokenizer, out_type: str = "f16", name: str = "llm-e2e"):
    """Write path, a GGUF file llama.cpp runs (llama-cli -m path, or llama_cpp.Llama(path)). out_type: f32 |
    f16 | q8_0; as llama.cpp's converter does, 1-D tensors (biases, LayerNorms) stay f32, and q8_0 keeps any
    matrix whose rows are not a multiple of 32 values in f16."""
    gguf = _gguf()
    if out_type not in OUT_TYPES:
        raise ValueError(f"--gguf_type={out_type!r}: expected one of {', '.join(OUT_TYPES)}")
    if tokenizer.name != "gpt2":
        raise ValueError(f"the model's tokenizer is {tokenizer.name!r}, not GPT-2's: llama.cpp's tokenizers all have "
                         f"an end-of-text id (11 by default) and a character vocabulary has none, so llama.cpp would "
                         f"stop generating at the character numbered 11. Export it for transformers (--export_hf) "
                         f"instead, or train on GPT-2's tokens")
    c = model.config
    if c.vocab_size < GPT2_VOCAB_SIZE:
        raise ValueError(f"vocab_size {c.vocab_size} is smaller than GPT-2's {GPT2_VOCAB_SIZE} tokens")
    tokens, types, merges = gpt2_vocab()
    Q = gguf.GGMLQuantizationType
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type]
    tmp = path + ".tmp"  # a file under the final name is always complete
    w = gguf.GGUFWriter(tmp, "gpt2")
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(4 * c.n_embd)
    w.add_block_count(c.n_layer)
    w.add_head_count(c.n_head)
    w.add_layer_norm_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # GPT-2's pre-tokenization regex
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(GPT2_VOCAB_SIZE - 1)
    w.add_eos_token_id(GPT2_VOCAB_SIZE - 1)
    w.add_add_bos_token(False)  # GPT-2 starts from the text itself, as our sample.py does
    for name_, v in gguf_tensors(model, len(tokens)).items():
        if v.ndim == 1 or out_type == "f32":
            w.add_tensor(name_, v)
        elif out_type == "f16" or v.shape[-1] % 32:
            w.add_tensor(name_, v.astype(np.float16))
        else:
            w.add_tensor(name_, gguf.quants.quantize(v, Q.Q8_0), raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
