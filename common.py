"""
What must agree between scripts: device/dtype/DDP setup, print0, checkpoint save/load, token-file I/O.
"""

import os
import random
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from model import GPT, GPTConfig

# ----------------------------------------------------------------------------------------------
# processes, devices, dtypes


def print0(*args, **kwargs):
    """print on the master process only (rank 0 under torchrun)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs)


@dataclass
class Runtime:
    device: str  # e.g. 'cuda:0', 'cpu', 'mps'
    device_type: str  # 'cuda', 'cpu' or 'mps'
    dtype: str  # 'float32', 'bfloat16' or 'float16' (autocast dtype; parameters stay fp32)
    ddp: bool = False
    ddp_rank: int = 0
    ddp_local_rank: int = 0
    ddp_world_size: int = 1
    master_process: bool = True

    @property
    def ptdtype(self) -> torch.dtype:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]

    def autocast(self):
        """Mixed precision context for forward passes (a no-op in float32)."""
        if self.dtype == "float32":
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.ptdtype)


def setup_runtime(device: str = "auto", dtype: str = "auto") -> Runtime:
    """Pick the device and dtype (saying which and why) and join the DDP group when run under torchrun."""
    valid_dtypes = ("auto", "float32", "bfloat16", "float16")
    if dtype not in valid_dtypes:
        raise ValueError(f"dtype must be one of {valid_dtypes}, got {dtype!r}")
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # set by torchrun
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
    if device == "auto":
        if torch.cuda.is_available():
            device, why = "cuda", "CUDA is available"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device, why = "mps", "Apple MPS is available"
        else:
            device, why = "cpu", "no CUDA or MPS device found"
    else:
        why = "requested"
    device_type = device.split(":")[0]
    if device_type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available; use --device=cpu or auto")
    if ddp and device_type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if ddp and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    # dtype: bf16 autocast on CUDA where supported, else fp16 (with a GradScaler in train.py); fp32 on CPU,
    # where bf16 autocast measured about 4x slower than fp32 for training on a 2-core x86 machine
    if dtype == "auto":
        if device_type == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    elif dtype == "bfloat16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        print0("WARNING: this GPU does not support bfloat16; using float16 with loss scaling (--dtype=float16)")
        dtype = "float16"
    elif dtype == "float16" and device_type == "cpu":
        print0("WARNING: float16 autocast is not supported on CPU; using float32 (--dtype=float32)")
        dtype = "float32"
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for the fp32 matmuls that remain
        torch.backends.cudnn.allow_tf32 = True
    rt = Runtime(device, device_type, dtype, ddp, rank, local_rank, world_size, rank == 0)
    print0(f"device: {device} ({why}), dtype: {dtype}" + (f", DDP world size {world_size}" if ddp else ""))
    return rt


def rng_state() -> dict:
    """Every random generator's state, in types that torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()),
                                                     *np_state[2:]], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])

# ----------------------------------------------------------------------------------------------
# checkpoints: nanoGPT's keys (model, model_args, optimizer, iter_num, best_val_loss, config) plus ours


def save_checkpoint(obj: dict, path: str):
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves a torn file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a checkpoint is an ordinary readable file
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def strip_compile_prefix(state_dict: dict) -> dict:
    """torch.compile wraps the model as '_orig_mod'; checkpoints store the plain names."""
    prefix = "_orig_mod."
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint safely (weights_only: no code in the file runs) with errors that say what to do."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}. Train one (python train.py "
                                f"config/train_shakespeare_char.py) or convert OpenAI's weights "
                                f"(python load_openai.py --model=gpt2 --out_dir=DIR), then pass --out_dir=DIR")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path!r} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path!r} is not a model checkpoint: expected keys 'model' and 'model_args', found {keys}")
    ckpt["model"] = strip_compile_prefix(ckpt["model"])
    return ckpt


def model_from_checkpoint(ckpt: dict, dropout: Optional[float] = None) -> GPT:
    """Build the GPT a checkpoint describes and load its weights (quantized checkpoints too)."""
    if "quantization" in ckpt:
        from quantize import quantized_model_from_checkpoint
        return quantized_model_from_checkpoint(ckpt)
    model_args = dict(ckpt["model_args"])
    if dropout is not None:
        model_args["dropout"] = dropout
    known = set(GPTConfig.__dataclass_fields__)
    model = GPT(GPTConfig(**{k: v for k, v in model_args.items() if k in known}))
    model.load_state_dict(ckpt["model"])
    return model


def tokenizer_from_checkpoint(ckpt: Optional[dict]):
    """The tokenizer a checkpoint was trained with: stored under 'tokenizer', else the meta.pkl of its
    dataset (nanoGPT checkpoints), else GPT-2's."""
    from tokenizer import CharTokenizer, load_tokenizer
    if ckpt is not None and ckpt.get("tokenizer") is not None:
        return load_tokenizer(ckpt["tokenizer"])
    dataset = (ckpt or {}).get("config", {}).get("dataset")
    if dataset:
        meta_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", dataset, "meta.pkl")
        if os.path.exists(meta_path):
            return CharTokenizer.load(meta_path)
    return load_tokenizer(None)


GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def load_model(init_from: str, out_dir: str = "", device: str = "cpu", dropout: Optional[float] = None,
               ckpt_name: str = "ckpt.pt"):
    """Load a model to use or to start a new run from -> (model on device, checkpoint dict or None, tokenizer).

    init_from: 'resume' (out_dir/ckpt_name), a GPT-2 name ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl'),
    or the path of a checkpoint file or of a folder holding ckpt_name (e.g. 'out-sft')."""
    if init_from in GPT2_NAMES:
        model = GPT.from_pretrained(init_from, dropout=dropout or 0.0)
        return model.to(device), None, tokenizer_from_checkpoint(None)
    if init_from == "resume":
        path = os.path.join(out_dir, ckpt_name)
    elif os.path.isdir(init_from):
        path = os.path.join(init_from, ckpt_name)
    elif os.path.isfile(init_from):
        path = init_from
    else:
        raise ValueError(f"init_from must be 'resume' (loads {os.path.join(out_dir, ckpt_name)!r}), one of "
                         f"{GPT2_NAMES}, or an existing checkpoint file or folder; got {init_from!r}")
    ckpt = load_checkpoint(path, map_location="cpu")
    model = model_from_checkpoint(ckpt, dropout)
    return model.to(device), ckpt, tokenizer_from_checkpoint(ckpt)

# ----------------------------------------------------------------------------------------------
# token files: raw uint16 (nanoGPT's train.bin / val.bin) or shards with a header (data/fineweb)

HEADER_BYTES = 1024  # 128 little-endian int64 values
# Low 16 bits 0xFFFF: read as uint16 tokens, a header starts with id 65535, which no vocabulary below
# 65535 ids can produce, so a headered file is never mistaken for a raw one.
SHARD_MAGIC = 0x4C4C4D45_FFFF  # 'LLME' + 0xFFFF
SHARD_VERSION = 1


def write_tokens(path: str, tokens, header: bool = False, vocab_size: int = 0):
    """Write uint16 token ids atomically (temporary name, then rename), with a shard header if asked."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2 ** 16):
        raise ValueError(f"token ids must fit in uint16 for {path!r}: found range [{tokens.min()}, {tokens.max()}]")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        if header:
            h = np.zeros(HEADER_BYTES // 8, dtype="<i8")
            h[:4] = [SHARD_MAGIC, SHARD_VERSION, tokens.size, vocab_size]
            f.write(h.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    os.replace(tmp, path)


def read_tokens(path: str) -> np.memmap:
    """Memory-map a token file (raw uint16 or headered shard) without reading it into RAM; a truncated or
    foreign shard is refused with a clear error."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"token file {path!r} does not exist")
    size = os.path.getsize(path)
    offset = 0
    if size >= HEADER_BYTES and np.fromfile(path, dtype="<i8", count=1)[0] == SHARD_MAGIC:
        h = np.fromfile(path, dtype="<i8", count=HEADER_BYTES // 8)
        if h[1] != SHARD_VERSION:
            raise ValueError(f"{path!r} is a token shard of version {h[1]}, this code reads version {SHARD_VERSION}")
        expected = HEADER_BYTES + 2 * int(h[2])
        if size != expected:
            raise ValueError(f"{path!r} is truncated or corrupt: its header promises {int(h[2]):,} tokens "
                             f"({expected:,} bytes) but the file has {size:,} bytes; delete it and re-run the "
                             f"prepare script that wrote it")
        offset = HEADER_BYTES
    elif size % 2:
        raise ValueError(f"{path!r} has an odd number of bytes ({size:,}): not a uint16 token file")
    if size == offset:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r", offset=offset)

# ----------------------------------------------------------------------------------------------
# metrics: log.jsonl always, a PNG a person can look at, Weights & Biases when asked


def append_jsonl(path: str, record: dict):
    """Append one JSON record per line (out_dir/log.jsonl, eval.jsonl ...)."""
    import json
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def plot_curves(path: str, curves: dict, title: str = "", xlabel: str = "iteration", ylabel: str = "loss"):
    """Write a line plot of curves {name: (xs, ys)} to path (PNG), atomically."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, (xs, ys) in curves.items():
        if len(xs):
            ax.plot(xs, ys, label=name, marker="o" if len(xs) < 30 else None, markersize=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def init_wandb(project: str, run_name: str, config: dict, mode: str = "online", out_dir: str = "."):
    """Start a Weights & Biases run. mode: 'online', 'offline' (no network: sync later with `wandb sync`) or
    'disabled'. Without an API key an online run falls back to offline with a notice instead of prompting."""
    valid = ("online", "offline", "disabled")
    if mode not in valid:
        raise ValueError(f"wandb_mode must be one of {valid}, got {mode!r}")
    try:
        import wandb
    except ImportError as e:
        raise ImportError("wandb_log=True needs the wandb package: pip install wandb") from e
    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _netrc_has_wandb()):
        print0("WARNING: no wandb login found (wandb login / WANDB_API_KEY); logging offline instead "
               "(sync later with: wandb sync <run dir>)")
        mode = "offline"
    os.makedirs(out_dir, exist_ok=True)
    return wandb.init(project=project, name=run_name, config=config, mode=mode, dir=out_dir,
                      settings=wandb.Settings(init_timeout=60, silent=True))


def _netrc_has_wandb() -> bool:
    path = os.environ.get("NETRC", os.path.join(os.path.expanduser("~"), ".netrc"))
    try:
        with open(path) as f:
            return "api.wandb.ai" in f.read()
    except OSError:
        return False
