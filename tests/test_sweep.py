"""
sweep.py end to end on tiny train.py runs (1 layer, n_embd 16, block 16, a few iterations on three sonnets): a 2x2
grid finishes with a 4-row results.csv, a second call skips all four, an interrupted run continues from its
checkpoint, a failed run is recorded while the others go on (all in one test: each run is a process start); the
FLOP budget derives max_iters; and the power-law fit recovers known exponents from synthetic points.
"""

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from test_train import char_data, env, run_inprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"device": "cpu", "compile": False, "n_layer": 1, "n_head": 2, "block_size": 16, "batch_size": 4,
        "total_batch_size": 0, "data_order": "random", "eval_iters": 2, "eval_interval": 4, "log_interval": 2,
        "warmup_iters": 1, "max_iters": 8, "lr_decay_iters": 8, "learning_rate": 1e-2, "min_lr": 1e-3}


def sweep_config(tmp_path, grid: dict, extra: str = "") -> str:
    path = tmp_path / "sweep_tiny.py"
    fixed = {**TINY, "data_dir": char_data(tmp_path / "data")}
    path.write_text(f"script = 'train.py'\ngrid = {grid!r}\nfixed = {fixed!r}\nout_dir = {str(tmp_path / 'sw')!r}\n"
                    + extra)
    return str(path)


def sweep(tmp_path, *args, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "sweep.py", *args], cwd=ROOT, env=env(tmp_path), capture_output=True,
                       text=True, timeout=600)
    assert not check or r.returncode == 0, f"sweep.py failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def results(tmp_path) -> list:
    with open(tmp_path / "sw" / "results.csv") as f:
        return list(csv.DictReader(f))


def test_grid_sweep_finishes_skips_and_resumes(tmp_path, monkeypatch):
    cfg = sweep_config(tmp_path, {"n_embd": [16, 32], "learning_rate": [1e-2, 3e-3]})
    out = sweep(tmp_path, cfg, "--parallel=2").stdout
    rows = results(tmp_path)
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows), out
    assert {"run", "n_embd", "learning_rate", "params", "params_non_embedding", "tokens", "flops", "wall_s",
            "final_val_loss", "best_val_loss"} <= set(rows[0]), rows[0].keys()
    assert {r["run"] for r in rows} == {f"n_embd-{n}_learning_rate-{lr}" for n in (16, 32) for lr in (0.01, 0.003)}
    small = next(r for r in rows if r["n_embd"] == "16")
    assert int(small["tokens"]) == 8 * 4 * 16 and float(small["best_val_loss"]) < 4.5
    assert int(small["params"]) > int(small["params_non_embedding"]) > 0
    assert float(small["flops"]) == pytest.approx(6 * int(small["params"]) * 8 * 64, rel=0.3)
    for name in ("results.md", "curves.png", "heat.png"):
        assert (tmp_path / "sw" / name).exists(), name
    assert "| n_embd \\ learning_rate | 0.01 | 0.003 |" in (tmp_path / "sw" / "results.md").read_text()

    # a second call runs nothing; --print_only lists nothing either
    again = sweep(tmp_path, cfg).stdout
    assert "4 already done" in again and "start" not in again, again
    assert sweep(tmp_path, cfg, "--print_only=True").stdout == ""

    # a run that will fail: its summary gone and its checkpoint torn, it is continued from a checkpoint that
    # cannot be read; it is recorded as failed and the sweep goes on to the next
    broken = tmp_path / "sw" / "n_embd-16_learning_rate-0.01"
    (broken / "ckpt.pt").write_bytes(b"torn")
    (broken / "log.jsonl").write_text("")
    # an interrupted run: its log loses the summary, as if stopped after the checkpoint at iteration 4
    run = tmp_path / "sw" / "n_embd-16_learning_rate-0.003"
    run_inprocess(monkeypatch, *[f"--{k}={v}" for k, v in TINY.items()], "--n_embd=16",
                  f"--data_dir={tmp_path / 'data'}", f"--out_dir={run}", "--max_iters=4", "--overwrite=True")
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log if r["type"] != "summary"))
    cmds = sweep(tmp_path, cfg, "--print_only=True").stdout.strip().splitlines()
    assert len(cmds) == 2 and all(c.endswith("--init_from=resume") for c in cmds) and f"--out_dir={run}" in cmds[1]
    out = sweep(tmp_path, cfg).stdout
    assert "2 already done" in out and "continue n_embd-16_learning_rate-0.003" in out, out
    assert "failed n_embd-16_learning_rate-0.01" in out and "1 run(s) failed" in out, out
    assert "resuming" in (run / "run.log").read_text() and "iteration 4" in (run / "run.log").read_text()
    iters = [r["iter"] for r in map(json.loads, open(run / "log.jsonl")) if r["type"] == "train"]
    assert iters == [2, 4, 6, 8], iters
    assert [r["status"] for r in results(tmp_path)] == ["failed", "done", "done", "done"]


def test_flops_budget_sets_max_iters(tmp_path, monkeypatch, capsys):
    data = char_data(tmp_path / "data")
    run_inprocess(monkeypatch, f"--data_dir={data}", f"--out_dir={tmp_path / 'o'}", "--flops_budget=2e8",
                  "--eval_interval=100", "--log_interval=100")
    out = capsys.readouterr().out
    m = re.search(r"\(([\d,]+) FLOPs per token x ([\d,]+) tokens per iteration\) -> max_iters = lr_decay_iters = "
                  r"([\d,]+)", out)
    assert m, out
    per_token, batch, iters = (int(g.replace(",", "")) for g in m.groups())
    assert iters == round(2e8 / (per_token * batch)) and f"done: {iters:,} iterations" in out
    summary = [json.loads(line) for line in open(tmp_path / "o" / "log.jsonl")][-1]
    assert summary["tokens"] == iters * batch and summary["flops"] == iters * batch * per_token, summary


def test_power_law_fit_recovers_known_exponents():
    """Synthetic points with 0.5% multiplicative noise (seeded): the exponent comes back within a few of its
    standard errors, and those errors are small because the noise is."""
    from sweep import fit_power_law
    rng = np.random.default_rng(0)
    x = np.geomspace(1e4, 1e8, 8)
    y = 7.0 * x ** -0.076 * np.exp(rng.normal(0, 0.005, x.size))
    fit = fit_power_law(x, y)
    assert abs(fit["alpha"] - 0.076) < max(4 * fit["alpha_err"], 0.005) and fit["alpha_err"] < 0.005, fit
    y = (3.0 * x ** -0.3 + 1.5) * np.exp(rng.normal(0, 0.002, x.size))
    fit = fit_power_law(x, y, offset=True)
    assert abs(fit["alpha"] - 0.3) < max(4 * fit["alpha_err"], 0.02) and abs(fit["c"] - 1.5) < 0.05, fit
    exact = fit_power_law(x, 2.0 * x ** -0.5)
    assert exact["alpha"] == pytest.approx(0.5) and exact["a"] == pytest.approx(2.0) and exact["alpha_err"] < 1e-9
