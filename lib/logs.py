"""
What a person reads or looks at during a run: log.jsonl records, loss plots as PNG, and Weights & Biases when asked.
"""

import json
import os


def print0(*args, **kwargs):
    """print on the master process only (rank 0 under torchrun)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs)


def append_jsonl(path: str, record: dict):
    """Append one JSON record per line (out_dir/log.jsonl, eval.jsonl ...)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def record(path: str, rec: dict, wandb_run=None):
    """One record of a run's log: a line of log.jsonl ({"type": "train" | "eval" | "sample" | "final" | "summary",
    "iter": ..., the figures}) and the same numbers to Weights & Biases when it is on."""
    append_jsonl(path, rec)
    if wandb_run is not None:
        wandb_run.log({f"{rec['type']}/{k}": v for k, v in rec.items() if k not in ("type", "iter") and v is not None
                       and not isinstance(v, (str, list, dict))}, step=rec["iter"])


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
