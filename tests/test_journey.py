"""runs/journey.sh end to end at its tiny scale (--scale=tiny: the same commands, small models and data): every
stage runs, the report card holds every stage's figures (full fine-tuning and LoRA side by side) and its pictures
exist, fine-tuning raises the held-out task accuracy and DPO the strict held-out reward accuracy above 0; a Ctrl-C during pre-training stops the journey, the
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

from lib.checkpoint import load_checkpoint
from lib.tokenizer import get_tokenizer
from lib.tokens import read_tokens

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
    stopped_at = load_checkpoint(os.path.join(out, "pretrain", "ckpt.pt"))["resume"]["iter_num"]
    for _ in range(2):
        r = subprocess.run(journey_command(out), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1800)
        runs.append((r.returncode, r.stdout + r.stderr))
    return out, runs, stopped_at


@pytest.fixture(scope="module")
def report(journey):
    with open(os.path.join(journey[0], "report.json")) as f:
        return json.load(f)


def journey_records(out) -> list:
    with open(os.path.join(out, "journey.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_ctrl_c_stops_the_journey_and_the_next_run_resumes_the_stage(journey):
    out, runs, stopped_at = journey
    (rc1, log1), (rc2, log2) = runs[0], runs[1]
    assert rc1 == 128 + signal.SIGINT, log1[-3000:]
    assert "stage 'pretrain' stopped" in log1 and "saving a checkpoint" in log1, log1[-3000:]
    assert rc2 == 0, log2[-5000:]
    recs = [r for r in journey_records(out) if r["stage"] == "pretrain"]
    assert [(r["action"], r["rc"]) for r in recs[:2]] == [("run", 130), ("resume", 0)], recs
    assert recs[1]["command"][-1] == "--init_from=resume"
    assert 20 < stopped_at < TINY_PRETRAIN_ITERS, stopped_at  # saved where Ctrl-C stopped it, after a checkpoint
    assert f"iteration {stopped_at}" in log2, log2[:5000]  # where the resumed leg says it starts
    ckpt = load_checkpoint(os.path.join(out, "pretrain", "ckpt.pt"))
    assert ckpt["resume"]["iter_num"] == TINY_PRETRAIN_ITERS
    # one log across both legs: what the first leg logged after its checkpoint is replaced, not repeated
    with open(os.path.join(out, "pretrain", "log.jsonl")) as f:
        evals = [r["iter"] for r in map(json.loads, f) if r.get("type") == "eval"]
    assert evals == [0, 20, 40, 60], evals


def test_a_finished_journey_is_skipped(journey):
    out, runs, _ = journey
    rc3, log3 = runs[2]
    assert rc3 == 0, log3[-3000:]
    for stage in ("pretrain", "sft", "sft_lora", "dpo", "attention", "quantize"):
        assert f"== {stage}: finished earlier" in log3, log3[-3000:]
    assert "== eval: " + sys.executable not in log3 and "iter " not in log3, log3[-3000:]  # no eval.py ran, no step
    assert log3.count("finished earlier, skipped") == 18, log3[-3000:]  # 6 models x 3 checks
    recs = journey_records(out)
    third = recs[max(i for i, r in enumerate(recs) if r["stage"] == "data" and "shakespeare/" in r["command"][1]):]
    assert [r["action"] for r in third if r["stage"] != "data"] == ["skip"] * 24, third  # 6 stages, 18 evals


def test_the_report_card_holds_every_stage(journey, report):
    out = journey[0]
    for stage in ("pretrain", "sft", "sft_lora", "dpo", "attention", "quantize", "eval"):
        assert report[stage]["commands"] and report[stage]["seconds"] > 0, (stage, report[stage])
    assert report["pretrain"]["commands"][0].startswith(f"{sys.executable} train.py config/journey_pretrain.py")
    p = report["pretrain"]
    assert p["iterations"] == TINY_PRETRAIN_ITERS and p["val_loss"] < p["val_loss_start"], p
    assert report["pretrain"]["resumed"] == 1 and report["pretrain"]["skipped"] == 1
    models = report["eval"]["models"]
    assert list(models) == ["pretrain", "sft", "sft_lora", "dpo", "int8", "int4"], models
    for name, m in models.items():
        assert all(v is not None for check in m.values() for v in check.values()), (name, m)
        assert m["task"]["items"] == m["choice"]["items"] == 160, m
    # full fine-tuning and LoRA side by side: how each trained, what it costs, what it keeps
    sbs = report["side_by_side"]
    assert sbs["sft"]["method"] == "full" and sbs["sft_lora"]["method"].startswith("LoRA r=16"), sbs
    assert sbs["sft_lora"]["trainable_parameters"] < sbs["sft"]["trainable_parameters"] / 10, sbs
    assert all(r["ppl_ratio"] > 0 and r["seconds"] > 0 for r in sbs.values()), sbs
    assert set(report["targets"]) and all(isinstance(t["met"], bool) for t in report["targets"].values())
    q = report["quantize"]
    assert [r["mode"] for r in q["rows"]] == ["fp32", "bf16", "int8", "int4 g32"], q
    assert all(r["linear_x_smaller"] > 1 and r["decode_tok_s"] > 0 for r in q["rows"][1:]), q
    for r in q["rows"]:  # perplexities of the held-out plays and questions, with deltas against fp32 and bf16
        assert r["ppl"] > 1 and r["task_ppl"] > 1 and r["change_vs_bf16_pct"] is not None, r
    assert q["rows"][0]["change_pct"] == 0 and q["rows"][1]["change_vs_bf16_pct"] == 0, q
    # one implementation: quantize.py's fp32 perplexity of the held-out plays is eval.py's for the same model and text
    assert q["rows"][0]["ppl"] == pytest.approx(models["dpo"]["perplexity"]["ppl"], rel=1e-5), (q, models["dpo"])
    a = report["attention"]["models"]
    assert list(a) == ["pretrain", "dpo"], a
    assert all(set(h["flagged"]) == {"previous-token", "induction"} and len(h["top"]["induction"]) == 3
               for h in a.values()), a
    env = report["environment"]
    import torch
    assert env["torch"] == torch.__version__.split("+")[0] or env["torch"] == torch.__version__, env
    assert env["device"] == ["cpu"] and env["commit"], env
    with open(os.path.join(out, "report.md")) as f:
        md = f.read()
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert {"report_pretrain.png", "report_sft.png", "report_dpo.png", "report_eval.png"} <= set(pictures), pictures
    assert any(p.startswith("attention/pretrain/attention_layer") for p in pictures), pictures
    assert any(p.startswith("attention/dpo/attention_layer") for p in pictures), pictures
    for picture in pictures:
        with open(os.path.join(out, picture), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", picture
    for stage in ("## 1. Pre-training", "## 2.", "## 3. DPO", "## 4. Attention", "## 5. Quantization", "## 6."):
        assert stage in md
    assert "torch " + env["torch"] in md and "held-out task accuracy: pretrain" in md


def test_fine_tuning_and_dpo_move_their_numbers(journey, report):
    """The tiny journey's held-out numbers move the way the full one's do. The pre-trained model answers no question
    (it never saw the question's layout); the fine-tuned one beats answering the most frequent speaker every time
    (13.75% of the 160 held-out questions) by 10 points or more (45.6% on an AVX2 CPU, with replay); DPO, whose
    reference is the fully fine-tuned model (report.json says so: dpo.started_from), starts at a strict reward
    accuracy of exactly 0 (every reward is 0: a tie is no win) and ends above 0.5 with a positive margin on the
    held-out pairs (0.706 on an AVX2 CPU), and with the chosen answers' NLL in its loss (rpo_alpha) it keeps the task
    accuracy. At this scale LoRA learns little of the task (the tiny model's 64-wide embedding, frozen under LoRA, is
    also its LM head): the side-by-side figures say so rather than assert it. Floating-point sums differ between CPU
    kinds, so the figures do a little too."""
    with open(os.path.join(journey[0], "data", "tasks", "meta.json")) as f:
        prior = json.load(f)["heldout_most_frequent_speaker_acc"]
    acc = report["sft"]["task_acc"]
    assert acc["pretrain"] == 0.0 and acc["sft"] >= prior + 0.1, (acc, prior)
    d = report["dpo"]
    assert d["started_from"] == "sft" and acc["dpo"] >= acc["sft"] - 0.15, (d["started_from"], acc)
    assert d["reward_acc_start"] == 0.0 and d["reward_margin_start"] == 0.0, d
    assert d["reward_acc"] > 0.5 and d["reward_margin"] > 0, d


# ---------------------------------------------------------------------------------------------------------------
# the tasks' data


def test_heldout_plays_are_the_validation_split(journey):
    """heldout.txt (the text whose perplexity every model gets) lies within the text of val.bin that train.py
    validates on and no stage trains on; the questions come from the plays of train.bin."""
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
    with open(os.path.join(out, "data", "tasks", "sft_val.jsonl")) as f:
        lines = [json.loads(line)["input"].split("\n")[-1] for line in f]
    assert not any(line in heldout for line in lines if len(line) > 30), lines


def test_task_files(journey):
    d = os.path.join(journey[0], "data", "tasks")
    read = lambda name: [json.loads(line) for line in open(os.path.join(d, name))]
    sft, val, dpo, task, choice = (read(n) for n in ("sft_train.jsonl", "sft_val.jsonl", "dpo_train.jsonl",
                                                       "task_val.jsonl", "choice_val.jsonl"))
    assert (len(sft), len(val), len(dpo), len(task), len(choice)) == (3600, 160, 640, 160, 160)
    with open(os.path.join(d, "meta.json")) as f:
        names = json.load(f)["speakers_asked"]
    assert len(names) == 20 and "Hamlet" in names and "Clown" not in names, names
    tok = get_tokenizer("gpt2")
    for s, t, c in zip(val, task, choice):
        name = s["output"].rsplit(" ", 1)[1]
        assert s["output"] == "The speaker is " + name and name in names and t["text"].endswith(s["output"]), (s, t)
        assert c["ctx"] + " " + c["endings"][c["label"]] == t["text"], (c, t)
        replied, reply = s["input"].split("\n\n?:\n")  # the speech replied to, with its speaker; the reply's line
        assert replied.split(":\n")[0] and replied.split(":\n")[1] and reply, s
    assert max(len(tok.encode_ordinary(" " + n)) for n in names) <= 3  # short answers: 1 to 3 tokens
    assert {c["label"] for c in choice} == {0, 1}  # eval.py breaks ties for the first ending: both orders occur
    prompt_input = lambda p: p["prompt"].split("### Input:\n")[1][:-len("\n\n### Response:\n")]
    assert all(p["chosen"] != p["rejected"] and p["prompt"].endswith("### Response:\n") for p in dpo)
    assert {prompt_input(p) for p in dpo} <= {s["input"] for s in sft}  # DPO asks fine-tuning's questions
    assert not {s["input"] for s in val} & {s["input"] for s in sft}  # the held-out ones are asked by neither


def run_prepare(argv):
    old = sys.argv
    sys.argv = [os.path.join(REPO, "data", "shakespeare_tasks", "prepare.py")] + argv
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        sys.argv = old


def test_prepare_stops_early_when_done(journey, capsys):
    with pytest.raises(SystemExit) as e:
        run_prepare([f"--out_dir={os.path.join(journey[0], 'data', 'tasks')}", "--dpo_records=640",
                     "--heldout_records=160"])
    assert e.value.code == 0 and "already holds these tasks" in capsys.readouterr().out


def test_prepare_bad_settings(tmp_path):
    with pytest.raises(ValueError, match=r"speakers >= 2.*got val_fraction=0.1, speakers=1, "):
        run_prepare([f"--out_dir={tmp_path}", "--speakers=1"])
    with pytest.raises(ValueError, match=r"the training plays give 4,186 questions about their 20 most talkative "
                                         r"speakers, fewer than heldout_records \+ sft_records = 103,599 .*ask for "
                                         r"fewer, e.g. --heldout_records=418 --sft_records=3768 --dpo_records=2000"):
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
    assert report_cli(f"--out_dir={out}", "--check=eval", "--model=int4", "--task=task").stdout == "done\n"
    assert report_cli(f"--out_dir={tmp_path}", "--check=dpo").stdout == "none\n"
    r = report_cli(f"--out_dir={tmp_path}", "--check=finetune")
    assert r.returncode == 1 and "ValueError: --check must be one of ('pretrain', 'sft', 'sft_lora', 'dpo', " \
                                  "'attention', 'quantize', 'eval'), got 'finetune'" in r.stderr, r.stderr
    r = report_cli(f"--out_dir={tmp_path}", "--check=eval", "--model=base")
    assert r.returncode == 1 and "--check=eval needs --model= one of ['pretrain', 'sft', 'sft_lora', 'dpo', 'int8', " \
                                 "'int4']" in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------------------------------
# runs/gpt2.sh, offline: a tiny GPT-2-shaped model in Hugging Face's layout and small files in the official formats
# stand in for OpenAI's weights, Alpaca, hh-rlhf, HellaSwag and LAMBADA; the scripts and flags are the recipe's


def write_stand_ins(d):
    import torch

    from lib.gpt2_weights import export_hf
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    export_hf(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50257, bias=True)),
              os.path.join(d, "gpt2"))
    words = "the king the queen a sword a crown is was goes comes home away".split()
    rng = np.random.default_rng(0)
    say = lambda n: " ".join(rng.choice(words, n))
    with open(os.path.join(d, "alpaca.json"), "w") as f:
        json.dump([{"instruction": f"Repeat: {say(3)}", "input": say(2) if i % 2 else "", "output": say(4)}
                   for i in range(40)], f)
    for name, n in (("hh_train.jsonl", 24), ("hh_test.jsonl", 8)):
        with open(os.path.join(d, name), "w") as f:
            for _ in range(n):
                turn = f"\n\nHuman: {say(4)}?\n\nAssistant:"
                f.write(json.dumps({"chosen": turn + " " + say(3), "rejected": turn + " " + say(2)}) + "\n")
    with open(os.path.join(d, "hellaswag.jsonl"), "w") as f:
        for i in range(8):
            a, b = say(4), say(2)
            f.write(json.dumps({"ctx": a + " " + b, "ctx_a": a, "ctx_b": b, "activity_label": "Talking",
                                "endings": [say(3) for _ in range(4)], "label": i % 4}) + "\n")
    with open(os.path.join(d, "lambada.jsonl"), "w") as f:
        for _ in range(8):
            f.write(json.dumps({"text": say(12)}) + "\n")


def test_the_public_data_recipe_offline(tmp_path):
    write_stand_ins(str(tmp_path))
    out = str(tmp_path / "out")
    cmd = ["bash", os.path.join(REPO, "runs", "gpt2.sh"), f"--out_dir={out}", "--scale=tiny", f"--gpt2={tmp_path}/gpt2",
           f"--alpaca={tmp_path}/alpaca.json", f"--hh={tmp_path}/hh_train.jsonl", f"--hh_test={tmp_path}/hh_test.jsonl",
           f"--hellaswag={tmp_path}/hellaswag.jsonl", f"--lambada={tmp_path}/lambada.jsonl"]
    r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    with open(os.path.join(out, "report.json")) as f:
        rep = json.load(f)
    assert rep["recipe"] == "gpt2" and rep["pretrain"]["kind"] == "imported", rep["pretrain"]
    assert rep["pretrain"]["commands"] == [f"{sys.executable} load_openai.py --from_dir={tmp_path}/gpt2 "
                                           f"--out_dir={out}/pretrain"]
    assert rep["sft"]["commands"][0].startswith(f"{sys.executable} finetune.py config/finetune_alpaca.py")
    assert rep["dpo"]["commands"][0].startswith(f"{sys.executable} align.py config/align_hh.py")
    assert rep["dpo"]["reward_acc_start"] == 0.0 and rep["dpo"]["iterations"] == 4, rep["dpo"]
    models = rep["eval"]["models"]
    assert list(models) == ["pretrain", "sft", "dpo", "int8", "int4"], models
    for name, m in models.items():
        assert m["hellaswag"]["items"] == m["lambada"]["items"] == 8, (name, m)
        assert all(v is not None for c in m.values() for v in c.values()), (name, m)
    # OpenAI's GPT-2 small has 12 layers: the literature's heads are looked up, and absent from 2 layers
    lit = rep["attention"]["models"]["pretrain"]["literature_heads"]
    assert [h["head"] for h in lit["induction"]] == ["L5H1", "L5H5", "L6H9", "L7H2", "L7H10"], lit
    assert all(h["score"] is None and not h["flagged"] for hs in lit.values() for h in hs), lit
    with open(os.path.join(out, "report.md")) as f:
        md = f.read()
    for ref in ("29.55% (build-nanogpt)", "31.14% (lm-evaluation-harness)", "32.56%", "45.99% (GPT-2 paper)",
                "40.06", "35.13", "| L4H11 | previous-token |"):
        assert ref in md, ref
    # a second run has nothing to do
    r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "== eval: " + sys.executable not in r.stdout and r.stdout.count("finished earlier") == 25, \
        r.stdout[-3000:]
