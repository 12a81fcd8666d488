"""
The scripts as one system: interrupted at any moment, a run resumes to the same result, bit for bit.

- kill -9 at 20 seeded random moments of a train.py run (inside steps and inside saves): the last checkpoint
  always loads, and resuming with no flags but the folder ends on the same final val loss as an uninterrupted
  run. The figures (trials, kills that hit a save, corrupt checkpoints, iterations lost) are printed.
- SIGINT and SIGTERM for train.py, finetune.py and align.py: the step finishes, a checkpoint is saved, the exit
  status is 128 + signal, and `--init_from=resume --out_dir=X` alone finishes the run with the uninterrupted
  run's losses; a second Ctrl-C during a save leaves a whole checkpoint and no temporary file.

Runs are forked from one runner process that has imported torch once (with one thread, so forking is safe):
a fresh interpreter costs seconds on a loaded 2-core machine, a fork milliseconds.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import PRELOAD

from lib.checkpoint import load_checkpoint
from lib.tokenizer import CharTokenizer
from lib.tokens import write_tokens
from test_train import char_data as prepared_chars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = ("From fairest creatures we desire increase,\nThat thereby beauty's rose might never die,\n"
        "But as the riper should by time decease,\nHis tender heir might bear his memory:\n") * 12
TRAIN = ["train.py", "--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16",
         "--batch_size=4", "--total_batch_size=128", "--data_order=random", "--eval_iters=2", "--log_interval=1",
         "--warmup_iters=2", "--learning_rate=1e-2", "--min_lr=1e-3", "--seed=7", "--dropout=0.1",
         "--max_iters=30", "--lr_decay_iters=30", "--eval_interval=3"]

# The runner: reads JSON jobs from stdin, one per line, forks a child per run, answers with JSON lines.
#   {"argv": [...], "out": FILE, "kill_after": seconds or null, "signal": 9|2|15, "second_signal_on_tmp": bool}
# The child runs the script with runpy, stdout/stderr into FILE. The parent waits kill_after seconds and sends
# the signal (with second_signal_on_tmp: a second SIGINT as soon as a checkpoint's temporary file exists).
RUNNER = PRELOAD + textwrap.dedent('''
    import glob, json, os, runpy, signal, sys, time
    for line in sys.stdin:
        job = json.loads(line)
        t0 = time.time()
        pid = os.fork()
        if pid == 0:  # the child: the script, as `python script ...` would run it
            fd = os.open(job["out"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 1); os.dup2(fd, 2)
            sys.argv = job["argv"]
            code = 0
            try:
                runpy.run_path(job["argv"][0], run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (print(e.code) or 1)
            except BaseException:
                import traceback; traceback.print_exc(); code = 1
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
        hit_save, status = False, None

        def alive():  # reaps the child when it has ended
            global status
            if status is None:
                done, st = os.waitpid(pid, os.WNOHANG)
                status = st if done else None
            return status is None
        if job.get("kill_after") is not None:
            deadline = t0 + job["kill_after"]
            while time.time() < deadline and alive():
                time.sleep(0.001)
            log_path = os.path.join(job.get("dir", "."), "log.jsonl")
            while job.get("after_log_lines") and alive():  # then until the run has logged that many lines
                if os.path.exists(log_path) and sum(1 for _ in open(log_path)) >= job["after_log_lines"]:
                    break
                time.sleep(0.0005)
            tmp_pattern = os.path.join(job.get("dir", "."), "*.tmp")
            if alive() and job.get("second_signal_on_tmp"):
                os.kill(pid, signal.SIGINT)
                while alive() and not glob.glob(tmp_pattern):
                    time.sleep(0.0002)
                if alive():
                    os.kill(pid, signal.SIGINT)
                    hit_save = True
            elif alive():
                os.kill(pid, job["signal"])
        if status is None:
            status = os.waitpid(pid, 0)[1]
        leftover = sorted(glob.glob(os.path.join(job.get("dir", "."), "*.tmp")))
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"code": code, "seconds": time.time() - t0, "tmp": leftover, "hit_save": hit_save}),
              flush=True)
''')


@pytest.fixture(scope="module")
def runner():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "WANDB_MODE": "disabled"}
    p = subprocess.Popen([sys.executable, "-c", RUNNER], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)

    def run(argv, out, kill_after=None, sig=signal.SIGKILL, folder=".", second_signal_on_tmp=False,
            after_log_lines=0):
        job = {"argv": argv, "out": str(out), "kill_after": kill_after, "signal": int(sig), "dir": str(folder),
               "second_signal_on_tmp": second_signal_on_tmp, "after_log_lines": after_log_lines}
        p.stdin.write(json.dumps(job) + "\n")
        p.stdin.flush()
        return json.loads(p.stdout.readline())
    yield run
    p.stdin.close()
    p.wait(timeout=60)


def char_data(folder) -> str:
    return prepared_chars(folder, TEXT)


def log(out_dir, kind=None) -> list:
    from lib.logs import read_jsonl
    recs = read_jsonl(os.path.join(out_dir, "log.jsonl"))
    return [r for r in recs if kind is None or r.get("type") == kind]


def test_kill9_at_20_random_moments_then_resume_is_bit_identical(tmp_path, runner, capsys):
    data = char_data(tmp_path / "data")
    ref = tmp_path / "ref"
    r = runner([*TRAIN, f"--data_dir={data}", f"--out_dir={ref}"], tmp_path / "ref.txt")
    assert r["code"] == 0, open(tmp_path / "ref.txt").read()[-3000:]
    want = log(ref, "eval")[-1]
    want_losses = [s["loss"] for s in log(ref, "train")]
    duration = r["seconds"]
    rng = np.random.default_rng(20261202)
    stats = dict(trials=0, hit_save=0, before_first_ckpt=0, corrupt=0, lost=[], same=0)
    for trial in range(20):
        out = tmp_path / f"t{trial}"
        delay = float(rng.uniform(0.02, duration))
        k = runner([*TRAIN, f"--data_dir={data}", f"--out_dir={out}"], tmp_path / f"t{trial}.txt", kill_after=delay,
                   folder=out)
        stats["trials"] += 1
        stats["hit_save"] += bool(k["tmp"])  # killed between the temporary file's creation and its rename
        ckpt_path = out / "ckpt.pt"
        if ckpt_path.exists():
            try:
                state = load_checkpoint(str(ckpt_path))["resume"]
            except Exception:
                stats["corrupt"] += 1
                raise
            logged = [s["iter"] for s in log(out, "train")]
            stats["lost"].append(max(logged, default=0) - state["iter_num"])
            argv = ["train.py", "--init_from=resume", f"--out_dir={out}"]  # the folder is all it needs
        else:
            stats["before_first_ckpt"] += 1
            argv = [*TRAIN, f"--data_dir={data}", f"--out_dir={out}"]  # nothing saved yet: start again
        res = runner(argv, tmp_path / f"t{trial}-resume.txt", folder=out)
        assert res["code"] == 0, open(tmp_path / f"t{trial}-resume.txt").read()[-3000:]
        assert res["tmp"] == [], f"trial {trial}: temporary files left after the resume: {res['tmp']}"
        got = log(out, "eval")[-1]
        assert got["iter"] == 30 and got["val_loss"] == want["val_loss"], (trial, delay, got, want)
        assert [s["loss"] for s in log(out, "train")] == want_losses, f"trial {trial} (kill after {delay:.3f} s)"
        stats["same"] += 1
    with capsys.disabled():
        print(f"\nkill -9 trials: {stats['trials']}, killed inside a save: {stats['hit_save']}, before the first "
              f"checkpoint: {stats['before_first_ckpt']}, corrupt checkpoints: {stats['corrupt']}, most iterations "
              f"lost: {max(stats['lost'], default=0)}, resumed runs equal to the uninterrupted one: {stats['same']}/20")
    assert stats["corrupt"] == 0 and stats["same"] == 20


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_train_signal_saves_and_a_bare_resume_finishes_identically(tmp_path, runner, sig):
    data = char_data(tmp_path / "data")
    ref, out = tmp_path / "ref", tmp_path / "out"
    argv = [*TRAIN, f"--data_dir={data}", "--eval_interval=30"]  # no evaluation to save at: the signal must
    r = runner([*argv, f"--out_dir={ref}"], tmp_path / "ref.txt")
    assert r["code"] == 0
    k = runner([*argv, f"--out_dir={out}"], tmp_path / "k.txt", kill_after=0.0, sig=sig, folder=out,
               after_log_lines=15)  # mid-run: at iteration 14 or so (the first line is the eval at 0)
    text = open(tmp_path / "k.txt").read()
    assert k["code"] == 128 + sig, text[-2000:]
    assert f"{signal.Signals(sig).name}: finishing this step" in text and f"--init_from=resume --out_dir={out}" in text
    state = load_checkpoint(str(out / "ckpt.pt"))["resume"]
    assert 0 < state["iter_num"] < 30 and max(s["iter"] for s in log(out, "train")) == state["iter_num"]
    res = runner(["train.py", "--init_from=resume", f"--out_dir={out}"], tmp_path / "res.txt", folder=out)
    assert res["code"] == 0, open(tmp_path / "res.txt").read()[-2000:]
    assert [s["loss"] for s in log(out, "train")] == [s["loss"] for s in log(ref, "train")]
    assert log(out, "eval")[-1]["val_loss"] == log(ref, "eval")[-1]["val_loss"]


def test_best_only_run_stop_goes_to_ckpt_last(tmp_path, runner):
    """always_save_checkpoint=False: ckpt.pt keeps the best model; a stop saves its state to ckpt_last.pt, which
    the resume then continues."""
    data = char_data(tmp_path / "data")
    out = tmp_path / "out"
    argv = [*TRAIN, f"--data_dir={data}", f"--out_dir={out}", "--always_save_checkpoint=False", "--max_iters=3000",
            "--lr_decay_iters=3000", "--eval_interval=2"]
    runner(argv, tmp_path / "a.txt", kill_after=0.0, sig=signal.SIGINT, folder=out, after_log_lines=60)
    best, last = load_checkpoint(str(out / "ckpt.pt")), load_checkpoint(str(out / "ckpt_last.pt"))
    assert last["resume"]["iter_num"] >= best["resume"]["iter_num"]
    assert best["resume"]["best"]["value"] == min(e["val_loss"] for e in log(out, "eval"))
    res = runner(["train.py", "--init_from=resume", f"--out_dir={out}", "--max_iters=" + str(
        last["resume"]["iter_num"] + 2)], tmp_path / "b.txt", folder=out)
    assert res["code"] == 0 and f"resuming {out / 'ckpt_last.pt'}" in open(tmp_path / "b.txt").read()


def test_second_ctrl_c_during_a_save_leaves_a_whole_checkpoint(tmp_path, runner):
    """The first SIGINT asks for a stop; the second arrives while the stop's checkpoint is being written (its
    temporary file exists). The save completes, the file loads, and no temporary file is left."""
    data = char_data(tmp_path / "data")
    out = tmp_path / "out"
    argv = [*TRAIN, f"--data_dir={data}", f"--out_dir={out}", "--n_embd=256", "--n_head=4", "--max_iters=3000",
            "--lr_decay_iters=3000", "--eval_interval=3000"]  # a bigger model: a save takes long enough to hit
    k = runner(argv, tmp_path / "k.txt", kill_after=0.0, folder=out, second_signal_on_tmp=True, after_log_lines=5)
    assert k["hit_save"] and k["tmp"] == [], k
    assert k["code"] != 0
    state = load_checkpoint(str(out / "ckpt.pt"))["resume"]
    assert state["iter_num"] > 0

# ----------------------------------------------------------------------------------------------
# the checkpoint matrix: what every script writes, every script that takes a model reads

CHARS = "\n" + "".join(chr(i) for i in range(32, 127))  # 96 characters: the TF fixture's vocabulary size
PRODUCERS = ("pretrain", "sft", "classify", "dpo", "imported", "int8", "int4")
CONSUMERS = ("train init", "train resume", "finetune init", "finetune resume", "align init", "align resume",
             "sample", "eval", "attention_viz", "quantize", "export_hf")


def expected(producer: str, consumer: str):
    """None where the cell must work, else a phrase of its clear error."""
    quantized = producer in ("int8", "int4")
    if quantized and consumer in ("train init", "finetune init", "align init"):
        return "cannot be trained"
    if consumer.endswith("resume"):
        own = {"train": ("pretrain",), "finetune": ("sft", "classify"), "align": ("dpo",)}[consumer.split()[0]]
        if producer not in own:
            return "weights only" if producer in ("imported", "int8", "int4") else "another script's run"
    if quantized and consumer in ("quantize", "export_hf"):
        return "quantized"
    return None


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, runner):
    """Char-level data of 96 characters, instruction / classification / preference records (train and val), a
    text file, the three trainers' tiny command lines, and a pre-trained checkpoint made from them."""
    tmp_path = tmp_path_factory.mktemp("inputs")
    tok = CharTokenizer(list(CHARS))
    text = "".join(TEXT + "".join(CHARS[1:]) + "\n" for _ in range(3))
    data = tmp_path / "data"
    data.mkdir()
    ids = np.array(tok.encode(text), dtype=np.uint16)
    write_tokens(str(data / "train.bin"), ids)
    write_tokens(str(data / "val.bin"), ids[:600])
    tok.save(str(data / "meta.pkl"))
    lines = [line for line in TEXT.splitlines() if line]
    sft = [{"instruction": f"next: {a}", "output": b[:12]} for a, b in zip(lines, lines[1:])]
    cls = [{"text": line, "label": i % 2} for i, line in enumerate(lines)]
    pairs = [{"prompt": a[:10], "chosen": b[:10], "rejected": a[-10:]} for a, b in zip(lines, lines[1:])]
    files = {}
    for name, recs in (("sft", sft), ("cls", cls), ("pairs", pairs)):
        for part, chunk in (("train", recs), ("val", recs[:4])):
            files[name, part] = tmp_path / f"{name}_{part}.jsonl"
            files[name, part].write_text("".join(json.dumps(r) + "\n" for r in chunk))
    (tmp_path / "text.txt").write_text(TEXT)
    tiny = ["--device=cpu", "--compile=False", "--log_interval=1", "--eval_interval=1", "--seed=1"]
    ft = [*tiny, "--batch_size=2", "--eval_iters=1", "--max_iters=2", "--warmup_iters=0", "--learning_rate=1e-3",
          "--block_size=32", "--sample_interval=0", "--prompt_template=none"]
    args = {
        "ft_sft": [*ft, f"--dataset={files['sft', 'train']}", f"--val_split={files['sft', 'val']}"],
        "ft_cls": [*ft, "--task=classify", f"--dataset={files['cls', 'train']}", f"--val_split={files['cls', 'val']}",
                   "--final_eval=False"],
        "al": [*tiny, f"--dataset={files['pairs', 'train']}", f"--val_split={files['pairs', 'val']}", "--max_iters=2",
               "--batch_size=2", "--total_batch_pairs=2", "--val_pairs=4", "--block_size=32", "--warmup_iters=0",
               "--learning_rate=1e-4"],
        "tr": [*tiny, f"--data_dir={data}", "--batch_size=2", "--total_batch_size=0", "--block_size=32",
               "--eval_iters=1", "--warmup_iters=0", "--learning_rate=1e-3", "--min_lr=1e-4", "--max_iters=2",
               "--lr_decay_iters=2"],
    }
    pre = tmp_path / "pre"
    r = runner(["train.py", *args["tr"], "--n_layer=2", "--n_head=2", "--n_embd=32", f"--out_dir={pre}"],
               tmp_path / "pre.txt", folder=pre)
    assert r["code"] == 0, open(tmp_path / "pre.txt").read()[-3000:]
    return dict(dir=tmp_path, data=data, files=files, pre=pre, **args)


def test_every_checkpoint_in_every_script(tmp_path, runner, inputs, capsys):
    import shutil
    data, tr, ft_sft, ft_cls, al = inputs["data"], inputs["tr"], inputs["ft_sft"], inputs["ft_cls"], inputs["al"]
    pre = inputs["pre"]

    def run(argv, name):
        r = runner(argv, tmp_path / f"{name}.txt", folder=tmp_path)
        return r["code"], open(tmp_path / f"{name}.txt").read()

    made = {"pretrain": pre / "ckpt.pt"}  # producer -> checkpoint path
    steps = [
        ("sft", ["finetune.py", *ft_sft, f"--init_from={pre}", f"--out_dir={tmp_path / 'sft'}"],
         tmp_path / "sft" / "ckpt.pt"),
        ("classify", ["finetune.py", *ft_cls, f"--init_from={pre}", f"--out_dir={tmp_path / 'cls'}"],
         tmp_path / "cls" / "ckpt.pt"),
        ("dpo", ["align.py", *al, f"--init_from={tmp_path / 'sft'}", f"--out_dir={tmp_path / 'dpo'}"],
         tmp_path / "dpo" / "ckpt.pt"),
        ("imported", ["load_openai.py", f"--from_dir={os.path.join(ROOT, 'tests', 'fixtures', 'gpt2_tiny_tf')}",
                      f"--out_dir={tmp_path / 'imp'}"], tmp_path / "imp" / "ckpt.pt"),
        ("int8", ["quantize.py", f"--init_from={pre}", "--mode=int8", f"--out_dir={tmp_path / 'q8'}",
                  "--device=cpu"], tmp_path / "q8" / "ckpt_int8.pt"),
        ("int4", ["quantize.py", f"--init_from={pre}", "--mode=int4", "--group_size=32",
                  f"--out_dir={tmp_path / 'q4'}", "--device=cpu"], tmp_path / "q4" / "ckpt_int4.pt"),
    ]
    for producer, argv, path in steps:
        code, out = run(argv, f"make-{producer}")
        assert code == 0 and path.exists(), f"{producer}: {out[-3000:]}"
        made[producer] = path
        if producer == "imported":  # the TF files name no tokenizer: the vocabulary goes next to the checkpoint
            shutil.copy(data / "meta.pkl", tmp_path / "imp" / "meta.pkl")
        assert load_checkpoint(str(path))["kind"] == {"int8": "quantized", "int4": "quantized"}.get(producer, producer)

    def consumer_argv(consumer, producer, path, new):
        if consumer.endswith("resume"):  # the producer's checkpoint as the run in a fresh folder
            os.makedirs(new)
            shutil.copy(path, os.path.join(new, "ckpt.pt"))
            state = load_checkpoint(str(path))["resume"]
            more = ["--init_from=resume", f"--out_dir={new}", f"--max_iters={(state or {}).get('iter_num', 0) + 1}"]
            return [f"{consumer.split()[0]}.py", *more]
        return {"train init": ["train.py", *tr, f"--init_from={path}", f"--out_dir={new}"],
                "finetune init": ["finetune.py", *ft_sft, f"--init_from={path}", f"--out_dir={new}"],
                "align init": ["align.py", *al, f"--init_from={path}", f"--out_dir={new}"],
                "sample": ["sample.py", f"--init_from={path}", "--device=cpu", "--num_samples=1",
                           "--max_new_tokens=3", "--start=From"],
                "eval": ["eval.py", f"--init_from={path}", "--task=perplexity", f"--text_file={inputs['dir'] / 'text.txt'}",
                         "--device=cpu", f"--out_dir={new}"],
                "attention_viz": ["attention_viz.py", f"--init_from={path}", "--text=From fairest creatures",
                                  f"--out_dir={new}", "--device=cpu"],
                "quantize": ["quantize.py", f"--init_from={path}", "--mode=int8", f"--out_dir={new}", "--device=cpu"],
                "export_hf": ["load_openai.py", f"--init_from={path}", f"--export_hf={new}"]}[consumer]

    table, failures = {}, []
    for p in PRODUCERS:
        for c in CONSUMERS:
            new = str(tmp_path / f"{p}-{c.replace(' ', '-')}")
            code, out = run(consumer_argv(c, p, made[p], new), f"{p}-{c.replace(' ', '-')}")
            last = out.strip().splitlines()[-1] if out.strip() else ""
            want = expected(p, c)
            if want is None:
                ok = code == 0
                table[p, c] = "ok" if ok else "FAIL"
            else:
                ok = code != 0 and re_clear(last) and want in last
                table[p, c] = "error" if ok else "FAIL"
            if not ok:
                failures.append(f"{p} -> {c}: exit {code}, expected {want or 'success'}; last line: {last[:400]}")
    width = max(map(len, PRODUCERS)) + 2
    with capsys.disabled():
        print("\ncheckpoint matrix (ok = works, error = the named clear error it should give):")
        print(" " * width + " | ".join(c.ljust(8) for c in CONSUMERS))
        for p in PRODUCERS:
            print(p.ljust(width) + " | ".join(table[p, c].ljust(max(8, len(c))) for c in CONSUMERS))
        print(f"{sum(v != 'FAIL' for v in table.values())}/{len(table)} cells as expected")
    assert not failures, "\n".join(failures)


def re_clear(line: str) -> bool:
    """A clear error: one of the exception types the scripts raise for bad input, with its message."""
    import re
    return re.match(r"^(ValueError|FileNotFoundError|TypeError): \S", line) is not None


@pytest.mark.parametrize("trainer", ["train", "finetune", "align"])
def test_signals_at_random_moments_in_every_trainer(tmp_path, runner, inputs, trainer, capsys):
    """Each trainer gets SIGINT and SIGTERM at 3 seeded random iterations each (once its log.jsonl has a random
    number of lines). Every time: it exits 128 + signal (or had already finished), its checkpoint loads, and `--init_from=resume --out_dir=X` alone ends on the
    uninterrupted run's final figures, bit for bit. Dropout is on: the random state must be restored too."""
    start = {"train": [], "finetune": [f"--init_from={inputs['pre']}"], "align": [f"--init_from={inputs['pre']}"]}
    argv = {"train": ["train.py", *inputs["tr"], "--n_layer=2", "--n_head=2", "--n_embd=32", "--max_iters=40",
                      "--lr_decay_iters=40", "--eval_interval=40"],
            "finetune": ["finetune.py", *inputs["ft_sft"], "--max_iters=40", "--eval_interval=40"],
            "align": ["align.py", *inputs["al"], "--max_iters=40", "--eval_interval=40"]}[trainer]
    argv = [*argv, *start[trainer], "--dropout=0.1"]

    def final(out):
        recs = log(out)
        train_losses = [r["loss"] for r in recs if "loss" in r and r.get("type") == "train"]
        return train_losses, recs[-1] if recs else None

    ref = tmp_path / "ref"
    r = runner([*argv, f"--out_dir={ref}"], tmp_path / "ref.txt", folder=ref)
    assert r["code"] == 0, open(tmp_path / "ref.txt").read()[-3000:]
    want_losses, _ = final(ref)
    assert len(want_losses) >= 40
    rng = np.random.default_rng({"train": 1, "finetune": 2, "align": 3}[trainer])
    stopped = 0
    for trial, sig in enumerate([signal.SIGINT, signal.SIGTERM] * 3):
        out = tmp_path / f"t{trial}"
        lines = int(rng.integers(2, 36))  # a random iteration: after that many lines of log.jsonl
        k = runner([*argv, f"--out_dir={out}"], tmp_path / f"t{trial}.txt", kill_after=0.0, sig=sig, folder=out,
                   after_log_lines=lines)
        text = open(tmp_path / f"t{trial}.txt").read()
        assert k["code"] in (0, 128 + sig), f"trial {trial}: exit {k['code']}\n{text[-3000:]}"
        assert k["tmp"] == []
        if k["code"] == 0:
            continue  # the signal came after the run ended
        stopped += 1
        assert f"--init_from=resume --out_dir={out}" in text, text[-2000:]
        state = load_checkpoint(str(out / "ckpt.pt"))["resume"]
        res = runner([f"{trainer}.py", "--init_from=resume", f"--out_dir={out}"], tmp_path / f"t{trial}-r.txt",
                     folder=out)
        assert res["code"] == 0, open(tmp_path / f"t{trial}-r.txt").read()[-3000:]
        got_losses, _ = final(out)
        assert got_losses == want_losses, f"{trainer} trial {trial} ({signal.Signals(sig).name} at iteration " \
                                          f"{state['iter_num']}): the resumed losses differ"
    with capsys.disabled():
        print(f"\n{trainer}: {stopped}/6 signals stopped the run; every resume equal to the uninterrupted run")
    assert stopped >= 5
