"""
finetune.py: loss masking, batching, the classification head, freezing, records in their real formats and every
bad one named, prompt templates, classification metrics, the exact loss under gradient accumulation and DDP,
stop-and-resume with no flags, and both tasks end to end on small synthetic data written here.

The runs are real: in this process through runpy (no interpreter start-up), or as processes where a signal or
torchrun is involved, with OMP_NUM_THREADS=1 (tiny models gain nothing from threads on a busy 2-core machine).
"""

import bz2
import csv
import gzip
import json
import os
import random
import re
import runpy
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from finetune import evaluate, make_batch, plot_confusion
from torch.nn import functional as F

from lib.checkpoint import load_checkpoint, make_checkpoint, resume_state, save_checkpoint
from lib.finetuning import (Finetuned, answer, class_metrics, class_report, encode_pair, format_prompt, freeze,
                            padded_fraction, plan_batches, template_marker)
from lib.models import load_model
from lib.optim import make_optimizer
from lib.runtime import Runtime
from lib.sft_data import encode_records, read_split
from lib.tokenizer import get_tokenizer
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=64", "--device=cpu", "--compile=False"]
FACTS = [("What is the capital of France?", "Paris."), ("What color is the sky?", "Blue."),
         ("How many legs does a spider have?", "Eight."), ("What is the opposite of hot?", "Cold."),
         ("Name a primary color.", "Red."), ("What do bees make?", "Honey."),
         ("What is frozen water called?", "Ice."), ("Which animal barks?", "A dog.")]
INSTRUCT = {"instruction_field": "instruction", "input_field": "input", "output_field": "output"}
CLASSIFY = {"text_field": "text", "label_field": "label"}


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def env(tmp_path) -> dict:
    return dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
                OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run(args, tmp_path, launcher=(sys.executable,)):
    """Run finetune.py as a user would, offline, with datasets' cache in tmp_path; return its stdout."""
    p = subprocess.run([*launcher, "finetune.py", *args, f"--cache_dir={tmp_path / 'cache'}"], cwd=ROOT,
                       env=env(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def run_here(args, monkeypatch):
    """Run finetune.py in this process, as __main__ with these arguments (its output goes to capsys); the
    signal handlers it installs are put back afterwards."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["finetune.py", *args])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        runpy.run_path(os.path.join(ROOT, "finetune.py"), run_name="__main__")
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def read_log(out_dir, kind=None):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if kind is None or r.get("type") == kind]


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


def write_csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="") as f:  # csv's own line end: CRLF, as Excel and the SMS Spam CSV have it
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def facts_json(path, n=4):
    """Alpaca's layout: one JSON array of records."""
    path.write_text(json.dumps([{"instruction": q, "input": "", "output": a} for q, a in FACTS] * n, indent=1))
    return str(path)

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
    assert torch.allclose(Finetuned(gpt)(xb, yb, reduction="sum")[1].float(), loss * len(logits), atol=1e-3)


def test_prompt_templates_and_the_formatted_prompt_detector():
    assert format_prompt("Add 2 and 3.", template="none") == "Add 2 and 3."
    assert format_prompt("Add.", "2 and 3", "none") == "Add.\n\n2 and 3"
    alpaca = format_prompt("Add.", "2 and 3")
    assert alpaca.endswith("### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n")
    assert template_marker(alpaca) == "### Response:" and template_marker("Add 2 and 3.") == ""
    assert template_marker("\n\nHuman: hi\n\nAssistant:") == "\n\nAssistant:"
    with pytest.raises(ValueError, match=r"prompt_template must be one of \('alpaca', 'none'\), got 'chat'"):
        format_prompt("x", template="chat")


def test_truncation_keeps_the_response_and_is_counted():
    tok = get_tokenizer("gpt2")
    long_input = "word " * 80
    rows = [("a:1", "Summarize.", long_input, "Short."), ("a:2", "Say hi.", "", "Hi.")]
    examples, stats = encode_records(tok, rows, 64, "left", "test")
    assert stats == dict(truncated=1, dropped=0)
    x, y = examples[0]
    response = tok.encode_ordinary("Short.") + [tok.eot_token]
    assert len(x) == 64 and y[-len(response):] == response  # prompt tokens went first
    _, stats = encode_records(tok, rows, 64, "drop", "test")
    assert stats == dict(truncated=0, dropped=1)
    with pytest.raises(ValueError, match=r"'tiny.json': no records left: all 2 are too long for block_size 8 "
                                         r"\(truncate='drop'\)"):
        encode_records(tok, rows, 8, "drop", "'tiny.json'")
    ids, label = encode_records(tok, [("t:1", "one two three four", 1)], 2, "left", "t")[0][0]
    assert (tok.decode(ids), label) == (" three four", 1)  # classify, 'left': the end of the text stays
    # the template is the caller's: 'none' keeps the prompt's tokens as they are
    (x, y), = encode_records(tok, [("t:1", "Q: hi\nA:", "", " yes")], 64, "left", "t", "none")[0]
    assert x == tok.encode_ordinary("Q: hi\nA:") + tok.encode_ordinary(" yes")  # then <|endoftext|> in y
    with pytest.raises(ValueError, match=r"^x.jsonl:7: "):  # a record that does not tokenize is named
        from lib.tokenizer import CharTokenizer
        encode_records(CharTokenizer(list("abc")), [("x.jsonl:7", "abz", 0)], 8, "left", "x")


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
# classification head, freezing, metrics


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
    opt = make_optimizer(gpt, 0.1, 1e-2, (0.9, 0.99), "cpu")
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


def test_metrics_against_a_hand_computed_confusion_matrix(tmp_path):
    """Rows: true class, columns: predicted. Class 'c' is never predicted (precision 0 by convention)."""
    confusion = torch.tensor([[5, 1, 0],   # a: 6 records, 5 right
                              [2, 3, 0],   # b: 5 records, 3 right
                              [1, 1, 0]])  # c: 2 records, none right
    m = class_metrics(confusion)
    # a: precision 5/8, recall 5/6, F1 2pr/(p+r) = 10/14; b: 3/5, 3/5, 3/5; c: 0, 0, 0
    np.testing.assert_allclose(m["precision"], [5 / 8, 3 / 5, 0.0])
    np.testing.assert_allclose(m["recall"], [5 / 6, 3 / 5, 0.0])
    np.testing.assert_allclose(m["f1"], [10 / 14, 3 / 5, 0.0])
    assert m["support"] == [6, 5, 2]
    report = class_report(confusion, ["a", "b", "c"]).splitlines()
    assert report[1].split() == ["a", "0.6250", "0.8333", "0.7143", "6"]
    assert report[4].split() == ["macro", "avg", f"{(5 / 8 + 3 / 5) / 3:.4f}", f"{(5 / 6 + 3 / 5) / 3:.4f}",
                                 f"{(10 / 14 + 3 / 5) / 3:.4f}", "13"]
    assert report[-3:] == [f"{'a':<12}" + "        5        1        0", f"{'b':<12}" + "        2        3        0",
                           f"{'c':<12}" + "        1        1        0"]
    plot_confusion(str(tmp_path / "confusion.png"), {"val": confusion, "test": confusion}, ["a", "b", "c"], "t")
    assert (tmp_path / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # evaluate() counts the same matrix from a model's own predictions
    rt = Runtime("cpu", "cpu", "float32")
    model = Finetuned(tiny_gpt(), num_classes=3)
    examples = [([random.Random(i).randrange(1000) for _ in range(5)], i % 3) for i in range(20)]
    batches = plan_batches([5] * 20, 4, seed=0, epoch=0)
    loss, acc, counted = evaluate(model, examples, batches, 0, rt, num_classes=3)
    pred = model.eval()(*make_batch(examples, range(20), 0))[0].argmax(-1)
    by_hand = torch.zeros(3, 3, dtype=torch.long)
    for t, p in zip([c for _, c in examples], pred.tolist()):
        by_hand[t, p] += 1
    assert torch.equal(counted, by_hand) and acc == pytest.approx(by_hand.diag().sum().item() / 20)

# ----------------------------------------------------------------------------------------------
# records: formats, layouts and bad records


def test_records_in_their_native_formats(tmp_path):
    rows = sentiment_rows(8, seed=0)
    # CSV with CRLF line ends and string labels
    src, got, names = read_split(write_csv(tmp_path / "a.csv", rows), "train", CLASSIFY)
    assert names == ["negative", "positive"] and got[0] == (f"{tmp_path / 'a.csv'}:2", rows[0][0], 0)
    assert (tmp_path / "a.csv").read_bytes().count(b"\r\n") == 9
    # GLUE SST-2's TSV: sentence<TAB>label with a header; 'sentence' is taken for the default text field
    tsv = tmp_path / "dev.tsv"
    tsv.write_text("sentence\tlabel\n" + "".join(f"{t}\t{int(l == 'positive')}\n" for t, l in rows))
    _, got, names = read_split("ignored", str(tsv), CLASSIFY)  # a file as the split
    assert names == ["0", "1"] and [r[2] for r in got] == [0, 1] * 4 and got[1][0] == f"{tsv}:3"
    _, got, _ = read_split("x", str(tsv), CLASSIFY, label_names=["neg", "pos"])
    assert [r[2] for r in got] == [0, 1] * 4
    # the raw SMS Spam Collection: label<TAB>text, no header, no extension; columns by index
    sms = tmp_path / "SMSSpamCollection"
    sms.write_text("".join(f"{'spam' if i % 3 == 0 else 'ham'}\tmessage number {i}\n" for i in range(9)))
    _, got, names = read_split(str(sms), "train", {"text_field": "1", "label_field": "0"})
    assert names == ["ham", "spam"] and got[0] == (f"{sms}:1", "message number 0", 1)
    # JSON lines, gzip and bz2; the {"prompt": ..., "response": ...} SFT layout
    lines = "".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in FACTS).encode()
    for path, opener in ((tmp_path / "sft.jsonl.gz", gzip.open), (tmp_path / "sft.jsonl.bz2", bz2.open)):
        with opener(path, "wb") as f:
            f.write(lines)
        _, got, names = read_split(str(path), "train", INSTRUCT)
        assert names is None and got[2] == (f"{path}:3", FACTS[2][0], "", FACTS[2][1])
    # Alpaca's JSON array: each record named by the line it starts on
    _, got, _ = read_split(facts_json(tmp_path / "alpaca.json", 1), "train", INSTRUCT)
    assert got[1][0] == f"{tmp_path / 'alpaca.json'}:7"


def test_bad_records_are_named_before_training(tmp_path, capsys):
    """What cannot be read (invalid JSON: the loader's check) is named first; then every record with a missing,
    mistyped or empty field, all in one message."""
    path = tmp_path / "sft.jsonl"
    good = '{"instruction": "a", "output": "x"}\n{"instruction": "b", "output": "y"}\n'
    path.write_text(good + '{"instruction": "c"\n' + good)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:3: invalid JSON .*\n1 bad record in "):
        read_split(str(path), "train", INSTRUCT)
    path.write_text(good + '{"instruction": "d", "output": 3}\n{"instruction": "e", "output": " "}\n'
                    '{"instruction": "f", "output": "z"}\n{"prompt": "g"}\n')
    with pytest.raises(ValueError) as e:
        read_split(str(path), "train", INSTRUCT)
    assert str(e.value).splitlines() == [
        f"{path}:3: field 'output' is 3 (int), expected str",
        f"{path}:4: field 'output' is empty (' '); fill it in or delete the record",
        f"{path}:6: no field 'instruction' (the record's fields are ['prompt']); fix the record, or name the field "
        f"that holds it: --instruction_field=prompt",
        f"3 bad records in {str(path)!r}: fix them, or skip bad records with --skip_bad_records=True"]
    _, got, _ = read_split(str(path), "train", INSTRUCT, skip_bad=True)
    assert [r[1] for r in got] == ["a", "b", "f"]
    assert f"WARNING: skipped 3 bad records of {str(path)!r} (the first: {path}:3: field" in capsys.readouterr().out
    # labels: outside the classes, mixed kinds, a file of one split only
    write_csv(tmp_path / "train.csv", [("fine", "pos"), ("meh", "neg"), ("ok", "pos"), ("bad", "neg")])
    write_csv(tmp_path / "val.csv", [("fine", "pos"), ("odd", "neutral")])
    _, _, names = read_split(str(tmp_path / "train.csv"), "train", CLASSIFY)
    with pytest.raises(ValueError, match=r"val.csv:3: label 'neutral' is none of the classes \['neg', 'pos'\] \(ids "
                                         r"0..1\); fix the record, or name every class in id order: --label_names="):
        read_split("x", str(tmp_path / "val.csv"), CLASSIFY, names)
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": "pos"}\n')
    with pytest.raises(ValueError, match=r"field 'label' mixes class names and ids \(e.g. .*sft.jsonl:1: 1 and "):
        read_split(str(path), "train", CLASSIFY)
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": -1}\n')  # IMDB's unlabelled split
    with pytest.raises(ValueError, match=r"sft.jsonl:2: label -1 is none of the classes \['0', '1'\]"):
        read_split(str(path), "train", CLASSIFY)
    with pytest.raises(ValueError, match=r"is a local file, which holds one split; for split 'test' pass a file"):
        read_split(str(tmp_path / "train.csv"), "test", CLASSIFY)


def test_hub_dataset_with_a_configuration(tmp_path, monkeypatch):
    """What finetune makes of a Hub split (datasets' own loading is theirs to test): ClassLabel names, the
    'sentence' field of GLUE, the configuration passed on; offline, the error says what to do."""
    import datasets
    ds = datasets.Dataset.from_dict({"sentence": ["good", "bad"], "label": [1, 0], "idx": [0, 1]},
                                    features=datasets.Features({"sentence": datasets.Value("string"),
                                                                "label": datasets.ClassLabel(names=["neg", "pos"]),
                                                                "idx": datasets.Value("int32")}))
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or ds)
    source, got, names = read_split("nyu-mll/glue", "validation", CLASSIFY, name="sst2")
    assert calls[0][0] == ("nyu-mll/glue", "sst2") and calls[0][1]["split"] == "validation"
    assert names == ["neg", "pos"] and got == [("nyu-mll/glue (validation) record 0", "good", 1),
                                               ("nyu-mll/glue (validation) record 1", "bad", 0)]
    monkeypatch.undo()
    import datasets.config
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"could not load the Hugging Face dataset 'nyu-mll/glue' \(name 'sst2', "
                                         r"split 'train'\)"):
        read_split("nyu-mll/glue", "train", CLASSIFY, name="sst2")

# ----------------------------------------------------------------------------------------------
# the run: exact loss weighting, templates, checkpoints, stop and resume


def weights(out_dir, name="ckpt.pt"):
    ckpt = load_checkpoint(os.path.join(out_dir, name))
    return {**ckpt["model"], **{f"head.{k}": v for k, v in (ckpt.get("head") or {}).items()}}


def uneven_sft(path, n=30):
    """Responses of 1 to ~40 tokens: micro-batches hold very different numbers of labels, so a mean of
    per-micro-batch means would weigh the tokens of short responses far more than those of long ones."""
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    path.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": " ".join(rng.choices(words, k=rng.choice(
        [1, 2, 30, 40])))}) + "\n" for i in range(n)))
    return str(path)


def labelled(path, n=40):
    """Sentiment records in JSONL: {"text", "label"}."""
    path.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in sentiment_rows(n, seed=1)))
    return str(path)


def test_accumulation_4_x_batch_2_equals_batch_8(tmp_path, monkeypatch, capsys):
    """batching='random' cuts one shuffled order into consecutive batches, and micro-batch m of step k is batch
    k * 4 + m: both runs see the same 8 records per step. The loss is the mean over all response tokens of the
    step either way, so the logged losses and the weights after 3 AdamW steps agree up to float rounding
    (summation order is all that differs; 1e-6). AdamW divides each gradient by its own running RMS, so early
    updates are about lr * sign(gradient) and rounding in a near-zero gradient moves a weight by up to ~lr/1000:
    lr=1e-4 keeps that below 1e-6, while a mean of per-micro-batch means moves weights by ~lr. The classifier
    (one label per record) is checked the same way."""
    data = uneven_sft(tmp_path / "sft.jsonl")
    common_args = [f"--dataset={data}", "--init_from=scratch", *TINY, "--batching=random", "--max_iters=3",
                   "--val_fraction=0.2", "--eval_interval=3", "--eval_iters=1", "--log_interval=1",
                   "--sample_interval=0", "--learning_rate=1e-4", "--warmup_iters=0", "--dropout=0.0",
                   "--dtype=float32"]  # the arithmetic of accumulation, not bfloat16 rounding
    csv_data = write_csv(tmp_path / "c.csv", sentiment_rows(30, 1))
    for task in ("instruct", "classify"):
        extra = [] if task == "instruct" else ["--task=classify", f"--dataset={csv_data}"]
        run_here(common_args + extra + [f"--out_dir={tmp_path / task / 'big'}", "--batch_size=8"], monkeypatch)
        run_here(common_args + extra + [f"--out_dir={tmp_path / task / 'acc'}", "--batch_size=2",
                                        "--gradient_accumulation_steps=4"], monkeypatch)
        big, acc = read_log(tmp_path / task / "big", "train"), read_log(tmp_path / task / "acc", "train")
        assert len(big) == len(acc) == 3
        np.testing.assert_allclose([r["loss"] for r in acc], [r["loss"] for r in big], rtol=0, atol=1e-6)
        assert [r["acc"] for r in acc] == [r["acc"] for r in big]
        wa, wb = weights(tmp_path / task / "acc"), weights(tmp_path / task / "big")
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
        moved = load_checkpoint(str(tmp_path / task / "big"))["model"]["transformer.h.0.attn.c_attn.weight"]
        start = tiny_gpt(seed=1337).state_dict()["transformer.h.0.attn.c_attn.weight"]  # the run's own init
        assert 1e-4 < (moved - start).abs().max() <= 3e-4 + 1e-6  # 3 steps of at most ~lr each: it trained
    capsys.readouterr()


@pytest.mark.parametrize("task,fsdp", [("instruct", False), ("instruct", True), ("classify", True)])
def test_ddp_two_ranks_equal_one_process_with_the_whole_batch(tmp_path, monkeypatch, task, fsdp):
    """2 ranks x batch 4 see, at each step, the 8 records that one process sees as one batch (micro-batch r of
    the step goes to rank r); the loss over all the step's tokens and the logged, all-reduced metrics agree. The
    same with FSDP (fsdp=True: parameters, gradients and optimizer states sharded; the classification head too)."""
    data = uneven_sft(tmp_path / "sft.jsonl") if task == "instruct" else labelled(tmp_path / "cls.jsonl")
    args = [f"--dataset={data}", "--init_from=scratch", *TINY, "--batching=random", "--max_iters=2",
            "--val_fraction=0.2", "--eval_interval=2", "--eval_iters=3", "--log_interval=1", "--sample_interval=0",
            "--learning_rate=1e-3", "--warmup_iters=0", "--dtype=float32",  # batch shapes differ: no bf16 rounding
            f"--task={task}", "--final_eval=False"]
    run_here(args + [f"--out_dir={tmp_path / 'one'}", "--batch_size=8"], monkeypatch)
    out = run(args + [f"--out_dir={tmp_path / 'ddp'}", "--batch_size=4", f"--fsdp={fsdp}"], tmp_path,
              launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    assert "DDP world size 2" in out and out.count("iter 2: loss") == 1  # rank 0 prints
    assert ("(FSDP over 2 rank(s)" if fsdp else "(DDP over 2 rank(s)") in out
    if task == "classify":
        a, b = load_checkpoint(str(tmp_path / "one")), load_checkpoint(str(tmp_path / "ddp"))
        assert a["labels"] == b["labels"] and max((a["head"][k] - b["head"][k]).abs().max() for k in a["head"]) < 1e-6
    for kind in ("train", "eval"):
        a, b = read_log(tmp_path / "one", kind), read_log(tmp_path / "ddp", kind)
        for key in ("loss", "acc", "val_loss", "val_acc"):
            np.testing.assert_allclose([r[key] for r in b if key in r], [r[key] for r in a if key in r], atol=1e-6)
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "ddp")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6


def test_templated_records_warn_and_prompt_template_none_uses_them_as_they_are(tmp_path, monkeypatch, capsys):
    path = tmp_path / "sft.jsonl"  # prompts formatted already: the common {"prompt", "response"} SFT layout
    path.write_text("".join(json.dumps({"prompt": format_prompt(q), "response": a}) + "\n" for q, a in FACTS * 2)
                    + '{"prompt": "a record without its response"}\n')
    val = tmp_path / "val.jsonl"  # the same records, as a file of their own (the training file itself is refused)
    val.write_text(path.read_text())
    args = [f"--dataset={path}", f"--val_split={val}", "--init_from=scratch", *TINY, "--block_size=256",
            "--max_iters=1", "--eval_iters=1", "--sample_interval=0", f"--out_dir={tmp_path / 'out'}"]
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:17: no field 'response' \(the record's fields are "
                                         r"\['prompt'\]\)"):  # before any training
        run_here(args, monkeypatch)
    args.append("--skip_bad_records=True")
    run_here(args, monkeypatch)
    out = capsys.readouterr().out
    assert f"WARNING: skipped 1 bad record of {str(path)!r} (the first: {path}:17: no field 'response'" in out
    assert "no 'instruction' field, using 'prompt' (--instruction_field=prompt)" in out
    assert "no 'output' field, using 'response' (--output_field=response)" in out
    assert re.search(rf"WARNING: 32 prompts look formatted already \({re.escape(str(path))}:\d+ contains '### "
                     r"Response:'\), and prompt_template='alpaca' wraps each in its template again. If the records "
                     r"hold finished prompts: --prompt_template=none\n", out)
    # the default warmup (100) is longer than this 1-step run: the schedule says so
    assert "WARNING: warmup_iters=100 is not shorter than the run (max_iters=1)" in out
    run_here(args + ["--prompt_template=none", f"--out_dir={tmp_path / 'none'}"], monkeypatch)
    out_none = capsys.readouterr().out
    assert "look formatted already" not in out_none
    # x = prompt + response + <|endoftext|> without its last id: the prompt wrapped twice, or as it is
    tok = get_tokenizer("gpt2")
    n = lambda wrap: sum(len(tok.encode_ordinary(wrap(format_prompt(q)))) + len(tok.encode_ordinary(a))
                         for q, a in FACTS * 2)
    for text, expected in ((out, n(format_prompt)), (out_none, n(lambda p: p))):
        assert f"train: 16 records from {str(path)!r}, {expected:,} tokens" in text
    assert load_checkpoint(str(tmp_path / "none"))["config"]["prompt_template"] == "none"


@pytest.mark.parametrize("signum, always_save", [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["SIGINT", "SIGTERM-best-only"])
def test_a_signal_saves_and_a_resume_with_no_flags_equals_the_uninterrupted_run(tmp_path, monkeypatch, capsys,
                                                                                signum, always_save):
    """A real process gets the signal after its save at step 3, finishes its step, saves and prints the resume command;
    `finetune.py --init_from=resume --out_dir=X` alone then continues to the same losses and weights, bit for
    bit, as a run never stopped (dropout on: the per-rank RNG is restored too). With always_save_checkpoint=False
    ckpt.pt holds the best eval only, and the stop goes to ckpt_last.pt, leaving it alone. A torn last log line
    (a kill during an append) is skipped with a warning."""
    args = ["config/finetune_alpaca.py", f"--dataset={facts_json(tmp_path / 'facts.json')}", "--init_from=scratch",
            *TINY, "--val_fraction=0.2", "--max_iters=12", "--learning_rate=3e-3", "--warmup_iters=5",
            "--eval_interval=3", "--eval_iters=2", "--sample_interval=0", "--log_interval=1", "--dropout=0.1",
            "--batch_size=2", "--gradient_accumulation_steps=2", f"--always_save_checkpoint={always_save}"]
    run_here(args + [f"--out_dir={tmp_path / 'whole'}"], monkeypatch)
    out_dir = tmp_path / "stopped"
    p = subprocess.Popen([sys.executable, "finetune.py", *args, f"--out_dir={out_dir}"], cwd=ROOT, env=env(tmp_path),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in p.stdout:  # the handlers are installed before the first step
        lines.append(line)
        if line.startswith("saved ") and "(iteration 3)" in line:
            p.send_signal(signum)
            break
    output = "".join(lines) + p.communicate(timeout=120)[0]
    assert p.returncode == 128 + signum, output
    name = signal.Signals(signum).name
    assert f"{name}: finishing this step, then saving a checkpoint" in output
    assert f"Resume with:\n  python finetune.py --init_from=resume --out_dir={out_dir}\n" in output
    stop_ckpt = load_checkpoint(str(out_dir / ("ckpt.pt" if always_save else "ckpt_last.pt")))
    at = stop_ckpt["resume"]["iter_num"]
    assert at in (4, 5) and stop_ckpt["kind"] == "sft" and len(stop_ckpt["resume"]["rng"]) == 1, output
    if not always_save:  # the best checkpoint is the eval's at step 3, not the stop's
        best = load_checkpoint(str(out_dir / "ckpt.pt"))["resume"]
        assert best["iter_num"] == 3 and best["best"] == {"name": "val_loss", "value": read_log(out_dir, "eval")[1][
            "val_loss"]}
    with open(out_dir / "log.jsonl", "a") as f:
        f.write('{"type": "train", "iter": 99, "lo')  # torn by a kill
    capsys.readouterr()
    run_here(["--init_from=resume", f"--out_dir={out_dir}"], monkeypatch)
    out = capsys.readouterr().out
    assert "skipped a torn log line" in out and f"(sft, iteration {at:,}) with its saved config" in out
    whole, resumed = read_log(tmp_path / "whole", "train"), read_log(out_dir, "train")
    assert [r["iter"] for r in resumed] == list(range(1, 13))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole]
    if always_save:
        wa, wb = weights(tmp_path / "whole"), weights(out_dir)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_non_finite_loss_stops_without_saving(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match=r"ERROR: the training loss became (nan|inf) at iteration \d+: the weights "
                                         r"are broken, so nothing was saved"):
        run_here([f"--dataset={facts_json(tmp_path / 'facts.json')}", "--init_from=scratch", *TINY,
                  f"--out_dir={tmp_path / 'out'}", "--learning_rate=1e20", "--warmup_iters=0", "--grad_clip=0",
                  "--max_iters=30", "--eval_interval=1000", "--eval_iters=1", "--sample_interval=0"], monkeypatch)
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_checkpoints_of_other_jobs(tmp_path, monkeypatch):
    """A pre-training run is a model to start from, not a run to resume; a quantized model cannot be trained."""
    gpt = tiny_gpt()
    args = dict(model_state=gpt.state_dict(), model_args=vars(gpt.config), tokenizer={"tokenizer": "gpt2"})
    pre = make_checkpoint("pretrain", config={"dataset": "x"}, resume=resume_state(
        5, "val_loss", 3.0, make_optimizer(gpt, 0.1, 1e-3, (0.9, 0.95), "cpu").state_dict()), **args)
    save_checkpoint(pre, str(tmp_path / "pre" / "ckpt.pt"))
    with pytest.raises(ValueError, match=r"is a checkpoint of kind 'pretrain' \(another script's run\); finetune.py --init_from=resume "
                                         r"continues only its own runs \(sft, classify\).*--init_from=.*pre"):
        run_here(["--init_from=resume", f"--out_dir={tmp_path / 'pre'}"], monkeypatch)
    q = make_checkpoint("quantized", config={}, quantization={"mode": "int8", "source": "out-x/ckpt.pt"}, **args)
    save_checkpoint(q, str(tmp_path / "q.pt"))
    with pytest.raises(ValueError, match=r"int8-quantized.*cannot be trained.*--init_from=out-x/ckpt.pt"):
        run_here([f"--dataset={facts_json(tmp_path / 'facts.json')}", f"--init_from={tmp_path / 'q.pt'}", *TINY,
                  f"--out_dir={tmp_path / 'out'}"], monkeypatch)
    # the pre-trained checkpoint starts a fine-tuning run: its weights, a new run at iteration 0
    run_here([f"--dataset={facts_json(tmp_path / 'facts.json')}", f"--init_from={tmp_path / 'pre'}",
              f"--out_dir={tmp_path / 'sft'}", *TINY, "--max_iters=1", "--eval_iters=1", "--sample_interval=0",
              "--warmup_iters=0"], monkeypatch)
    assert load_checkpoint(str(tmp_path / "sft"))["resume"]["iter_num"] == 1

# ----------------------------------------------------------------------------------------------
# end to end


def test_instruct_learns_to_answer_and_writes_a_sampleable_checkpoint(tmp_path):
    out_dir = tmp_path / "out"
    stdout = run(["config/finetune_alpaca.py", f"--dataset={facts_json(tmp_path / 'facts.json')}",
                  "--init_from=scratch", f"--out_dir={out_dir}", *TINY, "--val_fraction=0.2", "--max_iters=250",
                  "--learning_rate=3e-3", "--warmup_iters=10", "--eval_interval=250", "--eval_iters=5",
                  "--sample_interval=250", "--max_new_tokens=8", "--log_interval=50",
                  "--gradient_accumulation_steps=1"], tmp_path)
    assert "train: 26 records" in stdout and "val: 6 records" in stdout and "0 of them truncated" in stdout
    assert "padding is" in stdout and "sample 250:" in stdout
    evals = read_log(out_dir, "eval")
    # from ln(50304) = 10.8 at the start; the answers are 2-4 tokens, so a memorised set ends far below 1
    assert evals[0]["val_loss"] > 10 and evals[-1]["val_loss"] < 0.5, evals
    model, ckpt, tok = load_model("resume", str(out_dir))
    assert ckpt["kind"] == "sft" and ckpt["resume"]["iter_num"] == 250 and ckpt["resume"]["optimizer"]
    assert ckpt["resume"]["best"] == {"name": "val_loss", "value": evals[-1]["val_loss"]}
    model.eval()
    assert [answer(model, tok, q, max_new_tokens=8) for q, _ in FACTS] == [a for _, a in FACTS]


def test_classify_reaches_high_accuracy_reports_per_class_predicts_and_resumes(tmp_path, monkeypatch, capsys):
    """The classes differ by one word anywhere in the text; a 2-layer model fully fine-tuned reaches 100% test
    accuracy by about 100 steps in a trial run, so 0.9 after 150 leaves a wide margin for other seeds/CPUs.
    Training data in CSV, the test split in GLUE's TSV layout (sentence<TAB>label ids, with a header)."""
    rows = sentiment_rows(1400, seed=0)
    write_csv(tmp_path / "train.csv", rows[:1200])
    (tmp_path / "test.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{int(l == 'positive')}\n"
                                                                     for t, l in rows[1200:]))
    out_dir = tmp_path / "out"
    stdout = run(["config/finetune_imdb.py", f"--dataset={tmp_path / 'train.csv'}",
                  f"--test_split={tmp_path / 'test.tsv'}", "--init_from=scratch", f"--out_dir={out_dir}", *TINY,
                  "--max_iters=150", "--batch_size=16", "--learning_rate=3e-3", "--warmup_iters=10",
                  "--eval_interval=150", "--eval_iters=4", "--val_fraction=0.1", "--log_interval=50"], tmp_path)
    assert "classes: ['negative', 'positive']" in stdout
    final = {k: v for r in read_log(out_dir, "final") for k, v in r.items() if k.startswith("final_")}
    assert final["final_test_acc"] >= 0.9 and final["final_val_acc"] >= 0.9, final
    assert min(final["final_test_f1"]) >= 0.85 and sum(map(sum, final["final_test_confusion"])) == 200
    assert "class        precision    recall        f1   support" in stdout and (out_dir / "confusion.png").exists()
    gpt, ckpt, tok = load_model("resume", str(out_dir))
    assert ckpt["kind"] == "classify" and ckpt["labels"] == ["negative", "positive"]
    model = Finetuned(gpt, 2).eval()
    model.head.load_state_dict(ckpt["head"])  # the head round-trips: it classifies held-out texts
    examples, _ = encode_records(tok, [("a", "the film was really superb", 1), ("b", "a boring plot", 0)], 64,
                                 "left", "t")
    logits, _ = model(*make_batch(examples, [0, 1], tok.eot_token))
    assert logits.argmax(-1).tolist() == [1, 0]
    # in this process (no second start-up): --predict, then resuming keeps the iteration count
    with pytest.raises(SystemExit) as done:
        run_here(["--task=classify", "--init_from=resume", f"--out_dir={out_dir}", "--device=cpu",
                  "--predict=What a wonderful film"], monkeypatch)
    assert done.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("label: positive (0.9") and lines[-1].startswith("probabilities: negative=0.0"), lines
    run_here(["--init_from=resume", f"--out_dir={out_dir}", "--max_iters=155", "--eval_iters=1", "--final_eval=False",
              f"--cache_dir={tmp_path / 'cache'}"], monkeypatch)
    assert "(classify, iteration 150) with its saved config: changed" in capsys.readouterr().out
    assert load_checkpoint(str(out_dir))["resume"]["iter_num"] == 155
    with pytest.raises(ValueError, match=r"would make another run: weight_decay: 0.1 -> 0.5"):
        run_here(["--init_from=resume", f"--out_dir={out_dir}", "--weight_decay=0.5"], monkeypatch)


def test_replay_mixes_pretraining_text_without_changing_the_records_loss(tmp_path, monkeypatch, capsys):
    """Replay adds windows of a token file to every step, as more rows of the same forward: with replay_weight=0
    the run is the run without replay (the records' losses and the weights agree up to float rounding: the
    records now share a padded batch with the windows, 1e-5); with weight 1 the replayed text (one 16-token
    sentence repeated) is learnt alongside: in 20 steps at lr 3e-3 its logged loss falls from ln(50304) = 10.8 by
    more than 1 nat (1.7 measured). Replay without a folder is refused before any model is built."""
    from lib.tokens import write_tokens
    replay = tmp_path / "replay"
    replay.mkdir()
    write_tokens(str(replay / "train.bin"), np.tile(np.arange(1000, 1016), 200))
    common = [f"--dataset={uneven_sft(tmp_path / 'sft.jsonl')}", "--init_from=scratch", *TINY, "--max_iters=20",
              "--val_fraction=0.2", "--eval_interval=20", "--eval_iters=1", "--log_interval=1", "--sample_interval=0",
              "--learning_rate=3e-3", "--warmup_iters=0", "--batch_size=4", "--dtype=float32"]
    runs = {"plain": [], "weight0": [f"--replay_dir={replay}", "--replay_batch_size=2", "--replay_weight=0"],
            "replay": [f"--replay_dir={replay}", "--replay_batch_size=2"]}
    for name, extra in runs.items():
        run_here(common + extra + [f"--out_dir={tmp_path / name}"], monkeypatch)
    plain, weight0, replayed = (read_log(tmp_path / n, "train") for n in runs)
    np.testing.assert_allclose([r["loss"] for r in weight0], [r["loss"] for r in plain], rtol=0, atol=1e-5)
    wa, wb = weights(tmp_path / "weight0"), weights(tmp_path / "plain")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    assert "replay_loss" not in plain[0] and replayed[0]["replay_loss"] > 10
    assert replayed[-1]["replay_loss"] < replayed[0]["replay_loss"] - 1, [r["replay_loss"] for r in replayed]
    assert "replay: 2 x 64 tokens of" in capsys.readouterr().out
    with pytest.raises(ValueError, match="replay .*needs task='instruct' and a folder of token files"):
        run_here(common + ["--replay_batch_size=2", f"--out_dir={tmp_path / 'bad'}"], monkeypatch)
