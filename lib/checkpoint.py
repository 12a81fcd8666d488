"""
The checkpoint contract: one layout for every script that writes a model, read by every script that takes one.

    {"format": 2, "kind", "model", "model_args", "tokenizer", "config", "resume", ...what the kind adds}

kind: which job wrote it (pretrain, sft, classify, dpo, imported, quantized). resume: None (weights only) or what
continuing the run needs (resume_state). Files are written atomically and read with weights_only=True (no code
in a file runs); nanoGPT's layout is upgraded on read.
"""

import fcntl
import glob
import os
import signal
import subprocess
import sys
import threading
from typing import Optional

import torch

from lib.logs import print0
from lib.runtime import cache_root
from lib.tokenizer import tokenizer_for
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, where load_openai.py is

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
    """What continuing a run needs: optimizer and GradScaler states, one RNG state per rank, the loader's position,
    the iteration, and the best metric with its name."""
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
    """torch.save to a temporary file, fsync, then rename: a crash never leaves a torn file. SIGINT/SIGTERM wait
    until the file is complete, so a second Ctrl-C cannot tear or orphan it."""
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
    """A checkpoint of nanoGPT's train.py (model, model_args, optimizer, iter_num, best_val_loss, config) in the
    contract's terms: a pre-training run, resumable when it holds its optimizer, weights only otherwise."""
    resume = None
    if ckpt.get("optimizer") is not None and "iter_num" in ckpt:
        resume = resume_state(ckpt["iter_num"], "val_loss", ckpt.get("best_val_loss", float("inf")), ckpt["optimizer"])
    out = {k: v for k, v in ckpt.items() if k not in ("optimizer", "iter_num", "best_val_loss")}
    out.update(format=CKPT_FORMAT, kind="pretrain" if resume else "imported", resume=resume,
               config=ckpt.get("config") or {}, tokenizer=ckpt.get("tokenizer"))
    return out


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint safely (weights_only: no code in the file runs), validated and in the contract's layout."""
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


def pretrained_path(name: str) -> str:
    """OpenAI's GPT-2 `name` as a checkpoint file: load_openai.py converts it once into CACHE/checkpoints/NAME/ckpt.pt.
    Ranks (or nodes sharing the cache) take turns on a lock file, so one converts and the others read."""
    folder = os.path.join(cache_root(), "checkpoints", name)
    path = os.path.join(folder, "ckpt.pt")
    if os.path.exists(path):
        return path
    os.makedirs(folder, exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not os.path.exists(path):
            command = [sys.executable, os.path.join(ROOT, "load_openai.py"), f"--model={name}", f"--out_dir={folder}"]
            print0(f"{name}: converting OpenAI's weights once into {path}: python load_openai.py --model={name} "
                   f"--out_dir={folder}", flush=True)
            done = subprocess.run(command)
            if done.returncode or not os.path.exists(path):
                raise ValueError(f"--init_from={name}: load_openai.py could not provide OpenAI's weights (exit status "
                                 f"{done.returncode}; its message is above). Offline, convert a copy of the files: "
                                 f"python load_openai.py --from_dir=DIR --out_dir=out-{name}, then --init_from=out-{name}")
    return path


def checkpoint_path(init_from: str, out_dir: str = "", ckpt_name: str = "ckpt.pt") -> str:
    """The file that init_from names: 'resume', a GPT-2 name, a checkpoint folder, or a file."""
    if init_from == "resume":
        return resume_path(out_dir, ckpt_name)
    if init_from in GPT2_NAMES:
        return pretrained_path(init_from)
    if os.path.isdir(init_from):
        return os.path.join(init_from, ckpt_name)
    if os.path.isfile(init_from):
        return init_from
    raise ValueError(f"init_from must be 'resume' (continues {os.path.join(out_dir, ckpt_name)!r}), one of "
                     f"{GPT2_NAMES}, or an existing checkpoint file or folder; got {init_from!r}")


def float_model(ckpt: dict, dropout: Optional[float] = None) -> GPT:
    """The GPT a float checkpoint describes, with its weights. A quantized one is refused, naming its float source."""
    if ckpt["kind"] == "quantized":
        q = ckpt.get("quantization") or {}
        source = q.get("source") or "the float checkpoint it was made from"
        raise ValueError(f"{ckpt['path']!r} is {q.get('mode', 'quantized')}-quantized: its weights are for inference "
                         f"only (sample.py, eval.py, attention_viz.py) and cannot be trained. Train from the float "
                         f"checkpoint instead: --init_from={source}")
    model_args = dict(ckpt["model_args"])
    if dropout is not None:
        model_args["dropout"] = dropout
    known = set(GPTConfig.__dataclass_fields__)
    model = GPT(GPTConfig(**{k: v for k, v in model_args.items() if k in known}))
    model.load_state_dict(ckpt["model"])
    return model


def load_float_model(init_from: str, out_dir: str = "", device: str = "cpu", dropout: Optional[float] = None,
                     ckpt_name: str = "ckpt.pt"):
    """What the trainers start from -> (model on device, its checkpoint, its tokenizer): a GPT-2 name or any float
    checkpoint (lib/models.load_model also takes quantized ones)."""
    ckpt = load_checkpoint(checkpoint_path(init_from, out_dir, ckpt_name), map_location="cpu")
    return float_model(ckpt, dropout).to(device), ckpt, tokenizer_for(ckpt)
