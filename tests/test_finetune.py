"""
finetune.py: loss masking, batching, the classification head, freezing, bad-data errors, and both tasks end
to end on small synthetic data written here in the real formats (Alpaca's JSON array, CSV with string labels).
"""

import csv
import json
import os
import random
import runpy
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from common import load_model
from finetune import (Finetuned, answer, class_names, column, encode_pair, encode_records, format_prompt, freeze,
                      label_ids, load_split, make_batch, padded_fraction, plan_batches)
from model import GPT, GPTConfig
from tokenizer import get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=64", "--device=cpu", "--compile=False"]
FACTS = [("What is the capital of France?", "Paris."), ("What color is the sky?", "Blue."),
         ("How many legs does a spider have?", "Eight."), ("What is the opposite of hot?", "Cold."),
         ("Name a primary color.", "Red."), ("What do bees make?", "Honey."),
         ("What is frozen water called?", "Ice."), ("Which animal barks?", "A dog.")]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, which only wait on each other on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(args, tmp_path):
    """Run finetune.py as a user would, offline, with datasets' cache in tmp_path; return its stdout."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "finetune.py", *args, f"--cache_dir={tmp_path / 'cache'}"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def run_here(args, monkeypatch):
    """Run finetune.py in this process, as __main__ with these arguments (its output goes to capsys)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["finetune.py", *args])
    runpy.run_path(os.path.join(ROOT, "finetune.py"), run_name="__main__")


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def tiny_gpt(vocab_size=50304, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32))


def sentiment_rows(n, seed):
    """Texts of filler words with one sentiment word: separable by a single token, anywhere in the text."""
    rng = random.Random(seed)
    pos, neg = ["good", "great", "excellent", "wonderful", "superb"], ["bad", "awful", "terrible", "boring", "poor"]
    filler = "the a movie film plot actor scene story it was and very quite really this that".split()
    rows = []
    for i in range(n):
        words = rng.choices(filler, k=rng.randint(3, 12))
        words.insert(rng.randint(0, len(words)), rng.choice(pos if i % 2 else neg))
        rows.append((" ".join(words), "positive" if i % 2 else "negative"))
    return rows


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)

# ----------------------------------------------------------------------------------------------
# masking and batching


def test_labels_mask_exactly_the_prompt_and_the_padding():
    tok = get_tokenizer("gpt2")
    prompt = format_prompt("Name a primary color.")
    p, r = tok.encode_ordinary(prompt), tok.encode_ordinary("Red.") + [tok.eot_token]
    x, y, truncated = encode_pair(tok, prompt, "Red.", block_size=64)
    # by hand: x = prompt + response without its last id; y predicts only the response ids and <|endoftext|>
    assert not truncated
    assert x == (p + r)[:-1]
    assert y == [-1] * (len(p) - 1) + r
    short = encode_pair(tok, format_prompt("Hi?"), "Yes.", block_size=64)[:2]
    xb, yb = make_batch([(x, y), short], [0, 1], pad_id=tok.eot_token)
    n = len(short[0])
    assert xb.shape == yb.shape == (2, len(x))
    assert yb[0].tolist() == y
    assert yb[1, :n].tolist() == short[1] and (yb[1, n:] == -1).all()  # padding is never a target
    assert (xb[1, n:] == tok.eot_token).all()
    # the loss counts exactly those positions: the full-vocabulary loss over them, and GPT.forward's own
    gpt = tiny_gpt()
    logits, loss = Finetuned(gpt)(xb, yb)
    assert logits.shape == (len(r) + len(short[1]) - short[1].count(-1), 50304)
    full = gpt(xb)[0]  # (B, T, vocab) logits at every position
    assert torch.allclose(loss, F.cross_entropy(full[yb != -1], yb[yb != -1]), atol=1e-5)
    assert torch.allclose(loss, gpt(xb, yb)[1], atol=1e-5)


def test_truncation_keeps_the_response_and_is_counted():
    tok = get_tokenizer("gpt2")
    long_input = "word " * 80
    rows = [(0, "Summarize.", long_input, "Short."), (1, "Say hi.", "", "Hi."), (2, "  ", "", "x"), (3, "Q", "", "")]
    examples, stats = encode_records(tok, rows, 64, "left", "test")
    assert stats == dict(truncated=1, dropped=0, empty=2)
    x, y = examples[0]
    response = tok.encode_ordinary("Short.") + [tok.eot_token]
    assert len(x) == 64 and y[-len(response):] == response  # prompt tokens went first
    _, stats = encode_records(tok, rows, 64, "drop", "test")
    assert stats == dict(truncated=0, dropped=1, empty=2)
    with pytest.raises(ValueError, match=r"'tiny.json': no records left after filtering: 2 read, 0 empty, 2 too long "
                                         r"for block_size 8 \(truncate='drop'\)"):
        encode_records(tok, rows[:2], 8, "drop", "'tiny.json'")
    ids, label = encode_records(tok, [(0, "one two three four", 1)], 2, "left", "t")[0][0]
    assert (tok.decode(ids), label) == (" three four", 1)  # classify, 'left': the end of the text stays


def test_length_sorted_batches_cover_every_record_once_with_little_padding():
    lengths = [random.Random(i).randint(5, 500) for i in range(1000)]
    sorted_b = plan_batches(lengths, 8, seed=1, epoch=0)
    random_b = plan_batches(lengths, 8, seed=1, epoch=0, mode="random")
    for batches in (sorted_b, random_b):
        assert sorted(i for b in batches for i in b) == list(range(1000))
    assert padded_fraction(lengths, sorted_b) < 0.05 < 0.3 < padded_fraction(lengths, random_b)
    again = plan_batches(lengths, 8, seed=1, epoch=0)  # a pure function of (seed, epoch): exact resume
    assert all((a == b).all() for a, b in zip(sorted_b, again))
    assert any((a != b).any() for a, b in zip(sorted_b, plan_batches(lengths, 8, seed=1, epoch=1)))

# ----------------------------------------------------------------------------------------------
# classification head and freezing


def test_head_reads_the_last_real_token_whatever_the_padding():
    model = Finetuned(tiny_gpt(), num_classes=3).eval()
    texts = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15]]
    alone = torch.cat([model(*make_batch([(t, 0)], [0], 0))[0] for t in texts])  # (3, 3) no padding at all
    for pad_id in (0, 50256, 777):
        x, y = make_batch([(t, 2) for t in texts], [0, 1, 2], pad_id)
        assert [row.nonzero().item() for row in (y != -1)] == [4, 1, 2]  # the label sits on the last real token
        logits, _ = model(x, y)
        assert torch.allclose(logits, alone, atol=1e-5), pad_id
    # left padding would put the label on the final position, but shift and prefix the text: the batch
    # builder only right-pads, and the answer depends on the real tokens only
    x, y = make_batch([([1, 2, 3, 99], 0)], [0], 0)
    assert not torch.allclose(model(x, y)[0], model(*make_batch([([1, 2, 3, 98], 0)], [0], 0))[0])


def test_frozen_layers_do_not_change():
    gpt = tiny_gpt()
    model = Finetuned(gpt, num_classes=2)
    freeze(gpt, 1)
    opt = gpt.configure_optimizers(0.1, 1e-2, (0.9, 0.99), "cpu")
    opt.add_param_group({"params": list(model.head.parameters()), "weight_decay": 0.0})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = make_batch([([1, 2, 3], 0), ([4, 5], 1)], [0, 1], 0)
    for _ in range(3):
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    frozen = [k for k in before if k.startswith(("gpt.transformer.wte", "gpt.transformer.wpe", "gpt.transformer.h.0.",
                                                 "gpt.lm_head"))]
    assert frozen and not changed & set(frozen)
    assert {"gpt.transformer.h.1.attn.c_attn.weight", "gpt.transformer.ln_f.weight", "head.weight"} <= changed
    with pytest.raises(ValueError, match=r"n_trainable_layers must be -1 \(all\) or in \[0, 2\] .* got 3"):
        freeze(gpt, 3)

# ----------------------------------------------------------------------------------------------
# bad data


def test_bad_records_are_named(tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    path = tmp_path / "sft.jsonl"
    path.write_text('{"instruction": "a", "output": "x"}\n{"instruction": "b", "output": "y"}\n{"instruction": "c"}\n')
    ds, source = load_split(str(path), "train", cache_dir=cache)
    assert column(ds, "input", "input_field", source, required=False) == ["", "", ""]
    with pytest.raises(ValueError, match=r"sft.jsonl': record 2 has no 'output' field .*--output_field=NAME"):
        column(ds, "output", "output_field", source)
    with pytest.raises(ValueError, match=r"record 0 has no 'response' field"):
        column(ds, "response", "output_field", source)
    path.write_text('{"instruction": "a", "output": "x"}\n{"instruction": "b", "output": 3}\n')
    ds, source = load_split(str(path), "train", cache_dir=cache)
    with pytest.raises(ValueError, match=r"record 1 field 'output' is 3 \(int\), expected str"):
        column(ds, "output", "output_field", source)

    write_csv(tmp_path / "cls.csv", [("fine", "pos"), ("meh", "neg"), ("odd", "neutral")])
    ds, source = load_split(dataset="x", split=str(tmp_path / "cls.csv"), cache_dir=cache)  # a file as a split
    labels = column(ds, "label", "label_field", source, kinds=(int, str))
    assert class_names(ds, labels, "label", [], source) == ["neg", "neutral", "pos"]
    with pytest.raises(ValueError, match=r"record 2 has label 'neutral', which is none of the classes \['neg', 'po"):
        label_ids(labels, ["neg", "pos"], source)
    with pytest.raises(ValueError, match=r"record 1 has label 5, outside \[0, 2\) for the classes \['neg', 'pos'\]"):
        label_ids([1, 5], ["neg", "pos"], "'imdb'")
    with pytest.raises(ValueError, match=r"record 0 has label -1, outside \[0, 2\)"):  # IMDB's unlabelled split
        label_ids([-1], ["neg", "pos"], "'imdb'")
    with pytest.raises(ValueError, match=r"field 'label' mixes strings and integers"):
        class_names(ds, ["pos", 1], "label", [], source)
    with pytest.raises(ValueError, match=r"is a local file, which holds one split; for split 'test' pass another file"):
        load_split(str(tmp_path / "cls.csv"), "test", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match=r"data file '.*missing.jsonl' does not exist"):
        load_split(str(tmp_path / "missing.jsonl"), "train", cache_dir=cache)
    # a Hub name without network (offline mode stands in for it: no connection is tried)
    import datasets
    import huggingface_hub
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"could not load split 'train' of the Hugging Face dataset 'stanfordnlp/imdb' "
                                         r"\(ConnectionError: .*--dataset=data.jsonl"):
        load_split("stanfordnlp/imdb", "train", cache_dir=cache)

# ----------------------------------------------------------------------------------------------
# end to end


def test_instruct_learns_to_answer_and_writes_a_sampleable_checkpoint(tmp_path):
    data = tmp_path / "facts.json"  # Alpaca's layout: one JSON array of records
    data.write_text(json.dumps([{"instruction": q, "input": "", "output": a} for q, a in FACTS] * 4, indent=1))
    out_dir = tmp_path / "out"
    stdout = run(["config/finetune_alpaca.py", f"--dataset={data}", "--init_from=scratch", f"--out_dir={out_dir}",
                  *TINY, "--val_fraction=0.2", "--max_iters=250", "--learning_rate=3e-3", "--warmup_iters=10",
                  "--eval_interval=250", "--eval_iters=5", "--sample_interval=250", "--max_new_tokens=8",
                  "--log_interval=50", "--gradient_accumulation_steps=1"], tmp_path)
    assert "train: 26 records" in stdout and "val: 6 records" in stdout and "0 of them truncated" in stdout
    assert "padding is" in stdout and "sample 250:" in stdout
    evals = [r for r in read_log(out_dir) if "val_loss" in r]
    # from ln(50304) = 10.8 at the start; the answers are 2-4 tokens, so a memorised set ends far below 1
    assert evals[0]["val_loss"] > 10 and evals[-1]["val_loss"] < 0.5, evals
    model, ckpt, tok = load_model("resume", str(out_dir))
    assert {"model", "model_args", "config", "tokenizer", "iter_num", "best_val_loss", "optimizer"} <= set(ckpt)
    assert ckpt["iter_num"] == 250 and ckpt["task"] == "instruct"
    model.eval()
    assert [answer(model, tok, q, max_new_tokens=8) for q, _ in FACTS] == [a for _, a in FACTS]


def test_classify_reaches_high_accuracy_predicts_and_resumes(tmp_path, monkeypatch, capsys):
    """The classes differ by one word anywhere in the text; a 2-layer model fully fine-tuned reaches 100% test
    accuracy by about 100 steps in a trial run, so 0.9 after 150 leaves a wide margin for other seeds/CPUs."""
    rows = sentiment_rows(1400, seed=0)
    write_csv(tmp_path / "train.csv", rows[:1200])
    write_csv(tmp_path / "test.csv", rows[1200:])
    out_dir = tmp_path / "out"
    stdout = run(["config/finetune_imdb.py", f"--dataset={tmp_path / 'train.csv'}",
                  f"--test_split={tmp_path / 'test.csv'}", "--init_from=scratch", f"--out_dir={out_dir}", *TINY,
                  "--max_iters=150", "--batch_size=16", "--learning_rate=3e-3", "--warmup_iters=10",
                  "--eval_interval=150", "--eval_iters=4", "--val_fraction=0.1", "--log_interval=50"], tmp_path)
    assert "classes: ['negative', 'positive']" in stdout
    final = {k: v for r in read_log(out_dir) for k, v in r.items() if k.startswith("final_")}
    assert final["final_test_acc"] >= 0.9 and final["final_val_acc"] >= 0.9, final
    gpt, ckpt, tok = load_model("resume", str(out_dir))
    assert ckpt["task"] == "classify" and ckpt["labels"] == ["negative", "positive"]
    model = Finetuned(gpt, 2).eval()
    model.head.load_state_dict(ckpt["head"])  # the head round-trips: it classifies held-out texts
    examples, _ = encode_records(tok, [(0, "the film was really superb", 1), (1, "a boring plot", 0)], 64, "left", "t")
    logits, _ = model(*make_batch(examples, [0, 1], tok.eot_token))
    assert logits.argmax(-1).tolist() == [1, 0]
    # in this process (no second start-up): --predict, then resuming keeps the iteration count
    with pytest.raises(SystemExit) as done:
        run_here(["--task=classify", "--init_from=resume", f"--out_dir={out_dir}", "--device=cpu",
                  "--predict=What a wonderful film"], monkeypatch)
    assert done.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("label: positive (0.9") and lines[-1].startswith("probabilities: negative=0.0"), lines
    run_here(["config/finetune_imdb.py", f"--dataset={tmp_path / 'train.csv'}", f"--test_split={tmp_path / 'test.csv'}",
              "--init_from=resume",
              f"--out_dir={out_dir}", *TINY, "--max_iters=155", "--batch_size=16", "--eval_iters=1",
              "--val_fraction=0.1", "--final_eval=False", f"--cache_dir={tmp_path / 'cache'}"], monkeypatch)
    assert "resuming at iteration 150" in capsys.readouterr().out
    assert load_model("resume", str(out_dir))[1]["iter_num"] == 155
