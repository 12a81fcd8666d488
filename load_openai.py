"""
OpenAI's GPT-2 weights in our GPT (all four sizes, from OpenAI's TensorFlow release or Hugging Face's
safetensors, no TensorFlow needed), and our GPT in Hugging Face's format.

    python load_openai.py --model=gpt2 --out_dir=out-gpt2               # download, convert, write out-gpt2/ckpt.pt
    python load_openai.py --model=gpt2-xl --source=hf --out_dir=out-xl  # Hugging Face's model.safetensors instead
    python load_openai.py --from_dir=path/to/124M --out_dir=out-gpt2    # files copied by hand (offline)
    python load_openai.py --model=gpt2 --check                          # greedy completion of a fixed prompt
    python load_openai.py --init_from=out-shakespeare-char --export_hf=hf-char  # any checkpoint -> transformers
    python load_openai.py --init_from=gpt2 --export_hf=hf-gpt2          # (bias=False models too: zero biases)
    python sample.py --init_from=gpt2                                    # GPT.from_pretrained -> load_pretrained

Downloads are kept in $LLM_E2E_CACHE (default ~/.cache/llm-e2e), under openai/124M/ or hf/gpt2/. A file
appears there only once it is complete and verified; an interrupted download resumes where it stopped.

The map is one-to-one because model.py uses OpenAI's names. Hugging Face's GPT2LMHeadModel stores the four
projection matrices (c_attn, c_proj, c_fc, mlp.c_proj) as Conv1D weights of shape (in, out): they are
transposed to nn.Linear's (out, in). Everything else is copied as is; lm_head is tied to wte. OpenAI's
checkpoint has the same Conv1D layout with a leading 1 ([1, in, out], a 1x1 convolution).
"""

import glob
import json
import os
import sys
import time

import numpy as np
import torch

from common import cache_root, download
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
# TensorFlow's checkpoint (a "tensor bundle") read with numpy alone. Format, from tensorflow/core/util/
# tensor_bundle/tensor_bundle.proto and tensorflow/core/lib/io/table_format.txt (LevelDB's table format):
#   PREFIX.index   a sorted table: key "" -> BundleHeaderProto, key tensor name -> BundleEntryProto
#                  (dtype, shape, shard_id, offset, size, crc32c); data blocks + index block + 48-byte footer
#   PREFIX.data-00000-of-00001   the tensors' raw little-endian bytes, at entry.offset, entry.size long

CRC_POLY = 0x82F63B78  # CRC-32C (Castagnoli), reflected; RFC 3720 appendix B.4
TABLE_MAGIC = 0xDB4775248B80FB57  # last 8 bytes of every table file
TF_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8, 9: np.int64,
             10: np.bool_, 14: "bfloat16", 19: np.float16}  # tensorflow/core/framework/types.proto


def _crc_tables() -> np.ndarray:
    """(4, 256) slicing-by-4 tables: T[0] is the byte-at-a-time table, T[k] advances k more zero bytes."""
    t = np.zeros((4, 256), dtype=np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (CRC_POLY if c & 1 else 0)
        t[0, i] = c
    for k in range(1, 4):
        t[k] = (t[k - 1] >> 8) ^ t[0][t[k - 1] & 0xFF]
    return t


CRC_T = _crc_tables()
CRC_T0 = CRC_T[0].tolist()
CRC_CHUNK = 1024  # bytes per independent lane in the vectorised crc32c


def _crc_skip_tables(n: int) -> list:
    """The register after n zero bytes, as 4 lookup tables by register byte: CRC is linear over GF(2), so
    crc(A + B) = skip(crc(A), len(B)) ^ crc0(B) (the idea behind zlib's crc32_combine)."""
    images = np.uint32(1) << np.arange(32, dtype=np.uint32)  # where each of the 32 register bits ends up
    for _ in range(n):
        images = (images >> 8) ^ CRC_T[0][images & 0xFF]
    bits = (np.arange(256)[:, None] >> np.arange(8)) & 1  # (256, 8): the bits of every byte value
    return [np.bitwise_xor.reduce(np.where(bits, images[8 * k:8 * k + 8], 0), axis=1).tolist() for k in range(4)]


_CRC_SKIP = _crc_skip_tables(CRC_CHUNK)


def crc32c(data, lanes: int = 16384) -> int:
    """CRC-32C of bytes at ~100 MB/s with numpy: the data is cut into 1 KiB chunks whose CRCs are computed
    side by side (slicing-by-4, 4 bytes per step), then chained in order with the zero-skip tables."""
    data = memoryview(data).cast("B")
    head = len(data) % CRC_CHUNK
    crc = 0xFFFFFFFF
    for b in bytes(data[:head]):
        crc = (crc >> 8) ^ CRC_T0[(crc ^ b) & 0xFF]
    if len(data) > head:
        s0, s1, s2, s3 = _CRC_SKIP
        t0, t1, t2, t3 = CRC_T
        words = np.frombuffer(data, dtype="<u4", offset=head).reshape(-1, CRC_CHUNK // 4)  # (chunks, words)
        for s in range(0, len(words), lanes):
            cols = np.ascontiguousarray(words[s:s + lanes].T)  # (words, chunks): one column step per word
            reg = np.zeros(cols.shape[1], dtype=np.uint32)
            for w in cols:
                reg ^= w
                reg = t3[reg & 0xFF] ^ t2[(reg >> 8) & 0xFF] ^ t1[(reg >> 16) & 0xFF] ^ t0[reg >> 24]
            for r in reg.tolist():
                crc = s0[crc & 0xFF] ^ s1[(crc >> 8) & 0xFF] ^ s2[(crc >> 16) & 0xFF] ^ s3[crc >> 24] ^ r
    return crc ^ 0xFFFFFFFF


def _unmask(masked: int) -> int:
    """LevelDB / TF store crc32c 'masked' (crc32c.h: rotate right 15 bits, add a constant)."""
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def _varint(buf: bytes, pos: int):
    """Protobuf base-128 varint at buf[pos] -> (value, next position)."""
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes):
    """Yield (field number, value) of a protobuf message: ints for varint and fixed32, bytes for the rest."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} (field {field})")
        yield field, value


def _parse_entry(buf: bytes) -> dict:
    """BundleEntryProto -> dict(dtype, shape, shard_id, offset, size, crc32c)."""
    e = dict(dtype=0, shape=[], shard_id=0, offset=0, size=0, crc32c=None, slices=0)
    for field, value in _proto_fields(buf):
        if field == 1:
            e["dtype"] = value
        elif field == 2:  # TensorShapeProto: repeated Dim dim = 2 {int64 size = 1}
            for f, dim in _proto_fields(value):
                if f == 2:
                    e["shape"].append(dict(_proto_fields(dim)).get(1, 0))
        elif field in (3, 4, 5):
            e[("shard_id", "offset", "size")[field - 3]] = value
        elif field == 6:
            e["crc32c"] = value
        elif field == 7:
            e["slices"] += 1  # partitioned variable: not written by OpenAI's Saver
    return e


def _table_block(data: bytes, offset: int, size: int, path: str):
    """Yield (key, value) of one table block, after checking its trailer (type byte + masked crc32c)."""
    block, trailer = data[offset:offset + size], data[offset + size:offset + size + 5]
    if len(trailer) != 5:
        raise ValueError(f"{path!r} is truncated: a block at byte {offset} runs past the end of the file")
    if trailer[0] != 0:
        raise ValueError(f"{path!r} uses block compression type {trailer[0]}; only uncompressed tables are read")
    if crc32c(block + trailer[:1]) != _unmask(int.from_bytes(trailer[1:], "little")):
        raise ValueError(f"{path!r} is corrupt: crc32c mismatch in the block at byte {offset}")
    n_restarts = int.from_bytes(block[-4:], "little")
    end = len(block) - 4 - 4 * n_restarts  # entries, then the restart offsets, then their count
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)  # keys are prefix-compressed against the previous key
        unshared, pos = _varint(block, pos)
        n_value, pos = _varint(block, pos)
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + n_value]
        pos += n_value


def read_tf_index(path: str) -> dict:
    """Tensor name -> entry dict from a TF checkpoint's .index file."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 48 or int.from_bytes(data[-8:], "little") != TABLE_MAGIC:
        raise ValueError(f"{path!r} is not a TensorFlow checkpoint index (no table magic number at its end)")
    footer = data[-48:]
    _, pos = _varint(footer, 0)  # metaindex block handle: empty in tensor bundles
    _, pos = _varint(footer, pos)
    index_offset, pos = _varint(footer, pos)
    index_size, pos = _varint(footer, pos)
    entries = {}
    for _, handle in _table_block(data, index_offset, index_size, path):
        offset, p = _varint(handle, 0)
        size, _ = _varint(handle, p)
        for key, value in _table_block(data, offset, size, path):
            if key == b"":  # BundleHeaderProto: num_shards = 1, endianness = 2 (0 little, 1 big)
                header = dict(_proto_fields(value))
                if header.get(2, 0) != 0:
                    raise ValueError(f"{path!r} was written big-endian; only little-endian checkpoints are read")
                entries[""] = {"num_shards": header.get(1, 1)}
            else:
                entries[key.decode()] = _parse_entry(value)
    return entries


def read_tf_checkpoint(prefix: str, verify: bool = True) -> dict:
    """Tensor name -> numpy array from a TF checkpoint (prefix: e.g. 'dir/model.ckpt', without .index).
    verify: check every tensor's crc32c (about 100 MB/s: 5 s for gpt2, a minute for gpt2-xl)."""
    from tqdm import tqdm
    entries = read_tf_index(prefix + ".index")
    num_shards = entries.pop("", {}).get("num_shards", 1)
    total = sum(e["size"] for e in entries.values())
    arrays, files = {}, {}
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="verifying crc32c", disable=not verify or total < 1e8)
    try:
        for name, e in sorted(entries.items(), key=lambda kv: (kv[1]["shard_id"], kv[1]["offset"])):
            if e["slices"] or e["dtype"] not in TF_DTYPES:
                raise ValueError(f"{prefix}: tensor {name!r} is partitioned or of unsupported TF dtype {e['dtype']}")
            shard = f"{prefix}.data-{e['shard_id']:05d}-of-{num_shards:05d}"
            if shard not in files:
                if not os.path.exists(shard):
                    raise FileNotFoundError(f"{shard!r} not found: the .index file lists tensors stored in it")
                files[shard] = open(shard, "rb")
            f = files[shard]
            f.seek(e["offset"])
            buf = bytearray(e["size"])  # writable, so torch.from_numpy can share it without a copy
            if f.readinto(buf) != e["size"]:
                raise ValueError(f"{shard!r} is truncated: tensor {name!r} needs bytes {e['offset']:,}.."
                                 f"{e['offset'] + e['size']:,} but the file has {os.path.getsize(shard):,}")
            if verify and e["crc32c"] is not None and crc32c(buf) != _unmask(e["crc32c"]):
                raise ValueError(f"{shard!r} is corrupt: crc32c mismatch for tensor {name!r}; download it again")
            bar.update(len(buf))
            dtype = TF_DTYPES[e["dtype"]]
            if dtype == "bfloat16":  # numpy has none: keep the bits, widen to float32 (bf16 is fp32's top half)
                a = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                a = np.frombuffer(buf, dtype=np.dtype(dtype).newbyteorder("<"))
            arrays[name] = a.reshape(e["shape"])
    finally:
        bar.close()
        for f in files.values():
            f.close()
    return arrays

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
    from tokenizer import BPE_FILES  # OpenAI's encoder.json / vocab.bpe, whose sha256 we know
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

# ----------------------------------------------------------------------------------------------
# command line

if __name__ == "__main__":
    from dataclasses import asdict

    from common import load_model, make_checkpoint, print0, save_checkpoint, setup_runtime
    from configurator import configure

    write_hf = export_hf  # the function: the --export_hf flag below takes its name in this namespace
    model = "gpt2"  # 'gpt2' (124M) | 'gpt2-medium' (355M) | 'gpt2-large' (774M) | 'gpt2-xl' (1558M)
    source = "openai"  # 'openai': OpenAI's TensorFlow release | 'hf': Hugging Face's model.safetensors
    from_dir = ""  # convert a folder already on disk (either layout, any shape) instead of downloading
    init_from = ""  # for --export_hf: a checkpoint of any script (file, or folder with ckpt.pt) or a GPT-2 name
    out_dir = ""  # write OUT_DIR/ckpt.pt (an 'imported' checkpoint every script reads); '' = only fill the cache
    export_hf = ""  # write DIR/config.json + model.safetensors for transformers' GPT2LMHeadModel; '' = none
    check = False  # after loading, print the greedy completion of a fixed prompt
    cache_dir = ""  # '' = $LLM_E2E_CACHE, else ~/.cache/llm-e2e
    openai_url = OPENAI_URL  # base URL of OpenAI's release (a mirror works)
    hf_url = HF_URL  # base URL of the Hugging Face Hub (a mirror works)
    device = "auto"  # for --check: 'auto' | 'cpu' | 'cuda' | 'mps'
    # module constants (UPPER_CASE) are not options
    argv = [a + "=True" if a == "--check" else a for a in sys.argv[1:]]  # a bare --check means --check=True
    config = configure({k: v for k, v in globals().items() if k.islower()}, argv); globals().update(config)

    if not (out_dir or check or export_hf) and (from_dir or init_from):
        raise ValueError(f"--{'from_dir' if from_dir else 'init_from'}={from_dir or init_from!r} needs --out_dir=DIR "
                         f"(write DIR/ckpt.pt), --export_hf=DIR and/or --check")
    if from_dir and init_from:
        raise ValueError(f"pass one of --from_dir={from_dir!r} (a folder of downloaded files) and "
                         f"--init_from={init_from!r} (a checkpoint or GPT-2 name)")
    ckpt, tokenizer, tok_name = None, {"tokenizer": "gpt2"}, "gpt2"
    t0 = time.time()
    if init_from in PRETRAINED:
        model = init_from
    if from_dir:
        gpt = load_dir(from_dir)
        origin = {"from_dir": os.path.abspath(from_dir)}
    elif init_from and init_from not in PRETRAINED:
        if out_dir:
            raise ValueError(f"--init_from={init_from!r} is already a checkpoint: use it as it is, or --export_hf=DIR "
                             f"to write it for transformers")
        gpt, ckpt, tok = load_model(init_from, device="cpu")
        if ckpt["kind"] == "quantized":
            src = (ckpt.get("quantization") or {}).get("source") or "the float checkpoint it was made from"
            raise ValueError(f"{ckpt['path']!r} is quantized; GPT-2's Hugging Face format holds float weights: export "
                             f"the float checkpoint, --init_from={src}")
        tokenizer, tok_name = ckpt.get("tokenizer") or tok.meta(), tok.name
    else:
        pretrained_urls(model, source)  # validates both before any download
        gpt = load_pretrained(model, source=source, cache_dir=cache_dir, openai_url=openai_url, hf_url=hf_url)
        origin = {"pretrained": model, "source": source}
    print0(f"loaded {from_dir or init_from or model} in {time.time() - t0:.1f} s: "
           f"{gpt.num_params(non_embedding=False):,} parameters, {gpt.config}")
    if not (from_dir or ckpt):
        print0(f"cached in {cache_root(cache_dir)} (set LLM_E2E_CACHE to move it)")
    gpt2_vocab = tok_name == "gpt2" and gpt.config.vocab_size >= 50257
    if not gpt2_vocab and ckpt is None:
        print0(f"WARNING: vocab_size {gpt.config.vocab_size} is smaller than GPT-2's 50257, so the model does not "
               f"use GPT-2's tokenizer; the files name no other, and the checkpoint records GPT-2's: replace its "
               f"'tokenizer' entry (tokenizer.meta()) before sampling")
    if out_dir:
        # an import, not a run: no resume section, so --init_from=OUT_DIR starts a new run in every script
        ckpt = make_checkpoint("imported", gpt.state_dict(), asdict(gpt.config), config, tokenizer, resume=None,
                               origin=origin)
        path = os.path.join(out_dir, "ckpt.pt")
        save_checkpoint(ckpt, path)
        print0(f"wrote {path}: python sample.py --init_from={out_dir}")
    if export_hf:
        write_hf(gpt, export_hf)
        print0(f"wrote {os.path.join(export_hf, 'config.json')} and model.safetensors: GPT2LMHeadModel."
               f"from_pretrained({export_hf!r})" + ("" if gpt.config.bias else " (bias=False: exported as zero biases)"))
        if ckpt is not None and ckpt["kind"] == "classify":
            print0(f"WARNING: the classification head ({len(ckpt.get('labels') or [])} classes) is not exported: "
                   f"GPT2LMHeadModel has the language-model head only; classify with finetune.py --predict=TEXT")
        if not gpt2_vocab:
            print0(f"WARNING: the model's tokenizer is {tok_name!r} ({gpt.config.vocab_size} ids), "
                   f"not GPT-2's: transformers' GPT2Tokenizer does not fit it; encode text with this project's "
                   f"tokenizer.py and pass the ids")
    if check:
        from tokenizer import get_tokenizer
        tok = get_tokenizer("gpt2")
        if not gpt2_vocab:
            print0("WARNING: --check skipped: it needs GPT-2's tokenizer")
        else:
            rt = setup_runtime(device, "float32")
            prompt = "The meaning of life is"
            idx = torch.tensor([tok.encode(prompt)], device=rt.device)
            out = gpt.to(rt.device).eval().generate(idx, 24, temperature=0.0, vocab_limit=tok.n_vocab)
            ids = out[0, idx.size(1):].tolist()
            print0(f"greedy completion: {prompt!r} -> {tok.decode(ids)!r}\nfirst ids: {ids[:8]}")
