"""The shared mechanisms of lib/: checkpoint contract, resume config, schedule, padding, downloads, logs."""

import http.server
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from configurator import configure
from lib.checkpoint import load_checkpoint, make_checkpoint, resume_path, resume_state, save_checkpoint
from lib.download import download
from lib.finetuning import pad_right
from lib.lifecycle import resume_run, rng_state, truncate_log
from lib.logs import append_jsonl, read_jsonl
from lib.models import load_model
from lib.optim import check_schedule, lr_at, make_optimizer
from lib.progress import progress
from lib.runtime import local_rank
from model import GPT, GPTConfig


def tiny_ckpt(kind="pretrain", resume=True, config=None):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))
    opt = make_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    state = resume_state(5, "val_loss", 2.5, opt.state_dict(), None, [rng_state()]) if resume else None
    from dataclasses import asdict
    return make_checkpoint(kind, model.state_dict(), asdict(model.config), config or {"lr": 1.0, "max_iters": 10},
                                  {"tokenizer": "gpt2"}, state)


def test_checkpoint_round_trip_and_no_tmp_left(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(tiny_ckpt(), path)
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"
    ckpt = load_checkpoint(path)
    assert ckpt["kind"] == "pretrain" and ckpt["resume"]["iter_num"] == 5 and ckpt["path"] == path
    assert ckpt["resume"]["best"] == {"name": "val_loss", "value": 2.5}


def test_stale_tmp_of_a_killed_writer_is_removed(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = f"{path}.{int(dead.stdout)}.tmp"
    open(stale, "wb").write(b"torn")
    save_checkpoint(tiny_ckpt(), path)
    assert not os.path.exists(stale)


def test_nanogpt_layout_is_upgraded(tmp_path):
    """nanoGPT's train.py keys read as the contract: a resumable pre-training run, or weights only."""
    new = tiny_ckpt()
    old = {"model": new["model"], "model_args": new["model_args"], "optimizer": new["resume"]["optimizer"],
           "iter_num": 7, "best_val_loss": 1.5, "config": {"dataset": "x"}}
    torch.save(old, tmp_path / "a.pt")
    ckpt = load_checkpoint(str(tmp_path / "a.pt"))
    assert ckpt["kind"] == "pretrain" and ckpt["resume"]["iter_num"] == 7
    assert ckpt["resume"]["best"] == {"name": "val_loss", "value": 1.5}
    weights = {"model": new["model"], "model_args": new["model_args"], "optimizer": None, "iter_num": 0}
    torch.save(weights, tmp_path / "c.pt")
    ckpt = load_checkpoint(str(tmp_path / "c.pt"))
    assert ckpt["kind"] == "imported" and ckpt["resume"] is None


def test_quantized_refused_for_training(tmp_path):
    ckpt = tiny_ckpt("quantized", resume=False)
    ckpt["quantization"] = {"mode": "int8", "source": "out-x/ckpt.pt"}
    save_checkpoint(ckpt, str(tmp_path / "q.pt"))
    with pytest.raises(ValueError, match=r"int8-quantized.*cannot be trained.*--init_from=out-x/ckpt.pt"):
        load_model(str(tmp_path / "q.pt"), for_training=True)


def test_resume_run_saved_config_is_the_base(tmp_path):
    defaults = {"out_dir": str(tmp_path), "ckpt_name": "ckpt.pt", "init_from": "scratch", "lr": 0.5,
                "max_iters": 3, "batch_size": 4}
    save_checkpoint(tiny_ckpt(config={**defaults, "lr": 1e-3, "max_iters": 10, "batch_size": 8}),
                           str(tmp_path / "ckpt.pt"))
    explicit = set()
    config = configure(defaults, ["--init_from=resume", f"--out_dir={tmp_path}", "--max_iters=20"], verbose=False,
                       explicit=explicit)
    assert explicit == {"init_from", "out_dir", "max_iters"}
    out, ckpt = resume_run(config, explicit, ("pretrain",), "train.py")
    assert out["lr"] == 1e-3 and out["batch_size"] == 8 and out["max_iters"] == 20 and out["init_from"] == "resume"
    explicit = set()
    config = configure(defaults, ["--init_from=resume", f"--out_dir={tmp_path}", "--batch_size=2"], verbose=False,
                       explicit=explicit)
    with pytest.raises(ValueError, match=r"would make another run: batch_size: 8 -> 2"):
        resume_run(config, explicit, ("pretrain",), "train.py")
    with pytest.raises(ValueError, match=r"is a checkpoint of kind 'pretrain' \(another script's run\).*--init_from="):
        resume_run(config, set(), ("dpo",), "align.py")


def test_resume_path_prefers_the_newer_last_checkpoint(tmp_path):
    save_checkpoint(tiny_ckpt(), str(tmp_path / "ckpt.pt"))
    assert resume_path(str(tmp_path)) == str(tmp_path / "ckpt.pt")
    save_checkpoint(tiny_ckpt(), str(tmp_path / "ckpt_last.pt"))
    os.utime(tmp_path / "ckpt.pt", (1, 1))
    assert resume_path(str(tmp_path)) == str(tmp_path / "ckpt_last.pt")
    with pytest.raises(FileNotFoundError, match="found no checkpoint"):
        resume_path(str(tmp_path / "nothing"))


def test_lr_schedule_and_warnings(capsys):
    lrs = [lr_at(it, 1.0, 10, 100, 0.1) for it in range(120)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11) and lrs[10] == pytest.approx(1.0)
    assert lrs[100] == lrs[119] == 0.1 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(50, 1.0, 10, 100, 0.1, decay=False) == 1.0
    check_schedule(1e-6, 150, 31, 31, 1e-7, decay=False)
    out = capsys.readouterr().out
    assert "warmup_iters=150 is not shorter than the run (max_iters=31)" in out and "only 2.05e-07" in out
    with pytest.raises(ValueError, match="decay.*before its warmup ends"):
        check_schedule(1e-3, 100, 50, 200, 1e-4)
    check_schedule(1e-3, 10, 100, 100, 1e-4)
    assert capsys.readouterr().out == ""


def test_pad_right():
    x, y = pad_right([[1, 2, 3], [4]], [[-1, 5, 6], [7]], pad_id=0)
    assert x.tolist() == [[1, 2, 3], [4, 0, 0]] and y.tolist() == [[-1, 5, 6], [7, -1, -1]]


def test_progress_prints_lines_when_redirected(capsys):
    assert list(progress(range(20), desc="scoring")) == list(range(20))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("scoring: 20/20 it (100%")


def test_torn_log_line_is_skipped(tmp_path, capsys):
    path = str(tmp_path / "log.jsonl")
    for i in (1, 2, 3):
        append_jsonl(path, {"iter": i})
    with open(path, "a") as f:
        f.write('{"iter": 4, "lo')
    assert [r["iter"] for r in read_jsonl(path)] == [1, 2, 3]
    assert "torn log line" in capsys.readouterr().out
    truncate_log(path, 2)
    assert [json.loads(line)["iter"] for line in open(path)] == [1, 2]


def test_download_once_under_concurrency(tmp_path):
    """Four processes download the same file at once: the server is asked once, all four get the file."""
    body, hits = os.urandom(300_000), []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url, target = f"http://127.0.0.1:{server.server_port}/f.bin", str(tmp_path / "f.bin")
        code = f"from lib.download import download; download({url!r}, {target!r}, retries=1)"
        procs = [subprocess.Popen([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  stdout=subprocess.DEVNULL) for _ in range(4)]
        assert [p.wait(timeout=60) for p in procs] == [0] * 4
        assert open(target, "rb").read() == body and len(hits) == 1
        with pytest.raises(ConnectionError, match=r"could not download.*put the file there yourself"):
            download(f"http://127.0.0.1:1/x", str(tmp_path / "x"), retries=1, timeout=2,
                            hint="put the file there yourself")
    finally:
        server.shutdown()


def test_local_rank_from_srun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert local_rank() == 3
    monkeypatch.delenv("SLURM_LOCALID")
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        local_rank()


def test_gpt2_names_are_checkpoint_files_converted_once(tmp_path, monkeypatch):
    """--init_from=gpt2 reads CACHE/checkpoints/gpt2/ckpt.pt like any checkpoint (load_openai.py converts OpenAI's
    release into it once); missing and offline, load_openai.py's own message is followed by the offline recipe."""
    monkeypatch.setenv("LLM_E2E_CACHE", str(tmp_path / "cache"))
    ckpt = tiny_ckpt("imported", resume=False)
    save_checkpoint(ckpt, str(tmp_path / "cache" / "checkpoints" / "gpt2" / "ckpt.pt"))
    model, loaded, tok = load_model("gpt2")
    assert loaded["kind"] == "imported" and tok.name == "gpt2"
    torch.testing.assert_close(model.state_dict()["lm_head.weight"], ckpt["model"]["lm_head.weight"])
    # not converted yet: load_openai.py runs once, as its own process (scripts hand each other files), and every
    # later load reads its file; a failed conversion ends in the offline recipe
    import lib.checkpoint
    calls = []

    def converter(argv, **kw):
        calls.append(argv)
        if "--model=gpt2-medium" in argv:
            save_checkpoint(ckpt, os.path.join(argv[-1].split("=", 1)[1], "ckpt.pt"))
        return subprocess.CompletedProcess(argv, 0 if "--model=gpt2-medium" in argv else 1)
    monkeypatch.setattr(lib.checkpoint.subprocess, "run", converter)
    for _ in range(2):
        assert load_model("gpt2-medium")[1]["kind"] == "imported"
    assert len(calls) == 1 and calls[0][1].endswith("load_openai.py") and calls[0][2:] == [
        "--model=gpt2-medium", f"--out_dir={tmp_path / 'cache' / 'checkpoints' / 'gpt2-medium'}"]
    with pytest.raises(ValueError, match=r"--init_from=gpt2-large: load_openai.py could not provide OpenAI's weights "
                                         r"\(exit status 1.*python load_openai.py --from_dir=DIR --out_dir=out-gpt2-large"):
        load_model("gpt2-large")
