"""
Run a script over a grid of settings, resumably, then compare the runs: a table, their loss curves on one plot,
power-law fits for a size sweep, a heat table for a 2-D grid (docs/experiments.md).

    python data/shakespeare_char/prepare.py
    python sweep.py config/sweep_scaling_char.py               # 5 model sizes on a 2-core CPU
    python sweep.py config/sweep_optim.py --parallel=2         # learning rate x AdamW/Muon, two runs at a time
    python sweep.py config/sweep_scaling_char.py --print_only=True > cmds.txt   # the commands, one a line
    python sweep.py config/sweep_scaling_char.py --report_only=True             # tables and plots of what is there

With a scheduler, run line N of cmds.txt as task N of a job array (SLURM: sed -n "${SLURM_ARRAY_TASK_ID}p"
cmds.txt | bash), then --report_only=True. With GPUs every run gets its own and --parallel defaults to their number.
A sweep config is plain Python:

    script = "train.py"                                 # or finetune.py / align.py
    base = ["config/train_shakespeare_char.py"]         # config files of every run
    grid = {"n_layer": [2, 4], "n_embd": [64, 128]}     # cartesian product
    runs = [{"name": "muon", "optimizer": "muon"}]      # and/or named variants (each crossed with the grid)
    fixed = {"max_iters": 500}                          # overrides for every run
    out_dir = "out-sweep-width"

Each run is the script as a user would type it, into out_dir/<name from its keys>/ (its output in run.log there).
Run the same command again: finished runs (a summary in their log.jsonl) are skipped, interrupted ones continue with
--init_from=resume, failed ones are tried again; a failed run is recorded and the sweep goes on. Ctrl-C asks every
run to save and stop. Written to out_dir: results.csv, results.md, curves.png, scaling.png (>= 3 sizes), heat.png.
"""

import contextlib
import csv
import itertools
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

from configurator import configure
from lib.errors import install
from lib.logs import plot_curves, read_jsonl

# ----------------------------------------------------------------------------------------------
# defaults; a sweep config overrides them, --key=value overrides both
script = "train.py"  # the script every run runs
base = []  # config files given to every run, before the overrides
grid = None  # {key: [values]}: one run per combination (a dict; see the docstring)
runs = []  # named variants [{"name": ..., key: value, ...}], each crossed with the grid
fixed = None  # {key: value}: overrides for every run (a dict)
out_dir = "out-sweep"  # one folder per run inside, and the tables and pictures
parallel = 0  # runs at once (threads split between them); 0: one per GPU, 1 on a CPU
print_only = False  # print the commands of the runs still to do, one a line, and exit
report_only = False  # write the tables and pictures of the runs as they are, run nothing
HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------------------------
# the runs: each a name, its varied keys, and the command a user would type


def flag(key: str, value) -> str:
    return f"--{key}={value if isinstance(value, str) else repr(value)}"


def plan() -> list:
    """[{name, keys (the varied values), args (after the script)}] for every variant x grid point."""
    out = []
    for variant in runs or [{"name": ""}]:
        for point in itertools.product(*grid.values()):
            keys = dict(zip(grid, point))
            name = "_".join([variant["name"]] * bool(variant["name"]) + [f"{k}-{v}" for k, v in keys.items()])
            name = re.sub(r"[^A-Za-z0-9.+-]+", "_", name) or "run"  # a folder name: no '/', '=', spaces
            varied = {**{k: v for k, v in variant.items() if k != "name"}, **keys}  # the table's columns
            args = [*base, *[flag(k, v) for k, v in {**fixed, **varied}.items()],
                    f"--out_dir={os.path.join(out_dir, name)}"]
            out.append({"name": name, "keys": varied, "args": args})
    names = [r["name"] for r in out]
    if len(set(names)) < len(names):
        raise ValueError(f"two runs would share a folder: {sorted(n for n in names if names.count(n) > 1)}; give "
                         f"every variant of runs its own name")
    return out


def state(run: dict) -> str:
    """'done' (its log has a summary), 'resume' (a checkpoint to continue from) or 'new'."""
    folder = os.path.join(out_dir, run["name"])
    if any(r.get("type") == "summary" for r in read_jsonl(os.path.join(folder, "log.jsonl"))):
        return "done"
    return "resume" if os.path.exists(os.path.join(folder, "ckpt.pt")) else "new"


def status(run: dict) -> str:
    """For the table: done, failed (the last attempt; a FAILED file holds its exit code), interrupted, pending."""
    s = state(run)
    if s != "done" and os.path.exists(os.path.join(out_dir, run["name"], "FAILED")):
        return "failed"
    return {"done": "done", "resume": "interrupted", "new": "pending"}[s]


def command(run: dict) -> list:
    resume = ["--init_from=resume"] if state(run) == "resume" else []
    return [sys.executable, script_path, *run["args"], *resume]

# ----------------------------------------------------------------------------------------------
# results: one row per run from its log.jsonl (and checkpoint), the power-law fit, the pictures


def fit_power_law(x, y, offset: bool = False) -> dict:
    """Least squares fit of y = a x^-alpha (+ c) -> {a, alpha, alpha_err, c}, alpha_err one standard error.
    Without c: a straight line in log-log (Kaplan et al. 2020, arXiv:2001.08361, eq. 1.1-1.2). With c (the
    irreducible loss, Hoffmann et al. 2022, arXiv:2203.15556, eq. 2): Gauss-Newton from the best c on a grid."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    x0 = np.exp(np.log(x).mean())  # fit in x / x0: a well-conditioned problem at any scale of x
    lx = np.log(x / x0)

    def line(c):  # log(y - c) = log a0 - alpha log(x/x0): slope, intercept, residual sum of squares in y
        A = np.stack([np.ones_like(lx), -lx], 1)
        (la, alpha), *_ = np.linalg.lstsq(A, np.log(y - c), rcond=None)
        return la, alpha, float(((np.exp(la - alpha * lx) + c - y) ** 2).sum())

    if not offset:
        la, alpha, _ = line(0.0)
        r = np.log(y) - (la - alpha * lx)  # standard error of a regression slope: s / sqrt(sum (lx - mean)^2)
        err = math.sqrt((r ** 2).sum() / max(len(x) - 2, 1) / ((lx - lx.mean()) ** 2).sum())
        return {"a": float(np.exp(la) * x0 ** alpha), "alpha": float(alpha), "alpha_err": err, "c": 0.0}
    if len(x) < 4:
        raise ValueError(f"fitting a, alpha and c needs at least 4 points, got {len(x)}")
    c = min((line(c)[2], c) for c in np.linspace(0, 0.999 * y.min(), 200))[1]
    p = np.array([*line(c)[:2], c])  # (log a0, alpha, c)
    for _ in range(50):  # Gauss-Newton on y = exp(la) (x/x0)^-alpha + c
        f = np.exp(p[0] - p[1] * lx)
        J = np.stack([f, -f * lx, np.ones_like(lx)], 1)  # (n, 3) d y_hat / d (la, alpha, c)
        step, *_ = np.linalg.lstsq(J, y - f - p[2], rcond=None)
        p += step
        if np.abs(step).max() < 1e-12:
            break
    f = np.exp(p[0] - p[1] * lx)
    J = np.stack([f, -f * lx, np.ones_like(lx)], 1)
    s2 = ((f + p[2] - y) ** 2).sum() / max(len(x) - 3, 1)
    cov = s2 * np.linalg.pinv(J.T @ J)
    return {"a": float(np.exp(p[0]) * x0 ** p[1]), "alpha": float(p[1]), "alpha_err": float(math.sqrt(cov[1, 1])),
            "c": float(p[2])}


def row(run: dict, status: str) -> dict:
    folder = os.path.join(out_dir, run["name"])
    recs = read_jsonl(os.path.join(folder, "log.jsonl"))
    summary = next((r for r in recs if r["type"] == "summary"), {})
    evals = [r for r in recs if r["type"] == "eval" and r.get("val_loss") is not None]
    out = {"run": run["name"], **run["keys"], "status": status}
    # parameters, tokens and FLOPs: train.py's summary record has them (finetune.py's and align.py's do not)
    out.update({k: summary.get(k) for k in ("params", "params_non_embedding")})
    out.update({"iters": summary.get("iter"), "tokens": summary.get("tokens"), "flops": summary.get("flops"),
                "wall_s": summary.get("total_s"), "final_val_loss": evals[-1]["val_loss"] if evals else None,
                "best_val_loss": summary.get("best_val_loss")})
    for r in recs:  # whatever else the run evaluated (finetune.py's accuracies, ...)
        if r["type"] == "final":
            out.update({k: v for k, v in r.items() if k not in ("type", "iter") and isinstance(v, (int, float))})
    return out


def fmt(v) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) >= 1e9:
        return f"{v:.3g}"  # FLOPs
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return "" if v is None else f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


def report(planned: list):
    """results.csv, results.md, curves.png; scaling.png for >= 3 sizes, heat.png for a 2-D grid."""
    rows = [row(r, status(r)) for r in planned]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(os.path.join(out_dir, "results.csv.tmp"), "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)
    os.replace(os.path.join(out_dir, "results.csv.tmp"), os.path.join(out_dir, "results.csv"))
    md = [f"# {out_dir}: {len(rows)} runs of {script}\n", "| " + " | ".join(cols) + " |",
          "|" + "---|" * len(cols)] + ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    curves = {}
    for r in planned:
        recs = read_jsonl(os.path.join(out_dir, r["name"], "log.jsonl"))
        ev = [e for e in recs if e["type"] == "eval" and e.get("val_loss") is not None]
        curves[r["name"]] = ([e["iter"] for e in ev], [e["val_loss"] for e in ev])
    if any(len(xs) for xs, _ in curves.values()):
        plot_curves(os.path.join(out_dir, "curves.png"), curves, title=f"{out_dir}: val loss of every run")
        md.append("\n![val loss of every run](curves.png)")
    done = [r for r in rows if r["status"] == "done" and r.get("best_val_loss") and r.get("params_non_embedding")]
    if len({r["params_non_embedding"] for r in done}) >= 3:
        md += scaling(done)
    if len(grid) == 2 and done:
        md += heat(rows)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"written: {out_dir}/results.csv, results.md" + (", curves.png" if os.path.exists(
        os.path.join(out_dir, "curves.png")) else ""))


def scaling(done: list) -> list:
    """Best val loss against non-embedding parameters and against training FLOPs, log-log, with power-law fits."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    lines = ["\n## power-law fits of the best val loss L (least squares, +- one standard error)\n"]
    for ax, key, sym, label in zip(axes, ("params_non_embedding", "flops"), "NC", ("non-embedding parameters N",
                                                                                "training FLOPs C")):
        pts = sorted((r[key], r["best_val_loss"]) for r in done if r.get(key))
        if len(pts) < 3:
            continue
        x, y = map(np.array, zip(*pts))
        ax.loglog(x, y, "o", label="runs")
        xs = np.geomspace(x.min(), x.max(), 100)
        for offset in (False, True) if len(x) >= 4 else (False,):
            fit = fit_power_law(x, y, offset)
            text = (f"L = {fit['a']:.3g} {sym}^-{fit['alpha']:.3f}" + (f" + {fit['c']:.3f}" if offset
                    else "") + f", alpha = {fit['alpha']:.3f} +- {fit['alpha_err']:.3f}")
            ax.loglog(xs, fit["a"] * xs ** -fit["alpha"] + fit["c"], "--", label=text)
            lines.append(f"- {label}: {text}")
            print(f"fit against {label}: {text}")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # a label per decade only
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_yticks(np.linspace(y.min(), y.max(), 5), [f"{v:.2f}" for v in np.linspace(y.min(), y.max(), 5)])
        ax.set_xlabel(label)
        ax.set_ylabel("best val loss")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(f"{out_dir}: {len(done)} runs")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "scaling.png"), dpi=90)
    plt.close(fig)
    return lines + ["\n![loss against size and compute](scaling.png)"]


def heat(rows: list) -> list:
    """A 2-D grid as a table of best val loss, rows the first key's values, columns the second's; and heat.png."""
    (k1, v1), (k2, v2) = grid.items()
    cell = {(r[k1], r[k2]): r.get("best_val_loss") for r in rows}
    table = np.array([[cell.get((a, b)) if cell.get((a, b)) is not None else np.nan for b in v2] for a in v1])
    lines = [f"\n## best val loss, {k1} (rows) x {k2} (columns)\n", f"| {k1} \\ {k2} | " + " | ".join(map(str, v2))
             + " |", "|---|" + "---|" * len(v2)]
    lines += [f"| {a} | " + " | ".join("" if math.isnan(x) else f"{x:.4f}" for x in t) + " |"
              for a, t in zip(v1, table)]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(1.2 * len(v2) + 2.5, 0.6 * len(v1) + 1.8))
    im = ax.imshow(table, cmap="viridis_r")
    lo, hi = np.nanmin(table), np.nanmax(table)
    for i, j in itertools.product(range(len(v1)), range(len(v2))):
        if not math.isnan(table[i, j]):  # dark text on the light (low-loss) cells
            ax.text(j, i, f"{table[i, j]:.3f}", ha="center", va="center", fontsize=8,
                    color="k" if table[i, j] - lo < 0.5 * (hi - lo) else "w")
    ax.set_xticks(range(len(v2)), [str(v) for v in v2])
    ax.set_yticks(range(len(v1)), [str(v) for v in v1])
    ax.set_xlabel(k2)
    ax.set_ylabel(k1)
    fig.colorbar(im, ax=ax, label="best val loss")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "heat.png"), dpi=90)
    plt.close(fig)
    return lines + ["\n![best val loss over the grid](heat.png)"]

# ----------------------------------------------------------------------------------------------
# main: start runs as slots free up, forward a stop to them, then write the results


if __name__ == "__main__":
    install()  # a user's error is one line 'error: ...' (lib/errors.py)
    _argv, _explicit = sys.argv[1:], set()
    with contextlib.redirect_stdout(sys.stderr):  # the overrides on stderr: --print_only's stdout is commands only
        config = configure(globals(), _argv, explicit=_explicit)
    globals().update(config)
    # configure() takes simple values only, so the dicts grid and fixed are read from the config files here, in
    # order; on the command line --grid={...} replaces the grid and --fixed={...} adds to (and wins over) fixed
    _cli = {k: config[k] for k in ("grid", "fixed") if k in _explicit}
    for _path in [a for a in _argv if not a.startswith("--")]:
        _ns = {}
        exec(compile(open(_path).read(), _path, "exec"), _ns)
        grid = _ns["grid"] if isinstance(_ns.get("grid"), dict) else grid
        fixed = _ns["fixed"] if isinstance(_ns.get("fixed"), dict) else fixed
    grid = _cli.get("grid", grid) or {}
    fixed = {**(fixed or {}), **_cli.get("fixed", {})} if isinstance(_cli.get("fixed", {}), dict) else _cli["fixed"]

    for what, value in (("grid", grid), ("fixed", fixed)):
        if not isinstance(value, dict):
            raise TypeError(f"{what} must be a dict {{key: ...}}, got {value!r}; e.g. grid = {{'n_layer': [2, 4]}}")
    for key, values in grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"grid[{key!r}] must be a non-empty list of values, got {values!r}; e.g. [2, 4]")
    if not all(isinstance(r, dict) and isinstance(r.get("name"), str) and r["name"] for r in runs):
        raise ValueError(f"runs must be a list of dicts, each with a 'name', got {runs!r}; e.g. "
                         f"runs = [{{'name': 'muon', 'optimizer': 'muon'}}]")
    script_path = script if os.path.exists(script) else os.path.join(HERE, script)
    if not os.path.isfile(script_path):
        raise FileNotFoundError(f"script={script!r} does not exist (here or next to sweep.py); e.g. "
                                f"script = 'train.py'")
    for path in base:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"base config file {path!r} does not exist; base lists config files of every run")


    planned = plan()
    todo = [r for r in planned if state(r) != "done"]
    if print_only:
        for r in todo:
            print(shlex.join(command(r)))
        sys.exit(0)
    os.makedirs(out_dir, exist_ok=True)
    statuses = {}
    if not report_only:
        gpus = 0
        if shutil.which("nvidia-smi") and os.environ.get("CUDA_VISIBLE_DEVICES") != "":
            import torch  # only to count the GPUs (importing it takes seconds: not on a machine without)
            gpus = torch.cuda.device_count()
        parallel = parallel or max(gpus, 1)
        threads = max(1, (os.cpu_count() or 1) // parallel)
        print(f"sweep: {len(planned)} runs of {script} into {out_dir}/, {len(planned) - len(todo)} already done; "
              f"{parallel} at a time, {threads} thread(s) each" + (f", one GPU each of {gpus}" if gpus else ""))
        stop = []

        def on_signal(signum, frame):
            stop.append(signum)
            print(f"\n{signal.Signals(signum).name}: asking the {len(active)} running run(s) to save and stop",
                  flush=True)
            for p, *_ in active.values():
                p.send_signal(signal.SIGTERM)  # each saves a checkpoint; a repeated SIGTERM is ignored there

        active = {}  # slot -> (process, run, start time, log file)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        queue = list(todo)
        while queue and not stop or active:
            for slot in range(parallel):
                if slot not in active and queue and not stop:
                    run = queue.pop(0)
                    cmd, how = command(run), state(run)
                    folder = os.path.join(out_dir, run["name"])
                    os.makedirs(folder, exist_ok=True)
                    if os.path.exists(os.path.join(folder, "FAILED")):
                        os.remove(os.path.join(folder, "FAILED"))  # tried again
                    log = open(os.path.join(folder, "run.log"), "a")
                    log.write(f"$ {shlex.join(cmd)}\n")
                    log.flush()
                    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
                    env.update({"CUDA_VISIBLE_DEVICES": str(slot % gpus)} if gpus else {})
                    # a session of its own: the terminal's Ctrl-C reaches the sweep only, which forwards one SIGTERM
                    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                    active[slot] = (p, run, time.time(), log)
                    n = planned.index(run) + 1
                    print(f"[{n}/{len(planned)}] {'continue' if how == 'resume' else 'start'} {run['name']} "
                          f"(log: {folder}/run.log)", flush=True)
            time.sleep(0.2)
            for slot, (p, run, t0, log) in list(active.items()):
                if p.poll() is None:
                    continue
                log.close()
                del active[slot]
                done = state(run) == "done"
                statuses[run["name"]] = "done" if done else "interrupted" if stop else "failed"
                if statuses[run["name"]] == "failed":
                    with open(os.path.join(out_dir, run["name"], "FAILED"), "w") as f:
                        f.write(f"exit {p.returncode}\n")
                tail = open(os.path.join(out_dir, run["name"], "run.log")).read().strip().splitlines()[-1:] or [""]
                best = next((r["best_val_loss"] for r in read_jsonl(os.path.join(out_dir, run["name"], "log.jsonl"))
                             if r["type"] == "summary"), None)
                what = f"best val {best:.4f}" if done and best else f"exit {p.returncode}: {tail[0][:200]}"
                print(f"[{planned.index(run) + 1}/{len(planned)}] {statuses[run['name']]} {run['name']} in "
                      f"{time.time() - t0:.0f} s, {what}", flush=True)
        failed = [n for n, s in statuses.items() if s == "failed"]
        if failed:
            print(f"WARNING: {len(failed)} run(s) failed: {', '.join(failed)}; see their run.log; running the sweep "
                  f"again tries them again")
    report(planned)
    if not report_only and stop:
        print("interrupted: every run saved a checkpoint; the same command continues the sweep")
        sys.exit(128 + stop[0])
