"""align.py: the preference losses against hand computations, the hh-rlhf splitter, records in every layout and
format (.jsonl.gz, JSON, CSV, TSV; bad records named FILE:LINE), and DPO runs of a tiny char-level model on a
synthetic preference set (chosen responses list the prompt's letters in ascending order, rejected ones in descending
order): learning, exact resume (also from a bare --init_from=resume after SIGINT), stops by signal (best-only runs,
a second Ctrl-C mid-save, SIGTERM under torchrun), the schedule warning and a non-finite loss."""

import copy
import csv
import dataclasses
import gzip
import json
import math
import os
import random
import re
import runpy
import signal
import subprocess
import sys

import align
import numpy as np
import pytest
import torch

from lib.checkpoint import load_checkpoint, save_checkpoint
from lib.finetuning import PROMPT_INPUT, PROMPT_NO_INPUT, encode_pair, format_prompt
from lib.models import load_model
from lib.optim import make_optimizer
from lib.preferences import collate, encode_triples, preference_triples, response_tokens, split_hh
from lib.tokenizer import CharTokenizer
from model import GPT, GPTConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LETTERS = "abcdefgh"
VOCAB = "\n Human:Assistant" + LETTERS + "=." + PROMPT_INPUT + PROMPT_NO_INPUT  # every character of both layouts
# a tiny model gains nothing from threads, and a busy machine makes them much slower
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# a realistic multi-turn hh-rlhf record: the two sides share every turn but the last Assistant answer
HH_PROMPT = ("\n\nHuman: What's a good name for a grey cat?\n\nAssistant: How about Smokey, or Ash?"
             "\n\nHuman: Something less common, please.\n\nAssistant:")
HH_CHOSEN, HH_REJECTED = " Maybe Nimbus, after the rain clouds.", " I don't know, name it yourself."


def synthetic(n, seed, layout):
    """n preference records: chosen sorts the prompt's 4 letters ascending, rejected descending."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        s = "".join(rng.choice(LETTERS) for _ in range(4))
        c, r = "".join(sorted(s)), "".join(sorted(s, reverse=True))
        if c == r:
            continue
        if layout == "hh":
            out.append({k: f"\n\nHuman: {s}\n\nAssistant: {v}." for k, v in (("chosen", c), ("rejected", r))})
        else:
            out.append({"prompt": s + "=", "chosen": c + ".", "rejected": r + "."})
    return out


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    tok = CharTokenizer.from_text(VOCAB)
    return GPT(GPTConfig(block_size=32, vocab_size=tok.n_vocab, n_layer=2, n_head=2, n_embd=32)), tok


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Synthetic pairs in both layouts, a starting checkpoint (a randomly initialised tiny model), a config file."""
    d = tmp_path_factory.mktemp("align")
    model, tok = tiny_model()
    save_checkpoint({"model": model.state_dict(), "model_args": dataclasses.asdict(model.config), "iter_num": 0,
                     "best_val_loss": 9.9, "config": {}, "tokenizer": tok.meta()}, str(d / "start" / "ckpt.pt"))
    write_jsonl(d / "train.jsonl", synthetic(400, 0, "explicit"))
    write_jsonl(d / "val.jsonl", synthetic(64, 1, "explicit"))
    # hh-rlhf's own file layout: gzipped JSON lines, harmless-base/train.jsonl.gz and test.jsonl.gz
    same = "\n\nHuman: ab\n\nAssistant: ab."
    write_jsonl(d / "hh" / "train.jsonl.gz", synthetic(200, 2, "hh") + [{"chosen": same, "rejected": same}] * 3)
    write_jsonl(d / "hh" / "test.jsonl.gz", synthetic(32, 3, "hh"))
    (d / "align_synthetic.py").write_text(CONFIG.format(cache=str(d / "cache")))  # for the end-to-end runs
    return d


def env(hf_home):
    return {**ENV, "HF_HOME": str(hf_home), "HF_DATASETS_OFFLINE": "1"}  # no home-directory cache, no network


def run(args, hf_home):
    """Run align.py as a user would; return its output (stdout + stderr), failing with it on a non-zero exit."""
    p = subprocess.run([sys.executable, "align.py", *args, "--device=cpu", "--compile=False"], cwd=REPO,
                       env=env(hf_home), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


def records(out_dir, split):
    """align.py's log records of one split: 'train' (the log lines), or 'val' (the evaluations, their val_ prefix
    dropped: val_loss -> loss)."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        recs = list(map(json.loads, f))
    if split == "train":
        return [r for r in recs if r["type"] == "train"]
    return [{k[4:] if k.startswith("val_") else k: v for k, v in r.items()} for r in recs if r["type"] == "eval"]



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see ENV
    yield
    torch.set_num_threads(threads)

# ----------------------------------------------------------------------------------------------
# losses


def test_losses_match_hand_computation():
    pc, pr = torch.tensor([-5.0, -9.0, -3.0]), torch.tensor([-7.0, -8.0, -3.0])
    rc, rr = torch.tensor([-6.0, -8.5, -4.0]), torch.tensor([-6.5, -8.0, -4.0])
    beta = 0.2
    h = [(-5 + 6) - (-7 + 6.5), (-9 + 8.5) - (-8 + 8), (-3 + 4) - (-3 + 4)]  # 1.5, -0.5, 0
    sig = lambda z: 1 / (1 + math.exp(-z))
    for loss_type, ls, want in (
            ("dpo", 0.0, [-math.log(sig(beta * v)) for v in h]),
            ("cdpo", 0.1, [-0.9 * math.log(sig(beta * v)) - 0.1 * math.log(sig(-beta * v)) for v in h]),
            ("ipo", 0.0, [(v - 1 / (2 * beta)) ** 2 for v in h])):
        losses, cr, rj = align.preference_loss(pc, pr, rc, rr, loss_type, beta, ls)
        assert losses.tolist() == pytest.approx(want, abs=1e-6), loss_type
        assert cr.tolist() == pytest.approx([0.2, -0.1, 0.2]) and rj.tolist() == pytest.approx([-0.1, 0.0, 0.2])
    m = align.preference_metrics(torch.stack([pc, pr], 1), torch.stack([rc, rr], 1), torch.full((3, 2), 2.0),
                                 "dpo", beta, 0.0)
    assert m["reward_acc"] == pytest.approx(1 / 3)  # strict, as TRL's rewards/accuracies: the tie counts 0
    assert m["nll"] == pytest.approx((5 + 9 + 3) / 3 / 2)  # the chosen responses' NLL per token (2 tokens each)
    assert m["loss"] == m["dpo_loss"] == pytest.approx(sum(-math.log(sig(beta * v)) for v in h) / 3)
    with_nll = align.preference_metrics(torch.stack([pc, pr], 1), torch.stack([rc, rr], 1), torch.full((3, 2), 2.0),
                                        "dpo", beta, 0.0, rpo_alpha=0.5)
    assert with_nll["dpo_loss"] == m["dpo_loss"] and with_nll["loss"] == pytest.approx(m["dpo_loss"] + 0.5 * m["nll"])
    # IPO per token (TRL's): each log-prob divided by its response's length (chosen 2 tokens, rejected 4) first
    n = torch.tensor([[2.0, 4.0]] * 3)
    ipo = align.preference_metrics(torch.stack([pc, pr], 1), torch.stack([rc, rr], 1), n, "ipo", beta, 0.0,
                                   ipo_per_token=True)
    h_tok = [(-5 + 6) / 2 - (-7 + 6.5) / 4, (-9 + 8.5) / 2 - (-8 + 8) / 4, (-3 + 4) / 2 - (-3 + 4) / 4]
    assert ipo["dpo_loss"] == pytest.approx(sum((v - 1 / (2 * beta)) ** 2 for v in h_tok) / 3)
    assert m["reward_margin"] == pytest.approx(beta * sum(h) / 3)
    assert m["logp_margin"] == pytest.approx((2 - 1 + 0) / 3)
    assert m["logp_drift"] == pytest.approx((1 - 0.5 + 1 - 0.5 + 0 + 1) / 12)  # per response token


def test_step0_policy_equals_reference_gives_log2_and_half_accuracy():
    """At step 0 the policy is the reference: every implicit reward is 0, the DPO loss is log 2 and, ties counting
    TRL, strict, the reward accuracy is exactly 0 (a tie is no win)."""
    model, tok = tiny_model()
    ref = copy.deepcopy(model)
    pairs, _, _ = encode_triples(tok, [(i, r["prompt"], r["chosen"], r["rejected"]) for i, r in
                                             enumerate(synthetic(20, 5, "explicit"))], 32, "t", verbose=False)
    rt = align.setup_runtime("cpu", "float32")
    pol, refl = align.pair_logps(model, pairs, 8, rt), align.pair_logps(ref, pairs, 8, rt)
    m = align.preference_metrics(pol, refl, response_tokens(pairs), "dpo", 0.1, 0.0)
    assert m["loss"] == m["dpo_loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert m["reward_acc"] == 0.0 and m["reward_margin"] == 0.0 and m["logp_drift"] == 0.0


def test_reference_never_changes_and_precomputed_logps_match():
    """A few DPO steps move the policy but not the frozen reference; precomputed reference log-probs equal the
    ones computed on the fly in a training batch (to float rounding: the batches differ in shape)."""
    model, tok = tiny_model()
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    pairs, _, _ = encode_triples(tok, [(i, r["prompt"], r["chosen"], r["rejected"]) for i, r in
                                             enumerate(synthetic(32, 6, "explicit"))], 32, "t", verbose=False)
    rt = align.setup_runtime("cpu", "float32")
    precomputed = align.pair_logps(ref, pairs, 5, rt)
    opt = make_optimizer(model, 0.0, 1e-2, (0.9, 0.95), "cpu")
    for step in range(5):
        idx = list(range(step * 6, step * 6 + 6))
        x, y = collate(pairs, idx, "cpu")
        lp = align.sequence_logps(model, x, y, rt)
        with torch.no_grad():
            rl = align.sequence_logps(ref, x, y, rt)
        assert torch.allclose(rl, torch.cat([precomputed[idx, 0], precomputed[idx, 1]]), atol=1e-5)
        losses, _, _ = align.preference_loss(lp[:6], lp[6:], rl[:6], rl[6:])
        losses.mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items()), "the reference model changed"
    assert not torch.equal(model.lm_head.weight, ref.lm_head.weight), "the policy did not move"

# ----------------------------------------------------------------------------------------------
# data


def rows(records, file="pairs.jsonl"):
    """Records as lib.records.load_records returns them: [(FILE:LINE, record)]."""
    return [(f"{file}:{n}", r) for n, r in enumerate(records, 1)]


def test_hh_split_multi_turn_and_errors():
    prompt, response = split_hh(HH_PROMPT + HH_CHOSEN, "r")
    assert (prompt, response) == (HH_PROMPT, HH_CHOSEN)  # earlier Assistant turns stay in the prompt
    recs = rows([{"chosen": HH_PROMPT + HH_CHOSEN, "rejected": HH_PROMPT + HH_REJECTED},
                 {"chosen": HH_PROMPT + " Same.", "rejected": HH_PROMPT + " Same."},
                 {"chosen": HH_PROMPT + HH_CHOSEN, "rejected": HH_PROMPT.replace("grey", "black") + " x"}])
    with pytest.raises(ValueError, match=r"pairs\.jsonl:3: 'chosen' and 'rejected' differ before their last .*at "
                                         r"character 34: 'grey.*drop_mismatched=True\n1 bad record in pairs\.jsonl"):
        preference_triples(recs, "pairs.jsonl")
    triples, identical, mismatched = preference_triples(recs, "pairs.jsonl", drop_mismatched=True)
    assert triples == [("pairs.jsonl:1", HH_PROMPT, HH_CHOSEN, HH_REJECTED)] and (identical, mismatched) == (1, 1)
    # every bad record is named with its line, in one error; --skip_bad_records skips and counts them
    bad = rows([{"chosen": HH_PROMPT + "a", "rejected": "\n\nHuman: hi"}, {"chosen": None, "rejected": "x"},
                {"chosen": HH_PROMPT + "a", "rejected": 7}, {"chosen": HH_PROMPT + "a", "rejected": HH_PROMPT + "b"}])
    with pytest.raises(ValueError, match=r"(?s)pairs.jsonl:1: field 'rejected': no '\\n\\nAssistant:' turn.*\n"
                                         r"pairs.jsonl:2: no field 'chosen' \(the record's fields are \['chosen', "
                                         r"'rejected'\]\).*\npairs.jsonl:3: field 'rejected' must be a string, got "
                                         r"int 7\n3 bad records in d: fix them, or skip bad records with "
                                         r"--skip_bad_records=True"):
        preference_triples(bad, "d")
    assert preference_triples(bad, "d", skip_bad=True)[0] == [("pairs.jsonl:4", HH_PROMPT, "a", "b")]
    with pytest.raises(ValueError, match=r"d:1: no field 'chosen' .*every record of d needs \['chosen', 'rejected'"):
        preference_triples(rows([{"text": "t"}], "d"), "d")
    with pytest.raises(ValueError, match=r"prompt_template='alpaca' needs records with a 'prompt' or 'instruction'"):
        preference_triples(rows([{"chosen": HH_PROMPT + "a", "rejected": HH_PROMPT + "b"}]), "d", "alpaca")
    # the explicit layout, wrapped in finetune.py's template on request
    triples, _, _ = preference_triples(rows([{"prompt": "Name a colour.", "chosen": "Red.", "rejected": "No."}]),
                                             "d", "alpaca")
    assert triples == [("pairs.jsonl:1", format_prompt("Name a colour."), "Red.", "No.")]
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: field 'prompt' is empty"):
        preference_triples(rows([{"prompt": " ", "chosen": "a", "rejected": "b"}]), "d")


def test_instruction_input_records_become_alpaca_prompts():
    """Raschka's preference layout (rasbt/LLMs-from-scratch ch07/04_preference-tuning-with-dpo): instruction, input
    (empty or missing for some records), output, chosen, rejected. The Alpaca template joins instruction and input
    exactly as finetune.py does for SFT, so an SFT model sees the prompts it was trained on."""
    recs = rows([{"instruction": "Rewrite the sentence in passive voice.", "input": "The cat chased the mouse.",
                  "output": "x", "chosen": "The mouse was chased by the cat.", "rejected": "Cat chase mouse."},
                 {"instruction": "Name a primary colour.", "output": "y", "chosen": "Red.",
                  "rejected": "Red is nice."}],
                "prefs.json")
    triples, identical, mismatched = preference_triples(recs, "prefs.json", "alpaca")
    assert triples == [("prefs.json:1", format_prompt("Rewrite the sentence in passive voice.",
                                                      "The cat chased the mouse."),
                        "The mouse was chased by the cat.", "Cat chase mouse."),
                       ("prefs.json:2", format_prompt("Name a primary colour."), "Red.", "Red is nice.")]
    assert "### Input:\nThe cat chased the mouse." in triples[0][1] and "### Input:" not in triples[1][1]
    with pytest.raises(ValueError, match=r"prefs.json: records with 'instruction' \(and 'input'\) fields need a "
                                         r"template .*--prompt_template=alpaca"):
        preference_triples(recs, "prefs.json")
    with pytest.raises(ValueError, match=r"p: records have 'prompt' and 'instruction' fields"):
        preference_triples(recs + rows([{"prompt": "a", "chosen": "b", "rejected": "c"}]), "p", "alpaca")
    with pytest.raises(ValueError, match=r"prefs.json:1: field 'input' must be a string, got int 3"):
        preference_triples([(recs[0][0], {**recs[0][1], "input": 3})], "p", "alpaca")


def test_encoding_truncates_prompt_first_with_a_shared_prompt():
    tok = CharTokenizer.from_text(VOCAB)
    long_prompt = "abcdefgh" * 3 + "="  # 25 chars
    triples = [(0, "ab=", "ab.", "ba."), (1, long_prompt, "abcdefgh.", "a."), (2, "ab=", "", "a."),
               (3, "hh=", "a", "b")]
    pairs, truncated, empty = encode_triples(tok, triples, 16, "t", verbose=False)
    assert (len(pairs), truncated, empty) == (3, 1, 1)  # an empty response has no token to score (no EOT here)
    # untruncated: collate reproduces encode_pair's x and y exactly
    x, y = collate(pairs, [0], "cpu")
    for row, resp in ((0, "ab."), (1, "ba.")):
        ex, ey, _ = encode_pair(tok, "ab=", resp, 16, truncate="prompt")
        assert x[row, :len(ex)].tolist() == ex and y[row, :len(ey)].tolist() == ey
    # truncated: the longer response keeps its 9 tokens, both sides keep the same last 16 + 1 - 9 prompt tokens
    c, r, k = pairs[1]
    assert k == 8 and tok.decode(c) == long_prompt[-8:] + "abcdefgh." and tok.decode(r) == long_prompt[-8:] + "a."
    x, y = collate(pairs, [1], "cpu")  # (2, 16): padding is masked too
    assert (y[0] != -1).sum() == 9 and (y[1] != -1).sum() == 2 and x.shape == (2, 16)
    with pytest.raises(ValueError, match=r"t.jsonl:4: characters '!' are not in this character-level vocabulary.*"
                                         r"\n1 bad record in t"):
        encode_triples(tok, [("t.jsonl:4", "ab=", "a!", "b")], 16, "t", verbose=False)
    kept, _, _ = encode_triples(tok, [("t.jsonl:4", "ab=", "a!", "b")] + triples[:1], 16, "t", False, True)
    assert len(kept) == 1 and all((a == b).all() for a, b in zip(kept[0][:2], pairs[0][:2]))  # skip_bad_records


@pytest.fixture
def main(monkeypatch, capsys):
    """align.py run in this process as __main__ (no second start-up of torch and datasets) with the given flags ->
    its output. The run installs signal handlers: pytest's own are put back."""
    def call(args):
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        monkeypatch.chdir(REPO)
        monkeypatch.setattr(sys, "argv", ["align.py", *args])
        capsys.readouterr()
        try:
            runpy.run_path(os.path.join(REPO, "align.py"), run_name="__main__")
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        out = capsys.readouterr()
        return out.out + out.err
    return call


@pytest.mark.parametrize("args, error, match", [
    (["--loss_type=kto"], ValueError, r"loss_type must be one of \('dpo', 'cdpo', 'ipo'\), got 'kto'"),
    (["--loss_type=cdpo"], ValueError, r"needs 0 < label_smoothing < 0.5, got 0.0; e.g. --label_smoothing=0.1"),
    (["--label_smoothing=0.1"], ValueError, r"only applies to loss_type='cdpo'"),
    (["--beta=0"], ValueError, r"beta must be > 0"),
    (["--rpo_alpha=-1"], ValueError, r"rpo_alpha must be a number >= 0 \(0 = plain dpo\), got -1"),
    (["--ipo_per_token=True"], ValueError, r"ipo_per_token=True only applies to loss_type='ipo' \(got "
                                           r"loss_type='dpo'\); use --loss_type=ipo or --ipo_per_token=False"),
    (["--dataset=missing.jsonl"], FileNotFoundError, r"'missing.jsonl' does not exist"),
    (["--batch_size=3", "--total_batch_pairs=64", "--device=cpu"], ValueError,
     r"total_batch_pairs=64 must be a multiple of batch_size \* processes = 3 \* 1; e.g. --total_batch_pairs=24"),
])
def test_config_errors(args, error, match, main):
    with pytest.raises(error, match=match):
        main(args)


def test_checkpoint_and_data_errors(workdir, main):
    start = str(workdir / "start")
    for args, match in (([f"--init_from={start}", f"--out_dir={start}"], r"already holds ckpt.pt, which a new align.py "
                          r"run would overwrite.*--overwrite=True"),
                        ([f"--init_from={start}", f"--out_dir={start}", "--overwrite=True"],
                         r"is this run's own checkpoint"),
                        ([f"--init_from=resume", f"--out_dir={start}"], r"kind 'imported' .*align.py "
                         r"--init_from=resume continues only its own runs \(dpo\)"),
                        ([f"--init_from={start}", "--block_size=64"], r"block_size=64 exceeds the model's context"),
                        ([f"--init_from={start}", "--block_size=32", "--val_pairs=500", f"--cache_dir={workdir}/cache"],
                         r"train.jsonl' has 400 usable pairs, too few to hold out val_pairs=500 "
                         r".*--val_split=val.jsonl")):
        with pytest.raises(ValueError, match=match):
            main([*args, "--device=cpu", f"--dataset={workdir / 'train.jsonl'}"])

# ----------------------------------------------------------------------------------------------
# end to end


CONFIG = """# DPO on the synthetic pairs
block_size = 32
batch_size = 16
total_batch_pairs = 16
val_pairs = 64
warmup_iters = 5
learning_rate = 1e-2  # a tiny model from scratch: large steps
eval_interval = 20
log_interval = 5
dropout = 0.1
cache_dir = {cache!r}  # datasets' cache, inside the test's folder
"""


@pytest.fixture(scope="module")
def trained(workdir):
    """A run from a config file, in a subprocess as a user starts it."""
    out = str(workdir / "out")
    log = run([str(workdir / "align_synthetic.py"), f"--init_from={workdir / 'start'}",
               f"--dataset={workdir / 'train.jsonl'}",
               f"--val_split={workdir / 'val.jsonl'}", f"--out_dir={out}", "--max_iters=40"], workdir / "hf")
    return out, log


def test_dpo_learns_the_synthetic_preference(trained, workdir):
    """From policy == reference (loss log 2, accuracy 0.5), 40 steps of DPO make the held-out chosen responses
    (the prompt's letters in ascending order) clearly likelier than the rejected ones (descending): the rule is
    learnt in about 20 steps (reward accuracy 1.0 at lr 1e-2 in trial runs), so >= 0.9 leaves a wide margin, and
    the policy's chosen-minus-rejected log-prob margin grows by several nats (> 2 required)."""
    out, log = trained
    val = records(out, "val")
    assert [r["iter"] for r in val] == [0, 20, 40]
    assert val[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and val[0]["reward_acc"] == 0.0
    assert val[-1]["reward_acc"] >= 0.9, val
    assert val[-1]["logp_margin"] > val[0]["logp_margin"] + 2, val
    assert val[-1]["reward_chosen"] > val[-1]["reward_rejected"]
    assert "reference model: frozen copy in memory" in log and "64 held-out pairs" in log
    train = records(out, "train")
    assert [r["iter"] for r in train] == list(range(5, 45, 5)) and all(r["tok_per_s"] > 0 for r in train)
    # train and held-out log the same quantities under the same names (held-out ones prefixed val_)
    assert all(set(align.LOGGED) <= set(r) for r in train + val) and train[0]["loss"] == train[0]["dpo_loss"]
    assert train[0]["reward_acc"] < 1 and all(r["nll"] > 0 for r in train)
    assert os.path.getsize(os.path.join(out, "loss.png")) > 0 and os.path.getsize(os.path.join(out, "reward.png")) > 0
    # the contract's layout: kind 'dpo', the best metric named as DPO's (not a pre-training val loss), one RNG state
    # per rank; sample.py's loader opens it with the char tokenizer
    ckpt = load_checkpoint(out)
    assert ckpt["kind"] == "dpo" and ckpt["config"]["loss_type"] == "dpo" and ckpt["ref_init_from"] == str(
        workdir / "start" / "ckpt.pt")
    state = ckpt["resume"]
    assert state["iter_num"] == 40 and state["best"] == {"name": "dpo_val_loss", "value": min(r["dpo_loss"] for r in val)}
    assert len(state["rng"]) == 1 and state["optimizer"]["state"] and ckpt["data_fingerprint"]
    model, _, tok = load_model("resume", out)
    assert tok.decode(tok.encode("abc=")) == "abc=" and model.config.n_layer == 2


def test_rpo_keeps_the_chosen_likelihood_up(trained, workdir, main, tmp_path):
    """rpo_alpha adds the chosen responses' NLL to DPO's loss: after the same 20 steps on the same pairs as plain
    DPO, the held-out chosen responses are likelier than under plain DPO, which lowers them along with the
    rejected ones, and the preference is still learnt."""
    plain = [r for r in records(trained[0], "val") if r["iter"] == 20][0]
    out = str(tmp_path / "rpo")
    main([str(workdir / "align_synthetic.py"), f"--init_from={workdir / 'start'}", f"--dataset={workdir / 'train.jsonl'}",
          f"--val_split={workdir / 'val.jsonl'}", f"--out_dir={out}", "--max_iters=20", "--rpo_alpha=1.0",
          "--device=cpu", "--compile=False"])
    rpo = records(out, "val")[-1]
    assert rpo["iter"] == 20 and rpo["logp_chosen"] > plain["logp_chosen"] + 0.5, (rpo, plain)
    assert rpo["reward_acc"] > 0.8 and rpo["logp_margin"] > 0, rpo


def test_resume_continues_exactly(trained, workdir, main):
    """20 steps, then a resumed run to 40, log the same training losses and end on the same held-out metrics as
    the uninterrupted 40 steps (CPU, float32, one thread: bit-identical; dropout 0.1 checks that the RNG state is
    restored)."""
    out = str(workdir / "resumed")
    common = [str(workdir / "align_synthetic.py"), f"--dataset={workdir / 'train.jsonl'}",
              f"--val_split={workdir / 'val.jsonl'}", f"--out_dir={out}", "--device=cpu"]
    main([*common, f"--init_from={workdir / 'start'}", "--max_iters=20"])
    log = main([*common, "--init_from=resume", "--max_iters=40"])
    assert "loading the reference model from" in log
    full = {r["iter"]: r["loss"] for r in records(trained[0], "train")}
    resumed = {r["iter"]: r["loss"] for r in records(out, "train")}
    assert resumed == full
    assert records(out, "val")[-1] == records(trained[0], "val")[-1]


def test_sigint_saves_and_resume_with_no_flags_equals_the_uninterrupted_run(trained, workdir, tmp_path, main):
    """Ctrl-C finishes the step, saves and prints the resume command; that command alone (no config file, no data
    flags: the saved config is the base) continues to the same training losses, bit for bit, and the same final
    held-out metrics as the uninterrupted 40 steps (CPU, float32, one thread; dropout 0.1 checks that the RNG
    continues). A log line torn by the interruption does not block the resume."""
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "align.py", str(workdir / "align_synthetic.py"), f"--out_dir={out}",
                          f"--init_from={workdir / 'start'}", f"--dataset={workdir / 'train.jsonl'}",
                          f"--val_split={workdir / 'val.jsonl'}", "--max_iters=40", "--log_interval=1",
                          "--device=cpu", "--compile=False"], cwd=REPO, env=env(workdir / "hf"),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in p.stdout:  # training runs (and the handler is installed) once the first step is logged
        lines.append(line)
        if line.startswith("iter 7:"):
            p.send_signal(signal.SIGINT)
            break
    rest, _ = p.communicate(timeout=120)
    output = "".join(lines) + rest
    assert p.returncode == 128 + signal.SIGINT, output
    ckpt = load_checkpoint(str(out))
    stopped = ckpt["resume"]["iter_num"]
    assert 7 <= stopped < 20 and ckpt["kind"] == "dpo" and len(ckpt["resume"]["rng"]) == 1, output
    assert "SIGINT: finishing this step" in output and f"saved {out / 'ckpt.pt'} (iteration {stopped:,})" \
        in output
    command = output.split("Resume with:\n")[1].split("\n")[0].strip()
    assert command == f"python align.py --init_from=resume --out_dir={out}", output
    with open(out / "log.jsonl", "a") as f:
        f.write('{"iter": 99, "split": "tr')  # torn by a kill mid-append
    log = main(command.split()[2:])  # in this process: the same run, without a second start-up
    assert f"resuming {out / 'ckpt.pt'} (dpo, iteration {stopped:,}) with its saved config" in log
    assert "skipped a torn log line" in log and "reference model: frozen copy in memory" in log
    full = {r["iter"]: r["loss"] for r in records(trained[0], "train")}  # means over log_interval=5 steps
    resumed = {r["iter"]: r["loss"] for r in records(out, "train")}  # every step (--log_interval=1)
    assert sorted(resumed) == list(range(1, 41))
    assert {i: sum(resumed[j] for j in range(i - 4, i + 1)) / 5 for i in full} == pytest.approx(full, rel=1e-6)
    assert records(out, "val")[-1] == records(trained[0], "val")[-1]
    assert [r["iter"] for r in records(out, "val")] == [0, 20, 40]  # the resumed leg did not evaluate again


INTERRUPTED_SAVE = """
import os, runpy, signal, sys
import torch
save, interrupts = torch.save, int(sys.argv[1])


def interrupted_save(*args, **kwargs):  # Ctrl-C pressed while a checkpoint is being written
    global interrupts
    if interrupts:
        interrupts -= 1
        os.kill(os.getpid(), signal.SIGINT)
    return save(*args, **kwargs)


torch.save = interrupted_save
sys.argv = ["align.py", *sys.argv[2:]]
runpy.run_path("align.py", run_name="__main__")
"""


def interrupted_run(workdir, out, interrupts):
    """A best-only run (always_save_checkpoint=False) whose first `interrupts` checkpoint writes get a Ctrl-C: the
    first at iteration 5, when the held-out loss improves on log 2."""
    return subprocess.run([sys.executable, "-c", INTERRUPTED_SAVE, str(interrupts), str(workdir / "align_synthetic.py"),
                           f"--out_dir={out}", f"--init_from={workdir / 'start'}",
                           f"--dataset={workdir / 'train.jsonl'}", f"--val_split={workdir / 'val.jsonl'}",
                           "--max_iters=40", "--eval_interval=5", "--always_save_checkpoint=False", "--device=cpu"],
                          cwd=REPO, env=env(workdir / "hf"), capture_output=True, text=True, timeout=300)


def test_ctrl_c_in_a_best_only_run_saves_beside_the_best_checkpoint(workdir, tmp_path, main):
    """Ctrl-C while the best checkpoint (iteration 5) is written: the file is completed, the run finishes step 6 and
    saves that state in ckpt_last.pt, never over the best model in ckpt.pt; the resume continues from the newer
    ckpt_last.pt. No temporary file is left."""
    out = tmp_path / "out"
    p = interrupted_run(workdir, out, 1)
    output = p.stdout + p.stderr
    assert p.returncode == 128 + signal.SIGINT, output
    assert "SIGINT: finishing this step, then saving a checkpoint (Ctrl-C again to abort without saving)" in output
    assert sorted(os.listdir(out)) == [".lock", "ckpt.pt", "ckpt_last.pt", "log.jsonl", "loss.png",
                                   "reward.png"], output
    best, last = load_checkpoint(str(out / "ckpt.pt")), load_checkpoint(str(out / "ckpt_last.pt"))
    val5 = [r for r in records(out, "val") if r["iter"] == 5][0]["loss"]
    assert best["resume"]["iter_num"] == 5 and best["resume"]["best"] == {"name": "dpo_val_loss", "value": val5}
    assert last["resume"]["iter_num"] == 6 and last["resume"]["best"]["value"] == val5
    assert f"saved {out / 'ckpt_last.pt'} (iteration 6)" in output
    with pytest.raises(ValueError, match=r"resuming .*ckpt_last.pt' with different settings would make another run: "
                                         r"beta: 0.1 -> 0.5\. Only these may change"):
        main(["--init_from=resume", f"--out_dir={out}", "--beta=0.5"])
    # a lower learning rate may continue a run (the fix a diverged run is told)
    log = main(["--init_from=resume", f"--out_dir={out}", "--max_iters=8", "--learning_rate=5e-3"])
    assert f"resuming {out / 'ckpt_last.pt'} (dpo, iteration 6) with its saved config: changed learning_rate: 0.01 " \
           f"-> 0.005; max_iters: 40 -> 8" in log
    assert [r["iter"] for r in records(out, "train")][-1] == 8 and records(out, "train")[-1]["lr"] == 5e-3


def test_second_ctrl_c_during_the_stop_save_aborts_after_the_file_is_complete(workdir, tmp_path):
    """Ctrl-C again while the stop checkpoint is written: the run aborts ("interrupted", 130), but only once
    ckpt_last.pt is complete, and no temporary file is left. The signal comes from the process itself, so that it
    lands inside torch.save every time; a process that imported torch has threads of its own, which a signal mask
    would not cover."""
    out = tmp_path / "out"
    p = interrupted_run(workdir, out, 2)
    output = p.stdout + p.stderr
    assert p.returncode == 130 and p.stderr.endswith("interrupted\n"), output
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")], os.listdir(out)
    assert load_checkpoint(str(out / "ckpt_last.pt"))["resume"]["iter_num"] == 6, output


@pytest.mark.parametrize("fsdp", [False, True])
def test_ddp_follows_one_process_and_sigterm_stops_every_rank_together(workdir, tmp_path, main, fsdp):
    """2 ranks (torchrun, gloo) x 8 pairs take the same pairs per step as 1 process x 2 micro-steps of 8, so the
    losses agree to float rounding (dropout 0: the ranks draw their own masks). SIGTERM to torchrun (as a scheduler
    sends it) is forwarded to both ranks; they agree on the step to stop at, save one checkpoint holding both
    ranks' RNG states, and print the torchrun command that resumes. The same under FSDP (the policy sharded, its
    full state gathered on save)."""
    args = [str(workdir / "align_synthetic.py"), f"--init_from={workdir / 'start'}", "--dropout=0.0",
            f"--dataset={workdir / 'train.jsonl'}", f"--val_split={workdir / 'val.jsonl'}", "--batch_size=8",
            "--log_interval=1", "--eval_interval=1000", "--device=cpu"]
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "align.py", *args, "--max_iters=1000", f"--out_dir={tmp_path / 'ddp'}", f"--fsdp={fsdp}"], cwd=REPO,
                         env=env(workdir / "hf"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("iter 4:"):
            p.send_signal(signal.SIGTERM)
            break
    rest, _ = p.communicate(timeout=120)
    output = "".join(lines) + rest
    ckpt = load_checkpoint(str(tmp_path / "ddp"))
    stopped = ckpt["resume"]["iter_num"]
    assert "DDP world size 2" in output and "8 per micro-step x 1 grad accum x 2 processes" in output, output
    assert ("(FSDP over 2 rank(s)" if fsdp else "(DDP over 2 rank(s)") in output, output
    assert 4 <= stopped < 20 and len(ckpt["resume"]["rng"]) == 2, output
    assert "stopped by SIGTERM. Resume with:\n  torchrun --nproc_per_node=2 (and your other torchrun flags) align.py " \
           f"--init_from=resume --out_dir={tmp_path / 'ddp'}" in output
    assert not torch.equal(ckpt["resume"]["rng"][0]["torch"], ckpt["resume"]["rng"][1]["torch"])  # seed + rank
    log = main([*args, f"--max_iters={stopped}", f"--out_dir={tmp_path / 'one'}"])
    assert "8 per micro-step x 2 grad accum x 1 processes" in log
    one, ddp = records(tmp_path / "one", "train"), records(tmp_path / "ddp", "train")
    assert [r["iter"] for r in ddp] == list(range(1, stopped + 1))  # rank 0 alone logs
    np.testing.assert_allclose([r["loss"] for r in ddp], [r["loss"] for r in one], rtol=0, atol=1e-5)


def test_schedule_warning_and_non_finite_loss_stops_without_saving(workdir, main, tmp_path):
    """align's defaults (learning_rate 1e-6, 150 warmup steps) on 400 pairs (25 steps of 16) never lift the learning
    rate above 1.7e-7: a warning says so before training. A learning rate of 1e20 breaks the weights at the first
    step; the run stops at once, saving nothing."""
    common = ["--device=cpu", f"--init_from={workdir / 'start'}", f"--dataset={workdir / 'train.jsonl'}",
              f"--val_split={workdir / 'val.jsonl'}", "--block_size=32", "--batch_size=16", "--total_batch_pairs=16",
              "--val_pairs=16"]
    log = main([*common, f"--out_dir={tmp_path / 'slow'}", "--eval_interval=100"])
    assert "25 iterations (1.00 epochs)" in log
    assert "WARNING: warmup_iters=150 is not shorter than the run (max_iters=25): the learning rate never reaches " \
           "learning_rate=1e-06, only 1.66e-07" in log
    with pytest.raises(SystemExit) as stop:
        main([*common, f"--out_dir={tmp_path / 'nan'}", "--learning_rate=1e20", "--warmup_iters=0", "--grad_clip=0.0",
              "--max_iters=10", "--eval_interval=5"])
    message = str(stop.value.code)
    assert re.match(r"ERROR: the training loss became nan at iteration [12]: the weights are broken, so nothing was "
                    r"saved", message), message
    assert f"--init_from=resume --out_dir={tmp_path / 'nan'} --learning_rate=..." in message  # the fix: a lower one
    assert not (tmp_path / "nan" / "ckpt.pt").exists()


def test_hh_rlhf_jsonl_gz_files_with_precomputed_reference(workdir, main):
    """hh-rlhf conversations from its own file layout (train.jsonl.gz, test.jsonl.gz), the reference's log-probs
    precomputed; a block of 24 tokens truncates every pair prompt-first."""
    out = str(workdir / "hh_out")
    with pytest.raises(ValueError, match=r"--dataset='.*hh' includes held-out pairs \['.*test.jsonl.gz'\], which "
                                         r"would be trained on; .*--val_split=DIR/test.jsonl.gz"):
        main(["--device=cpu", f"--init_from={workdir / 'start'}", f"--dataset={workdir / 'hh'}"])  # the folder
    log = main(["--device=cpu", f"--init_from={workdir / 'start'}", f"--dataset={workdir / 'hh' / 'train.jsonl.gz'}",
                f"--val_split={workdir / 'hh' / 'test.jsonl.gz'}", f"--out_dir={out}",
                "--precompute_ref=True", "--max_iters=10", "--block_size=24", "--batch_size=8",
                "--total_batch_pairs=16",
                "--val_pairs=32", "--learning_rate=1e-2", "--warmup_iters=2", "--eval_interval=10", "--log_interval=5"])
    assert "200 training pairs" in log and "32 held-out pairs" in log and "dropped 3 with identical responses" in log
    assert "232 (100.0%) truncated prompt-first to block_size 24" in log  # 26 prompt + 6 response chars > 25
    assert "reference log-probs: precomputed for 232 pairs; no reference model held" in log
    val = records(out, "val")
    assert val[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and val[0]["reward_acc"] == 0.0
    ckpt = load_checkpoint(out)
    assert ckpt["ref_logps"]["train"].shape == (200, 2) and ckpt["ref_logps"]["val"].shape == (32, 2)


def test_instruction_records_csv_and_a_broken_jsonl_line(workdir, main, tmp_path):
    """The formats users have: Raschka's instruction preference set (a JSON list, --prompt_template=alpaca) and a
    CSV of prompt,chosen,rejected; a JSONL file with one broken line in the middle stops before any training with
    that line's number."""
    common = ["--device=cpu", f"--init_from={workdir / 'start'}", "--eval_only=True", "--block_size=32",
              "--total_batch_pairs=8", "--val_pairs=8"]
    prefs = [{"instruction": "sort the letters.", "input": s["prompt"][:-1], "output": s["chosen"],
              "chosen": s["chosen"], "rejected": s["rejected"]} for s in synthetic(40, 7, "explicit")]
    prefs[1]["input"] = ""  # some records have no input
    (tmp_path / "prefs.json").write_text(json.dumps(prefs, indent=2))
    log = main([*common, f"--dataset={tmp_path / 'prefs.json'}", "--prompt_template=alpaca",
                f"--out_dir={tmp_path / 'o1'}"])
    assert "data: 32 training pairs" in log and "8 held-out pairs" in log and "40 (100.0%) truncated" in log
    with pytest.raises(ValueError, match=r"prefs.json': records with 'instruction' \(and 'input'\) fields need a "
                                         r"template"):
        main([*common, f"--dataset={tmp_path / 'prefs.json'}", f"--out_dir={tmp_path / 'o2'}"])
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["prompt", "chosen", "rejected"], lineterminator="\r\n")
        w.writeheader()
        w.writerows(synthetic(24, 8, "explicit"))
    log = main([*common, f"--dataset={tmp_path / 'pairs.csv'}", f"--out_dir={tmp_path / 'o3'}"])
    assert "data: 16 training pairs" in log and "0 (0.0%) truncated" in log
    # explicit held-out pairs in another format: a TSV with a header
    (tmp_path / "val.tsv").write_text("prompt\tchosen\trejected\n" + "".join(
        f"{r['prompt']}\t{r['chosen']}\t{r['rejected']}\n" for r in synthetic(12, 10, "explicit")))
    log = main([*common, f"--dataset={tmp_path / 'pairs.csv'}", f"--val_split={tmp_path / 'val.tsv'}",
                f"--out_dir={tmp_path / 'o5'}"])
    assert "data: 24 training pairs" in log and "8 held-out pairs" in log
    lines = [json.dumps(r) for r in synthetic(20, 9, "explicit")]
    lines[4] = lines[4][:25]  # torn mid-record
    (tmp_path / "broken.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"broken.jsonl:5: invalid JSON \(Unterminated string .*fix the line\n1 bad "
                                         r"record in .*--skip_bad_records=True"):
        main([*common, f"--dataset={tmp_path / 'broken.jsonl'}", f"--out_dir={tmp_path / 'o4'}"])
    log = main([*common, f"--dataset={tmp_path / 'broken.jsonl'}", f"--out_dir={tmp_path / 'o4'}",
                "--skip_bad_records=True"])
    assert "WARNING: skipped 1 bad record of" in log and "data: 11 training pairs" in log


def test_eval_only_scores_the_starting_model_with_ipo(workdir, main):
    """eval_only evaluates and exits without writing a checkpoint; IPO's loss at policy == reference is
    (0 - 1 / (2 beta))^2 = 1 for beta 0.5."""
    out = workdir / "eval_only"
    log = main(["--device=cpu", f"--init_from={workdir / 'start'}", f"--dataset={workdir / 'train.jsonl'}",
                f"--val_split={workdir / 'val.jsonl'}", f"--out_dir={out}", f"--cache_dir={workdir / 'cache'}",
                "--eval_only=True", "--loss_type=ipo", "--beta=0.5", "--block_size=32", "--total_batch_pairs=8"])
    assert "eval iter 0: val loss 1.0000, dpo loss 1.0000, nll " in log and "reward acc 0.000" in log and "done: 0 iterations" in log
    assert not (out / "ckpt.pt").exists() and len(records(out, "val")) == 1
