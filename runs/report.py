"""
The journey's report card: out_dir/report.md with the pictures it shows, and out_dir/report.json with the same
figures under one key per stage (pretrain, sft, sft_lora, dpo, attention, quantize, eval), full fine-tuning and LoRA
side by side, and the recipe's targets with whether they were met. Every figure is read from what
the stages wrote (log.jsonl, eval.jsonl, attention_summary.json, quant_report.json, and journey.jsonl, where the
journey notes each command and its wall time), never from console text.

    python runs/report.py                                      # out-journey (bash runs/journey.sh)
    python runs/report.py --out_dir=out-gpt2-journey --recipe=gpt2  # bash runs/gpt2.sh: GPT-2 on public data

The journeys also ask it whether a stage is finished (--check=STAGE prints done, partial or none) and have it
note each command (--record=STAGE --action=run --seconds=S --rc=N -- COMMAND...). The folders of a journey:
    pretrain  sft  sft_lora  dpo  attention  quantize  (each model's folder gets its eval.jsonl)  data/
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from configurator import configure

# -----------------------------------------------------------------------------
out_dir = "out-journey"  # the journey's folder
recipe = "journey"  # 'journey' (runs/journey.sh, Shakespeare offline) or 'gpt2' (runs/gpt2.sh, public data)
check = ""  # print done / partial / none for a stage: one of STAGES below
model = ""  # --check=eval: whose check ('pretrain', 'sft', 'sft_lora', 'dpo', 'int8', 'int4')
task = ""  # --check=eval: which check (a key of CHECKS below)
record = ""  # note a command of this stage in journey.jsonl (the command follows '--')
action = "run"  # --record: 'run', 'resume' or 'skip'
seconds = 0.0  # --record: its wall time
rc = 0  # --record: its exit status
argv, command = (sys.argv[1:sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1:]) if "--" in sys.argv \
    else (sys.argv[1:], [])
quiet = any(a.startswith(("--check=", "--record=")) for a in argv)  # bookkeeping calls print no overrides
config = configure(globals(), argv, verbose=not quiet); globals().update(config)
# -----------------------------------------------------------------------------
STAGES = ("pretrain", "sft", "sft_lora", "dpo", "attention", "quantize", "eval")
MODELS = {"pretrain": ("pretrain", "ckpt.pt"), "sft": ("sft", "ckpt.pt"), "sft_lora": ("sft_lora", "ckpt.pt"),
          "dpo": ("dpo", "ckpt.pt"), "int8": ("quantize", "ckpt_int8.pt"),
          "int4": ("quantize", "ckpt_int4.pt")}  # name -> (folder, file); gpt2.sh runs all but sft_lora
# the shipped journey's targets (issue 25): the fine-tuned model learns the task and keeps the language model, DPO
# keeps both within a few points and raises the strict held-out reward accuracy
TARGETS = {"task_acc_min": 0.60, "ppl_ratio_max": 1.5, "dpo_task_acc_drop_max": 0.05, "dpo_ppl_ratio_max": 1.5,
           "dpo_reward_acc_min": 0.75}
# The held-out checks every model gets: name -> eval.py's task, the file it reads (None: any, e.g. the official
# one), --hellaswag_prompt, and [(metric of its eval.jsonl record, what it is, published reference for GPT-2 124M)].
RECIPES = {
    "journey": {
        "perplexity": ("perplexity", "heldout.txt", None, [("ppl", "perplexity of the held-out plays", None),
                                                           ("bits_per_byte", "bits per byte", None)]),
        "task": ("lambada", "task_val.jsonl", None,
                 [("acc", "task accuracy: the greedy answer names the true speaker", None)]),
        "choice": ("hellaswag", "choice_val.jsonl", None,
                   [("acc", "choice accuracy: the true speaker more likely than the rejected one", None)])},
    "gpt2": {
        "hellaswag": ("hellaswag", None, "ctx", [("acc_norm", "HellaSwag acc_norm, completion style",
                                                   "29.55% (build-nanogpt)")]),
        "hellaswag_harness": ("hellaswag", None, "harness", [("acc_norm_chars", "HellaSwag acc_norm, harness prompt",
                                                              "31.14% (lm-evaluation-harness)")]),
        "lambada": ("lambada", None, None, [("acc", "LAMBADA accuracy", "32.56% (lm-evaluation-harness), 45.99% "
                                                                       "(GPT-2 paper)"),
                                            ("ppl", "LAMBADA perplexity", "40.06 (lm-evaluation-harness), 35.13 "
                                                                          "(GPT-2 paper)")]),
        "perplexity": ("perplexity", "heldout.txt", None, [("ppl", "perplexity of the held-out plays", None)])}}
# where the interpretability literature finds GPT-2 small's induction heads (Olsson et al. 2022; Wang et al. 2022,
# arXiv:2211.00593, the IOI circuit: 5.5, 6.9 and 5.1, 7.2, 7.10 in its list) and a previous-token head (4.11)
LITERATURE_HEADS = {"induction": ["L5H1", "L5H5", "L6H9", "L7H2", "L7H10"], "previous-token": ["L4H11"]}
if recipe not in RECIPES:
    raise ValueError(f"recipe must be one of {list(RECIPES)}, got {recipe!r}")
CHECKS = RECIPES[recipe]
# whose attention is looked at -> its folder: OpenAI's weights (the literature's heads are theirs), or the journey's
# pre-trained and final model side by side (what fine-tuning and alignment changed in the heads)
ATTENTION_OF = {"pretrain": "attention"} if recipe == "gpt2" else {"pretrain": os.path.join("attention", "pretrain"),
                                                                   "dpo": os.path.join("attention", "dpo")}


def path(*parts) -> str:
    return os.path.join(out_dir, *parts)


def read_jsonl(p: str) -> list:
    """Records of a JSON-lines log; a torn last line (a killed writer) is left out."""
    out = []
    if os.path.exists(p):
        for line in open(p, encoding="utf-8"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def read_json(p: str):
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def stamp(p: str) -> str:
    """A file's modification time in eval.py's record format (local time, seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(os.path.getmtime(p)))


def newer(p: str, than: str) -> bool:
    return os.path.exists(p) and os.path.exists(than) and stamp(p) >= stamp(than)

# -----------------------------------------------------------------------------
# is a stage finished? done: its outputs are complete and newer than its input; partial: a checkpoint of an
# unfinished run, to resume; none: nothing yet


def trained_state(stage: str) -> str:
    ckpt_path = path(stage, "ckpt.pt")
    if not os.path.exists(ckpt_path):
        return "none"
    from lib.checkpoint import load_checkpoint
    ckpt = load_checkpoint(ckpt_path)
    if ckpt["kind"] == "imported":  # OpenAI's weights, converted (runs/gpt2.sh): nothing to train
        return "done"
    target = ckpt["config"].get("max_iters", 0)
    it = (ckpt.get("resume") or {}).get("iter_num", -1)
    logged = [r for r in read_jsonl(path(stage, "log.jsonl")) if r.get("iter", -1) >= target and
              any(k in r for k in ("val_loss", "reward_acc", "best_val_loss"))]  # its last evaluation
    return "done" if target > 0 and it >= target and logged else "partial"


def eval_record(name: str, check_name: str):
    """The newest eval.jsonl record of model `name` for a check, if it is newer than the model's checkpoint."""
    folder, ckpt_name = MODELS[name]
    ckpt_path = path(folder, ckpt_name)
    if not os.path.exists(ckpt_path):
        return None
    kind, data, prompt, _ = CHECKS[check_name]
    for r in reversed(read_jsonl(path(folder, "eval.jsonl"))):
        used = r.get("text") or [] if kind == "perplexity" else [r.get("data") or ""]
        if r.get("task") == kind and r.get("ckpt_name") in (ckpt_name, None) and r.get("time", "") >= stamp(ckpt_path) \
                and (data is None or [os.path.basename(u) for u in used] == [data]) \
                and (prompt is None or r.get("hellaswag_prompt") == prompt):
            return r
    return None


def state(stage: str) -> str:
    if stage in ("pretrain", "sft", "sft_lora", "dpo"):
        return trained_state(stage)
    if stage == "attention":
        return "done" if all(newer(path(folder, "attention_summary.json"), path(m, "ckpt.pt"))
                             for m, folder in ATTENTION_OF.items()) else "none"
    if stage == "quantize":
        p = path("quantize", "quant_report.json")
        if not newer(p, path("dpo", "ckpt.pt")):
            return "none"
        modes = [row["mode"].split()[0] for row in read_json(p)["rows"]]
        return "done" if modes[:1] == ["fp32"] and {"int8", "int4"} <= set(modes) else "none"
    if stage == "eval":
        if model not in MODELS or task not in CHECKS:
            raise ValueError(f"--check=eval needs --model= one of {list(MODELS)} and --task= one of {list(CHECKS)} "
                             f"(recipe {recipe!r}), got {model!r} and {task!r}")
        return "done" if eval_record(model, task) is not None else "none"
    raise ValueError(f"--check must be one of {STAGES}, got {stage!r}")


if check:
    print(state(check))
    sys.exit(0)
if record:
    if record not in ("data",) + STAGES or action not in ("run", "resume", "skip"):
        raise ValueError(f"--record must be one of {('data',) + STAGES} and --action one of run, resume, skip; got "
                         f"{record!r}, {action!r}")
    os.makedirs(out_dir, exist_ok=True)
    with open(path("journey.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps({"stage": record, "action": action, "command": command, "seconds": round(seconds, 2),
                            "rc": rc, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    sys.exit(0)

# -----------------------------------------------------------------------------
# the figures of each stage


def legs(stage: str) -> dict:
    """What ran for a stage (every distinct command, in order: a resumed leg shows its own), its wall time over
    every leg, and how many legs resumed an interrupted run or were skipped by a later journey run."""
    recs = [r for r in read_jsonl(path("journey.jsonl")) if r["stage"] == stage]
    ran = [r for r in recs if r["action"] != "skip"]
    commands = []
    for r in ran:
        if " ".join(r["command"]) not in commands:
            commands.append(" ".join(r["command"]))
    return {"commands": commands, "seconds": round(sum(r["seconds"] for r in ran), 1),
            "resumed": sum(r["action"] == "resume" for r in ran), "skipped": sum(r["action"] == "skip" for r in recs)}


def first_last(recs: list, key: str):
    values = [r[key] for r in recs if r.get(key) is not None]
    return (values[0], values[-1]) if values else (None, None)


def evals() -> dict:
    """Every model's figures on the held-out checks: {model: {check: {metric: value}}}."""
    out = {}
    for name in MODELS:
        rs = {c: eval_record(name, c) for c in CHECKS}
        if any(rs.values()):
            out[name] = {c: {m: r and r.get(m) for m, _, _ in CHECKS[c][3]} | {"items": r and (r.get("items") or
                                                                                             r.get("tokens"))}
                         for c, r in rs.items()}
    return out


def pretrain_figures() -> dict:
    log = read_jsonl(path("pretrain", "log.jsonl"))
    ev = [r for r in log if r.get("type") == "eval" and r.get("val_loss") is not None]
    train = [r for r in log if r.get("type") == "train" and r.get("tok_per_s")]
    out = {"parameters": None, "iterations": ev[-1]["iter"] if ev else None}
    out["val_loss_start"], out["val_loss"] = first_last(ev, "val_loss")
    out["train_loss"] = ev[-1]["train_loss"] if ev else None
    out["tok_per_s"] = statistics.median(r["tok_per_s"] for r in train) if train else None
    if os.path.exists(path("pretrain", "ckpt.pt")):
        from lib.checkpoint import load_checkpoint
        ckpt = load_checkpoint(path("pretrain", "ckpt.pt"))
        out["parameters"] = sum(v.numel() for k, v in ckpt["model"].items() if k != "lm_head.weight")  # tied
        out["kind"], out["model_args"] = ckpt["kind"], ckpt["model_args"]
    return out


def method(stage: str) -> dict:
    """How a fine-tuning stage trained: every weight, or LoRA adapters (rank, targets, trainable parameters)."""
    if not os.path.exists(path(stage, "ckpt.pt")):
        return {}
    from lib.checkpoint import load_checkpoint
    ckpt = load_checkpoint(path(stage, "ckpt.pt"))
    lora = ckpt.get("lora")
    if not lora:
        n = sum(v.numel() for k, v in ckpt["model"].items() if k != "lm_head.weight")  # tied to wte
        return {"method": "full", "trainable_parameters": n}
    return {"method": f"LoRA r={lora['rank']} alpha={lora['alpha']:g} on {lora['targets']}"
                      + (" + LayerNorms" if lora.get("norms") else ""),
            "trainable_parameters": sum(v.numel() for v in lora["adapters"].values())}


def sft_figures(stage: str = "sft") -> dict:
    ev = [r for r in read_jsonl(path(stage, "log.jsonl")) if "val_loss" in r]
    out = {"iterations": ev[-1]["iter"] if ev else None, **method(stage)}
    out["val_loss_start"], out["val_loss"] = first_last(ev, "val_loss")
    out["val_token_acc_start"], out["val_token_acc"] = first_last(ev, "val_acc")
    return out


def dpo_figures() -> dict:
    """The held-out figures at the first and the last evaluation; the same quantities as the training log lines
    (align.py's LOGGED: loss, dpo_loss, nll, strict reward_acc, reward_margin), plus how far the policy moved."""
    ev = [r for r in read_jsonl(path("dpo", "log.jsonl")) if r.get("type") == "eval"]
    out = {"iterations": ev[-1]["iter"] if ev else None, **method("dpo")}
    for key in ("reward_acc", "reward_margin", "loss", "dpo_loss", "nll", "logp_margin", "logp_drift"):
        out[f"{key}_start"], out[key] = first_last(ev, f"val_{key}")
    return out


def attention_figures() -> dict:
    """Each looked-at model's heads: {model: figures} (the journey: pretrain and dpo; gpt2.sh: OpenAI's weights)."""
    out = {}
    for name, folder in ATTENTION_OF.items():
        if os.path.exists(path(folder, "attention_summary.json")):
            out[name] = heads_of(folder)
    return {"models": out} if out else {}


def heads_of(folder: str) -> dict:
    s = read_json(path(folder, "attention_summary.json"))
    top = {}
    for key in ("prev_token", "induction", "sink"):
        cells = sorted(((v, l, h) for l, row in enumerate(s[key]) for h, v in enumerate(row)), reverse=True)[:3]
        top[key] = [{"head": f"L{l}H{h}", "score": v} for v, l, h in cells]
    out = {"model": s["model"], "prompt_tokens": s["prompt_tokens"], "flag_threshold": s["flag_threshold"],
           "flagged": s["flagged"], "top": top,
           "pictures": [os.path.join(folder, f) for f in sorted(os.listdir(path(folder))) if f.endswith(".png")]}
    if recipe == "gpt2":  # which of the literature's heads the detector flags, with their scores
        scores = {"induction": s["induction"], "previous-token": s["prev_token"]}
        out["literature_heads"] = {
            kind: [{"head": h, "score": score_of(scores[kind], h), "flagged": h in s["flagged"][kind]} for h in heads]
            for kind, heads in LITERATURE_HEADS.items()}
    return out


def score_of(grid: list, head: str):
    layer, h = (int(x) for x in head[1:].split("H"))
    return grid[layer][h] if layer < len(grid) and h < len(grid[layer]) else None  # None: not in this model


def quantize_figures() -> dict:
    p = path("quantize", "quant_report.json")
    if not os.path.exists(p):
        return {}
    q = read_json(p)
    # perplexities (eval.py's code) of the held-out plays and of the held-out questions with their answers, each
    # against fp32 (weights and activations) and against bf16 (the activations of the CPU's int8/int4 kernels: the
    # difference is the weights' alone)
    keys = [f"{p}{k}" for p in ("", "task_") for k in ("ppl", "change_pct", "change_vs_bf16_pct")]
    rows = [{"mode": r["mode"], "kernel": r["kernel"], "disk_mb": r["disk_bytes"] / 1e6,
             "linear_x_smaller": r["linear_ratio"], **{k: r.get(k) for k in keys},
             "decode_tok_s": r["decode_tok_s"], "decode_speedup": r["decode_speedup"]} for r in q["rows"]]
    return {"metric": q["metric"], "device": q["device"], "threads": q["threads"], "eval": q.get("eval"), "rows": rows}


def environment() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                                  cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None
    import torch  # the stages ran with torch's default number of threads, unless told otherwise
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   cpu)
    devices = sorted({r.get("device") for f, _ in MODELS.values() for r in read_jsonl(path(f, "eval.jsonl"))} - {None})
    commit, dirty = git("rev-parse", "--short=12", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    return {"torch": metadata.version("torch"), "python": platform.python_version(), "device": devices,
            "threads": torch.get_num_threads(), "cpu": f"{cpu} ({os.cpu_count()} logical cores)",
            "commit": commit and commit + (" with uncommitted changes" if dirty else ""),
            "date": time.strftime("%Y-%m-%d %H:%M")}

# -----------------------------------------------------------------------------
# pictures: the training stages' curves from their logs, and the checks of every model


def figure(name: str, panels: list, title: str) -> str:
    """panels: [(ylabel, {label: (xs, ys)})] side by side -> out_dir/report_<name>.png ('' when nothing to draw)."""
    panels = [(y, {k: v for k, v in c.items() if v[0]}) for y, c in panels]
    panels = [(y, c) for y, c in panels if c]
    if not panels:
        return ""
    import matplotlib
    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (ylabel, curves) in zip(axes[0], panels):
        for label, (xs, ys) in curves.items():
            if isinstance(xs[0], str):  # a bar per model
                ax.bar(xs, ys, label=label)
                ax.set_ylim(0, 1)
            else:
                ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None, markersize=3)
                ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    out = f"report_{name}.png"
    fig.savefig(path(out + ".tmp.png"), dpi=90)
    plt.close(fig)
    os.replace(path(out + ".tmp.png"), path(out))
    return out


def series(recs: list, key: str) -> tuple:
    pts = [(r["iter"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def pictures(ev: dict) -> dict:
    pt, sft, lora, dpo = (read_jsonl(path(s, "log.jsonl")) for s in ("pretrain", "sft", "sft_lora", "dpo"))
    train, val = [r for r in dpo if r.get("type") == "train"], [r for r in dpo if r.get("type") == "eval"]
    kinds = lambda recs, t: [r for r in recs if r.get("type") == t]
    out = {"pretrain": figure("pretrain", [("loss", {
               "train (log lines)": series([r for r in pt if r.get("type") == "train"], "loss"),
               "train": series(pt, "train_loss"), "val (held-out text)": series(pt, "val_loss")})], "pre-training"),
           "sft": figure("sft", [("loss on the responses", {
               "full, train": series(kinds(sft, "train"), "loss"), "full, val": series(sft, "val_loss"),
               "LoRA, train": series(kinds(lora, "train"), "loss"), "LoRA, val": series(lora, "val_loss")}),
               ("held-out token accuracy", {"full": series(sft, "val_acc"), "LoRA": series(lora, "val_acc")})],
               "supervised fine-tuning: every weight and LoRA"),
           # train and held-out of the same quantity side by side, each quantity on its own panel
           "dpo": figure("dpo", [(f"{what} ({key})", {"train": series(train, key), "val": series(val, "val_" + key)})
                                 for key, what in (("dpo_loss", "preference loss"), ("nll", "chosen NLL per token"),
                                                   ("reward_acc", "reward accuracy, strict"))], "DPO")}
    shares = [(c, m, label) for c, spec in CHECKS.items() for m, label, _ in spec[3] if "acc" in m]
    names = [n for n in ev if all(ev[n][c][m] is not None for c, m, _ in shares)]
    if names and shares:
        out["eval"] = figure("eval", [(label.split(":")[0], {label.split(":")[0]: (names, [ev[n][c][m] for n in names])})
                                      for c, m, label in shares], "every model on the held-out checks")
    return out

# -----------------------------------------------------------------------------
# report.json, then report.md


def fmt(v, spec=".4f"):
    return "-" if v is None else format(v, spec)


def arrow(a, b, spec=".4f"):
    return f"{fmt(a, spec)} → {fmt(b, spec)}"


ev = evals()
first_acc = next(((c, m) for c, spec in CHECKS.items() for m, _, _ in spec[3] if "acc" in m), None)
along = lambda c, m: {n: ev[n][c][m] for n in ("pretrain", "sft", "sft_lora", "dpo") if n in ev}  # base -> SFT -> DPO
rep = {"recipe": recipe, "environment": environment(), "data": legs("data"),
       "pretrain": {**legs("pretrain"), **pretrain_figures(), "checks": ev.get("pretrain")},
       "sft": {**legs("sft"), **sft_figures("sft"), "checks": ev.get("sft")},
       "sft_lora": {**legs("sft_lora"), **sft_figures("sft_lora"), "checks": ev.get("sft_lora")},
       "dpo": {**legs("dpo"), **dpo_figures(), "checks": ev.get("dpo")},
       "attention": {**legs("attention"), **attention_figures()},
       "quantize": {**legs("quantize"), **quantize_figures(), "checks": {n: ev[n] for n in ("int8", "int4") if n in ev}},
       "eval": {**legs("eval"), "models": ev,
                "checks": {c: [{"metric": m, "what": w, "reference": ref} for m, w, ref in spec[3]]
                           for c, spec in CHECKS.items()}}}
for stage in ("sft", "sft_lora", "dpo"):  # each check along the chain, e.g. rep['sft']['task_acc'] = {'pretrain': ..}
    rep[stage].update({f"{c}_{m}": along(c, m) for c, spec in CHECKS.items() for m, _, _ in spec[3]})


def side_by_side() -> dict:
    """Full fine-tuning and LoRA on the same data and steps: {'sft': {...}, 'sft_lora': {...}}, each with its held-out
    task accuracy, perplexity of the held-out plays and its ratio to the pre-trained model's, wall time, trainable
    parameters (the journey's checks; {} for a recipe without them)."""
    if recipe != "journey" or "pretrain" not in ev:
        return {}
    base = ev["pretrain"]["perplexity"]["ppl"]
    return {n: {"method": rep[n].get("method"), "trainable_parameters": rep[n].get("trainable_parameters"),
                "seconds": rep[n]["seconds"], "task_acc": ev[n]["task"]["acc"], "choice_acc": ev[n]["choice"]["acc"],
                "ppl": ev[n]["perplexity"]["ppl"],
                "ppl_ratio": ev[n]["perplexity"]["ppl"] / base if base and ev[n]["perplexity"]["ppl"] else None}
            for n in ("sft", "sft_lora", "dpo") if n in ev}


def dpo_start() -> str:
    """The fine-tuning stage DPO started from ('sft' or 'sft_lora'), as its checkpoint's init_from names it."""
    if not os.path.exists(path("dpo", "ckpt.pt")):
        return "sft"
    from lib.checkpoint import load_checkpoint
    start = os.path.basename(os.path.normpath(str(load_checkpoint(path("dpo", "ckpt.pt"))["config"].get("init_from"))))
    return start if start in ("sft", "sft_lora") else "sft"


def targets(sbs: dict, start: str) -> dict:
    """The shipped recipe's targets (TARGETS), each with its value and whether it is met: the fine-tuned model that
    DPO starts from (start: 'sft' or 'sft_lora'), then DPO's."""
    if not {start, "dpo"} <= set(sbs):
        return {}
    s, d = sbs[start], sbs["dpo"]
    out = {"sft task accuracy >= 60%": (s["task_acc"], s["task_acc"] is not None and
                                        s["task_acc"] >= TARGETS["task_acc_min"]),
           "sft perplexity <= 1.5x pre-trained": (s["ppl_ratio"], s["ppl_ratio"] is not None and
                                                  s["ppl_ratio"] <= TARGETS["ppl_ratio_max"]),
           "dpo task accuracy within 5 points of sft": (d["task_acc"], d["task_acc"] is not None and s["task_acc"]
                                                         is not None and d["task_acc"] >= s["task_acc"] -
                                                         TARGETS["dpo_task_acc_drop_max"]),
           "dpo perplexity <= 1.5x pre-trained": (d["ppl_ratio"], d["ppl_ratio"] is not None and
                                                  d["ppl_ratio"] <= TARGETS["dpo_ppl_ratio_max"]),
           "dpo held-out reward accuracy (strict) >= 0.75": (rep["dpo"].get("reward_acc"), (rep["dpo"].get("reward_acc")
                                                             or 0) >= TARGETS["dpo_reward_acc_min"])}
    return {k: {"value": v, "met": bool(ok)} for k, (v, ok) in out.items()}


rep["side_by_side"] = side_by_side()
rep["dpo"]["started_from"] = dpo_start()
rep["targets"] = targets(rep["side_by_side"], rep["dpo"]["started_from"])
rep["total_seconds"] = round(sum(rep[s]["seconds"] for s in ("data",) + STAGES), 1)
for stage, picture in pictures(ev).items():
    if picture:
        rep[stage]["picture"] = picture
with open(path("report.json.tmp"), "w", encoding="utf-8") as f:
    json.dump(rep, f, indent=1)
os.replace(path("report.json.tmp"), path("report.json"))

env, p, s, sl, d, a, q = (rep[k] for k in ("environment", "pretrain", "sft", "sft_lora", "dpo", "attention",
                                          "quantize"))
chain = lambda c, m: " → ".join(f"{n} {fmt(v, '.1%' if 'acc' in m else '.2f')}" for n, v in along(c, m).items())
headline = chain(*first_acc) if first_acc else "-"
heads = a.get("models", {})
flags = lambda n: heads.get(n, {}).get("flagged", {})
title = {"journey": "The journey: pre-train → fine-tune (full and LoRA) → align → look inside → quantize → evaluate",
         "gpt2": "The journey on public data: GPT-2 124M → Alpaca SFT → hh-rlhf DPO → attention → int8/int4 → "
                 "HellaSwag, LAMBADA, perplexity"}[recipe]
sbs = rep["side_by_side"]
delta = lambda r, key: (f"{fmt(r.get(key + 'change_pct'), '+.2f')}% vs fp32, "
                        f"{fmt(r.get(key + 'change_vs_bf16_pct'), '+.2f')}% vs bf16")
lines = [f"# {title}", "",
         f"torch {env['torch']}, Python {env['python']}, device {', '.join(env['device']) or '-'}, {env['threads']} "
         f"threads, {env['cpu']}, commit {env['commit']}, {env['date']}. Wall time in all: {rep['total_seconds']:.0f} s.",
         "", "| stage | wall time | figures |", "|---|---|---|",
         f"| pretrain | {p['seconds']:.0f} s | " + (f"val loss {arrow(p.get('val_loss_start'), p.get('val_loss'))} in "
                                                  f"{p.get('iterations')} iterations" if p.get("iterations") else
                                                  f"{p.get('kind')}, {fmt(p.get('parameters'), ',')} parameters") + " |",
         f"| sft | {s['seconds']:.0f} s | held-out {first_acc and CHECKS[first_acc[0]][3][0][1].split(':')[0]}: "
         f"{headline} |"] + ([
         f"| sft_lora | {sl['seconds']:.0f} s | {sl.get('method')}, {fmt(sl.get('trainable_parameters'), ',')} "
         f"trainable parameters |"] if sl.get("iterations") else []) + [
         f"| dpo | {d['seconds']:.0f} s | held-out reward accuracy (strict) "
         f"{arrow(d.get('reward_acc_start'), d.get('reward_acc'), '.3f')}, margin "
         f"{arrow(d.get('reward_margin_start'), d.get('reward_margin'))} |",
         f"| attention | {a['seconds']:.0f} s | " + "; ".join(
             f"{n}: previous-token heads {', '.join(flags(n).get('previous-token', [])) or 'none'}, induction heads "
             f"{', '.join(flags(n).get('induction', [])) or 'none'}" for n in heads) + " |",
         f"| quantize | {q['seconds']:.0f} s | " + "; ".join(
             f"{r['mode']}: {r['linear_x_smaller']:.1f}x smaller, ppl {delta(r, '')}, {r['decode_speedup']:.2f}x tok/s"
             for r in q.get("rows", [])[1:]) + " |",
         f"| eval | {rep['eval']['seconds']:.0f} s | {len(ev)} models x {len(CHECKS)} held-out checks |",
         f"| data | {rep['data']['seconds']:.0f} s | |", ""]
if rep["targets"]:
    how = {"sft": "full fine-tuning", "sft_lora": "LoRA fine-tuning"}[d["started_from"]]
    lines += [f"| target (the shipped recipe: {how}, then DPO) | value | met |", "|---|---|---|"] + [
        f"| {k} | {fmt(t['value'], '.3f')} | {'yes' if t['met'] else '**no**'} |" for k, t in rep["targets"].items()] + [""]


def section(title: str, stage: dict, body: list):
    lines.extend([f"## {title}", "", "```"] + stage["commands"] + ["```", ""])
    note = f", resumed {stage['resumed']} time(s) after an interruption" if stage.get("resumed") else ""
    note += "; skipped by a later run, its outputs complete" if stage.get("skipped") else ""
    lines.extend([f"{stage['seconds']:.1f} s{note}.", ""] + body + [""])
    if stage.get("picture"):
        lines.extend([f"![{title}]({stage['picture']})", ""])


section("1. Pre-training", p, [
    f"{fmt(p.get('parameters'), ',')} parameters ({p.get('kind')}). " + (
        f"Val loss (held-out plays) {arrow(p.get('val_loss_start'), p.get('val_loss'))}, train loss "
        f"{fmt(p.get('train_loss'))}, {fmt(p.get('tok_per_s'), ',.0f')} tokens/s." if p.get("iterations") else "")])
section("2. Supervised fine-tuning", {**s, "commands": s["commands"] + sl["commands"],
                                      "seconds": s["seconds"] + sl["seconds"]}, [
    f"Every weight: loss on the held-out responses {arrow(s.get('val_loss_start'), s.get('val_loss'))}, token "
    f"accuracy {arrow(s.get('val_token_acc_start'), s.get('val_token_acc'), '.3f')}." + (
        f" LoRA: {arrow(sl.get('val_loss_start'), sl.get('val_loss'))}, token accuracy "
        f"{arrow(sl.get('val_token_acc_start'), sl.get('val_token_acc'), '.3f')}." if sl.get("iterations") else "")] + ([
    "", "| fine-tuning | trainable parameters | wall time | task accuracy | choice accuracy | perplexity of the "
    "held-out plays | × pre-trained |", "|---|---|---|---|---|---|---|"] + [
    f"| {n} ({r['method']}) | {fmt(r['trainable_parameters'], ',')} | {r['seconds']:.0f} s | {fmt(r['task_acc'], '.1%')} | "
    f"{fmt(r['choice_acc'], '.1%')} | {fmt(r['ppl'], '.2f')} | {fmt(r['ppl_ratio'], '.2f')} |" for n, r in sbs.items()]
    + [""] if sbs else []) + [f"- {w}: {chain(c, m)}" for c, spec in CHECKS.items() for m, w, _ in spec[3]])
section("3. DPO", d, [
    f"Held-out, as logged in training too: reward accuracy (strict, as TRL's rewards/accuracies: a tie is no win) "
    f"{arrow(d.get('reward_acc_start'), d.get('reward_acc'), '.3f')}, reward margin "
    f"{arrow(d.get('reward_margin_start'), d.get('reward_margin'))}, preference loss "
    f"{arrow(d.get('dpo_loss_start'), d.get('dpo_loss'))}, chosen NLL per token {arrow(d.get('nll_start'), d.get('nll'))}, "
    f"loss (preference + rpo_alpha x NLL) {arrow(d.get('loss_start'), d.get('loss'))}, log-prob drift "
    f"{fmt(d.get('logp_drift'), '+.4f')} per token" + (f"; {d['method']}." if d.get("method") else ".")])
body = []
for n, h in heads.items():
    top = h.get("top", {})
    body += [f"**{n}** ({h.get('model')}), prompt of {h.get('prompt_tokens')} tokens. Flagged at score ≥ "
             f"{h.get('flag_threshold')}: previous-token {h['flagged'].get('previous-token')}, induction "
             f"{h['flagged'].get('induction')}. Highest: " + "; ".join(
                 f"{k} " + ", ".join(f"{t['head']} {t['score']:.2f}" for t in v) for k, v in top.items()) + "."] + (
        ["", "| literature's head | kind | score | flagged |", "|---|---|---|---|"] + [
            f"| {x['head']} | {kind} | {fmt(x['score'], '.2f')} | {'yes' if x['flagged'] else 'no'} |"
            for kind, xs in h["literature_heads"].items() for x in xs] if h.get("literature_heads") else []) + [""] + \
        [f"![{os.path.basename(x)}]({x})" for x in h.get("pictures", [])] + [""]
if heads and not any(h["flagged"].get("previous-token") or h["flagged"].get("induction") for h in heads.values()):
    body += ["No head of any model reaches the threshold: the previous-token score is measured on the held-out "
             "question, the induction score on random token sequences repeated once (drawn from the ids of the "
             "training data where attention_viz.py finds it: --induction_data); the highest scores are listed above "
             "for each model. A model this small and this briefly trained has not formed such heads yet.", ""]
section("4. Attention", a, body)
section("5. Quantization", q, [
    "| mode | kernel | disk MB | Linear weights | ppl, held-out plays | ppl, held-out questions | decode tok/s |",
    "|---|---|---|---|---|---|---|"] + [
    f"| {r['mode']} | {r['kernel']} | {r['disk_mb']:.2f} | {r['linear_x_smaller']:.1f}x smaller | {fmt(r['ppl'])} "
    f"({delta(r, '')}) | {fmt(r['task_ppl'])} ({delta(r, 'task_')}) | {r['decode_tok_s']:.1f} "
    f"({r['decode_speedup']:.2f}x) |" for r in q.get("rows", [])] + [
    "", "Perplexity by eval.py's own code (lib/perplexity.py: sliding windows, the text after <|endoftext|>); each "
    "delta against fp32 (weights and activations) and against bf16 (the precision of the CPU kernels' activations: "
    "the difference is the weights' alone)."])
cols = [(c, m, w, ref) for c, spec in CHECKS.items() for m, w, ref in spec[3]]
section("6. Every model on the same held-out checks", rep["eval"], [
    "| model | " + " | ".join(w.split(":")[0] for _, _, w, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"] + [
    f"| {n} | " + " | ".join(fmt(m[c][k], ".1%" if "acc" in k else ".3f") for c, k, _, _ in cols) + " |"
    for n, m in ev.items()] + ([
        "| published, GPT-2 124M | " + " | ".join(ref or "-" for _, _, _, ref in cols) + " |"] if recipe == "gpt2"
                               else []) + [""] + [f"- {w}" for _, _, w, _ in cols if ":" in w])
with open(path("report.md.tmp"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
os.replace(path("report.md.tmp"), path("report.md"))
print(f"wrote {path('report.md')}, {path('report.json')} and the pictures report_*.png")
