"""
Measure a language model the way papers do: perplexity of a long text (sliding window), LAMBADA (last-word
accuracy and perplexity) and HellaSwag (4-way sentence completion).

    python eval.py --init_from=gpt2 --task=hellaswag        # downloads the official jsonl once (12 MB)
    python eval.py --init_from=gpt2-xl --task=lambada --batch_size=32
    python eval.py --init_from=gpt2 --task=perplexity --text_file=book.txt --stride=512
    python eval.py --init_from=resume --out_dir=out-shakespeare-char --task=perplexity --dataset=shakespeare_char
    python eval.py --init_from=resume --out_dir=out-gpt2 --ckpt_name=ckpt_int8.pt --task=hellaswag --limit=500
    torchrun --standalone --nproc_per_node=8 eval.py --init_from=gpt2-xl --task=hellaswag  # items split by rank
    python eval.py --init_from=gpt2,out-sft,out-dpo,out-dpo/ckpt_int8.pt --task=lambada  # several, side by side
    python eval.py --init_from=out-sft --task=harness --harness_tasks=hellaswag,arc_easy  # lm-evaluation-harness

Results are printed as a table and appended to out_dir/eval.jsonl (with several models, to the eval.jsonl
next to each checkpoint). Downloads are cached in $LLM_E2E_CACHE
(default ~/.cache/llm-e2e); --data_file=F reads a local copy instead (.jsonl, .json, .csv, .tsv or .txt, also
.gz/.bz2/.xz; a .txt line is one LAMBADA passage), --source=hf Hugging Face's copy.
"""

import hashlib
import math
import os
import re
import sys
import time
from typing import Optional

import torch

from configurator import configure
from lib.checkpoint import GPT2_NAMES, checkpoint_path
from lib.download import download
from lib.errors import install
from lib.logs import append_jsonl
from lib.models import load_model
from lib.perplexity import all_reduce_sums, perplexity, score_batch, sliding_windows, text_tokens  # quantize.py's too
from lib.progress import progress
from lib.records import load_records, report_bad
from lib.runtime import cache_root, print0, setup_runtime
from lib.textfiles import read_text
from lib.tokens import read_tokens

# The official files. The checksums come from public records, not from a download of ours: HellaSwag's from
# TensorFlow Datasets (tensorflow/datasets, url_checksums/hellaswag.txt: 12,246,618 bytes), LAMBADA's from the
# dataset card of EleutherAI/lambada_openai (the value lm-evaluation-harness's first LAMBADA task checked too).
DATASETS = {
    "hellaswag": {"url": "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
                  "sha256": "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588",
                  "items": 10042, "hf": ("Rowan/hellaswag", None, "validation")},
    "lambada": {"url": "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",
                "sha256": "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
                "items": 5153, "hf": ("EleutherAI/lambada_openai", "default", "test")},
}

# -----------------------------------------------------------------------------
# what to measure
task = "hellaswag"  # 'hellaswag' | 'lambada' | 'perplexity' | 'harness' (lm-evaluation-harness: pip install lm-eval)
harness_tasks = ""  # --task=harness: lm-eval's task names, comma-separated (e.g. hellaswag,lambada_openai)
harness_include = ""  # --task=harness: a folder of your own lm-eval task YAMLs (local data files work offline)
limit = 0  # evaluate the first N items (hellaswag, lambada) or N tokens (perplexity); 0 = all
source = "url"  # hellaswag/lambada data: 'url' (official jsonl, checksummed, cached) or 'hf' (Hugging Face datasets)
data_url = ""  # download from this mirror instead of the official URL (the checksum must still match)
data_file = ""  # read this local file of items in the official format instead (not checksummed: subsets, your own
# items): .jsonl/.json/.csv/.tsv/.txt, optionally .gz/.bz2/.xz, a folder or a glob
encoding = "utf-8"  # of --data_file and --text_file (e.g. latin-1, cp1252)
skip_bad_records = False  # True: leave out malformed items (counted in one WARNING line) instead of stopping
hellaswag_prompt = "ctx"  # 'ctx': ctx + ' ' + ending (completion style, build-nanogpt); 'harness': lm-eval-harness's
text_file = ""  # perplexity: a text file (optionally .gz/.bz2/.xz) ...
dataset = ""  # ... or a prepared dataset: data/<dataset>/<split>.bin (or its shards)
split = "val"  # split of --dataset
stride = 0  # perplexity: tokens the window moves per step; 0 = half the window; = window for plain chunks
# model
init_from = "resume"  # 'resume' (out_dir/ckpt_name), 'gpt2' | 'gpt2-medium' | 'gpt2-large' | 'gpt2-xl', or a path;
# several, comma-separated, are scored one after another on the same items and shown side by side
out_dir = "out"  # checkpoint folder for 'resume'; eval.jsonl is appended here
ckpt_name = "ckpt.pt"  # e.g. 'ckpt_int8.pt' for a quantized checkpoint
block_size = 0  # context window in tokens; 0 = the model's block_size
batch_size = 16  # sequences per forward pass (a HellaSwag item is 4 sequences)
# system
device = "auto"  # 'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps'
dtype = "auto"  # 'auto' | 'float32' | 'bfloat16' | 'float16' (autocast; scores are computed in float32)
compile = False  # torch.compile the model (pays off for long runs on a GPU; lengths vary, so expect recompiles)
# -----------------------------------------------------------------------------

# -----------------------------------------------------------------------------
# data: download, read, validate


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_rows(name: str) -> tuple:
    """The task's raw rows as ([(where, dict)], problems of the rows that are no records) from --data_file,
    the official URL (cached) or Hugging Face."""
    spec = DATASETS[name]
    if data_file:
        recs = load_records(data_file, encoding=encoding, report=False)
        return recs.rows, recs.bad
    if source == "hf":
        import datasets
        repo, config_name, hf_split = spec["hf"]
        try:
            ds = datasets.load_dataset(repo, config_name, split=hf_split)
        except RuntimeError as e:  # datasets >= 4 runs no loading scripts: take the Hub's parquet conversion
            if "scripts are no longer supported" not in str(e):
                raise
            ds = datasets.load_dataset(repo, config_name, split=hf_split, revision="refs/convert/parquet")
        return [(f"{repo} [{hf_split}] row {i + 1}", dict(row)) for i, row in enumerate(ds)], []
    if source != "url":
        raise ValueError(f"source must be 'url' or 'hf', got {source!r}")
    path = os.path.join(cache_root(), os.path.basename(spec["url"]))
    if os.path.exists(path) and sha256_of(path) != spec["sha256"]:
        print0(f"WARNING: {path} does not match its sha256 {spec['sha256']}; downloading it again")
        os.remove(path)
    download(data_url or spec["url"], path, spec["sha256"],
             hint=f"Without network: put a copy at {path!r}, or pass --data_file=PATH, or --source=hf with a filled "
                  f"Hugging Face cache")
    rows = load_records(path).rows
    assert len(rows) == spec["items"], f"{path} has {len(rows)} items, expected {spec['items']}"
    return rows, []


def parse_rows(rows_bad: tuple, parse) -> list:
    """parse(where, row) for every row; the rows it refuses and those that were no records are reported
    together (or skipped, counted in one WARNING line under --skip_bad_records)."""
    (rows, bad), parsed = rows_bad, []
    for where, row in rows:
        try:
            parsed.append(parse(where, row))
        except ValueError as e:  # its message starts with the row's FILE:LINE
            bad.append(str(e))
    report_bad(bad, skip_bad_records, repr(data_file) if data_file else f"the {task} data")
    return parsed


def hellaswag_item(where: str, row: dict, prompt: str):
    """-> (context, endings, label). prompt 'ctx': the context and endings as given (build-nanogpt's
    hellaswag.py); 'harness': lm-evaluation-harness's lm_eval/tasks/hellaswag/utils.py, the context
    'activity_label: ctx_a Ctx_b' and the endings cleaned of WikiHow's [header] markers."""
    fmt = "the official format {'ctx': str, 'endings': [4 strings], 'label': 0-3} of rowanz/hellaswag"
    keys = ("ctx",) if prompt == "ctx" else ("activity_label", "ctx_a", "ctx_b")
    if not isinstance(row, dict) or any(k not in row for k in keys + ("endings", "label")):
        got = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"{where}: a HellaSwag item needs the keys {list(keys + ('endings', 'label'))}, found "
                         f"{got}; expected {fmt}")
    bad = [k for k in keys if not isinstance(row[k], str)]
    if bad:
        raise ValueError(f"{where}: {bad[0]!r} must be a string, got {row[bad[0]]!r}; expected {fmt}")
    endings, label = row["endings"], row["label"]
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise ValueError(f"{where}: 'endings' must be a list of at least 2 strings, got {endings!r}; expected {fmt}")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)  # Hugging Face's copy stores the label as a string
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
        raise ValueError(f"{where}: 'label' {row['label']!r} is out of range for {len(endings)} endings; expected "
                         f"an int in 0..{len(endings) - 1}")
    if prompt == "ctx":
        return row["ctx"], endings, label
    context = harness_clean(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    return context, [harness_clean(e) for e in endings], label


def harness_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")  # WikiHow's [header], [step] ... markers


def lambada_item(where: str, row: dict):
    """-> (context, last word): the word is the text after the last space, scored as ' ' + word."""
    text = row.get("text") if isinstance(row, dict) else None
    if not isinstance(text, str):
        got = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"{where}: a LAMBADA item needs a 'text' string, found {got}; expected OpenAI's format "
                         f"{{'text': 'passage ... last word'}} (lambada_test.jsonl)")
    context, _, word = text.rpartition(" ")
    if not context or not word:
        raise ValueError(f"{where}: cannot split {text[-60:]!r} into a context and a last word after a space")
    return context, word

# -----------------------------------------------------------------------------
# scoring


def score_items(model, items: list, window: int, batch_size: int, n_vocab: int, rt):
    """items: [(context ids, [continuation ids, ...])]. Yields (item index, [(log-probs, greedy)] for each
    continuation), longest items first: out-of-memory shows at once, and neighbours need little padding
    (lm-evaluation-harness's order). The context is cut from the left to fit the window."""
    order = sorted(range(len(items)), key=lambda i: -min(max(len(items[i][0]) + len(c) for c in items[i][1]),
                                                          window + 1))
    batch, n_rows = [], 0
    for k, i in enumerate(order):
        batch.append(i)
        n_rows += len(items[i][1])
        if n_rows < batch_size and k < len(order) - 1:
            continue
        rows = [((ctx + c)[-(window + 1):], len(c)) for ctx, conts in (items[j] for j in batch) for c in conts]
        scores = score_batch(model, rows, n_vocab, rt)
        for j in batch:
            yield j, scores[:len(items[j][1])]
            scores = scores[len(items[j][1]):]
        batch, n_rows = [], 0


def encode_items(pairs: list, tokenizer, window: int):
    """[(context, [continuation strings])] -> ([(context ids, [continuation ids])], kept indices). Items the
    tokenizer cannot encode (a character-level vocabulary) or whose continuation alone fills the window are
    left out."""
    items, kept = [], []
    for i, (context, conts) in enumerate(pairs):
        try:
            ctx = tokenizer.encode_ordinary(context)
            ids = [tokenizer.encode_ordinary(" " + c) for c in conts]
        except ValueError:  # characters outside a character-level vocabulary
            continue
        if not ctx and tokenizer.eot_token is not None:
            ctx = [tokenizer.eot_token]  # nothing to condition on: start from <|endoftext|> like GPT-2's documents
        if ctx and all(len(c) <= window for c in ids):
            items.append((ctx, ids))
            kept.append(i)
    return items, kept


def weight_count(model) -> int:
    """Parameters as model.num_params counts them, the quantized ones included: int8/int4 layers hold their
    weights as integer buffers (int4 two to a byte, re-packed per device), so count in x out (+ bias) each."""
    n = model.num_params()
    for m in model.modules():  # each module once, also one registered twice (a quantized tied wte / lm_head)
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and not isinstance(w, torch.nn.Parameter) and not w.is_floating_point():
            bias = getattr(m, "bias", None)
            n += m.in_features * m.out_features + (bias.numel() if bias is not None else 0)
    return n


# -----------------------------------------------------------------------------
# tasks: each returns (number of items or tokens scored, metrics {name: value}, extra record fields)


def eval_choices(parsed, model, tokenizer, window: int, n_vocab: int, rt):
    """HellaSwag, or LAMBADA with the last word as the only continuation. parsed: [(context, continuations,
    label)] (label None for LAMBADA)."""
    parsed = parsed[:limit or None][rt.ddp_rank::rt.ddp_world_size]
    items, kept = encode_items([(c, e) for c, e, _ in parsed], tokenizer, window)
    s = {"n": 0, "acc": 0, "acc_norm": 0, "acc_norm_chars": 0, "nll": 0.0, "tokens": 0,
         "skipped": len(parsed) - len(items)}
    for j, scores in progress(score_items(model, items, window, batch_size, n_vocab, rt), desc=task,
                              total=len(items), unit="item"):
        _, conts, label = parsed[kept[j]]
        ll = [float(lp.sum()) for lp, _ in scores]
        if task == "lambada":
            s["acc"] += int(bool(scores[0][1].all()))  # every token of the word predicted greedily
            s["nll"] -= ll[0]
            s["tokens"] += len(scores[0][0])
        else:
            for name, values in {"acc": ll,  # the ending with the highest log-likelihood ...
                                 "acc_norm": [v / len(lp) for v, (lp, _) in zip(ll, scores)],  # ... per token
                                 "acc_norm_chars": [v / max(len(e), 1) for v, e in zip(ll, conts)]}.items():
                s[name] += int(max(range(len(values)), key=values.__getitem__) == label)  # ties: the first
        s["n"] += 1
    s = all_reduce_sums(s, rt)
    n = int(s["n"])
    if n == 0:
        raise ValueError("no item could be scored: each has characters outside the model's vocabulary or a "
                         "continuation longer than its window; use a model with GPT-2's tokenizer")
    if task == "lambada":  # perplexity per word, exp(mean NLL of the last word), as lm-eval-harness's lambada_openai
        return n, {"acc": s["acc"] / n, "ppl": math.exp(s["nll"] / n)}, \
            {"skipped": int(s["skipped"]), "tokens_per_word": s["tokens"] / n}
    return n, {k: s[k] / n for k in ("acc", "acc_norm", "acc_norm_chars")}, \
        {"skipped": int(s["skipped"]), "hellaswag_prompt": hellaswag_prompt}


def perplexity_tokens(tokenizer, text: Optional[str] = None) -> list:
    """-> [(name, token array)]: the text file (after <|endoftext|>, so that its first token is scored too;
    `text`: its text, already read) or the prepared split's token files, cut to --limit tokens in total."""
    if text_file:
        text = read_text(text_file, encoding) if text is None else text
        try:
            files = [(text_file, text_tokens(tokenizer, text))]
        except ValueError as e:
            raise ValueError(f"{text_file!r} cannot be encoded with this model's tokenizer: {e}") from e
    else:
        from lib.tokenizer import CharTokenizer
        from lib.tokens import token_files
        data_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", dataset)
        meta = os.path.join(data_dir, "meta.pkl")
        if os.path.exists(meta) and getattr(tokenizer, "chars", None) != CharTokenizer.load(meta).chars:
            raise ValueError(f"{data_dir!r} holds ids of the characters in {meta!r}, but the model reads other ids "
                             f"({tokenizer.name}, {tokenizer.n_vocab:,}); evaluate a model trained on it")
        files = [(p, read_tokens(p)) for p in token_files(data_dir, split)]
    out, left = [], limit or sum(len(t) for _, t in files)
    for name, tokens in files:
        if left >= 2 and len(tokens) >= 2:
            out.append((name, tokens[:left]))
            left -= len(out[-1][1])
    if not out:
        raise ValueError(f"no text to score: {text_file or dataset!r} has fewer than 2 tokens (limit={limit})")
    return out


def eval_perplexity(model, tokenizer, window: int, n_vocab: int, rt, text: Optional[str] = None):
    step = stride or max(window // 2, 1)
    if not 1 <= step <= window:
        raise ValueError(f"stride must be in 1..{window} (the window), got {stride!r}; --stride=0 is half the window")
    if bool(text_file) == bool(dataset):
        raise ValueError(f"--task=perplexity needs exactly one of --text_file=PATH or --dataset=NAME (data/NAME/"
                         f"{split}.bin), got text_file={text_file!r}, dataset={dataset!r}")
    files = perplexity_tokens(tokenizer, text)
    for name, tokens in files:
        if int(tokens.max()) >= n_vocab:
            raise ValueError(f"{name!r} holds token id {int(tokens.max())}, beyond this model's tokenizer "
                             f"({n_vocab:,} ids): it was prepared with another tokenizer")
    n_windows = sum(len(sliding_windows(len(t), window, step)) for _, t in files)
    print0(f"perplexity: {sum(len(t) for _, t in files):,} tokens of {', '.join(name for name, _ in files)}; "
           f"{n_windows:,} windows of {window} tokens, one every {step}")
    n, metrics, n_bytes = perplexity(model, tokenizer, files, window, step, batch_size, n_vocab, rt)  # lib/perplexity.py
    return n, metrics, {"window": window, "stride": step, "bytes": n_bytes, "text": [name for name, _ in files]}

# -----------------------------------------------------------------------------


if __name__ == "__main__":
    install()  # a user's error is one line 'error: ...', Ctrl-C is 'interrupted' (lib/errors.py)
    config = configure(globals(), sys.argv[1:]); globals().update(config)
    if task not in ("hellaswag", "lambada", "perplexity", "harness"):
        raise ValueError(f"task must be 'hellaswag', 'lambada', 'perplexity' or 'harness', got {task!r}; "
                         f"e.g. --task=hellaswag")
    if (task == "harness") != bool(harness_tasks):
        raise ValueError("--task=harness needs --harness_tasks=NAME[,NAME] (lm-eval's task names), and "
                         "--harness_tasks goes with --task=harness")
    if task == "harness":
        from lib.harness import run_harness  # before the model loads: without lm-eval, say how to install it
    if limit < 0 or batch_size < 1 or block_size < 0:
        raise ValueError(f"limit and block_size must be >= 0 and batch_size >= 1, got limit={limit!r}, "
                         f"block_size={block_size!r}, batch_size={batch_size!r}")
    if hellaswag_prompt not in ("ctx", "harness"):
        raise ValueError(f"hellaswag_prompt must be 'ctx' or 'harness', got {hellaswag_prompt!r}")
    # read and check the data before the model loads: a bad row should not wait for gpt2-xl
    if task == "hellaswag":
        parsed = parse_rows(load_rows("hellaswag"), lambda w, row: hellaswag_item(w, row, hellaswag_prompt))
    elif task == "lambada":
        parsed = [(context, [word], None) for context, word in parse_rows(load_rows("lambada"), lambada_item)]
    elif task == "harness":
        pass  # lm-eval reads its own data
    elif data_file or source != "url":
        raise ValueError("--data_file and --source are for hellaswag and lambada; perplexity reads --text_file or "
                         "--dataset")
    elif text_file and not os.path.isfile(text_file):
        raise FileNotFoundError(f"text file {text_file!r} does not exist")
    # perplexity's text, read now: a wrong encoding fails naming the line, before the model loads
    text = read_text(text_file, encoding) if task == "perplexity" and text_file else None
    if task in ("hellaswag", "lambada"):
        print0(f"{task}: {len(parsed):,} items" + (f", evaluating the first {limit:,}" if limit else ""))
    rt = setup_runtime(device, dtype)
    models = [m.strip() for m in init_from.split(",")]
    if not all(models):
        raise ValueError(f"init_from has an empty entry: {init_from!r}; separate several models with commas, e.g. "
                         f"--init_from=out-a,out-b/ckpt_int8.pt")
    for entry in models:  # every file named exists, before the first model is scored
        if entry not in GPT2_NAMES:
            checkpoint_path(entry, out_dir, ckpt_name)
    results = []  # (name, metrics) of each model, for the comparison table
    for entry in models:
        model, ckpt, tokenizer = load_model(entry, out_dir, rt.device, ckpt_name=ckpt_name)
        model.eval()
        n_vocab, window = tokenizer.n_vocab, block_size or model.config.block_size
        if n_vocab > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {n_vocab:,} ids but the model only {model.config.vocab_size:,} "
                             f"outputs: the checkpoint's tokenizer does not belong to it")
        if window > model.config.block_size:
            raise ValueError(f"block_size={block_size} exceeds the model's context of {model.config.block_size} "
                             f"tokens; use --block_size=0")
        name = ckpt["path"] if ckpt is not None else entry
        print0(f"model: {name} ({weight_count(model) / 1e6:.1f}M parameters), tokenizer {tokenizer.name} "
               f"({n_vocab:,} ids), window {window} tokens, batch {batch_size}")
        if compile:
            print0("compiling the model... (about a minute)")
            model = torch.compile(model)

        t0 = time.time()
        if task == "harness":  # {task: {metric: value}} -> 'task/metric' columns
            scores = run_harness(model, tokenizer, rt, harness_tasks.split(","), limit, batch_size, harness_include)
            n, metrics = len(scores), {f"{t}/{k}": v for t, m in scores.items() for k, v in m.items()}
            extra = {"harness_tasks": harness_tasks}
        elif task == "perplexity":
            n, metrics, extra = eval_perplexity(model, tokenizer, window, n_vocab, rt, text)
        else:
            n, metrics, extra = eval_choices(parsed, model, tokenizer, window, n_vocab, rt)
        seconds = time.time() - t0
        if extra.get("skipped"):
            print0(f"WARNING: {extra['skipped']:,} items were left out: their text has characters outside the "
                   f"model's vocabulary, or a continuation longer than the {window}-token window")
        unit = {"perplexity": "tokens", "harness": "tasks"}.get(task, "items")
        rate = "" if task == "harness" else f" ({n / max(seconds, 1e-9):,.1f} {unit}/s)"
        print0(f"\n{task} | {name} | {n:,} {unit} | {seconds:.1f} s{rate}\n| metric | value |\n|---|---|")
        for k, v in metrics.items():
            print0(f"| {k} | {v:.4f} |")
        results.append((name, metrics))
        if rt.master_process:
            # one model: out_dir/eval.jsonl; several: the eval.jsonl next to each checkpoint (a GPT-2 name: out_dir)
            folder = out_dir if len(models) == 1 or ckpt is None else os.path.dirname(ckpt["path"])
            record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "task": task, "init_from": entry,
                      "ckpt_name": os.path.basename(ckpt["path"]) if ckpt is not None else None,
                      "iter_num": (ckpt.get("resume") or {}).get("iter_num", ckpt.get("iter_num"))
                      if ckpt is not None else None, unit: n, **metrics, **extra,
                      "limit": limit, "data": data_file or (source if task != "perplexity" else None),
                      "seconds": round(seconds, 2), "device": rt.device, "dtype": rt.dtype}
            append_jsonl(os.path.join(folder, "eval.jsonl"), record)
            print0(f"appended to {os.path.join(folder, 'eval.jsonl')}")
        del model
    if len(results) > 1:  # side by side
        keys = list(results[0][1])
        print0(f"\n{task}, {len(results)} models\n| model | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
        for name, metrics in results:
            print0(f"| {name} | " + " | ".join(f"{metrics[k]:.4f}" for k in keys) + " |")
    if rt.ddp:
        torch.distributed.destroy_process_group()
