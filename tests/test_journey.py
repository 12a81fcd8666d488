"""runs/journey.sh end to end at its tiny scale (--scale=tiny: the same commands, small models and data): every
stage runs, the report card holds every stage's figures and its pictures exist, fine-tuning raises the held-out
task accuracy and DPO the held-out reward accuracy above 0.5; a Ctrl-C during pre-training stops the journey, the
next run resumes that stage with train.py's own --init_from=resume, and a run after a finished journey skips every
stage. Also data/shakespeare_tasks/prepare.py (its held-out plays are the validation split of the pre-training
corpus; the name of the answer is the same tokens as in the excerpt) and runs/report.py's checks.

Everything is seeded and runs on one CPU thread, so the tiny journey gives the same numbers on every run on the same
machine; the accuracy assertions hold with a margin (see test_fine_tuning_and_dpo_move_their_numbers)."""

import json
import os
import re
import runpy
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from common import load_checkpoint, read_tokens
from tokenizer import get_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the journey's Python is this one; one thread is steadier on a busy machine
ENV = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY_PRETRAIN_ITERS = 60  # runs/journey.sh --scale=tiny


def journey_command(out):
    return ["bash", os.path.join(REPO, "runs", "journey.sh"), f"--out_dir={out}", "--scale=tiny"]


def pretrain_iter(out) -> int:
    """The last iteration pre-training logged so far (-1 before its first line)."""
    try:
        with open(os.path.join(out, "pretrain", "log.jsonl")) as f:
            return max([json.loads(line)["iter"] for line in f if line.strip().endswith("}")], default=-1)
    except OSError:
        return -1


@pytest.fixture(scope="module")
def journey(tmp_path_factory):
    """Three runs of the tiny journey into one folder: the first stopped by Ctrl-C (SIGINT to its process group, as a
    terminal sends it) once pre-training has saved its first checkpoint (iteration 20); the second to the end; the
    third with nothing left to do. -> (out, [(returncode, output) of each run])"""
    out = str(tmp_path_factory.mktemp("journey") / "out")
    p = subprocess.Popen(journey_command(out), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    deadline = time.time() + 1200
    while p.poll() is None and time.time() < deadline:
        if 20 < pretrain_iter(out) < TINY_PRETRAIN_ITERS:  # training past its first checkpoint
            os.killpg(p.pid, signal.SIGINT)
            break
        time.sleep(0.02)
    runs = [(p.wait(timeout=600), p.stdout.read())]
    for _ in range(2):
        r = subprocess.run(journey_command(out), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1800)
        runs.append((r.returncode, r.stdout + r.stderr))
    return out, runs


@pytest.fixture(scope="module")
def report(journey):
    with open(os.path.join(journey[0], "report.json")) as f:
        return json.load(f)


def journey_records(out) -> list:
    with open(os.path.join(out, "journey.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_ctrl_c_stops_the_journey_and_the_next_run_resumes_the_stage(journey):
    out, runs = journey
    (rc1, log1), (rc2, log2) = runs[0], runs[1]
    assert rc1 == 128 + signal.SIGINT, log1[-3000:]
    assert "stage 'pretrain' stopped" in log1 and "saving a checkpoint" in log1, log1[-3000:]
    assert rc2 == 0, log2[-5000:]
    recs = [r for r in journey_records(out) if r["stage"] == "pretrain"]
    assert [(r["action"], r["rc"]) for r in recs[:2]] == [("run", 130), ("resume", 0)], recs
    assert recs[1]["command"][-1] == "--init_from=resume"
    assert re.search(r"resuming .*pretrain.*iteration 2\d", log2), log2[:5000]
    ckpt = load_checkpoint(os.path.join(out, "pretrain", "ckpt.pt"))
    assert ckpt["resume"]["iter_num"] == TINY_PRETRAIN_ITERS
    # one log across both legs: what the first leg logged after its checkpoint is replaced, not repeated
    with open(os.path.join(out, "pretrain", "log.jsonl")) as f:
        evals = [r["iter"] for r in map(json.loads, f) if r.get("type") == "eval"]
    assert evals == [0, 20, 40, 60], evals


def test_a_finished_journey_is_skipped(journey):
    out, runs = journey
    rc3, log3 = runs[2]
    assert rc3 == 0, log3[-3000:]
    for stage in ("pretrain", "sft", "dpo", "attention", "quantize"):
        assert f"== {stage}: finished earlier" in log3, log3[-3000:]
    assert "== eval:" not in log3 and "iter " not in log3, log3[-3000:]  # no evaluation, no training step
    third = [r for r in journey_records(out) if r["time"] >= "0"][-8:]
    assert {r["action"] for r in third if r["stage"] not in ("data",)} == {"skip"}, third


def test_the_report_card_holds_every_stage(journey, report):
    out = journey[0]
    for stage in ("pretrain", "sft", "dpo", "attention", "quantize", "eval"):
        assert report[stage]["commands"] and report[stage]["seconds"] > 0, (stage, report[stage])
    assert report["pretrain"]["commands"][0].startswith(f"{sys.executable} train.py config/journey_pretrain.py")
    p = report["pretrain"]
    assert p["iterations"] == TINY_PRETRAIN_ITERS and p["val_loss"] < p["val_loss_start"], p
    assert report["pretrain"]["resumed"] == 1 and report["pretrain"]["skipped"] == 1
    models = report["eval"]["models"]
    assert list(models) == ["pretrain", "sft", "dpo", "int8", "int4"], models
    for name, m in models.items():
        assert all(m[k] is not None for k in ("perplexity", "bits_per_byte", "task_acc", "choice_acc")), (name, m)
        assert m["items"] == 80, m
    q = report["quantize"]
    assert [r["mode"] for r in q["rows"]] == ["fp32", "int8", "int4 g32"], q
    assert all(r["linear_x_smaller"] > 1 and r["decode_tok_s"] > 0 for r in q["rows"][1:]), q
    a = report["attention"]
    assert set(a["flagged"]) == {"previous-token", "induction"} and len(a["top"]["induction"]) == 3, a
    env = report["environment"]
    import torch
    assert env["torch"] == torch.__version__.split("+")[0] or env["torch"] == torch.__version__, env
    assert env["device"] == ["cpu"] and env["commit"], env
    with open(os.path.join(out, "report.md")) as f:
        md = f.read()
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert {"report_pretrain.png", "report_sft.png", "report_dpo.png", "report_eval.png"} <= set(pictures), pictures
    assert any(p.startswith("attention/attention_layer") for p in pictures), pictures
    for picture in pictures:
        with open(os.path.join(out, picture), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", picture
    for stage in ("## 1. Pre-training", "## 2.", "## 3. DPO", "## 4. Attention", "## 5. Quantization", "## 6."):
        assert stage in md
    assert "torch " + env["torch"] in md and "held-out task accuracy pretrain" in md


def test_fine_tuning_and_dpo_move_their_numbers(report):
    """The tiny journey's held-out numbers move the way the full one's do. At this scale the pre-trained model
    answers no question (it never saw the question's layout), the fine-tuned one gets a share of the 80 held-out
    questions right (the margin asked for: 5 of them), and DPO, whose reference is the fine-tuned model, starts at
    a reward accuracy of exactly 0.5 (every reward is 0) and ends above it on the held-out pairs."""
    acc = report["sft"]["task_acc"]
    assert acc["pretrain"] == 0.0 and acc["sft"] >= 5 / 80, acc
    d = report["dpo"]
    assert d["reward_acc_start"] == 0.5 and d["reward_margin_start"] == 0.0, d
    assert d["reward_acc"] > 0.55 and d["reward_margin"] > 0, d


# ---------------------------------------------------------------------------------------------------------------
# the tasks' data


def test_heldout_plays_are_the_validation_split(journey):
    """heldout.txt (the plays the held-out questions come from) lies within the text of val.bin that train.py
    validates on, so pre-training never sees a held-out question's speeches."""
    out = journey[0]
    tok = get_tokenizer("gpt2")
    val = tok.decode(read_tokens(os.path.join(out, "data", "shakespeare", "val.bin")).tolist())
    train_tail = tok.decode(read_tokens(os.path.join(out, "data", "shakespeare", "train.bin"))[-2000:].tolist())
    with open(os.path.join(out, "data", "tasks", "heldout.txt")) as f:
        heldout = f.read()
    with open(os.path.join(out, "data", "tasks", "meta.json")) as f:
        meta = json.load(f)
    assert meta["heldout_plays"] == ["othello", "romeo-and-juliet", "timon-of-athens"], meta
    assert len(heldout) > 300_000 and heldout in val and heldout[:200] not in train_tail


def test_task_files(journey):
    d = os.path.join(journey[0], "data", "tasks")
    read = lambda name: [json.loads(line) for line in open(os.path.join(d, name))]
    sft, val, dpo, task, choice = (read(n) for n in ("sft_train.jsonl", "sft_val.jsonl", "dpo_train.jsonl",
                                                       "task_val.jsonl", "choice_val.jsonl"))
    assert (len(sft), len(val), len(dpo), len(task), len(choice)) == (600, 80, 400, 80, 80)
    tok = get_tokenizer("gpt2")
    in_excerpt = 0
    for s, t, c in zip(val, task, choice):
        name = s["output"].rsplit("\n", 1)[1]
        assert re.fullmatch(r"[A-Za-z']+", name) and t["text"].endswith(" is\n" + name), (s, t)
        assert c["ctx"] + " " + c["endings"][c["label"]] == t["text"], (c, t)
        if name + ":\n" in s["input"]:
            in_excerpt += 1  # the answer's name is the same tokens as the excerpt's (both start a line)
            ids = tok.encode_ordinary("\n" + name)
            assert ids == tok.encode_ordinary("\n\n" + name + ":\n")[1:1 + len(ids)], name
    assert in_excerpt > 40, in_excerpt  # most answers name someone who spoke in the excerpt
    assert {c["label"] for c in choice} == {0, 1}  # eval.py breaks ties for the first ending: both orders occur
    assert all(p["chosen"] != p["rejected"] and p["prompt"].endswith("### Response:\n") for p in dpo)
    assert not {s["input"] for s in sft} & {p["prompt"].split("### Input:\n")[1][:-len("\n\n### Response:\n")]
                                             for p in dpo}  # DPO asks other questions than fine-tuning


def run_prepare(argv):
    old = sys.argv
    sys.argv = [os.path.join(REPO, "data", "shakespeare_tasks", "prepare.py")] + argv
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        sys.argv = old


def test_prepare_stops_early_when_done(journey, capsys):
    with pytest.raises(SystemExit) as e:
        run_prepare([f"--out_dir={os.path.join(journey[0], 'data', 'tasks')}", "--sft_records=600",
                     "--dpo_records=400", "--heldout_records=80"])
    assert e.value.code == 0 and "already holds these tasks" in capsys.readouterr().out


def test_prepare_bad_settings(tmp_path):
    with pytest.raises(ValueError, match=r"context_speeches >= 1.*context_speeches=0"):
        run_prepare([f"--out_dir={tmp_path}", "--context_speeches=0"])
    with pytest.raises(ValueError, match=r"held-out questions, fewer than .*heldout_records = 99,999; ask for fewer, "
                                         r"e.g. .*--heldout_records=2406"):
        run_prepare([f"--out_dir={tmp_path}", "--heldout_records=99999"])
    assert not os.listdir(tmp_path)  # nothing written


# ---------------------------------------------------------------------------------------------------------------
# runs/report.py's checks


def report_cli(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "runs", "report.py"), *args], capture_output=True,
                          text=True, env=ENV, timeout=120)


def test_report_checks(journey, tmp_path):
    out = journey[0]
    assert report_cli(f"--out_dir={out}", "--check=sft").stdout == "done\n"
    assert report_cli(f"--out_dir={out}", "--check=eval", "--model=int4", "--task=lambada").stdout == "done\n"
    assert report_cli(f"--out_dir={tmp_path}", "--check=dpo").stdout == "none\n"
    r = report_cli(f"--out_dir={tmp_path}", "--check=finetune")
    assert r.returncode == 1 and "ValueError: --check must be one of ('pretrain', 'sft', 'dpo', 'attention', " \
                                  "'quantize', 'eval'), got 'finetune'" in r.stderr, r.stderr
    r = report_cli(f"--out_dir={tmp_path}", "--check=eval", "--model=base")
    assert r.returncode == 1 and "--check=eval needs --model= one of ['pretrain', 'sft', 'dpo', 'int8', 'int4']" \
                                 in r.stderr, r.stderr
