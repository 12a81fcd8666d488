"""
train.py end to end, as subprocesses on CPU with tiny models (2 layers, 2 heads, 32 dims, block 16) and char-level
data written into tmp_path: the loss falls on real text and one batch is overfit; a resumed run continues
bit-identically; DDP with 2 ranks (torchrun, gloo) follows one process with twice the gradient accumulation;
Ctrl-C saves a loadable checkpoint; a non-finite loss stops the run unsaved; wandb without a login falls back to
offline; bad config values, bad data and resuming with another model fail early with clear errors.

The resume, DDP, SIGINT and wandb runs are real processes, with OMP_NUM_THREADS=1: tiny models gain nothing from
more threads, and the two DDP ranks then do not fight over two cores; the resume and wandb runs are forked from
conftest.py's runner. The other runs execute train.py inside the test process (runpy, one thread). Both save an
interpreter and torch start-up each.
"""

import json
import os
import re
import runpy
import signal
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from conftest import run_script

from lib.checkpoint import load_checkpoint, save_checkpoint
from lib.models import load_model
from lib.tokenizer import CharTokenizer
from lib.tokens import write_tokens
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# real text: three of Shakespeare's sonnets (18, 29, 116), public domain
TEXT = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.

When, in disgrace with fortune and men's eyes,
I all alone beweep my outcast state,
And trouble deaf heaven with my bootless cries,
And look upon myself and curse my fate,
Wishing me like to one more rich in hope,
Featured like him, like him with friends possess'd,
Desiring this man's art and that man's scope,
With what I most enjoy contented least;
Yet in these thoughts myself almost despising,
Haply I think on thee, and then my state,
Like to the lark at break of day arising
From sullen earth, sings hymns at heaven's gate;
For thy sweet love remember'd such wealth brings
That then I scorn to change my state with kings.

Let me not to the marriage of true minds
Admit impediments. Love is not love
Which alters when it alteration finds,
Or bends with the remover to remove:
O no! it is an ever-fixed mark
That looks on tempests and is never shaken;
It is the star to every wandering bark,
Whose worth's unknown, although his height be taken.
Love's not Time's fool, though rosy lips and cheeks
Within his bending sickle's compass come;
Love alters not with his brief hours and weeks,
But bears it out even to the edge of doom.
If this be error and upon me proved,
I never writ, nor no man ever loved.
"""

# the tiny model and a short run; each test adds what it checks
TINY = ["--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16",
        "--batch_size=4", "--total_batch_size=0", "--data_order=random", "--eval_iters=2", "--log_interval=1",
        "--warmup_iters=2", "--learning_rate=1e-2", "--min_lr=1e-3", "--seed=7"]


def char_data(folder, text: str = TEXT) -> str:
    """train.bin / val.bin / meta.pkl of `text` (last 10% = val), as data/shakespeare_char/prepare.py writes them."""
    os.makedirs(folder, exist_ok=True)
    tok = CharTokenizer.from_text(text)
    ids = np.array(tok.encode(text), dtype=np.uint16)
    n = int(len(ids) * 0.9)
    write_tokens(os.path.join(folder, "train.bin"), ids[:n])
    write_tokens(os.path.join(folder, "val.bin"), ids[n:])
    tok.save(os.path.join(folder, "meta.pkl"))
    return str(folder)


def env(tmp_path) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    # hermetic: no home-directory config or cache, and no wandb login
    return {**e, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HOME": str(tmp_path / "home"),
            "NETRC": str(tmp_path / "no-netrc"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
            "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_DATA_DIR": str(tmp_path / "wandb-data")}


def train(tmp_path, *args, launcher=None) -> subprocess.CompletedProcess:
    """Run train.py as its own process (forked from conftest.py's runner; or processes, with launcher=torchrun's
    command) and check that it succeeded."""
    if launcher is None:
        r = run_script(["train.py", *TINY, *args], env=env(tmp_path))
    else:
        r = subprocess.run([*launcher, "train.py", *TINY, *args], cwd=ROOT, env=env(tmp_path), capture_output=True,
                           text=True, timeout=600)
    assert r.returncode == 0, f"train.py failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def records(out_dir, kind: str) -> list:
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [rec for rec in map(json.loads, f) if rec["type"] == kind]


def run_inprocess(monkeypatch, *args):
    """Run train.py in this process: no interpreter start-up. For the runs that need no process of their own
    (the DDP, resume and SIGINT tests start real processes)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["train.py", *TINY, *args])
    handlers, threads = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
    finally:  # train.py installs its Ctrl-C handler: give pytest its own back
        for s, h in handlers.items():
            signal.signal(s, h)
        torch.set_num_threads(threads)

# ----------------------------------------------------------------------------------------------
# learning


def test_loss_falls_on_real_text_with_config_file_and_overrides(tmp_path, monkeypatch, capsys):
    data = char_data(tmp_path / "data")
    cfg = tmp_path / "cfg.py"
    cfg.write_text("max_iters = 50\nlr_decay_iters = max_iters\neval_interval = 25\nlearning_rate = 1.0\n")
    out = tmp_path / "out"
    run_inprocess(monkeypatch, str(cfg), f"--data_dir={data}", f"--out_dir={out}", "--learning_rate=2e-2",
                  "--batch_size=8", "--eval_iters=4")
    stdout = capsys.readouterr().out
    # the config file applies, and the command line wins over it
    assert f"config {cfg}: max_iters = 50" in stdout and "override: learning_rate = 0.02" in stdout
    evals = records(out, "eval")
    assert [e["iter"] for e in evals] == [0, 25, 50]
    # From about ln(vocab) = 3.9 at initialisation to near the characters' unigram entropy (~3.0 nats for
    # English): a drop of 0.6 is far outside the noise of 4 batches of 128 characters.
    assert evals[0]["val_loss"] > 3.7 and evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.6, evals
    steps = records(out, "train")
    assert [s["iter"] for s in steps] == list(range(1, 51)) and steps[0]["lr"] == pytest.approx(2e-2 / 3)
    assert np.mean([s["loss"] for s in steps[-10:]]) < steps[0]["loss"] - 0.6
    assert all(s["grad_norm"] > 0 and s["tok_per_s"] > 0 and s["mfu"] > 0 for s in steps)
    # one stable, greppable line per log_interval
    assert len(re.findall(r"^iter \d+/50 \| loss \d+\.\d{4} \| lr \S+ \| norm \d+\.\d{4} \| [\d.]+ ms/iter \| "
                          r"[\d,]+ tok/s \| MFU [\d.]+%$", stdout, re.M)) == 50
    assert "done: 50 iterations" in stdout and "best val loss" in stdout
    assert open(out / "loss.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # the checkpoint contract; the char vocabulary travels with it, sample.py needs nothing else
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["kind"] == "pretrain" and {"model", "model_args", "config", "tokenizer", "resume"} <= set(ckpt)
    state = ckpt["resume"]
    assert {"optimizer", "rng", "loader", "scaler"} <= set(state) and len(state["rng"]) == 1
    assert state["iter_num"] == 50 and state["best"] == {"name": "val_loss", "value": pytest.approx(evals[-1]["val_loss"])}
    assert ckpt["config"]["learning_rate"] == 0.02 and ckpt["config"]["max_iters"] == 50
    assert ckpt["model_args"] == dict(block_size=16, vocab_size=CharTokenizer.from_text(TEXT).n_vocab, n_layer=2,
                                      n_head=2, n_embd=32, dropout=0.0, bias=True)
    model, _, tok = load_model("resume", str(out))
    assert tok.decode(tok.encode("Love is not love")) == "Love is not love"
    x = torch.tensor([tok.encode(TEXT[:16])])
    assert model(x, x)[1].item() < 3.5


def test_overfits_one_batch(tmp_path, monkeypatch):
    # a train split of block_size + 1 tokens holds exactly one window: every batch is that batch
    data = char_data(tmp_path / "data", TEXT[:170])
    with open(os.path.join(data, "train.bin"), "r+b") as f:
        f.truncate(2 * 17)
    out = tmp_path / "out"
    run_inprocess(monkeypatch, f"--data_dir={data}", f"--out_dir={out}", "--max_iters=60", "--decay_lr=False",
                  "--eval_interval=60")
    losses = [s["loss"] for s in records(out, "train")]
    assert losses[0] > 3.5 and losses[-1] < 0.01, losses

# ----------------------------------------------------------------------------------------------
# exact resume, DDP, interrupts


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_bit_identically(tmp_path, optimizer):
    """A run of 12 iterations equals one stopped at 6 and resumed, to the last bit of every logged loss. Dropout
    and 2 accumulation steps make sure the random state and the loader position are restored too; with Muon,
    both optimizers' states (Muon's momentum, AdamW's moments) travel in the checkpoint."""
    data = char_data(tmp_path / "data")
    args = [f"--data_dir={data}", "--dropout=0.1", "--total_batch_size=128", "--lr_decay_iters=12",
            "--eval_interval=12", f"--optimizer={optimizer}"]
    train(tmp_path, *args, "--max_iters=12", f"--out_dir={tmp_path / 'full'}")
    train(tmp_path, *args, "--max_iters=6", f"--out_dir={tmp_path / 'part'}")
    saved = load_checkpoint(str(tmp_path / "part"))
    assert saved["resume"]["iter_num"] == 6 and saved["config"]["optimizer"] == optimizer
    if optimizer == "muon":
        assert set(saved["resume"]["optimizer"]) == {"muon", "adamw"}
    # no other flag: the saved config is the base (only max_iters changes between the legs)
    r = run_script(["train.py", "--init_from=resume", f"--out_dir={tmp_path / 'part'}", "--max_iters=12"],
                   env=env(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "(pretrain, iteration 6) with its saved config: changed max_iters: 6 -> 12" in r.stdout
    full, part = records(tmp_path / "full", "train"), records(tmp_path / "part", "train")
    assert [s["iter"] for s in part] == list(range(1, 13))
    assert [s["loss"] for s in part[6:]] == [s["loss"] for s in full[6:]]
    assert [s["grad_norm"] for s in part[6:]] == [s["grad_norm"] for s in full[6:]]
    assert records(tmp_path / "part", "eval")[-1]["val_loss"] == records(tmp_path / "full", "eval")[-1]["val_loss"]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_ddp_two_ranks_match_one_process_with_twice_the_accumulation(tmp_path, monkeypatch, capsys, optimizer):
    """BinLoader numbers batches globally: micro-step m of rank r at iteration k draws batch (k*A + m)*W + r.
    So 2 ranks x 1 micro-step and 1 rank x 2 micro-steps see the same batches at every iteration, and DDP's
    gradient average equals the accumulated one up to float rounding. Muon orthogonalizes the averaged gradient
    on every rank alike, so the ranks stay in step. (The single process runs in-process.)"""
    data = char_data(tmp_path / "data")
    args = [f"--data_dir={data}", "--total_batch_size=128", "--max_iters=8", "--lr_decay_iters=8",
            "--eval_interval=8", f"--optimizer={optimizer}"]
    run_inprocess(monkeypatch, *args, f"--out_dir={tmp_path / 'one'}")
    assert "2 accumulation step(s)" in capsys.readouterr().out
    ddp = train(tmp_path, *args, f"--out_dir={tmp_path / 'ddp'}",
                launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    assert "DDP world size 2" in ddp.stdout and "2 rank(s) x 1 accumulation step(s)" in ddp.stdout
    assert ddp.stdout.count("iter 8/8 |") == 1  # only rank 0 prints
    a, b = records(tmp_path / "one", "train"), records(tmp_path / "ddp", "train")
    assert len(a) == len(b) == 8
    np.testing.assert_allclose([s["loss"] for s in b], [s["loss"] for s in a], rtol=0, atol=1e-5)
    ea, eb = records(tmp_path / "one", "eval"), records(tmp_path / "ddp", "eval")
    np.testing.assert_allclose([e["val_loss"] for e in eb], [e["val_loss"] for e in ea], rtol=0, atol=1e-5)
    assert load_checkpoint(str(tmp_path / "ddp"))["resume"]["iter_num"] == 8


def test_sigint_finishes_the_step_and_saves_a_loadable_checkpoint(tmp_path):
    data = char_data(tmp_path / "data")
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "train.py", *TINY, f"--data_dir={data}", f"--out_dir={out}",
                          "--max_iters=100000", "--eval_interval=100000", "--log_interval=1"], cwd=ROOT,
                         env=env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in p.stdout:  # wait until training runs (the handler is installed by then)
        lines.append(line)
        if line.startswith("iter 3/"):
            p.send_signal(signal.SIGINT)
            break
    rest, _ = p.communicate(timeout=120)
    output = "".join(lines) + rest
    assert p.returncode == 128 + signal.SIGINT, output
    assert "SIGINT: finishing this step" in output and "--init_from=resume" in output.split("Resume with:")[1]
    state = load_checkpoint(str(out / "ckpt.pt"))["resume"]
    assert state["iter_num"] >= 3 and f"saved {out / 'ckpt.pt'} (iteration {state['iter_num']:,})" in output
    assert state["loader"]["step"] == state["iter_num"]
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    GPT(GPTConfig(**ckpt["model_args"])).load_state_dict(ckpt["model"])


def test_non_finite_loss_stops_without_saving(tmp_path, monkeypatch):
    # lr 1e20 makes the first update's weights so large that the second step's forward overflows
    data = char_data(tmp_path / "data")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:  # sys.exit(message): printed to stderr, exit status 1
        run_inprocess(monkeypatch, f"--data_dir={data}", f"--out_dir={out}", "--learning_rate=1e20",
                      "--decay_lr=False", "--grad_clip=0.0", "--max_iters=20", "--eval_interval=10",
                      "--log_interval=5")
    message = str(stop.value.code)
    # found at the first log line (iteration 5), but named where it happened
    assert message.startswith("ERROR: the loss became nan at iteration 2: the weights are broken, so "
                              "nothing was saved"), message
    assert "Lower --learning_rate" in message and "--init_from=resume" in message
    assert not os.path.exists(out / "ckpt.pt")

# ----------------------------------------------------------------------------------------------
# wandb, init from a checkpoint file


def test_wandb_without_login_falls_back_to_offline_and_init_from_a_checkpoint_file(tmp_path):
    data = char_data(tmp_path / "data")
    tok = CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    start = GPT(GPTConfig(block_size=32, vocab_size=tok.n_vocab, n_layer=2, n_head=2, n_embd=32))
    save_checkpoint({"model": start.state_dict(), "model_args": asdict(start.config), "tokenizer": tok.meta(),
                     "config": {}}, str(tmp_path / "start.pt"))
    out = tmp_path / "out"
    r = train(tmp_path, f"--data_dir={data}", f"--out_dir={out}", f"--init_from={tmp_path / 'start.pt'}",
              "--max_iters=4", "--eval_interval=4", "--wandb_log=True", "--wandb_mode=online",
              "--sample_interval=2", "--sample_prompt=Love", "--sample_tokens=8")
    assert "WARNING: no wandb login found" in r.stdout
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, os.listdir(out / "wandb")
    # the run's record log (read by `wandb sync`) holds every metric; the samples are a table
    log = open(next(runs[0].glob("run-*.wandb")), "rb").read()
    assert all(key in log for key in (b"val_loss", b"train_loss", b"loss", b"lr", b"grad_norm", b"tok_per_s"))
    samples = [rec["text"] for rec in records(out, "sample")]
    table = json.load(open(next(runs[0].glob("files/media/table/samples_4_*.table.json"))))
    assert table == {"columns": ["iter", "text"], "data": [[2, samples[0]], [4, samples[1]]]}
    # started from the file's weights, cut to the requested context, a new run at iteration 0
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["model_args"]["block_size"] == 16 and ckpt["resume"]["iter_num"] == 4
    assert records(out, "eval")[0]["iter"] == 0

def test_streaming_source_trains_and_resumes(tmp_path, monkeypatch, capsys):
    """data_source='stream': documents of a local jsonl tokenized while training (GPT-2 ids); validation from
    a prepared val.bin; the stream position goes into the checkpoint and a resumed run picks it up."""
    from lib.tokenizer import get_tokenizer
    lines = [line for line in TEXT.splitlines() if line]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": " ".join(lines[i:i + 3])}) + "\n" for i in range(0, len(lines), 3)))
    val = tmp_path / "val"
    os.makedirs(val)
    write_tokens(str(val / "val.bin"), get_tokenizer("gpt2").encode_ordinary(TEXT))
    out = tmp_path / "out"
    args = ["--data_source=stream", f"--stream_dataset={docs}", "--stream_name=", "--shuffle_buffer=8",
            f"--data_dir={val}", f"--out_dir={out}", "--eval_interval=4", "--lr_decay_iters=8"]
    run_inprocess(monkeypatch, *args, "--max_iters=4")
    assert "data: streaming" in capsys.readouterr().out
    assert [(e["iter"], e["train_loss"]) for e in records(out, "eval")] == [(0, None), (4, None)]  # val only
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["tokenizer"] == {"tokenizer": "gpt2"} and ckpt["model_args"]["vocab_size"] == 50304
    assert isinstance(ckpt["resume"]["loader"], list) and len(ckpt["resume"]["loader"]) == 1  # one per rank
    run_inprocess(monkeypatch, *args, "--max_iters=6", "--init_from=resume")
    assert "iteration 4" in capsys.readouterr().out
    assert [s["iter"] for s in records(out, "train")] == list(range(1, 7))

# ----------------------------------------------------------------------------------------------
# clear errors before any work


@pytest.mark.parametrize("args, error, match", [
    (["--batch_size=abc"], TypeError, r"batch_size expects a int \(default 16\), got 'abc'"),
    (["--n_layers=4"], ValueError, r"unknown config key 'n_layers'; did you mean n_layer"),
    (["--total_batch_size=100"], ValueError, r"total_batch_size=100 tokens is not a multiple of batch_size \* "
                                             r"block_size \* ranks = 4 \* 16 \* 1 = 64; use e.g. "
                                             r"--total_batch_size=128"),
    (["--data_order=shuffled"], ValueError, r"data_order must be one of \('random', 'sequential'\), got 'shuffled'"),
    (["--init_from=gpt3"], ValueError, r"init_from must be 'scratch', 'resume', one of .* got 'gpt3'"),
    (["--warmup_iters=100", "--lr_decay_iters=50"], ValueError, r"would decay \(at iteration 50\) before its warmup"),
])
def test_bad_config_fails_early(tmp_path, monkeypatch, args, error, match):
    data = char_data(tmp_path / "data")
    with pytest.raises(error, match=match):
        run_inprocess(monkeypatch, f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}", *args)
    assert not os.path.exists(tmp_path / "out")


def test_unknown_key_in_config_file_and_missing_data(tmp_path, monkeypatch):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("learning_rat = 1e-3\n")
    with pytest.raises(ValueError, match=rf"config file {re.escape(str(cfg))}: unknown config key 'learning_rat'; "
                                         r"did you mean learning_rate"):
        run_inprocess(monkeypatch, str(cfg))
    with pytest.raises(FileNotFoundError, match=r"no 'train' token files in .*empty.* Prepare the data first"):
        run_inprocess(monkeypatch, f"--data_dir={tmp_path / 'empty'}", f"--out_dir={tmp_path / 'out'}")


def test_resume_with_another_model_or_vocabulary_lists_the_differences(tmp_path, monkeypatch):
    data = char_data(tmp_path / "data")
    tok = CharTokenizer.from_text(TEXT)
    model = GPT(GPTConfig(block_size=16, vocab_size=tok.n_vocab, n_layer=2, n_head=2, n_embd=32))
    out = tmp_path / "out"
    save_checkpoint({"model": model.state_dict(), "model_args": asdict(model.config), "tokenizer": tok.meta(),
                     "config": {}, "iter_num": 5, "best_val_loss": 3.0, "optimizer": {}}, str(out / "ckpt.pt"))
    with pytest.raises(ValueError, match=r"resuming .*ckpt.pt.* with different settings would make another run: "
                                         r"n_embd: 32 -> 48; n_layer: 2 -> 3\. Only these may change"):
        run_inprocess(monkeypatch, f"--data_dir={data}", f"--out_dir={out}", "--init_from=resume", "--n_layer=3",
                      "--n_embd=48")
    other = char_data(tmp_path / "other", TEXT.upper())
    with pytest.raises(ValueError, match=r"does not fit the data: the checkpoint's vocabulary is char \(\d+ ids\), "
                                         r"the data's char \(\d+ ids"):
        run_inprocess(monkeypatch, f"--data_dir={other}", f"--out_dir={out}", "--init_from=resume")

