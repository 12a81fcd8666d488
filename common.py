"""
What must agree between scripts: device/dtype/DDP setup, print0, the checkpoint contract, the run lifecycle
(signals, stopping together, resuming), the learning-rate schedule, right-padding, downloads, progress, logs
and token files.
"""

import glob
import hashlib
import io
import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from model import GPT, GPTConfig, native_bf16

# Linux: torch backs its CPU tensors of 2 MB and more with transparent huge pages (PyTorch's THP_MEM_ALLOC_ENABLE).
# Without them every step maps its largest tensors afresh in 4 KB pages and faults them in one at a time: on a 2-core
# CPU the cross-entropy of 1,024 tokens over GPT-2's 50,304-token vocabulary (206 MB of logits) took 188 ms instead of
# 54, a step of the Shakespeare BPE model 470 ms instead of 211. Set THP_MEM_ALLOC_ENABLE=0 to turn it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

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


def local_rank() -> int:
    """This process's index on its node: torchrun's LOCAL_RANK, else what srun or mpirun set."""
    for key in ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"):
        if key in os.environ:
            return int(os.environ[key])
    if int(os.environ["WORLD_SIZE"]) == 1:
        return 0
    raise ValueError("RANK and WORLD_SIZE are set but not LOCAL_RANK (nor SLURM_LOCALID or OMPI_COMM_WORLD_LOCAL_RANK):"
                     " launch with torchrun (torchrun --nproc_per_node=8 train.py ...), or export LOCAL_RANK, the "
                     "process's GPU index on its node, along with MASTER_ADDR and MASTER_PORT")


def setup_runtime(device: str = "auto", dtype: str = "auto", training: bool = False) -> Runtime:
    """Pick the device and dtype (saying which and why) and join the DDP group when run under torchrun.
    training=True (train.py, finetune.py, align.py): dtype='auto' autocasts to bfloat16 on CPUs with native bfloat16
    matmuls too; the scripts that measure or generate keep float32 on every CPU, so that their figures are exact."""
    valid_dtypes = ("auto", "float32", "bfloat16", "float16")
    if dtype not in valid_dtypes:
        raise ValueError(f"dtype must be one of {valid_dtypes}, got {dtype!r}")
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # set by torchrun
    rank, local, world_size = 0, 0, 1
    if ddp:
        rank, local, world_size = int(os.environ["RANK"]), local_rank(), int(os.environ["WORLD_SIZE"])
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
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if ddp and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    # dtype: bf16 autocast where bf16 matmuls are native: GPUs with bf16 tensor cores, and for training CPUs with
    # AVX512-BF16 or AMX (the AdamW char demo on 2 such cores: 49 s instead of 89 s, val loss 1.7271 against 1.7293);
    # fp16 with a GradScaler on older GPUs; fp32 on other CPUs, where bf16 is emulated and slower than fp32.
    why_not = native_bf16(device_type) if device_type in ("cuda", "cpu") else "no bfloat16 autocast on this device"
    if dtype != "auto":
        why_dtype = "requested"
    elif device_type == "cuda":
        dtype, why_dtype = ("float16", why_not) if why_not else ("bfloat16", "native bfloat16 matmuls")
    elif why_not or not training:
        dtype, why_dtype = "float32", why_not or ("float32 for exact figures on a CPU; --dtype=bfloat16 is faster "
                                                  "here (native bfloat16 matmuls)")
    else:
        dtype, why_dtype = "bfloat16", "native bfloat16 matmuls"
    if dtype == "bfloat16" and device_type == "cuda" and why_not:
        print0("WARNING: this GPU has no native bfloat16 (it would be emulated, slowly); using float16 with loss "
               "scaling instead (--dtype=float16)")
        dtype, why_dtype = "float16", "this GPU emulates bfloat16"
    elif dtype == "bfloat16" and device_type == "cpu" and why_not:
        print0(f"WARNING: --dtype=bfloat16 on this CPU is slower than float32 ({why_not})")
    elif dtype == "float16" and device_type == "cpu":
        print0("WARNING: float16 autocast is not supported on CPU; using float32 (--dtype=float32)")
        dtype, why_dtype = "float32", "no float16 autocast on CPU"
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for the fp32 matmuls that remain
        torch.backends.cudnn.allow_tf32 = True
    rt = Runtime(device, device_type, dtype, ddp, rank, local, world_size, rank == 0)
    print0(f"device: {device} ({why}), dtype: {dtype} ({why_dtype})" + (f", DDP world size {world_size}" if ddp else ""))
    return rt


# dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, per GPU; fp32 runs count against them too
GPU_PEAKS = {"H200": 989e12, "H100": 989e12, "H100 PCIe": 756e12, "H800": 989e12, "GH200": 989e12, "A100": 312e12,
             "A800": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10": 125e12, "A6000": 155e12,
             "V100": 125e12, "T4": 65e12, "4090": 165e12, "3090": 71e12}


def peak_flops(device: str) -> tuple:
    """A device's peak FLOP/s for MFU -> (flops or 0.0, where the number comes from). GPUs are matched on
    whole words of their name ('NVIDIA L40S' is not an L4, 'A10G' not an A10)."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        words = re.split(r"[\s\-_]+", name.replace("NVIDIA", "").strip())
        hits = [k for k in GPU_PEAKS if all(w in words for w in k.split())]
        if not hits:
            return 0.0, f"{name} is not in common.GPU_PEAKS; set --peak_flops"
        key = max(hits, key=len)  # 'H100 PCIe' over 'H100'
        return GPU_PEAKS[key], f"{name}, dense bf16 datasheet peak"
    if device == "cpu":
        # a rough guess: threads x fp32 FLOP per cycle (two FMA units of AVX-512 or AVX2) x 2.5 GHz
        flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
        per_cycle = 64 if " avx512f" in flags else 32 if " avx2" in flags else 8
        n = torch.get_num_threads()
        return n * per_cycle * 2.5e9, f"{n} threads x {per_cycle} FLOP/cycle x 2.5 GHz, a rough guess; set --peak_flops"
    return 0.0, f"no peak known for {device}; set --peak_flops"


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


def gather_objects(obj, rt: Runtime) -> list:
    """Every rank's obj, in rank order (a collective: all ranks call it at the same point)."""
    if not rt.ddp:
        return [obj]
    # sent as torch.save bytes: all_gather_object fails to unpickle tensors itself (torch 2.13: "UntypedStorage
    # has no attribute 'dtype'"), and weights_only=True reads back nothing but data
    buf = io.BytesIO()
    torch.save(obj, buf)
    objs = [None] * rt.ddp_world_size
    torch.distributed.all_gather_object(objs, buf.getvalue())
    return [torch.load(io.BytesIO(b), weights_only=True) for b in objs]


def restore_rng(states: Optional[list], rt: Runtime):
    """Continue every rank's random numbers from a checkpoint's per-rank list (or warn that they cannot be)."""
    states = states or []
    if len(states) == rt.ddp_world_size:
        set_rng_state(states[rt.ddp_rank])
    else:
        print0(f"WARNING: the checkpoint holds random states for {len(states)} rank(s), this run has "
               f"{rt.ddp_world_size}: dropout and sampling continue with fresh random numbers, so the resumed run "
               f"is not bit-identical to an uninterrupted one")

# ----------------------------------------------------------------------------------------------
# the checkpoint contract: one layout for every script that writes a model
#   {"format": 2, "kind", "model", "model_args", "tokenizer", "config", "resume", ...what the kind adds}
# kind: which job wrote it. resume: None (weights only) or what continuing the run needs (resume_state).


CKPT_FORMAT = 2
CKPT_KINDS = ("pretrain", "sft", "classify", "dpo", "imported", "quantized")
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def make_checkpoint(kind: str, model_state: dict, model_args: dict, config: dict, tokenizer: dict,
                    resume: Optional[dict] = None, **extra) -> dict:
    """A checkpoint in the contract's layout. extra: classify: head, labels; dpo: ref_init_from, ref_logps,
    data_fingerprint; quantized: quantization (with 'source', the float checkpoint); imported: origin."""
    assert kind in CKPT_KINDS, f"kind {kind!r} is not one of {CKPT_KINDS}"
    return {"format": CKPT_FORMAT, "kind": kind, "model": strip_compile_prefix(model_state),
            "model_args": dict(model_args), "tokenizer": tokenizer, "config": dict(config), "resume": resume, **extra}


def resume_state(iter_num: int, best_name: str, best_value: float, optimizer=None, scaler=None,
                 rng: Optional[list] = None, loader=None, **extra) -> dict:
    """What continuing a run needs: the optimizer (a state dict, or a list of them), the GradScaler, one RNG
    state per rank, the data loader's position, the iteration, and the best metric with its name."""
    return {"iter_num": iter_num, "best": {"name": best_name, "value": best_value}, "optimizer": optimizer,
            "scaler": scaler, "rng": rng, "loader": loader, **extra}


def _stale_tmp(path: str) -> list:
    """Temporary files of earlier saves of path whose writer is gone (killed mid-save)."""
    out = []
    for tmp in glob.glob(glob.escape(path) + ".*.tmp"):
        pid = tmp[len(path) + 1:-4]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)  # raises if no such process
            except ProcessLookupError:
                out.append(tmp)
            except PermissionError:
                pass  # another user's live process
    return out


def save_checkpoint(obj: dict, path: str):
    """torch.save to a temporary file in the same folder, fsync, then rename: a crash never leaves a torn file.
    SIGINT/SIGTERM wait until the file is complete, so a second Ctrl-C cannot tear or orphan it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    for tmp in _stale_tmp(path):
        os.unlink(tmp)
    tmp = f"{path}.{os.getpid()}.tmp"
    # Defer the signals at the Python level: a handler always runs in the main thread, but a blocked signal mask
    # would cover this thread only, and torch runs threads of its own that would receive the signal instead.
    deferred, previous = [], {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, lambda signum, frame: deferred.append(signum))
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # an ordinary readable file
        os.replace(tmp, path)
        dir_fd = os.open(folder, os.O_RDONLY)  # the rename itself survives a power cut only once the folder is synced
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum in deferred:  # now the file is whole: what the signals would have done
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


def strip_compile_prefix(state_dict: dict) -> dict:
    """torch.compile wraps the model as '_orig_mod'; checkpoints store the plain names."""
    prefix = "_orig_mod."
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def _upgrade(ckpt: dict) -> dict:
    """A checkpoint of an older layout (nanoGPT's, or ours before the contract) in the contract's terms."""
    if "quantization" in ckpt:
        kind = "quantized"
    elif "ref_init_from" in ckpt:
        kind = "dpo"
    elif ckpt.get("task") in ("instruct", "classify"):
        kind = "sft" if ckpt["task"] == "instruct" else "classify"
    elif "origin" in ckpt or ckpt.get("optimizer") is None:
        kind = "imported"
    else:
        kind = "pretrain"
    resume = None
    if ckpt.get("optimizer") is not None and "iter_num" in ckpt:
        rng = ckpt.get("rng")
        resume = resume_state(ckpt["iter_num"], "dpo_val_loss" if kind == "dpo" else "val_loss",
                              ckpt.get("best_val_loss", float("inf")), ckpt["optimizer"], ckpt.get("scaler"),
                              [rng] if isinstance(rng, dict) else rng, ckpt.get("loader"))
    out = {k: v for k, v in ckpt.items() if k not in ("optimizer", "iter_num", "best_val_loss", "scaler", "rng",
                                                     "loader", "task")}
    out.update(format=CKPT_FORMAT, kind=kind, resume=resume, config=ckpt.get("config") or {},
               tokenizer=ckpt.get("tokenizer"))
    return out


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint safely (weights_only: no code in the file runs), validated and in the contract's
    layout whatever wrote it, with errors that say what to do."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}. Train one (python train.py "
                                f"config/train_shakespeare_char.py) or convert OpenAI's weights "
                                f"(python load_openai.py --model=gpt2 --out_dir=DIR), then pass --init_from=DIR")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path!r} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path!r} is not a model checkpoint: expected keys 'model' and 'model_args', found {keys}")
    if "kind" not in ckpt:
        ckpt = _upgrade(ckpt)
    elif ckpt["kind"] not in CKPT_KINDS:
        raise ValueError(f"{path!r} says it was written by a {ckpt['kind']!r} job; known kinds: {CKPT_KINDS}")
    ckpt["model"] = strip_compile_prefix(ckpt["model"])
    ckpt["path"] = path
    return ckpt


def model_from_checkpoint(ckpt: dict, dropout: Optional[float] = None) -> GPT:
    """Build the GPT a checkpoint describes and load its weights (quantized checkpoints too)."""
    if ckpt.get("kind") == "quantized":
        from quantize import quantized_model_from_checkpoint
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
    from tokenizer import CharTokenizer, load_tokenizer
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


def last_name(ckpt_name: str) -> str:
    """Where a run that keeps only its best model in ckpt_name saves the state it stopped in: ckpt_last.pt."""
    stem, ext = os.path.splitext(ckpt_name)
    return f"{stem}_last{ext or '.pt'}"


def resume_path(out_dir: str, ckpt_name: str = "ckpt.pt") -> str:
    """The checkpoint a run continues from: the newer of out_dir/ckpt_name and out_dir/ckpt_last.pt."""
    paths = [p for p in (os.path.join(out_dir, ckpt_name), os.path.join(out_dir, last_name(ckpt_name)))
             if os.path.exists(p)]
    if not paths:
        raise FileNotFoundError(f"init_from='resume' found no checkpoint in {out_dir!r} (looked for {ckpt_name} and "
                                f"{last_name(ckpt_name)}); pass the --out_dir of the run to continue, or start one "
                                f"with --init_from=scratch or a model (--init_from=gpt2, --init_from=out-DIR)")
    return max(paths, key=os.path.getmtime)


def checkpoint_path(init_from: str, out_dir: str = "", ckpt_name: str = "ckpt.pt") -> str:
    """The file that init_from names: 'resume' (resume_path), a checkpoint folder, or a file."""
    if init_from == "resume":
        return resume_path(out_dir, ckpt_name)
    if os.path.isdir(init_from):
        return os.path.join(init_from, ckpt_name)
    if os.path.isfile(init_from):
        return init_from
    raise ValueError(f"init_from must be 'resume' (continues {os.path.join(out_dir, ckpt_name)!r}), one of "
                     f"{GPT2_NAMES}, or an existing checkpoint file or folder; got {init_from!r}")


def load_model(init_from: str, out_dir: str = "", device: str = "cpu", dropout: Optional[float] = None,
               ckpt_name: str = "ckpt.pt", for_training: bool = False, meta: str = ""):
    """Load a model to use or to start a new run from -> (model on device, checkpoint dict or None, tokenizer).

    init_from: 'resume', a GPT-2 name ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl'), or the path of a
    checkpoint file or of a folder holding ckpt_name (e.g. 'out-sft'). Any kind of checkpoint is accepted;
    for_training refuses quantized ones (weights that cannot take gradients) naming the float file to use."""
    if init_from in GPT2_NAMES:
        model = GPT.from_pretrained(init_from, dropout=dropout or 0.0)
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


# keys that may change between the legs of one run: where and how it runs, how often it reports, how long it goes
# (and the peak learning rate, the fix for a run that diverged)
MAY_CHANGE = ("init_from", "out_dir", "ckpt_name", "max_iters", "epochs", "lr_decay_iters", "learning_rate",
              "eval_interval", "eval_iters", "eval_only", "log_interval", "sample_interval", "sample_prompt",
              "sample_tokens", "num_samples", "max_new_tokens", "always_save_checkpoint", "save_best", "final_eval", "predict", "wandb_log",
              "wandb_project", "wandb_run_name", "wandb_mode", "device", "dtype", "compile", "data_dir", "cache_dir",
              "peak_flops")


def resume_run(config: dict, explicit: set, kinds: tuple, script: str, may_change: tuple = MAY_CHANGE):
    """Continue the run in config['out_dir'] -> (its config, its checkpoint). The saved config is the base; of
    the keys set by config files or --key=value (explicit), those in may_change replace the saved values (each
    difference printed) and any other that differs is an error, since it would make another run."""
    path = resume_path(config["out_dir"], config.get("ckpt_name", "ckpt.pt"))
    ckpt = load_checkpoint(path)
    if ckpt["kind"] not in kinds or ckpt.get("resume") is None:
        what = "weights only, no optimizer state" if ckpt.get("resume") is None else "another script's run"
        raise ValueError(f"{path!r} is a checkpoint of kind {ckpt['kind']!r} ({what}); {script} --init_from=resume "
                         f"continues only its own runs ({', '.join(kinds)}). To start a new run of {script} from it: "
                         f"--init_from={os.path.dirname(path) or '.'} --out_dir=NEW_DIR")
    saved = ckpt["config"]
    out = dict(config)
    out.update({k: v for k, v in saved.items() if k in config})  # keys the saved run lacks keep today's default
    changed, refused = [], []
    for key in sorted(explicit):
        was = saved.get(key, ckpt["model_args"].get(key))  # the model's shape also when an old config lacks it
        if key == "init_from" or key not in saved and key not in ckpt["model_args"] or was == config[key]:
            continue
        (changed if key in may_change else refused).append(f"{key}: {was!r} -> {config[key]!r}")
        out[key] = config[key]
    out["init_from"] = "resume"
    if refused:
        raise ValueError(f"resuming {path!r} with different settings would make another run: " + "; ".join(refused)
                         + f". Only these may change between legs: {', '.join(k for k in may_change if k in config)}. "
                         f"Drop those flags to continue the run, or start a new one from it: "
                         f"--init_from={os.path.dirname(path) or '.'} --out_dir=NEW_DIR")
    it = ckpt["resume"]["iter_num"]
    print0(f"resuming {path} ({ckpt['kind']}, iteration {it:,}) with its saved config"
           + (": changed " + "; ".join(changed) if changed else ""))
    return out, ckpt


def resume_command(script_argv: list, rt: Runtime, out_dir: str) -> str:
    """The command that continues this run (printed when it stops): the saved config does the rest."""
    launcher = (f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', rt.ddp_world_size)} (and your "
                f"other torchrun flags)" if rt.ddp else "python")
    return f"{launcher} {script_argv[0]} --init_from=resume --out_dir={out_dir}"

# ----------------------------------------------------------------------------------------------
# the run lifecycle: SIGINT/SIGTERM -> finish the step, save, print how to resume, exit


@dataclass
class StopRequest:
    """Set by SIGINT/SIGTERM. A trainer reads agreed() once per step and stops (after saving) when it is set."""
    signal: int = 0  # the first stop signal received, 0 while none
    _work: object = None  # the all-reduce in flight (DDP)
    _flag: Optional[torch.Tensor] = None
    _done: object = None  # CUDA event after the reduced flag's copy to the host

    def agreed(self, rt: Runtime) -> int:
        """The stop decision every rank shares. Under DDP it is the maximum over ranks of the flags raised one
        call earlier: the reduction runs in the background on the training's own process group (NCCL on GPUs,
        no side group whose network interface could differ) and is read a step later, so the host never waits
        for the step in flight. All ranks call this at the same points."""
        if not rt.ddp:
            return self.signal
        agreed = 0
        if self._work is not None:
            if self._done is not None:
                self._done.synchronize()  # waits for the previous step's reduce and copy, not for this step
            else:
                self._work.wait()
            agreed = int(self._flag[0])
        flag = torch.full((1,), self.signal, dtype=torch.int32, device=rt.device)
        self._work = torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, async_op=True)
        if rt.device_type == "cuda":
            self._work.wait()  # the current stream waits for the reduce; the host does not
            self._flag = flag.to("cpu", non_blocking=True)  # into pinned memory
            self._done = torch.cuda.Event()
            self._done.record()
        else:
            self._flag = flag
        return agreed


_stop = StopRequest()


def catch_signals() -> StopRequest:
    """Install the stop handlers: the first SIGINT or SIGTERM asks the run to finish its step, save and exit.
    A repeated SIGTERM is the same request again (SLURM signals a job step twice, torchrun forwards what the
    terminal already sent), so it is ignored; so is any repeat under torchrun, whose agent kills the workers
    30 s after forwarding. A second Ctrl-C of a plain run aborts without saving, but never inside a save."""
    def handler(signum, frame):
        if not _stop.signal:
            _stop.signal = signum
            print0(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint"
                   + ("" if "RANK" in os.environ else " (Ctrl-C again to abort without saving)"), flush=True)
        elif signum == signal.SIGINT and "RANK" not in os.environ:
            raise KeyboardInterrupt
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return _stop


def stop_exit(signum: int, rt: Runtime, script_argv: list, out_dir: str):
    """After the stop save: say how to continue, leave the process group, exit 128 + signal as shells do."""
    print0(f"stopped by {signal.Signals(signum).name}. Resume with:\n  {resume_command(script_argv, rt, out_dir)}",
           flush=True)
    if rt.ddp:
        torch.distributed.destroy_process_group()
    sys.exit(128 + signum)

# ----------------------------------------------------------------------------------------------
# the learning-rate schedule of every trainer


def lr_at(it: int, learning_rate: float, warmup_iters: int, decay_iters: int, min_lr: float,
          decay: bool = True) -> float:
    """Linear warmup over warmup_iters (Goyal et al. 2017, arXiv:1706.02677), then cosine decay to min_lr at
    decay_iters (Loshchilov & Hutter, SGDR, arXiv:1608.03983), as GPT-3 was trained (Brown et al. 2020,
    arXiv:2005.14165, appendix B), and min_lr after it; decay=False holds learning_rate after the warmup."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if not decay:
        return learning_rate
    if it >= decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def check_schedule(learning_rate: float, warmup_iters: int, decay_iters: int, max_iters: int, min_lr: float,
                   decay: bool = True):
    """Refuse a schedule that cannot be computed, and warn about one that cannot do what its numbers say."""
    if decay and decay_iters <= warmup_iters:
        raise ValueError(f"the learning rate would decay (at iteration {decay_iters}) before its warmup ends (at "
                         f"{warmup_iters}); e.g. --warmup_iters={max(0, min(warmup_iters, decay_iters // 10))}")
    if max_iters <= 0:
        return
    reached = max(lr_at(it, learning_rate, warmup_iters, decay_iters, min_lr, decay)
                  for it in range(min(max_iters, warmup_iters + 1)))
    if warmup_iters >= max_iters:
        print0(f"WARNING: warmup_iters={warmup_iters:,} is not shorter than the run (max_iters={max_iters:,}): the "
               f"learning rate never reaches learning_rate={learning_rate:g}, only {reached:.3g}. Use e.g. "
               f"--warmup_iters={max(1, max_iters // 10)} (10% of the run) or more iterations")
    if reached < 1e-7:
        print0(f"WARNING: the learning rate never exceeds {reached:.3g}: the weights will barely move. Raise "
               f"--learning_rate (now {learning_rate:g})")
    if decay and min_lr > learning_rate:
        print0(f"WARNING: min_lr={min_lr:g} is above learning_rate={learning_rate:g}: the 'decay' raises the rate")

# ----------------------------------------------------------------------------------------------
# batches of variable-length records


def pad_right(xs: list, ys: list, pad_id: int):
    """Sequences of token ids and their labels (same lengths) -> x, y LongTensors (B, T), right-padded: x with
    pad_id, y with -1 (ignored by the loss). With causal attention, padding after a token never changes that
    token's output, so padded and unpadded rows give the same logits where it matters."""
    T = max(len(s) for s in xs)
    x = torch.full((len(xs), T), pad_id, dtype=torch.long)  # (B, T)
    y = torch.full((len(xs), T), -1, dtype=torch.long)  # (B, T)
    for r, (ids, labels) in enumerate(zip(xs, ys)):
        assert len(ids) == len(labels), f"row {r}: {len(ids)} ids but {len(labels)} labels"
        x[r, :len(ids)] = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        y[r, :len(labels)] = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    return x, y

# ----------------------------------------------------------------------------------------------
# progress: tqdm bars on a terminal, a line per ~10% in a redirected log


def progress(iterable, desc: str = "", total: Optional[int] = None, unit: str = "it", disable: bool = False,
             **kwargs):
    """Iterate with a progress display on rank 0: a tqdm bar when stderr is a terminal, else (a log file, a
    pipe) one line at every tenth of the total, so logs do not fill with redrawn bars."""
    disable = disable or int(os.environ.get("RANK", "0")) != 0
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if sys.stderr.isatty() or disable:
        from tqdm import tqdm
        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, **kwargs)
    return _progress_lines(iterable, desc, total, unit)


def _progress_lines(iterable, desc: str, total: Optional[int], unit: str):
    t0, next_mark, n = time.time(), 1, 0
    for n, item in enumerate(iterable, 1):
        yield item
        if total and n * 10 >= next_mark * total:
            while n * 10 >= next_mark * total:
                next_mark += 1
            rate = n / max(time.time() - t0, 1e-9)
            print(f"{desc}: {n:,}/{total:,} {unit} ({100 * n / total:.0f}%, {rate:,.1f} {unit}/s)", file=sys.stderr,
                  flush=True)
    if not total and n:
        print(f"{desc}: {n:,} {unit} in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)

# ----------------------------------------------------------------------------------------------
# downloads: one downloader for weights, evaluation sets and corpora


def cache_root(cache_dir: str = "") -> str:
    """The download cache: cache_dir, else $LLM_E2E_CACHE, else ~/.cache/llm-e2e."""
    return cache_dir or os.environ.get("LLM_E2E_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llm-e2e")


def _announced_checksums(response) -> dict:
    """Checksums the server states: Azure's Content-MD5 (base64 MD5 of the whole blob; on a ranged reply it
    is x-ms-blob-content-md5) and the Hub's X-Linked-Etag (sha256 of an LFS file, on the redirect)."""
    import base64
    out = {}
    for r in (*response.history, response):
        md5 = r.headers.get("x-ms-blob-content-md5") or (r.status_code == 200 and r.headers.get("Content-MD5"))
        if md5:
            out["md5"] = base64.b64decode(md5).hex()
        etag = r.headers.get("X-Linked-Etag", "").strip('"')
        if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag):
            out["sha256"] = etag
    return out


def _checksum_mismatch(path: str, expect: dict) -> Optional[str]:
    """None if the file's digests match every expected one, else a description of the first mismatch."""
    if not expect:
        return None
    hashes = {k: hashlib.new(k) for k in expect}
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            for h in hashes.values():
                h.update(block)
    for k, h in hashes.items():
        if h.hexdigest() != expect[k]:
            return f"{k} {h.hexdigest()}, expected {expect[k]}"
    return None


def download(url: str, path: str, sha256: Optional[str] = None, retries: int = 4, backoff: float = 1.0,
             timeout: float = 30.0, chunk_size: int = 1 << 16, hint: str = "") -> str:
    """Fetch url to path -> path. Streamed with a progress bar, resumed from path + '.part' with an HTTP Range
    request after an interruption, retried (retries = failures in a row without progress, waiting backoff,
    2*backoff, ... seconds), size and checksum (sha256 given, or announced by the server) verified, and renamed
    to path only when complete. An existing path is taken as done: only this function writes it. Processes that
    download the same file at once (DDP ranks, nodes sharing a home directory) take turns on a lock file, so the
    first downloads and the others find the file. hint: the offline fix, added to a connection error.
    A connection lost mid-chunk loses that chunk's bytes (requests raises before returning them), so chunks
    stay small."""
    import fcntl
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if os.path.exists(path):  # another process finished it while this one waited
            return path
        return _download(url, path, sha256, retries, backoff, timeout, chunk_size, hint)


def _download(url, path, sha256, retries, backoff, timeout, chunk_size, hint) -> str:
    import requests
    from tqdm import tqdm
    part, failures, error, reached = path + ".part", 0, None, False
    expect = {"sha256": sha256} if sha256 else {}
    while failures < retries:
        have = os.path.getsize(part) if os.path.exists(part) else 0
        got = 0
        try:
            with requests.get(url, headers={"Range": f"bytes={have}-"} if have else {}, stream=True,
                              timeout=timeout) as r:
                reached = True
                if r.status_code == 404:
                    raise FileNotFoundError(f"{url} answered 404 Not Found: check the name and the base URL")
                if r.status_code == 416 and have:  # nothing past our end: the partial file may be whole already
                    total = int(r.headers.get("Content-Range", "*/-1").rsplit("/", 1)[1])
                elif r.status_code >= 400:
                    raise requests.HTTPError(f"{url} answered {r.status_code} {r.reason}", response=r)
                else:
                    if not sha256:
                        expect.update(_announced_checksums(r))
                    if r.status_code == 206 and r.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                        total = int(r.headers["Content-Range"].rsplit("/", 1)[1])  # "bytes 100-199/200"
                    else:  # a full reply (the server ignored Range, or this is the first try): start over
                        have = 0
                        total = int(r.headers["Content-Length"]) if "Content-Length" in r.headers else None
                    with open(part, "ab" if have else "wb") as f, \
                            tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                                 desc=os.path.basename(path), leave=False, disable=not sys.stderr.isatty()) as bar:
                        for chunk in r.iter_content(chunk_size):
                            f.write(chunk)
                            bar.update(len(chunk))
                            got += len(chunk)
        except (requests.ConnectionError, requests.Timeout, requests.HTTPError,
                requests.exceptions.ChunkedEncodingError) as e:  # the last: connection lost mid-body
            if isinstance(e, requests.HTTPError) and e.response is not None and 400 <= e.response.status_code < 500 \
                    and e.response.status_code not in (408, 429):
                raise ValueError(f"{url}: {e}") from e
            error = e
        else:
            size = os.path.getsize(part)
            if total is not None and size < total:
                error = ConnectionError(f"the connection closed after {size:,} of {total:,} bytes")
            elif total is not None and size > total:
                os.remove(part)
                got, error = 0, ConnectionError(f"the partial file had {size:,} bytes, more than the {total:,} "
                                                f"the server has")
            else:
                bad = _checksum_mismatch(part, expect)
                if bad is None:
                    os.replace(part, path)
                    checked = " and ".join(["size"] + sorted(expect))
                    print(f"downloaded {url} ({size:,} bytes, {checked} verified) -> {path}")
                    return path
                os.remove(part)  # corrupt: never resume from it
                got, error = 0, ValueError(f"{url} downloaded corrupt: {bad}")
        failures = 0 if got else failures + 1  # bytes kept reset the count: a flaky link still finishes
        if failures < retries:
            wait = backoff * 2 ** max(failures - 1, 0)
            print(f"WARNING: download of {url} failed ({error}); retrying in {wait:g} s")
            time.sleep(wait)
    if isinstance(error, ValueError):
        raise error
    offline = "" if reached else f"no network connection to {url.split('/')[2]}: "
    raise ConnectionError(f"{offline}could not download {url}: {retries} attempt(s) in a row failed ({error})."
                          + (f" {hint}" if hint else "")) from error

# ----------------------------------------------------------------------------------------------
# logs: one JSON record per line, read back tolerantly


def append_jsonl(path: str, record: dict):
    """Append one JSON record per line (out_dir/log.jsonl, eval.jsonl ...)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: str) -> list:
    """The records of a log written by append_jsonl. A line torn by a kill or a full disk (it can only be the
    last) is skipped with a warning instead of blocking a resume."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                print0(f"WARNING: {path}:{n}: skipped a torn log line ({line[:60]!r}...)")
    return out


def start_log(out_dir: str, resume_iter: Optional[int]) -> str:
    """out_dir/log.jsonl for this run (rank 0 calls it). A resumed run keeps what was logged up to its checkpoint's
    iteration (the rest is logged again); a new run moves an earlier run's log aside, saying so."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "log.jsonl")
    if resume_iter is not None:
        truncate_log(path, resume_iter)
    elif os.path.exists(path):
        os.replace(path, os.path.join(out_dir, "log.prev.jsonl"))
        print0(f"WARNING: {out_dir!r} holds an earlier run; this one overwrites its checkpoint at the first save (its "
               f"log is now log.prev.jsonl). To continue that run instead: --init_from=resume --out_dir={out_dir}")
    return path


def truncate_log(path: str, iter_num: int):
    """Keep what a log recorded up to iteration iter_num (a resumed run logs the rest again), atomically."""
    if not os.path.exists(path):
        return
    kept = [r for r in read_jsonl(path) if r.get("iter", 0) <= iter_num]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(path + ".tmp", path)

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
# metrics: a PNG a person can look at, Weights & Biases when asked


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
