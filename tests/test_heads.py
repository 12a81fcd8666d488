"""
lib/heads.py and train.py --track_heads=True: the scores mean what they say on hand-built attention patterns; the
induction probe draws only ids that occur in the training data (in train.py and attention_viz.py alike); a
previous-token head planted in a tiny GPT's weights is found, and train.py logs it at its first evaluation.
"""

import json
import math
import os
import re
import runpy
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

from lib import heads
from lib.checkpoint import make_checkpoint, save_checkpoint
from lib.tokenizer import CharTokenizer
from model import GPT, GPTConfig
from test_train import TEXT, char_data, run_inprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def causal_uniform(T: int) -> torch.Tensor:
    return torch.ones(T, T).tril() / torch.arange(1, T + 1)[:, None]


def prev_pattern(T: int) -> torch.Tensor:
    """Every token attends to the one before it (the first to itself)."""
    p = torch.zeros(T, T)
    p[0, 0] = 1
    p[torch.arange(1, T), torch.arange(T - 1)] = 1
    return p


def test_statistics_on_hand_built_patterns():
    T = 12
    prev = prev_pattern(T)
    sink = torch.zeros(T, T)
    sink[:, 0] = 1
    att = torch.stack([prev, sink, causal_uniform(T)])[None]  # (B=1, nh=3, T, T)
    s = heads.head_stats(att)
    assert s["prev"][0, 0] == pytest.approx(1.0) and s["entropy"][0, 0] == pytest.approx(0.0)
    assert s["sink"][0, 1] == pytest.approx(1.0) and s["entropy"][0, 1] == pytest.approx(0.0)
    # uniform over the t+1 visible tokens: entropy log(t+1), 1/(t+1) on the first and the previous token
    t = torch.arange(1, T, dtype=torch.float64)
    assert s["entropy"][0, 2] == pytest.approx(torch.log(t + 1).mean().item(), abs=1e-6)
    assert s["sink"][0, 2] == pytest.approx((1 / (t + 1)).mean().item(), abs=1e-6)
    assert s["prev"][0, 2] == pytest.approx((1 / (t + 1)).mean().item(), abs=1e-6)

    # exact induction: [eot] + r + r, each second-copy token attends to the successor of its first occurrence
    ids, start, L = heads.repeated_random_tokens(n_vocab=50, eot=49, block_size=32, L=64, batch=3, seed=0)
    assert (start, L) == (1, 15) and ids.shape == (3, 31), "L is capped to fit the block: 1 + 2 * 15 <= 32"
    assert (ids[:, 0] == 49).all() and (ids[:, 1:16] == ids[:, 16:]).all()
    assert all(len(set(row[1:16].tolist())) == 15 for row in ids), "r has no repeated token"
    assert (ids[:, 1:] != 49).all(), "<|endoftext|> is never drawn into r"
    ids0, _, L0 = heads.repeated_random_tokens(n_vocab=20, eot=0, block_size=64, L=64, batch=2, seed=1)
    assert L0 == 19 and (ids0[:, 1:] != 0).all() and ids0.max() < 20, "L capped by the 19 ids besides eot"
    T = ids.size(1)
    ind = causal_uniform(T).clone()
    for q in range(start + L, start + 2 * L):
        ind[q] = 0
        ind[q, q - L + 1] = 1
        assert ids[0, q] == ids[0, q - L] and ind[q, q - L + 1] == 1  # target = successor of first occurrence
    att = torch.stack([ind, causal_uniform(T), prev_pattern(T)])[None]
    score = heads.induction_score(att, start, L)[0]
    assert score[0] == pytest.approx(1.0)
    assert score[1] < 0.1 and score[2] == 0, f"uniform and previous-token heads are not induction heads: {score}"

    flagged = heads.flag_heads(torch.tensor([[0.1, 0.9], [0.5, 0.39]]), 0.4)
    assert flagged == [(0, 1, pytest.approx(0.9)), (1, 0, pytest.approx(0.5))]


def test_probe_draws_ids_of_the_training_data(tmp_path):
    data = char_data(tmp_path / "data", "abcab cab\n" * 20)  # 5 characters in the text
    ids = heads.data_token_ids(data)
    assert ids == sorted(set(CharTokenizer.from_text("abcab cab\n").encode("abc \n"))), ids
    probe, start, L = heads.repeated_random_tokens(n_vocab=76, eot=None, block_size=32, L=16, batch=4, seed=0, ids=ids)
    assert (start, L) == (0, 5) and set(probe.flatten().tolist()) == set(ids), "L capped by the 5 ids, all drawn"
    probe, start, L = heads.repeated_random_tokens(n_vocab=50, eot=2, block_size=32, L=16, batch=4, seed=0,
                                                   ids=[1, 2, 7, 9])
    assert (start, L) == (1, 3) and set(probe[:, 1:].flatten().tolist()) == {1, 7, 9} and (probe[:, 0] == 2).all()


def planted_prev_token_gpt(vocab_size: int, T: int = 16) -> GPT:
    """A 1-layer GPT whose head 0 attends to the previous token, by construction. The token embeddings are 0, the
    position embedding of t is (cos wt, sin wt, -cos wt, -sin wt, 0, ...): zero mean, so ln_1 only rescales it, by
    4 (sqrt(32 / 2)). Head 0's query is the position rotated back by one step, its key the position: the score of
    key s for query t is beta cos(w (t - 1 - s)), highest at s = t - 1. With w = pi / T neighbours differ by
    beta (1 - cos w) / sqrt(16) = 10 nats at beta = 2100: the softmax puts ~all weight on t - 1. Head 1 is 0:
    uniform attention."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=T, vocab_size=vocab_size, bias=True)).eval()
    w, beta = math.pi / T, 2100.0
    t = torch.arange(T, dtype=torch.float32)
    with torch.no_grad():
        model.transformer.wte.weight.zero_()
        model.transformer.wpe.weight.zero_()
        model.transformer.wpe.weight[:, :4] = torch.stack([t.mul(w).cos(), t.mul(w).sin(), -t.mul(w).cos(),
                                                           -t.mul(w).sin()], 1)
        W = model.transformer.h[0].attn.c_attn.weight  # (3C, C): rows 0..31 query, 32..63 key, 64..95 value
        W.zero_()
        model.transformer.h[0].attn.c_attn.bias.zero_()
        c, s = math.cos(w), math.sin(w)
        W[0, 0], W[0, 1], W[1, 0], W[1, 1] = beta * c / 4, beta * s / 4, -beta * s / 4, beta * c / 4
        W[32, 0], W[33, 1] = 1 / 4, 1 / 4  # keys: the position itself (ln_1's output divided by its scale 4)
    return model


def test_planted_previous_token_head_is_found_and_logged_by_train(tmp_path, monkeypatch, capsys):
    data = char_data(tmp_path / "data")
    tok = CharTokenizer.from_text(TEXT)
    model = planted_prev_token_gpt(tok.n_vocab)
    text = torch.tensor([tok.encode(TEXT[i:i + 16]) for i in range(0, 64, 16)])  # (4, 16)
    probe = heads.repeated_random_tokens(tok.n_vocab, None, 16, 8, 4, 0, heads.data_token_ids(data))
    scores = heads.layer_scores(model, text, probe)
    assert scores["prev_token"][0] > 0.95 and scores["induction"][0] < 0.3, scores
    prev = heads.head_stats(heads.attention_maps(model, text))["prev"].mean(1)  # (1, 2)
    assert [(l, h) for l, h, _ in heads.flag_heads(prev, 0.4)] == [(0, 0)], prev

    # train.py starts from it (learning rate 0: the weights stay) and logs the same at every evaluation
    ckpt = make_checkpoint("pretrain", model.state_dict(), asdict(model.config), {}, tok.meta(), None)
    save_checkpoint(ckpt, str(tmp_path / "planted.pt"))
    out = tmp_path / "out"
    run_inprocess(monkeypatch, f"--init_from={tmp_path / 'planted.pt'}", f"--data_dir={data}", f"--out_dir={out}",
                  "--track_heads=True", "--max_iters=2", "--eval_interval=2", "--learning_rate=0", "--min_lr=0",
                  "--warmup_iters=0", "--decay_lr=False", "--block_size=16")
    logged = [json.loads(line) for line in open(out / "log.jsonl")]
    recs = [r for r in logged if r["type"] == "heads"]
    assert [r["iter"] for r in recs] == [0, 2], logged
    for r in recs:
        assert len(r["prev_token"]) == len(r["induction"]) == 1, r
        assert r["prev_token"][0] > 0.95 and 0 <= r["induction"][0] < 0.3, r
        assert math.isfinite(r["in_context_loss"]), r
    assert re.search(r"^heads 0: best previous-token score per layer (0\.9\d|1\.00), induction 0\.\d\d, "
                     r"in-context loss -?\d+\.\d{3}$", capsys.readouterr().out, re.M)
    assert open(out / "heads.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_attention_viz_probe_uses_the_checkpoint_data(tmp_path, monkeypatch, capsys):
    """attention_viz --summary draws its random tokens from the ids of the checkpoint's data_dir."""
    data = char_data(tmp_path / "data", TEXT)
    tok = CharTokenizer.from_text(TEXT)
    model = planted_prev_token_gpt(tok.n_vocab)
    ckpt = make_checkpoint("pretrain", model.state_dict(), asdict(model.config), {"data_dir": data}, tok.meta(), None)
    save_checkpoint(ckpt, str(tmp_path / "run" / "ckpt.pt"))
    monkeypatch.setattr(sys, "argv", ["attention_viz.py", f"--out_dir={tmp_path / 'run'}", "--text=Shall I compare",
                                      "--summary=True", "--induction_batch=2"])
    runpy.run_path(os.path.join(ROOT, "attention_viz.py"), run_name="__main__")
    out = capsys.readouterr().out
    n_ids = len(np.unique(np.fromfile(os.path.join(data, "train.bin"), dtype=np.uint16)))
    assert f"drawn from the {n_ids} ids that occur in {data}" in out, out
    assert "previous-token heads (score >= 0.4): L0H0" in out, out


def test_in_context_loss_is_taken_at_the_positions_it_names():
    """token_losses' column k is the loss of token k given tokens 0..k-1; in_context_loss compares the last eighth
    of the positions with positions T/16..T/8-1."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=20, bias=False)).eval()
    text = torch.randint(0, 20, (10, 32))  # 10 windows: two chunks of 8 and 2
    losses = heads.token_losses(model, text)
    assert losses.shape == (10, 32) and losses[:, 0].isnan().all() and not losses[:, 1:].isnan().any()
    with torch.no_grad():
        for k in (1, 17, 31):  # the model alone on tokens 0..k-1, scored on token k
            logits, _ = model(text[:, :k])
            want = torch.nn.functional.cross_entropy(logits[:, -1], text[:, k], reduction="none")
            assert torch.allclose(losses[:, k], want, atol=1e-5), (k, losses[:, k], want)
        _, mean = model(text[:, :-1], text[:, 1:])
    assert losses[:, 1:].mean().item() == pytest.approx(mean.item(), abs=1e-5)
    # a loss equal to its position: the last eighth (28..31, mean 29.5) minus positions 2..3 (mean 2.5)
    ramp = torch.arange(32.0).expand(3, 32)
    assert heads.in_context_loss(ramp) == pytest.approx(27.0)
    assert heads.in_context_loss(torch.ones(3, 256)) == 0  # no in-context learning: no difference


def test_repeat_prepare_mixes_passages_written_twice(tmp_path):
    """data/shakespeare_repeat/prepare.py: each split is its natural text in order with passages inserted, each one
    twice in a row, span_min..span_max long and a span of that split's text; about repeat_fraction of it is in
    passages (the share of a few dozen random spans: +-0.15 holds for any seed); the vocabulary is the characters'."""
    chars = char_data(tmp_path / "chars", TEXT * 2)
    out = tmp_path / "mix"
    subprocess.run([sys.executable, os.path.join(ROOT, "data", "shakespeare_repeat", "prepare.py"),
                    f"--char_dir={chars}", f"--out_dir={out}", "--span_min=4", "--span_max=12",
                    "--repeat_fraction=0.5"], check=True, capture_output=True, text=True)
    assert open(out / "meta.pkl", "rb").read() == open(os.path.join(chars, "meta.pkl"), "rb").read()
    meta = json.load(open(out / "meta.json"))
    for split in ("train", "val"):
        text = np.fromfile(os.path.join(chars, f"{split}.bin"), dtype=np.uint16).tolist()
        mix = np.fromfile(out / f"{split}.bin", dtype=np.uint16).tolist()
        assert meta[f"{split}_tokens"] == len(mix) == len(text) + meta[f"{split}_repeated"], (split, meta)
        assert 0.35 < meta[f"{split}_repeated"] / len(mix) < 0.65, (split, meta)
        spans = {tuple(text[i:i + L]) for L in range(4, 13) for i in range(len(text) - L + 1)}
        # parse it: reach[i] holds the positions j in the text that mix[:i] can stand for, natural characters
        # moving both, a passage p p (a span of the text) moving in mix only
        reach = [set() for _ in range(len(mix) + 1)]
        reach[0].add(0)
        for i in range(len(mix)):
            for j in reach[i]:
                if j < len(text) and mix[i] == text[j]:
                    reach[i + 1].add(j + 1)
                for L in range(4, 13):
                    p = tuple(mix[i:i + L])
                    if len(p) == L and p == tuple(mix[i + L:i + 2 * L]) and p in spans:
                        reach[i + 2 * L].add(j)
        assert len(text) in reach[-1], f"{split}.bin is not its text with passages inserted, each written twice"
