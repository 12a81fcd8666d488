"""
sample.py end to end on tiny checkpoints trained here (train.py's checkpoint format, saved with
save_checkpoint): a character-level one and a GPT-2 BPE one. A subprocess for each behaviour a user
sees (seeded, streamed, max_new_tokens, stop at <|endoftext|>); in-process runs (runpy) for second runs,
variants and the error messages, which cost no new Python.
"""

import os
import runpy
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from lib.checkpoint import save_checkpoint
from lib.finetuning import format_prompt
from lib.tokenizer import CharTokenizer, get_tokenizer
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEP = "\n---------------\n"
CHAR_TEXT = ("ROMEO: But, soft! what light through yonder window breaks?\n"
             "JULIET: O Romeo, Romeo! wherefore art thou Romeo?\n") * 8
CAT = "The cat sat on the mat 🐈."  # the cat is 3 BPE tokens that split its 4 UTF-8 bytes
INSTRUCTION, RESPONSE = "Name three primary colors.", "Red, blue and yellow."


def train_and_save(path, tok, batches, config, steps, lr):
    """A few AdamW steps on fixed batches of token ids (lists of rows), saved the way train.py saves."""
    torch.manual_seed(0)
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    batches = [torch.tensor(rows) for rows in batches]  # each (B, T + 1)
    for _ in range(steps):
        loss = sum(model(b[:, :-1], b[:, 1:])[1] for b in batches)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    save_checkpoint({"model": model.state_dict(), "model_args": asdict(config), "optimizer": opt.state_dict(),
                     "iter_num": steps, "best_val_loss": loss.item(), "config": {"dataset": "tiny"},
                     "tokenizer": tok.meta()}, str(path / "ckpt.pt"))
    return path


@pytest.fixture(scope="module")
def char_dir(tmp_path_factory):
    tok = CharTokenizer.from_text(CHAR_TEXT)
    ids = tok.encode(CHAR_TEXT)
    rows = [ids[i:i + 33] for i in range(0, 8 * 33, 33)]
    return train_and_save(tmp_path_factory.mktemp("char"), tok, [rows], GPTConfig(
        block_size=32, vocab_size=tok.n_vocab, n_layer=2, n_head=2, n_embd=32), steps=20, lr=1e-2)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """Memorises two documents, each from position 0 as sampling sees them (50 steps at lr 1e-2: every next
    token is the argmax with a margin of more than 1.5 logits, far beyond float differences between CPUs)."""
    tok = get_tokenizer("gpt2")
    batches = []
    for doc in (CAT + "<|endoftext|>", format_prompt(INSTRUCTION) + RESPONSE + "<|endoftext|>"):
        ids = tok.encode(doc)
        batches.append([(ids * 3)[:max(len(ids) + 2, 24) + 1]])  # then <|endoftext|> is followed by text
    return train_and_save(tmp_path_factory.mktemp("bpe"), tok, batches, GPTConfig(
        block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32), steps=50, lr=1e-2)


def run(*args):
    r = subprocess.run([sys.executable, "sample.py", *args, "--device=cpu", "--compile=False"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def split(stdout):
    """stdout -> (samples, summary line): what follows the 'loaded ...' line, cut at the separators."""
    body = stdout[stdout.index("\n", stdout.index("\nloaded ") + 1) + 1:]
    *samples, summary = body.split(SEP)  # SEP starts with the newline printed after each sample
    return samples, summary


def sample_in_process(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["sample.py", *args, "--device=cpu"])
    monkeypatch.chdir(ROOT)
    runpy.run_path(os.path.join(ROOT, "sample.py"), run_name="__main__")


def test_char_sampling_is_seeded_streamed_and_bounded(char_dir, monkeypatch, capsys):
    args = (f"--out_dir={char_dir}", "--start=ROMEO:", "--num_samples=2", "--max_new_tokens=40", "--seed=7")
    out1 = run(*args)
    sample_in_process(monkeypatch, *args)
    out2 = capsys.readouterr().out
    samples, summary = split(out1)
    assert samples == split(out2)[0]  # same seed, same text (in a second, separate run)
    assert len(samples) == 2 and samples[0] != samples[1]  # the generator moves on between samples
    assert all(s.startswith("ROMEO:") and len(s) == len("ROMEO:") + 40 for s in samples)  # no stop token
    assert summary.startswith("2 samples, 80 tokens in ") and "tokens/s decoding" in summary
    assert "char tokenizer (" in out1 and ", iter 20, val loss " in out1
    # streaming: text arrives while the process is still generating (it would run for minutes)
    p = subprocess.Popen([sys.executable, "sample.py", f"--out_dir={char_dir}", "--start=ROMEO:",
                          "--max_new_tokens=1000000", "--device=cpu"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    try:
        got = b""
        while b"\nROMEO:" not in got or len(got) < got.index(b"\nROMEO:") + 12:
            chunk = os.read(p.stdout.fileno(), 4096)
            assert chunk, f"sample.py ended early: {got!r}"
            got += chunk
        assert p.poll() is None
    finally:
        p.kill()
        p.wait()
        p.stdout.close()


def test_bpe_stops_at_eot_and_keeps_utf8_whole(bpe_dir, monkeypatch, capsys):
    """Greedy from 'The cat' ends at <|endoftext|>; the 🐈 comes out of 3 tokens that each hold part of
    its bytes, printed whole. Without the stop, <|endoftext|> is printed and the next document begins."""
    tok = get_tokenizer()
    assert len(tok.encode(" 🐈")) == 3
    n = len(tok.encode(CAT)) - len(tok.encode("The cat")) + 1  # the continuation plus <|endoftext|>
    out = run(f"--out_dir={bpe_dir}", "--start=The cat", "--num_samples=2", "--temperature=0", "--max_new_tokens=50")
    samples, summary = split(out)
    assert samples == [CAT, CAT] and summary.startswith(f"2 samples, {2 * n} tokens in ")
    assert "gpt2 tokenizer (50,257 tokens)" in out
    sample_in_process(monkeypatch, f"--out_dir={bpe_dir}", "--start=The cat", "--num_samples=1", "--temperature=0",
                      f"--max_new_tokens={n + 2}", "--stop_at_eot=False")
    samples, summary = split(capsys.readouterr().out)
    assert samples == [CAT + "<|endoftext|>The cat"] and summary.startswith(f"1 sample, {n + 2} tokens in ")


def test_instruct_prints_only_the_response(bpe_dir, monkeypatch, capsys):
    sample_in_process(monkeypatch, f"--out_dir={bpe_dir}", f"--instruct={INSTRUCTION}", "--num_samples=1",
                      "--temperature=0")
    samples, summary = split(capsys.readouterr().out)
    n = len(get_tokenizer().encode(RESPONSE)) + 1  # and <|endoftext|>
    assert samples == [RESPONSE] and summary.startswith(f"1 sample, {n} tokens in ")


def test_prompt_file_and_ckpt_name(char_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "prompt.txt").write_text("JULIET:")
    os.link(char_dir / "ckpt.pt", char_dir / "other.pt")
    sample_in_process(monkeypatch, f"--out_dir={char_dir}", "--ckpt_name=other.pt",
                      f"--start=FILE:{tmp_path / 'prompt.txt'}", "--num_samples=1", "--max_new_tokens=5")
    out = capsys.readouterr().out
    assert f"loaded {char_dir / 'other.pt'}" in out
    samples, _ = split(out)
    assert samples[0].startswith("JULIET:") and len(samples[0]) == len("JULIET:") + 5


def test_bad_input_is_explained(char_dir, tmp_path, monkeypatch):
    missing = tmp_path / "nothing-here"
    with pytest.raises(FileNotFoundError, match=r"no checkpoint 'ckpt.pt' in out_dir '.*nothing-here' .*the folder "
                                                r"does not exist.*python train.py config/train_shakespeare_char.py"):
        sample_in_process(monkeypatch, f"--out_dir={missing}")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint 'ckpt_int8.pt' in out_dir .*it holds \['ckpt.pt'"):
        sample_in_process(monkeypatch, f"--out_dir={char_dir}", "--ckpt_name=ckpt_int8.pt")
    with pytest.raises(ValueError, match=r"one of \('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl'\).*got 'gpt3'"):
        sample_in_process(monkeypatch, "--init_from=gpt3")
    with pytest.raises(ValueError, match=r"characters 'éΩ' are not in this character-level vocabulary"):
        sample_in_process(monkeypatch, f"--out_dir={char_dir}", "--start=ROMEO: é Ω")
    with pytest.raises(FileNotFoundError, match=r"no prompt file '.*missing.txt'"):
        sample_in_process(monkeypatch, f"--out_dir={char_dir}", f"--start=FILE:{tmp_path / 'missing.txt'}")
    with pytest.raises(ValueError, match=r"0 < top_p <= 1; got temperature=0.8, top_k=200, top_p=1.5"):
        sample_in_process(monkeypatch, f"--out_dir={char_dir}", "--top_p=1.5")


def test_nanogpt_checkpoint_with_its_meta_pkl(char_dir, tmp_path, monkeypatch, capsys):
    """A checkpoint in nanoGPT's exact layout (its train.py's keys, the compile prefix, no 'tokenizer' entry) and a
    meta.pkl as its data/shakespeare_char/prepare.py writes it (vocab_size, itos, stoi): the vocabulary is found
    next to the checkpoint or given with --meta, and the first line says which."""
    import pickle

    from lib.checkpoint import load_checkpoint
    ours = load_checkpoint(str(char_dir / "ckpt.pt"))
    tok = CharTokenizer.from_meta(ours["tokenizer"])
    chars = tok.chars
    nano = {"model": {"_orig_mod." + k: v for k, v in ours["model"].items()}, "optimizer": ours["resume"]["optimizer"],
            "model_args": dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=True, vocab_size=len(chars),
                               dropout=0.0),
            "iter_num": 20, "best_val_loss": torch.tensor(1.5).item(), "config": {"dataset": "no_such_dataset"}}
    meta = {"vocab_size": len(chars), "itos": {i: c for i, c in enumerate(chars)},
            "stoi": {c: i for i, c in enumerate(chars)}}
    folder = tmp_path / "nanogpt-out"
    folder.mkdir()
    torch.save(nano, folder / "ckpt.pt")
    elsewhere = tmp_path / "meta" / "meta.pkl"
    elsewhere.parent.mkdir()
    with open(elsewhere, "wb") as f:
        pickle.dump(meta, f)
    sample_in_process(monkeypatch, f"--init_from={folder / 'ckpt.pt'}", f"--meta={elsewhere}", "--start=ROMEO:",
                      "--num_samples=1", "--max_new_tokens=10", "--seed=7")
    out = capsys.readouterr().out
    assert f"tokenizer: characters from {elsewhere} (--meta)" in out and "loaded " in out and ", pretrain, iter 20" in out
    with_meta = split(out)[0]
    os.link(elsewhere, folder / "meta.pkl")
    sample_in_process(monkeypatch, f"--init_from={folder}", "--start=ROMEO:", "--num_samples=1",
                      "--max_new_tokens=10", "--seed=7")
    out = capsys.readouterr().out
    assert "(next to the checkpoint)" in out and split(out)[0] == with_meta
    # ours gives the same text from the same weights
    sample_in_process(monkeypatch, f"--out_dir={char_dir}", "--start=ROMEO:", "--num_samples=1",
                      "--max_new_tokens=10", "--seed=7")
    assert split(capsys.readouterr().out)[0] == with_meta
    os.unlink(folder / "meta.pkl")
    with pytest.raises(ValueError, match=r"tokenizer has 50,257 tokens but the model's table only \d+.*--meta="):
        sample_in_process(monkeypatch, f"--init_from={folder}")
