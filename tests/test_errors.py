"""
lib/errors.py and lib/lifecycle.lock_out_dir, with the scripts as real processes (the excepthook acts only there):
a user's bad input ends in one line "error: ..." and exit status 2 with nothing written, LLM_E2E_TRACEBACK=1 brings
the traceback back, Ctrl-C is "interrupted" and 130, internal errors keep their traceback; one run per out_dir.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import run_script

from lib import lifecycle
from lib.tokenizer import CharTokenizer
from lib.tokens import write_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = ["--device=cpu", "--compile=False"]


def run(tmp_path, *argv, extra_env=None) -> subprocess.CompletedProcess:
    """`python ARGV...` as a process of its own, forked from a runner that has imported torch (conftest.py)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LLM_E2E_TRACEBACK", "RANK")}
    env.update({"OMP_NUM_THREADS": "1", "HOME": str(tmp_path / "home"), **(extra_env or {})})
    return run_script(argv, env=env, timeout=120)


def listing(folder):
    """What a folder holds (None: it does not exist), to check that a failed run left it as it was."""
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else None


# (script and flags, text the one line must contain); {tmp} is the test's folder, every run gets --out_dir={tmp}/out
BAD_INPUTS = [
    (["train.py", *CPU, "--nonsense_key=1"], "'nonsense_key'"),
    (["train.py", *CPU, "--n_layer=x"], "n_layer expects a int (default 12), got 'x'"),
    (["train.py", *CPU, "--data_dir={tmp}/no_such_data"], "{tmp}/no_such_data"),
    (["sample.py", *CPU, "--init_from={tmp}/no_such_ckpt"], "{tmp}/no_such_ckpt"),
    (["finetune.py", *CPU, "--task=bogus"], "task must be one of ('instruct', 'classify'), got 'bogus'"),
    (["eval.py", *CPU, "--task=bogus"], "got 'bogus'"),
    (["quantize.py", "--device=cpu", "--mode=int3"], "got 'int3'"),
    (["load_openai.py", "--device=cpu", "--model=gpt3"], "'gpt3'"),
    (["data/shakespeare_char/prepare.py", "--input={tmp}/wide.txt"], "70,000 distinct characters"),
    (["train.py", *CPU, "--n_head=0"], "n_head must be at least 1, got 0"),
    (["train.py", *CPU, "--n_embd=100", "--n_head=3"], "n_embd must be a multiple of n_head=3, got 100"),
    (["train.py", *CPU, "--dropout=1.5"], "dropout must be in [0, 1), got 1.5"),
    (["train.py", *CPU, "--learning_rate=-0.1"], "learning_rate must be 0 or more, got -0.1"),
    (["train.py", "--device=mps"], "device='mps' was requested but this torch has no usable Apple MPS backend"),
    # data checked against the model before the first step (TINY: a model that would start in a second)
    (["train.py", *CPU, "--data_dir={tmp}/chars_no_vocab", "{TINY}"], "holds character-level token files (its "
                                                                      "meta.json says so) but no vocabulary"),
    (["train.py", *CPU, "--data_dir={tmp}/chars_other_vocab", "{TINY}"], "the meta.pkl belongs to another corpus"),
    (["train.py", *CPU, "--data_dir={tmp}/ids_recorded", "{TINY}"], "hold ids up to 60000 (their meta.json, or read "
                                                                   "now), beyond the model's vocabulary of 50304 ids"),
    (["train.py", *CPU, "--data_dir={tmp}/ids_unrecorded", "{TINY}"], "hold ids up to 60000 (their meta.json, or "
                                                                     "read now), beyond the model's vocabulary"),
]
TINY = ["--n_layer=1", "--n_head=1", "--n_embd=8", "--block_size=8", "--batch_size=2", "--total_batch_size=0", "--max_iters=1",
        "--eval_iters=1", "--warmup_iters=0", "--lr_decay_iters=1"]


def bad_data(tmp_path):
    """Token folders whose description does not fit their files or a model (the audit's silent cases)."""
    text = "to be or not to be, that is the question\n" * 20
    tok = CharTokenizer.from_text(text)
    ids = np.array(tok.encode(text), dtype=np.uint16)
    for name in ("chars_no_vocab", "chars_other_vocab", "ids_recorded", "ids_unrecorded"):
        os.makedirs(tmp_path / name)
        write_tokens(str(tmp_path / name / "train.bin"), ids if name.startswith("chars") else ids * 0 + 60000)
        write_tokens(str(tmp_path / name / "val.bin"), ids if name.startswith("chars") else ids * 0 + 60000)
    described = {"tokenizer": "char", "vocab_size": tok.n_vocab}
    (tmp_path / "chars_no_vocab" / "meta.json").write_text(json.dumps(described))
    (tmp_path / "chars_other_vocab" / "meta.json").write_text(json.dumps(
        {**described, "itos": {str(i): c for i, c in enumerate(tok.chars)}}))
    CharTokenizer.from_text("another corpus altogether").save(str(tmp_path / "chars_other_vocab" / "meta.pkl"))
    (tmp_path / "ids_recorded" / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "max_id": 60000}))


def test_bad_inputs_are_one_line_and_touch_nothing(tmp_path):
    """Each user error: exit status 2, stderr is `error: ...` naming the offending value, no traceback, and the
    --out_dir is as it was (not created, or unchanged where the script made it before reading its input)."""
    # 70,000 distinct characters (code points above the surrogates): more ids than uint16 holds
    (tmp_path / "wide.txt").write_text("".join(map(chr, range(0x10000, 0x10000 + 70_000))), encoding="utf-8")
    bad_data(tmp_path)
    for argv, expected in BAD_INPUTS:
        argv = [x for a in argv for x in (TINY if a == "{TINY}" else [a])]
        out = tmp_path / f"out_{argv[0].replace('/', '_')}_{len(listing(tmp_path))}"
        if argv[0].startswith("data/"):
            out.mkdir()  # a prepare script makes its folder first: it must stay empty
        before = listing(out)
        argv = [a.format(tmp=tmp_path) for a in argv] + [f"--out_dir={out}"]
        r = run(tmp_path, *argv)
        line = expected.format(tmp=tmp_path)
        assert r.returncode == 2, f"{argv}: exit {r.returncode}\n{r.stderr[-3000:]}"
        assert "Traceback" not in r.stderr and r.stderr.startswith("error: "), f"{argv}:\n{r.stderr[-3000:]}"
        assert line in r.stderr, f"{argv}: {line!r} not in\n{r.stderr}"
        assert listing(out) == before, f"{argv} changed {out}: {before} -> {listing(out)}"


def test_full_traceback_on_request(tmp_path):
    r = run(tmp_path, "train.py", *CPU, "--n_layer=x", f"--out_dir={tmp_path}/out",
            extra_env={"LLM_E2E_TRACEBACK": "1"})
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr
    assert "TypeError: command line: n_layer expects a int" in r.stderr


def test_only_rank_0_prints_under_torchrun(tmp_path):
    r = run(tmp_path, "train.py", *CPU, "--n_layer=x", extra_env={"RANK": "1"})
    assert r.returncode == 2 and r.stderr == ""


def test_internal_errors_keep_their_traceback(tmp_path):
    """Not a user's mistake: a RuntimeError anywhere, or a FileNotFoundError raised inside numpy (or from code that
    is no file of the project, like python -c), keeps Python's traceback and exit status 1."""
    for code in ["raise RuntimeError('boom')",
                 "import numpy as np; np.load('/no/such/file.npy')",
                 "raise ValueError('from -c')"]:
        r = run(tmp_path, "-c", f"from lib.errors import install; install(); {code}")
        assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr, (code, r.stderr)
        assert "error: " not in r.stderr.splitlines()[0]


def test_ctrl_c_is_one_line_and_130(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LLM_E2E_TRACEBACK", "RANK")}
    p = subprocess.Popen([sys.executable, "-c", "from lib.errors import install; install(); import time; "
                          "print('ready', flush=True); time.sleep(60)"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "ready\n"
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 130 and err == "interrupted\n", (p.returncode, err)


# ----------------------------------------------------------------------------------------------
# one writer per out_dir

HOLD = "import sys, time; from lib.lifecycle import lock_out_dir; lock_out_dir(sys.argv[1]); print('locked', " \
       "flush=True); time.sleep(120)"


def test_out_dir_lock_names_its_holder_and_dies_with_it(tmp_path):
    out = str(tmp_path / "out")
    p = subprocess.Popen([sys.executable, "-c", HOLD, out, "--marker"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "locked\n"
        with pytest.raises(ValueError, match=rf"--out_dir={out}: process {p.pid} \(-c {out} --marker\).*another "
                                             rf"--out_dir"):
            lifecycle.lock_out_dir(out)
        # a training run on that folder stops before it writes anything
        data = tmp_path / "data"
        data.mkdir()
        tok = CharTokenizer.from_text("to be or not to be, that is the question\n" * 20)
        ids = np.array(tok.encode("to be or not to be, that is the question\n" * 20), dtype=np.uint16)
        write_tokens(str(data / "train.bin"), ids[:700])
        write_tokens(str(data / "val.bin"), ids[700:])
        tok.save(str(data / "meta.pkl"))
        r = run(tmp_path, "train.py", *CPU, f"--data_dir={data}", f"--out_dir={out}", "--n_layer=2", "--n_head=2",
                "--n_embd=32", "--block_size=16", "--batch_size=2", "--total_batch_size=0", "--max_iters=2")
        assert r.returncode == 2 and r.stderr.startswith("error: another run is writing"), r.stderr[-3000:]
        assert str(p.pid) in r.stderr and sorted(os.listdir(out)) == [".lock"]
    finally:
        p.kill()
        p.wait()
    # the holder is gone: its lock went with it
    time.sleep(0.1)
    lifecycle.lock_out_dir(out)
    with open(os.path.join(out, ".lock")) as f:
        assert f.read().split("\n")[0] == str(os.getpid())
    lifecycle.unlock_out_dir()  # as a run's end does: a child may take it now
    r = run(tmp_path, "-c", HOLD.replace("time.sleep(120)", "None"), out)
    assert r.returncode == 0 and r.stdout == "locked\n", r.stderr[-3000:]


def test_a_new_run_never_replaces_a_checkpoint_silently(tmp_path):
    """A folder holding any checkpoint (here an import's, not a training run's): a new train.py run stops before
    building anything, names what is there and the three choices; with --overwrite=True it runs, and the earlier
    logs are kept under new names (log.1.jsonl, log.2.jsonl), never over each other."""
    data = tmp_path / "chars"
    text = "to be or not to be, that is the question\n" * 20
    os.makedirs(data)
    tok = CharTokenizer.from_text(text)
    ids = np.array(tok.encode(text), dtype=np.uint16)
    write_tokens(str(data / "train.bin"), ids)
    write_tokens(str(data / "val.bin"), ids)
    tok.save(str(data / "meta.pkl"))
    out = tmp_path / "out"
    os.makedirs(out)
    (out / "ckpt.pt").write_bytes(b"an imported model")
    (out / "log.jsonl").write_text('{"type": "train", "iter": 1, "loss": 1.0}\n')
    args = ["train.py", *CPU, f"--data_dir={data}", f"--out_dir={out}", *TINY]
    r = run(tmp_path, *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"--out_dir={out} already holds ckpt.pt, which a new train.py run would overwrite" in r.stderr
    assert "--init_from=resume" in r.stderr and "--overwrite=True" in r.stderr and "NEW_DIR" in r.stderr
    assert (out / "ckpt.pt").read_bytes() == b"an imported model" and listing(out) == ["ckpt.pt", "log.jsonl"]
    for n in (1, 2):
        r = run(tmp_path, *args, "--overwrite=True")
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"the earlier run's log in {str(out)!r} is now log.{n}.jsonl" in r.stdout
    assert (out / "log.1.jsonl").read_text() == '{"type": "train", "iter": 1, "loss": 1.0}\n'
    assert sorted(listing(out)) == [".lock", "ckpt.pt", "log.1.jsonl", "log.2.jsonl", "log.jsonl", "loss.png"]


def test_imports_and_quantized_copies_are_not_replaced_silently(tmp_path):
    """load_openai.py --out_dir and quantize.py's ckpt_<mode>.pt: a file already there stops the script before it
    loads or downloads anything, naming the file and --overwrite=True."""
    out = tmp_path / "out"
    os.makedirs(out)
    (out / "ckpt.pt").write_bytes(b"an earlier import")
    (out / "ckpt_int8.pt").write_bytes(b"an earlier quantization")
    for argv, expected in ((["load_openai.py", "--model=gpt2", f"--out_dir={out}"],
                            f"--out_dir={out} already holds ckpt.pt, which this import would overwrite"),
                           (["quantize.py", "--device=cpu", "--mode=int8", f"--out_dir={out}"],
                            f"{out / 'ckpt_int8.pt'} exists already (an earlier int8 quantization); --overwrite=True")):
        r = run(tmp_path, *argv)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and expected in r.stderr, r.stderr[-2000:]
    assert (out / "ckpt.pt").read_bytes() == b"an earlier import" and listing(out) == ["ckpt.pt", "ckpt_int8.pt"]
