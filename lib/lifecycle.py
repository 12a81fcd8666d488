"""
The run lifecycle that train.py, finetune.py and align.py share: resume a run with its saved config as the base,
random states per rank, one writer per out_dir, the log, SIGINT/SIGTERM -> finish the step, save, print how to
resume, exit.
"""

import fcntl
import io
import json
import os
import random
import resource
import signal
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from lib import fsdp
from lib.checkpoint import load_checkpoint, make_checkpoint, resume_path, resume_state, save_checkpoint
from lib.logs import read_jsonl
from lib.runtime import Runtime, print0
from model import Block


def rng_state() -> dict:
    """Every random generator's state, in types that torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()),
                                                     *np_state[2:]], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


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
    if len(states) != rt.ddp_world_size:
        print0(f"WARNING: the checkpoint holds random states for {len(states)} rank(s), this run has "
               f"{rt.ddp_world_size}: dropout and sampling continue with fresh random numbers, so the resumed run "
               f"is not bit-identical to an uninterrupted one")
        return
    state = states[rt.ddp_rank]
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# keys that may change between the legs of one run, in every trainer: where and how it runs, how often it reports,
# how long it goes (and the peak learning rate, the fix for a run that diverged). Each trainer adds its own.
MAY_CHANGE = ("init_from", "out_dir", "ckpt_name", "max_iters", "learning_rate", "eval_interval", "eval_iters",
              "eval_only", "log_interval", "always_save_checkpoint", "wandb_log", "wandb_project", "wandb_run_name",
              "wandb_mode", "device", "dtype", "compile", "cache_dir")


def resume_run(config: dict, explicit: set, kinds: tuple, script: str, may_change: tuple = ()):
    """Continue the run in config['out_dir'] -> (its config, its checkpoint). The saved config is the base; keys set
    by config files or --key=value (explicit) replace it if they are in MAY_CHANGE + may_change; any other that
    differs is an error: it would make another run."""
    may_change = MAY_CHANGE + tuple(may_change)
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
    """The command that continues this run: the saved config does the rest."""
    launcher = (f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', rt.ddp_world_size)} (and your "
                f"other torchrun flags)" if rt.ddp else "python")
    return f"{launcher} {script_argv[0]} --init_from=resume --out_dir={out_dir}"


@dataclass
class StopRequest:
    """Set by SIGINT/SIGTERM; a trainer reads agreed() once per step and stops (after saving) when it is set."""
    signal: int = 0  # the first stop signal received, 0 while none
    _work: object = None  # the all-reduce in flight (DDP)
    _flag: Optional[torch.Tensor] = None
    _done: object = None  # CUDA event after the reduced flag's copy to the host

    def agreed(self, rt: Runtime) -> int:
        """The stop decision every rank shares (all call this at the same points). Under DDP: the maximum over ranks
        of the flags raised one call earlier, reduced in the background on the training's own process group (no side
        group whose network interface could differ) and read a step later: the host never waits for the step."""
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
    """The first SIGINT or SIGTERM asks the run to finish its step, save and exit. Repeats are ignored (SLURM
    signals a job step twice, torchrun forwards what the terminal already sent), except a second Ctrl-C of a plain
    run, which aborts without saving (never inside a save)."""
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
    unlock_out_dir()
    if rt.ddp:
        torch.distributed.destroy_process_group()
    sys.exit(128 + signum)


_lock = None  # the open out_dir/.lock of this process: the lock lasts as long as the file object


def lock_out_dir(out_dir: str):
    """Make out_dir this process's alone (rank 0 calls it), so that two runs never overwrite each other's files: a
    flock on out_dir/.lock, which names the holder. The kernel releases it however the process ends."""
    global _lock
    unlock_out_dir()  # an earlier run in this process (tests run scripts in-process): flock is per open file
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, ".lock")
    f = open(path, "a+")  # not "w": truncating would erase the holder's PID before we know we may write
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        f.seek(0)
        pid, _, command = f.read().partition("\n")
        f.close()
        raise ValueError(f"another run is writing to --out_dir={out_dir}: process {pid.strip() or '?'} "
                         f"({command.strip() or 'command unknown'}) holds {path}. Wait for it to finish (or stop "
                         f"it), or choose another --out_dir") from e
    f.truncate(0)
    f.write(f"{os.getpid()}\n{' '.join(sys.argv)}\n")
    f.flush()
    _lock = f


def unlock_out_dir():
    """Let the next run have out_dir (a process may live on after its run: tests run scripts in-process)."""
    global _lock
    if _lock is not None:
        _lock.close()
        _lock = None


def check_out_dir(out_dir: str, init_from: str, overwrite: bool, script: str):
    """Consent before a new run replaces a model: a new run into an out_dir that holds any checkpoint stops here,
    before anything is built, offering the choices (init_from='resume', overwrite=True, another folder)."""
    if init_from == "resume" or overwrite or not os.path.isdir(out_dir):
        return
    held = sorted(f for f in os.listdir(out_dir) if f.endswith(".pt") and os.path.isfile(os.path.join(out_dir, f)))
    if held:
        raise ValueError(f"--out_dir={out_dir} already holds {', '.join(held)}, which a new {script} run would "
                         f"overwrite. To continue that run: --init_from=resume --out_dir={out_dir}; to start from its "
                         f"model in a new folder: --init_from={out_dir} --out_dir=NEW_DIR; to replace it: --overwrite=True")


def start_log(out_dir: str, resume_iter: Optional[int]) -> str:
    """out_dir/log.jsonl for this run (rank 0 calls it). A resumed run keeps what was logged up to its checkpoint's
    iteration; a new run moves an earlier run's log aside (log.1.jsonl, log.2.jsonl, ...), saying so."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "log.jsonl")
    if resume_iter is not None:
        truncate_log(path, resume_iter)
    elif os.path.exists(path):
        n = 1
        while os.path.exists(os.path.join(out_dir, f"log.{n}.jsonl")):
            n += 1
        os.replace(path, os.path.join(out_dir, f"log.{n}.jsonl"))
        print0(f"the earlier run's log in {out_dir!r} is now log.{n}.jsonl")
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
# around every trainer's loop: restore a resumed run, wrap the model, save, stop on nan, end


def restore(state: dict, optimizer, scaler, rt: Runtime, root, loader=None) -> tuple:
    """Continue a run from its checkpoint's resume state -> (iter_num, best metric value): the optimizer (of the
    module root), the GradScaler, the loader's position, then the random numbers (last: making the model drew some)."""
    fsdp.load_optimizer(root, optimizer, state["optimizer"])
    if state.get("scaler"):  # empty unless the run used float16
        scaler.load_state_dict(state["scaler"])
    if loader is not None and state.get("loader") is not None:
        loader.load_state_dict(state["loader"])
    restore_rng(state["rng"], rt)
    return state["iter_num"], state["best"]["value"]


def wrap(model, rt: Runtime, compile: bool, dynamic: bool = False, shard: bool = False, cpu_offload: bool = False):
    """The module the training steps run, made before the optimizer: sharded in place by FSDP2 (shard=True) or
    DDP-wrapped under torchrun, and torch.compile'd (dynamic: batch lengths vary). Evaluation and sampling call model
    itself, whose other shapes would make compile trace again."""
    if shard:
        fsdp.shard(model, [m for m in model.modules() if isinstance(m, Block)], rt, cpu_offload)
        print0(fsdp.memory_line(model, rt, True))
    elif rt.ddp:
        print0(fsdp.memory_line(model, rt, False))
    if compile:
        print0("compiling the model with torch.compile (the first iterations are slow) ...")
        model = torch.compile(model, dynamic=dynamic or None)
    if rt.ddp and not fsdp.is_sharded(model):
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[rt.ddp_local_rank] if rt.device_type == "cuda" else None)
    return model


def sync_gradients(train_model, on: bool):
    """Whether the next forward and backward average gradients over the ranks: only at the last micro-step of an
    optimizer step; before it they accumulate locally (DDP's no_sync, FSDP without its reduce-scatter)."""
    module = getattr(train_model, "_orig_mod", train_model)  # under torch.compile
    if fsdp.is_sharded(module):
        module.set_requires_gradient_sync(on)
    elif hasattr(train_model, "require_backward_grad_sync"):  # DDP
        train_model.require_backward_grad_sync = on


def grad_norm(norm) -> float:
    """clip_grad_norm_'s result as a number (a DTensor under FSDP)."""
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()


def save_run(path: str, kind: str, model, config: dict, tokenizer: dict, rt: Runtime, iter_num: int, best: tuple,
             optimizer, scaler, loader=None, root=None, **extra):
    """Write a trainer's checkpoint with everything an exact resume needs (a collective under DDP; rank 0 writes).
    model: the GPT; root: the module the optimizer trains, when it is not the GPT itself (a head around it). best:
    (the metric's name, its best value). extra: what the kind adds (make_checkpoint); a module is saved as its state
    dict."""
    root = root if root is not None else model
    rngs = gather_objects(rng_state(), rt)
    if fsdp.is_sharded(root):
        full, opt_state = fsdp.full_state(root, optimizer)  # collectives: rank 0 gets everything
        names = {m: f"{n}." if n else "" for n, m in root.named_modules()}
        part = lambda m: {k[len(names[m]):]: v for k, v in full.items() if k.startswith(names[m])}
    else:
        opt_state, part = optimizer.state_dict(), lambda m: m.state_dict()
    if rt.master_process:
        extra = {k: part(v) if isinstance(v, torch.nn.Module) else v for k, v in extra.items()}
        resume = resume_state(iter_num, best[0], best[1], opt_state, scaler.state_dict(), rngs, loader)
        save_checkpoint(make_checkpoint(kind, part(model), vars(model.config), config, tokenizer, resume, **extra),
                        path)
        print0(f"saved {path} (iteration {iter_num:,})")


def stop_non_finite(what: str, value: float, iter_num: int, rt: Runtime, out_dir: str):
    """Exit at once: saving weights that produce nan/inf would only destroy the last good checkpoint."""
    unlock_out_dir()
    sys.exit(f"ERROR: the {what} became {value} at iteration {iter_num:,}: the weights are broken, so nothing was "
             f"saved. Lower --learning_rate, check the data, or use --dtype=bfloat16 or float32, then "
             f"continue from the last good checkpoint in {out_dir!r} (if any): "
             f"{resume_command(sys.argv, rt, out_dir)} --learning_rate=...")


def peak_memory(rt: Runtime) -> str:
    if rt.device_type == "cuda":
        return f"{torch.cuda.max_memory_allocated(rt.device) / 2 ** 30:.2f} GiB on the GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB of RAM (max resident set)"


def end_run(rt: Runtime, wandb_run=None):
    unlock_out_dir()
    if wandb_run is not None:
        wandb_run.finish()
    if rt.ddp:
        torch.distributed.destroy_process_group()
