"""
eval.py: HellaSwag, LAMBADA and sliding-window perplexity scores checked against a brute-force recomputation
(unbatched, one ending at a time) by transformers' GPT2LMHeadModel holding the same random weights; batching
and padding; the window plan; bad rows; downloads from a 127.0.0.1 server. Tiny models, no network.
"""

import functools
import hashlib
import http.server
import json
import math
import os
import runpy
import subprocess
import sys
import threading

import eval as ev
import pytest
import torch

from lib.checkpoint import make_checkpoint, resume_state, save_checkpoint
from lib.gpt2_weights import config_to_hf, state_dict_to_hf
from lib.models import load_model
from lib.quant import WeightOnlyQuantizer
from lib.records import load_records
from lib.runtime import Runtime
from lib.tokenizer import CharTokenizer, get_tokenizer
from lib.tokens import write_tokens
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOW = 32  # the tiny models' block_size
CPU = Runtime("cpu", "cpu", "float32")

# HellaSwag rows in the official jsonl layout (rowanz/hellaswag data/hellaswag_val.jsonl): made-up text, real keys
HELLASWAG = [
    {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "A man stands next to a car covered in snow.",
     "ctx_b": "he", "ctx": "A man stands next to a car covered in snow. he", "split": "val",
     "split_type": "indomain", "label": 2, "source_id": "activitynet~v_x",
     "endings": ["eats a sandwich in the kitchen.", "starts to dance on the roof of the house.",
                 "scrapes the ice off the windshield with a brush.", "is shown talking to the camera."]},
    {"ind": 7, "activity_label": "Home and Garden", "ctx_a": "[header] How to clean a window [title] Mix warm "
     "water and soap in a bucket. [step] Dip a sponge in the bucket and wring it out.", "ctx_b": "",
     "ctx": "[header] How to clean a window [title] Mix warm water and soap in a bucket. [step] Dip a sponge in "
     "the bucket and wring it out.", "split": "val", "split_type": "zeroshot", "label": 0,
     "source_id": "wikihow~1", "endings": ["[title] Wipe the glass from top to bottom. [step] Dry it with a towel.",
                                           "[title] Paint the window red.", "Sing a song.",
                                           "[title] Throw the bucket out of the window and leave it there."]},
    {"ind": 9, "activity_label": "Playing guitar", "ctx_a": "A young woman sits on a chair holding a guitar. She "
     "tunes the strings carefully, listening to each note, then looks up at the audience in the small room and "
     "smiles before she begins.", "ctx_b": "she", "ctx": "A young woman sits on a chair holding a guitar. She "
     "tunes the strings carefully, listening to each note, then looks up at the audience in the small room and "
     "smiles before she begins. she", "split": "val", "split_type": "indomain", "label": 1,
     "source_id": "activitynet~v_y", "endings": ["plays a song.", "strums the first chords of a slow song while "
                                                 "the people listen.", "jumps.", "throws the guitar away."]},
    {"ind": 12, "activity_label": "Making a sandwich", "ctx_a": "Bread is laid out on a board.", "ctx_b": "a knife",
     "ctx": "Bread is laid out on a board. a knife", "split": "val", "split_type": "indomain", "label": "3",
     "source_id": "activitynet~v_z", "endings": ["flies.", "is put in the sink", "sings a song about cheese.",
                                                 "spreads butter on the bread."]},
]

LAMBADA = [
    "He opened the door and saw his old friend standing on the porch. \"It has been years,\" said Tom. She "
    "smiled and hugged him. \"Come in, Tom",
    "The recipe called for two eggs, but the fridge was empty. She walked to the store and bought a dozen eggs",
    "They sailed for days until the island appeared on the horizon. The captain shouted to the crew: land",
    "The old clock in the hall struck midnight, and every guest at the party turned to look at the clock",
]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 2-layer GPT with GPT-2's tokenizer in a 50304-row table (the padded size, so scores must normalise over
    the real 50,257 ids), saved as a real checkpoint; the HF oracle with the same weights; data files."""
    d = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=WINDOW, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)
    model = GPT(cfg)
    save_checkpoint(make_checkpoint("pretrain", model.state_dict(), vars(cfg), {}, {"tokenizer": "gpt2"},
                                    resume=resume_state(7, "val_loss", 0.0)), str(d / "ckpt.pt"))
    from transformers import GPT2Config, GPT2LMHeadModel
    hf = GPT2LMHeadModel(GPT2Config(**config_to_hf(cfg), attn_implementation="eager")).eval()
    hf.load_state_dict(state_dict_to_hf(model.state_dict()))
    tok = get_tokenizer("gpt2")
    texts = LAMBADA + [greedy_passage(hf, tok)]
    return {"dir": d, "ckpt": str(d / "ckpt.pt"), "hf": hf, "tok": tok,
            "hellaswag": write_jsonl(d / "hellaswag.jsonl", HELLASWAG),
            "lambada": write_jsonl(d / "lambada.jsonl", [{"text": t} for t in texts])}


def greedy_passage(hf, tok) -> str:
    """A LAMBADA passage whose last word the model predicts greedily: context + the model's own argmax token,
    when that token is ' word' and encodes back to itself. Without it acc would be 0 for random weights."""
    for subject in ("cat", "river", "king", "doctor", "garden", "winter", "ship", "teacher", "castle", "song"):
        context = f"Once upon a time there was a {subject} who lived far away, and every day the"
        with torch.no_grad():
            t = int(hf(torch.tensor([tok.encode_ordinary(context)])).logits[0, -1, :50257].argmax())
        word = tok.decode([t])
        if word.startswith(" ") and word[1:].isalpha() and tok.encode_ordinary(word) == [t]:
            return context + word
    raise AssertionError("no context found whose greedy token is a word")


_oracle_cache = {}


def oracle(hf, ctx_ids, cont_ids, window=WINDOW):
    """Brute force, one continuation at a time: log-probs and greedy hits of cont_ids after ctx_ids (context cut
    from the left to the window), normalised over GPT-2's 50,257 real ids. Cached: several tests ask the same."""
    key = (id(hf), tuple(ctx_ids), tuple(cont_ids), window)
    if key not in _oracle_cache:
        _oracle_cache[key] = _oracle(hf, ctx_ids, cont_ids, window)
    return _oracle_cache[key]


def _oracle(hf, ctx_ids, cont_ids, window):
    ids = (ctx_ids + cont_ids)[-(window + 1):]
    with torch.no_grad():
        logits = hf(torch.tensor([ids[:-1]])).logits[0, -len(cont_ids):, :50257].double()
    target = torch.tensor(cont_ids)
    logp = logits.log_softmax(-1)[torch.arange(len(cont_ids)), target]
    return logp, logits.argmax(-1) == target


def rows_of(path):
    """[(FILE:LINE, row)] of a data file, as eval.py reads --data_file."""
    return load_records(path).rows


def load_eval(path):
    model, ckpt, tok = load_model(path, device="cpu")
    return model.eval(), tok


def argmax(xs):
    return max(range(len(xs)), key=xs.__getitem__)


def run_eval(*args):
    """eval.py from the command line, in a fresh process."""
    r = subprocess.run([sys.executable, "eval.py", *args, "--device=cpu", "--compile=False"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def run_eval_here(monkeypatch, capsys, *args):
    """eval.py run as __main__ in this process (the whole script, minus the seconds a fresh torch import costs)."""
    monkeypatch.setattr(sys, "argv", ["eval.py", *args, "--device=cpu", "--compile=False"])
    runpy.run_path(os.path.join(ROOT, "eval.py"), run_name="__main__")
    return capsys.readouterr().out


def last_record(out_dir):
    with open(os.path.join(out_dir, "eval.jsonl")) as f:
        return json.loads(f.readlines()[-1])

# ---------------------------------------------------------------------------------------------------------------
# HellaSwag and LAMBADA against the oracle


def test_hellaswag_loglikelihoods_match_oracle_and_batching_changes_nothing(setup):
    """Per ending: the same log-likelihoods (1e-4) and greedy hits as the oracle, whatever the batch size. (The
    'harness' prompt only changes the strings: checked below and end to end in the CLI test.)"""
    model, tok = load_eval(setup["ckpt"])
    parsed = [ev.hellaswag_item(w, row, "ctx") for w, row in rows_of(setup["hellaswag"])]
    items, kept = ev.encode_items([(c, e) for c, e, _ in parsed], tok, WINDOW)
    assert kept == [0, 1, 2, 3]
    assert len(items[2][0]) > WINDOW, "item 2's context must overflow the window to test the left cut"
    # batch size 1: one item per forward; 5: two items (8 rows, padded); 64: all at once
    runs = {bs: dict(ev.score_items(model, items, WINDOW, bs, 50257, CPU)) for bs in (1, 5, 64)}
    for j, (ctx, conts) in enumerate(items):
        ref = [oracle(setup["hf"], ctx, c) for c in conts]
        for bs, scores in runs.items():
            for (logp, greedy), (ref_logp, ref_greedy) in zip(scores[j], ref):
                assert torch.allclose(logp, ref_logp, atol=1e-4), (j, bs, logp, ref_logp)
                assert torch.equal(greedy, ref_greedy)
        # same predictions for acc (sum) and acc_norm (mean per token)
        ll, ref_ll = [float(lp.sum()) for lp, _ in runs[5][j]], [float(lp.sum()) for lp, _ in ref]
        assert argmax(ll) == argmax(ref_ll)
        assert argmax([v / len(c) for v, c in zip(ll, conts)]) == argmax([v / len(c) for v, c in zip(ref_ll, conts)])


def test_harness_prompt_is_lm_eval_harness_preprocessing():
    context, endings, label = ev.hellaswag_item("x", HELLASWAG[1], "harness")
    assert context == "Home and Garden: How to clean a window. Mix warm water and soap in a bucket. Dip a sponge " \
                      "in the bucket and wring it out."
    assert endings[0] == " Wipe the glass from top to bottom. Dry it with a towel." and label == 0  # lm-eval's too
    context, _, label = ev.hellaswag_item("x", HELLASWAG[3], "harness")
    assert context == "Making a sandwich: Bread is laid out on a board. A knife" and label == 3  # label "3" -> 3


def test_cli_hellaswag_and_lambada_report_oracle_metrics(setup, tmp_path, monkeypatch, capsys):
    hf, tok = setup["hf"], setup["tok"]
    out = run_eval_here(monkeypatch, capsys, f"--init_from={setup['ckpt']}", "--task=hellaswag",
                        f"--data_file={setup['hellaswag']}", "--hellaswag_prompt=harness", "--batch_size=5",
                        f"--out_dir={tmp_path}")
    assert "| acc_norm |" in out
    rec = last_record(tmp_path)
    hits = {"acc": 0, "acc_norm": 0, "acc_norm_chars": 0}
    for row in HELLASWAG:
        context, endings, label = ev.hellaswag_item("x", row, "harness")
        ctx = tok.encode_ordinary(context)
        conts = [tok.encode_ordinary(" " + e) for e in endings]
        ll = [float(oracle(hf, ctx, c)[0].sum()) for c in conts]
        hits["acc"] += argmax(ll) == label
        hits["acc_norm"] += argmax([v / len(c) for v, c in zip(ll, conts)]) == label
        hits["acc_norm_chars"] += argmax([v / len(e) for v, e in zip(ll, endings)]) == label
    assert rec["items"] == 4 and rec["iter_num"] == 7 and rec["hellaswag_prompt"] == "harness"
    for k, v in hits.items():
        assert rec[k] == pytest.approx(v / 4), k

    run_eval_here(monkeypatch, capsys, f"--init_from={setup['ckpt']}", "--task=lambada",
                  f"--data_file={setup['lambada']}", "--limit=5", f"--out_dir={tmp_path}")
    rec = last_record(tmp_path)
    correct, nll = 0, 0.0
    for w, row in list(rows_of(setup["lambada"])):
        context, word = ev.lambada_item(w, row)
        logp, greedy = oracle(hf, tok.encode_ordinary(context), tok.encode_ordinary(" " + word))
        correct += bool(greedy.all())
        nll -= float(logp.sum())
    assert correct >= 1, "the greedy passage must be predicted"
    assert rec["items"] == 5 and rec["acc"] == pytest.approx(correct / 5)
    assert rec["ppl"] == pytest.approx(math.exp(nll / 5), rel=1e-5)

def test_data_file_in_any_format_scores_the_same(setup, tmp_path, monkeypatch, capsys):
    """LAMBADA from .jsonl, .jsonl.bz2, a .txt of one passage per line (CRLF) and a .json list: the same items,
    the same numbers; a file in another encoding is named with the encoding to try, not a UnicodeDecodeError."""
    import bz2
    texts = [row["text"] for _, row in rows_of(setup["lambada"])]
    with bz2.open(tmp_path / "lambada.jsonl.bz2", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    (tmp_path / "lambada.txt").write_bytes("".join(t + "\r\n" for t in texts).encode())
    (tmp_path / "lambada.json").write_text(json.dumps([{"text": t} for t in texts], indent=1))
    results = []
    for data in (setup["lambada"], tmp_path / "lambada.jsonl.bz2", tmp_path / "lambada.txt", tmp_path / "lambada.json"):
        run_eval_here(monkeypatch, capsys, f"--init_from={setup['ckpt']}", "--task=lambada", f"--data_file={data}",
                      f"--out_dir={tmp_path}")
        rec = last_record(tmp_path)
        results.append((rec["items"], rec["acc"], rec["ppl"]))
    assert results[0][0] == len(texts) and results.count(results[0]) == 4, results
    with bz2.open(tmp_path / "latin.txt.bz2", "wb") as f:
        f.write("Caf\u00e9 au lait, said the old man to the waiter\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.txt.bz2:1: not valid utf-8 \(byte b'\\xe9' at column 4: .*\); the file "
                                         r"is probably cp1252: pass --encoding=cp1252"):
        run_eval_here(monkeypatch, capsys, f"--init_from={setup['ckpt']}", "--task=lambada",
                      f"--data_file={tmp_path / 'latin.txt.bz2'}", f"--out_dir={tmp_path}")
    run_eval_here(monkeypatch, capsys, f"--init_from={setup['ckpt']}", "--task=perplexity", "--encoding=cp1252",
                  f"--text_file={tmp_path / 'latin.txt.bz2'}", f"--out_dir={tmp_path}")
    assert last_record(tmp_path)["bytes"] == len("Caf\u00e9 au lait, said the old man to the waiter\n".encode())


def test_bad_rows_are_reported_together_or_skipped(setup, tmp_path, monkeypatch, capsys):
    path = write_jsonl(tmp_path / "h.jsonl", [HELLASWAG[0], {**HELLASWAG[1], "label": 9}, '{"ctx": ',
                                              HELLASWAG[2], {"ctx": "x"}])
    args = [f"--init_from={setup['ckpt']}", "--task=hellaswag", f"--data_file={path}", f"--out_dir={tmp_path}"]
    with pytest.raises(ValueError, match=r"(?s)h.jsonl:3: invalid JSON .*\n.*h.jsonl:2: 'label' 9 is out of range "
                                         r"for 4 endings.*\n.*h.jsonl:5: a HellaSwag item needs the keys .*\n3 bad "
                                         r"records in .*h.jsonl': fix them, or skip bad records with "
                                         r"--skip_bad_records=True"):
        run_eval_here(monkeypatch, capsys, *args)
    out = run_eval_here(monkeypatch, capsys, *args, "--skip_bad_records=True")
    assert out.count("WARNING: skipped 3 bad records of") == 1
    assert last_record(tmp_path)["items"] == 2


def test_quantized_checkpoints_count_their_weights(setup, tmp_path, monkeypatch, capsys):
    import quantize as Q

    from lib.checkpoint import load_checkpoint
    model, _ = load_eval(setup["ckpt"])
    n = model.num_params()
    ckpt = load_checkpoint(setup["ckpt"])
    for mode in ("int8", "int4"):
        q = WeightOnlyQuantizer(mode, 32)
        save_checkpoint(Q.quantized_checkpoint(model, ckpt, None, q, setup["ckpt"]), str(tmp_path / f"{mode}.pt"))
        qmodel, _ = load_eval(str(tmp_path / f"{mode}.pt"))
        assert sum(p.numel() for p in qmodel.parameters()) < n // 10  # the weights are integer buffers
        assert ev.weight_count(qmodel) == n, mode
        out = run_eval_here(monkeypatch, capsys, f"--init_from={tmp_path / f'{mode}.pt'}", "--task=lambada",
                            f"--data_file={setup['lambada']}", "--limit=1", f"--out_dir={tmp_path}")
        assert f"({n / 1e6:.1f}M parameters)" in out and n / 1e6 >= 1.5
    assert ev.weight_count(model) == n


def test_several_models_in_one_run_score_as_they_do_alone(setup, tmp_path, monkeypatch, capsys):
    """--init_from=A,B: each model gets the record it gets alone, in the eval.jsonl next to its checkpoint, and a
    side-by-side table; an empty entry is refused."""
    import shutil

    from lib.checkpoint import load_checkpoint
    other = tmp_path / "other"
    other.mkdir()
    torch.manual_seed(1)
    ckpt = load_checkpoint(setup["ckpt"])
    ckpt["model"] = GPT(GPTConfig(**ckpt["model_args"])).state_dict()  # other weights, same shape
    save_checkpoint(ckpt, str(other / "ckpt.pt"))
    first = tmp_path / "first"
    first.mkdir()
    shutil.copy(setup["ckpt"], first / "ckpt.pt")
    args = ("--task=lambada", f"--data_file={setup['lambada']}", "--limit=5")
    alone = []
    for d in (first, other):
        run_eval_here(monkeypatch, capsys, f"--init_from={d}", *args, f"--out_dir={tmp_path / 'alone'}")
        alone.append(last_record(tmp_path / "alone"))
    assert alone[0]["acc"] != alone[1]["acc"] or alone[0]["ppl"] != alone[1]["ppl"]
    out = run_eval_here(monkeypatch, capsys, f"--init_from={first},{other / 'ckpt.pt'}", *args,
                        f"--out_dir={tmp_path / 'unused'}")
    for d, rec in zip((first, other), alone):
        both = last_record(d)
        assert both["ckpt_name"] == "ckpt.pt" and both["items"] == 5
        assert (both["acc"], both["ppl"]) == (rec["acc"], rec["ppl"]), (both, rec)
    assert not (tmp_path / "unused").exists()
    assert "lambada, 2 models\n| model | acc | ppl |" in out and f"| {other / 'ckpt.pt'} | " in out, out
    with pytest.raises(ValueError, match="init_from has an empty entry"):
        run_eval_here(monkeypatch, capsys, f"--init_from={first},", *args)


def test_progress_is_lines_when_redirected(setup, tmp_path):
    """A log file gets about one progress line per tenth, not a redrawn bar per item."""
    texts = [row["text"] for _, row in rows_of(setup["lambada"])] * 10
    data = write_jsonl(tmp_path / "l.jsonl", [{"text": t} for t in texts])
    r = subprocess.run([sys.executable, "eval.py", f"--init_from={setup['ckpt']}", "--task=lambada",
                        f"--data_file={data}", "--batch_size=1", f"--out_dir={tmp_path}", "--device=cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("lambada: ")]
    assert 5 <= len(lines) <= 11 and "\r" not in r.stderr and lines[-1].startswith(f"lambada: {len(texts)}/"), r.stderr

# ---------------------------------------------------------------------------------------------------------------
# perplexity


@pytest.mark.parametrize("window,stride", [(4, 4), (4, 1), (5, 2), (8, 3), (32, 16), (7, 7)])
def test_sliding_windows_score_every_token_once(window, stride):
    for n in (2, 3, window, window + 1, window + 2, 3 * window + 1, 50):
        scored = []
        for begin, end, n_new in ev.sliding_windows(n, window, stride):
            assert 1 <= end - begin <= window + 1 and 1 <= n_new <= end - begin - 1
            scored += range(end - n_new, end)
            if end - n_new > window - stride + 1:  # past the first window: at least window - stride + 1 context
                assert end - n_new - begin >= window - stride + 1
        assert scored == list(range(1, n)), (n, window, stride)
    # stride == window is plain chunking: windows tokens[kW : (k+1)W + 1]
    assert ev.sliding_windows(10, 3, 3) == [(0, 4, 3), (3, 7, 3), (6, 10, 3)]


def test_perplexity_stride_equals_window_is_chunked_nll_and_stride_1_matches_oracle(setup, tmp_path, monkeypatch):
    model, tok = load_eval(setup["ckpt"])
    text = " ".join(LAMBADA)
    path = tmp_path / "text.txt"
    path.write_text(text)
    ids = [tok.eot_token] + tok.encode_ordinary(text)  # the text is scored after <|endoftext|>
    monkeypatch.setattr(ev, "text_file", str(path))
    n, m, extra = ev.eval_perplexity(model, tok, WINDOW, 50257, CPU)
    assert n == len(ids) - 1 and extra["stride"] == WINDOW // 2  # stride 0 = half the window
    assert extra["bytes"] == len(text.encode())

    # stride == window: the mean NLL of plain chunks x = ids[kW:(k+1)W], y = ids[kW+1:(k+1)W+1]
    monkeypatch.setattr(ev, "stride", WINDOW)
    n, m, _ = ev.eval_perplexity(model, tok, WINDOW, 50257, CPU)
    full, _, _ = load_model(setup["ckpt"], device="cpu")  # with its LM head, through model.forward's loss
    full.eval()
    nll = 0.0
    for k in range(0, len(ids) - 1, WINDOW):
        x, y = torch.tensor([ids[k:k + WINDOW]]), torch.tensor([ids[k + 1:k + WINDOW + 1]])
        with torch.no_grad():
            logits, _ = full(x[:, :y.size(1)])
        nll += float(torch.nn.functional.cross_entropy(logits[0, :, :50257], y[0], reduction="sum"))
    assert m["nll"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)
    assert m["ppl"] == pytest.approx(math.exp(m["nll"]))

    # stride 1: every token with all the context the window allows, as the oracle computes it token by token
    monkeypatch.setattr(ev, "stride", 1)
    monkeypatch.setattr(ev, "limit", 45)
    n, m, extra = ev.eval_perplexity(model, tok, WINDOW, 50257, CPU)
    # tokens 1..W see the whole prefix: one forward over ids[:W+1] scores them; later ones one forward each
    ref = oracle(setup["hf"], ids[:1], ids[1:WINDOW + 1])[0].tolist()
    ref += [float(oracle(setup["hf"], ids[j - WINDOW:j], [ids[j]])[0]) for j in range(WINDOW + 1, 45)]
    assert n == 44 and m["nll"] == pytest.approx(-sum(ref) / 44, rel=1e-5)
    assert m["bits_per_byte"] == pytest.approx(-sum(ref) / math.log(2) / extra["bytes"], rel=1e-5)


def test_cli_perplexity_char_level_checkpoint(tmp_path, monkeypatch):
    """A character-level checkpoint (no <|endoftext|>): the first character has no context, all others are scored."""
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 3
    tok = CharTokenizer.from_text(text)
    torch.manual_seed(1)
    cfg = GPTConfig(block_size=16, vocab_size=tok.n_vocab, n_layer=2, n_head=2, n_embd=32)
    save_checkpoint({"model": GPT(cfg).state_dict(), "model_args": vars(cfg), "config": {}, "iter_num": 1,
                     "best_val_loss": 0.0, "tokenizer": tok.meta()}, str(tmp_path / "ckpt.pt"))
    (tmp_path / "text.txt").write_text(text)
    out = run_eval("--init_from=resume", f"--out_dir={tmp_path}", "--task=perplexity",
                   f"--text_file={tmp_path / 'text.txt'}", "--stride=5", "--batch_size=7")
    rec = last_record(tmp_path)
    assert rec["tokens"] == len(text) - 1 and rec["window"] == 16 and rec["stride"] == 5, out
    assert rec["bits_per_byte"] == pytest.approx(rec["nll"] / math.log(2) * (len(text) - 1) / rec["bytes"])
    assert 1 < rec["ppl"] < 2 * tok.n_vocab  # random weights: about the vocabulary size

    # HellaSwag through a character vocabulary: items with unknown characters are left out, not fatal
    model, _ = load_eval(str(tmp_path / "ckpt.pt"))
    items, kept = ev.encode_items([("Speak, speak.", ["hear me", "further"]), ("Zebra!", ["x"])], tok, 16)
    assert kept == [0] and len(list(ev.score_items(model, items, 16, 4, tok.n_vocab, CPU))) == 1
    with pytest.raises(ValueError, match="no item could be scored"):
        ev.eval_choices([("Zebra!", ["x"], 0)], model, tok, 16, tok.n_vocab, CPU)
    for name, text, match in [("zoo.txt", "Zeal", r"zoo\.txt' cannot be encoded with this model's tokenizer: "
                                                   r"characters 'Z'"),
                              ("one.txt", "F", r"no text to score: .*one\.txt' has fewer than 2 tokens")]:
        (tmp_path / name).write_text(text)
        monkeypatch.setattr(ev, "text_file", str(tmp_path / name))
        with pytest.raises(ValueError, match=match):
            ev.perplexity_tokens(tok)

def test_perplexity_on_prepared_token_shards(setup, tmp_path, monkeypatch):
    """--dataset reads data/<dataset>/ (here under tmp_path): shards are scored one after the other, no window
    crosses from one file into the next, --limit counts tokens over all of them, and ids from another
    vocabulary are refused."""
    model, tok = load_eval(setup["ckpt"])
    data = tmp_path / "data" / "tiny"
    data.mkdir(parents=True)
    ids = [tok.eot_token] + tok.encode_ordinary(" ".join(LAMBADA))
    write_tokens(str(data / "tiny_val_000000.bin"), ids[:40], header=True, vocab_size=50257)
    write_tokens(str(data / "tiny_val_000001.bin"), ids[40:], header=True, vocab_size=50257)
    monkeypatch.setattr(ev, "__file__", str(tmp_path / "eval.py"))  # the data folder next to the script
    monkeypatch.setattr(ev, "dataset", "tiny")
    monkeypatch.setattr(ev, "limit", 70)
    n, m, extra = ev.eval_perplexity(model, tok, WINDOW, 50257, CPU)
    assert n == 39 + 29 and len(extra["text"]) == 2  # tokens 1..39 of the first file, 1..29 of the second
    # window 32, stride 16: ids[0:33] scores 1..32, ids[16:40] scores 33..39; the second file starts afresh
    ref = oracle(setup["hf"], ids[:1], ids[1:33])[0].tolist() + oracle(setup["hf"], ids[16:33], ids[33:40])[0].tolist()
    ref += oracle(setup["hf"], ids[40:41], ids[41:70])[0].tolist()
    assert m["nll"] == pytest.approx(-sum(ref) / 68, rel=1e-5)

    # a character-level dataset (meta.pkl) or ids beyond the model's vocabulary: refused before any scoring
    CharTokenizer.from_text("abc ").save(str(data / "meta.pkl"))
    with pytest.raises(ValueError, match=r"holds ids of the characters in .*meta\.pkl.*gpt2, 50,257"):
        ev.eval_perplexity(model, tok, WINDOW, 50257, CPU)
    (data / "meta.pkl").unlink()
    with pytest.raises(ValueError, match=r"holds token id \d+, beyond this model's tokenizer \(100 ids\)"):
        ev.eval_perplexity(model, tok, WINDOW, 100, CPU)


# ---------------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("line,match", [
    ({"ctx": "A man", "label": 0}, r"hellaswag\.jsonl:2: .*needs the keys .*'endings'"),
    ({**HELLASWAG[0], "label": 4}, r"hellaswag\.jsonl:2: 'label' 4 is out of range for 4 endings"),
    ({**HELLASWAG[0], "endings": "one ending"}, r"hellaswag\.jsonl:2: 'endings' must be a list"),
    ({**HELLASWAG[0], "ctx": None}, r"hellaswag\.jsonl:2: 'ctx' must be a string"),
    ('{"ctx": "broken', r"hellaswag\.jsonl:2: invalid JSON"),
])
def test_malformed_hellaswag_rows_name_the_line(tmp_path, line, match):
    path = write_jsonl(tmp_path / "hellaswag.jsonl", [HELLASWAG[0], line])
    with pytest.raises(ValueError, match=match):
        [ev.hellaswag_item(w, row, "ctx") for w, row in rows_of(path)]


def test_malformed_lambada_rows_and_bad_options(tmp_path, setup, monkeypatch):
    path = write_jsonl(tmp_path / "lambada.jsonl", [{"text": "a b"}, "", {"txt": "a b"}])
    with pytest.raises(ValueError, match=r"lambada\.jsonl:3: a LAMBADA item needs a 'text' string"):
        [ev.lambada_item(w, row) for w, row in rows_of(path)]
    with pytest.raises(ValueError, match=r"lambada\.jsonl:1: cannot split 'oneword'"):
        ev.lambada_item(f"{tmp_path}/lambada.jsonl:1", {"text": "oneword"})
    with pytest.raises(FileNotFoundError, match="data file .*missing.jsonl"):
        list(rows_of(str(tmp_path / "missing.jsonl")))
    model, tok = load_eval(setup["ckpt"])
    monkeypatch.setattr(ev, "text_file", setup["lambada"])
    monkeypatch.setattr(ev, "stride", WINDOW + 1)
    with pytest.raises(ValueError, match=r"stride must be in 1\.\.32"):
        ev.eval_perplexity(model, tok, WINDOW, 50257, CPU)
    monkeypatch.setattr(ev, "stride", 0)
    monkeypatch.setattr(ev, "dataset", "shakespeare")
    with pytest.raises(ValueError, match="exactly one of --text_file"):
        ev.eval_perplexity(model, tok, WINDOW, 50257, CPU)

@pytest.mark.parametrize("args,error,match", [
    (["--task=mmlu"], ValueError, "task must be 'hellaswag', 'lambada', 'perplexity' or 'harness', got 'mmlu'"),
    (["--limit=-1"], ValueError, "limit and block_size must be >= 0 and batch_size >= 1, got limit=-1"),
    (["--hellaswag_prompt=mc"], ValueError, "hellaswag_prompt must be 'ctx' or 'harness', got 'mc'"),
    (["--task=perplexity", "--data_file=x.jsonl"], ValueError, "--data_file and --source are for hellaswag and"),
    (["--task=perplexity", "--text_file=missing.txt"], FileNotFoundError, "text file 'missing.txt' does not exist"),
    (["--task=lambada", "--data_file={lambada}", "--init_from={ckpt}", "--block_size=64"], ValueError,
     "block_size=64 exceeds the model's context of 32 tokens"),
    (["--task=lambada", "--data_file={lambada}", "--init_from={small}"], ValueError,
     "the tokenizer has 50,257 ids but the model only 100 outputs"),
])
def test_bad_options_are_refused(setup, tmp_path, monkeypatch, capsys, args, error, match):
    cfg = GPTConfig(block_size=16, vocab_size=100, n_layer=1, n_head=1, n_embd=8)  # GPT-2's tokenizer, 100 outputs
    save_checkpoint({"model": GPT(cfg).state_dict(), "model_args": vars(cfg), "tokenizer": {"tokenizer": "gpt2"}},
                    str(tmp_path / "small.pt"))
    args = [a.format(small=tmp_path / "small.pt", **setup) for a in args]
    with pytest.raises(error, match=match):
        run_eval_here(monkeypatch, capsys, f"--out_dir={tmp_path}", *args)
    assert not (tmp_path / "eval.jsonl").exists()


# ---------------------------------------------------------------------------------------------------------------
# downloads, from a server on 127.0.0.1


@pytest.fixture
def server(tmp_path):
    """Serves tmp_path/www over HTTP on 127.0.0.1; yields the base URL."""
    www = tmp_path / "www"
    www.mkdir()
    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path != "/short":
                return super().do_GET()
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b'{"text": "cut')  # then the connection closes: a truncated download

    handler = functools.partial(Handler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", www
    httpd.shutdown()
    httpd.server_close()


def test_load_rows_downloads_once_into_the_cache(server, tmp_path, monkeypatch, capsys):
    url, www = server
    data = "".join(json.dumps({"text": t}) + "\n" for t in LAMBADA).encode()
    (www / "lambada_test.jsonl").write_bytes(data)
    monkeypatch.setenv("LLM_E2E_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ev, "data_url", f"{url}/lambada_test.jsonl")
    monkeypatch.setattr("lib.download.time.sleep", lambda s: None)  # the downloader's waits between retries
    # a mirror serving other bytes than the official file is refused, and nothing is cached
    with pytest.raises(ValueError, match="downloaded corrupt: sha256 .*expected 4aa8d02c"):
        ev.load_rows("lambada")
    assert [f for f in os.listdir(tmp_path / "cache") if not f.endswith(".lock")] == []
    spec = {**ev.DATASETS["lambada"], "sha256": hashlib.sha256(data).hexdigest(), "items": len(LAMBADA)}
    monkeypatch.setitem(ev.DATASETS, "lambada", spec)
    rows, _ = ev.load_rows("lambada")
    assert [r["text"] for _, r in rows] == LAMBADA and rows[0][0].endswith("lambada_test.jsonl:1")
    (tmp_path / "cache" / "lambada_test.jsonl").write_text("damaged")  # a damaged cache is fetched again
    assert len(ev.load_rows("lambada")[0]) == len(LAMBADA) and "WARNING" in capsys.readouterr().out
    (www / "lambada_test.jsonl").unlink()  # from now on only the cache has it
    assert len(ev.load_rows("lambada")[0]) == len(LAMBADA)
    monkeypatch.setattr(ev, "source", "ftp")
    with pytest.raises(ValueError, match="source must be 'url' or 'hf', got 'ftp'"):
        ev.load_rows("lambada")
