"""
FSDP2 (--fsdp=True) on the CPU: 2 ranks under torchrun with gloo. Sharded training equals one process with the same
global batch (losses and weights to 1e-6 in float32); its checkpoint is the one contract (gathered on save), read by
sample.py and resumed by one process, and a one-process checkpoint resumes under FSDP; SIGTERM saves and a resume
under FSDP ends where the uninterrupted run does.
"""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import run_script

from lib.checkpoint import load_checkpoint
from test_train import ROOT, TINY, char_data, env, records, run_inprocess, train

TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
# 2 ranks x 1 micro-step = 1 process x 2 micro-steps: the same batches at every iteration (BinLoader's numbering)
ARGS = ["--total_batch_size=128", "--lr_decay_iters=8", "--eval_interval=4", "--dropout=0.0", "--dtype=float32",
        "--learning_rate=1e-3", "--min_lr=1e-4"]  # Adam divides by sqrt(v): a larger rate amplifies rounding


def weights(out) -> dict:
    return load_checkpoint(str(out))["model"]


def assert_same_run(a, b, atol=1e-6):
    la, lb = records(a, "train"), records(b, "train")
    assert [r["iter"] for r in la] == [r["iter"] for r in lb]
    np.testing.assert_allclose([r["loss"] for r in lb], [r["loss"] for r in la], rtol=0, atol=atol)
    np.testing.assert_allclose([r["val_loss"] for r in records(b, "eval")], [r["val_loss"] for r in records(a, "eval")],
                               rtol=0, atol=atol)
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst <= atol, f"weights differ by up to {worst}"


def test_fsdp_equals_one_process_and_its_checkpoint_goes_anywhere(tmp_path, monkeypatch, capsys):
    data = char_data(tmp_path / "data")
    args = [f"--data_dir={data}", *ARGS]
    run_inprocess(monkeypatch, *args, "--max_iters=8", f"--out_dir={tmp_path / 'one'}")
    r = train(tmp_path, *args, "--max_iters=8", "--fsdp=True", f"--out_dir={tmp_path / 'fsdp'}", launcher=TORCHRUN)
    assert "memory per rank for the training state" in r.stdout and "(FSDP over 2 rank(s); DDP would hold" in r.stdout
    assert_same_run(tmp_path / "one", tmp_path / "fsdp")
    ckpt = load_checkpoint(str(tmp_path / "fsdp"))
    assert ckpt["kind"] == "pretrain" and ckpt["model"]["lm_head.weight"].data_ptr() != 0
    torch.testing.assert_close(ckpt["model"]["lm_head.weight"], ckpt["model"]["transformer.wte.weight"])  # still tied
    assert all(isinstance(k, str) for k in ckpt["resume"]["optimizer"]["state"])  # keyed by parameter name
    # read by every script: sample.py here
    s = run_script(["sample.py", f"--init_from={tmp_path / 'fsdp'}", "--device=cpu", "--num_samples=1",
                    "--max_new_tokens=8", "--start=Shall"], env=env(tmp_path), timeout=120)
    assert s.returncode == 0 and "Shall" in s.stdout, s.stderr[-2000:]
    (tmp_path / "text.txt").write_text("Shall I compare thee to a summer's day?\n" * 4)
    e = run_script(["eval.py", f"--init_from={tmp_path / 'fsdp'}", "--device=cpu", "--task=perplexity",
                    f"--text_file={tmp_path / 'text.txt'}"], env=env(tmp_path), timeout=120)
    assert e.returncode == 0 and "perplexity" in e.stdout, e.stdout[-2000:] + e.stderr[-2000:]
    # an FSDP checkpoint resumed by one process, and a one-process checkpoint resumed under FSDP, with another
    # number of ranks: both end where the uninterrupted runs end
    for first, then, name in ((TORCHRUN, None, "fsdp_then_one"), (None, TORCHRUN, "one_then_fsdp")):
        out = tmp_path / name
        legs = [(first, ["--max_iters=4", f"--out_dir={out}", *args]),
                (then, ["--max_iters=8", "--init_from=resume", f"--out_dir={out}", *args])]
        for launcher, leg in legs:
            fsdp = ["--fsdp=True"] if launcher else ["--fsdp=False"]
            if launcher:
                train(tmp_path, *leg, *fsdp, launcher=launcher)
            else:
                run_inprocess(monkeypatch, *leg, *fsdp)
        assert_same_run(tmp_path / "one", out)


def test_sigterm_under_fsdp_saves_and_the_resume_ends_where_the_uninterrupted_run_does(tmp_path):
    data = char_data(tmp_path / "data")
    args = [*TINY, f"--data_dir={data}", *ARGS, "--max_iters=40", "--lr_decay_iters=40", "--eval_interval=40",
            "--fsdp=True"]
    train(tmp_path, *args[len(TINY):], f"--out_dir={tmp_path / 'full'}", launcher=TORCHRUN)
    out = tmp_path / "stopped"
    p = subprocess.Popen([*TORCHRUN, "train.py", *args, f"--out_dir={out}"], cwd=ROOT, env=env(tmp_path),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("iter 5/"):
            os.killpg(p.pid, signal.SIGTERM)  # what SLURM does to a job step: every process of it
            break
    rest, _ = p.communicate(timeout=120)
    output = "".join(lines) + rest
    state = load_checkpoint(str(out))["resume"]
    assert "stopped by SIGTERM" in output and 5 <= state["iter_num"] < 40, output[-3000:]
    train(tmp_path, *args[len(TINY):], "--init_from=resume", f"--out_dir={out}", launcher=TORCHRUN)
    assert_same_run(tmp_path / "full", out, atol=0)


def test_fsdp_refusals(tmp_path, monkeypatch):
    data = char_data(tmp_path / "data")
    with pytest.raises(ValueError, match=r"optimizer='muon' is not offered with fsdp=True.*--optimizer=adamw"):
        run_inprocess(monkeypatch, f"--data_dir={data}", f"--out_dir={tmp_path / 'a'}", "--fsdp=True",
                      "--optimizer=muon")
    with pytest.raises(ValueError, match=r"fsdp=True shards the model over the ranks of a torchrun launch"):
        run_inprocess(monkeypatch, f"--data_dir={data}", f"--out_dir={tmp_path / 'b'}", "--fsdp=True")
