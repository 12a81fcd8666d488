"""
FineWeb-Edu (or any text dataset) as GPT-2 token shards: fineweb_val_000000.bin, fineweb_train_000001.bin, ...
of shard_size tokens each (uint16 after a header with magic, version and token count; see lib.tokens.write_tokens),
the first shard being the validation split, plus meta.json. Each document is preceded by <|endoftext|>.

    python data/fineweb/prepare.py                                  # sample-10BT: ~10B tokens, 100 shards
    python data/fineweb/prepare.py --max_tokens=300_000_000         # a 3-shard taste of it
    python data/fineweb/prepare.py --max_tokens=100_000_000         # the validation shard only (train.py streams)
    python data/fineweb/prepare.py --dataset=corpus.jsonl --out_dir=data/mycorpus --shard_size=10_000_000
    python data/fineweb/prepare.py --dataset=books/ --out_dir=data/books --shard_size=1_000_000  # .txt: a file a doc
    python data/fineweb/prepare.py --dataset=owt.txt --doc_separator='<|endoftext|>' --out_dir=data/owt
    python data/fineweb/prepare.py --dataset=roneneldan/TinyStories --name= --out_dir=data/tinystories

Documents stream in through `datasets` (nothing is downloaded up front) and are tokenized in num_proc worker
processes. Plain text (.txt, optionally .gz/.bz2/.xz) is read here, whole: a file is one document, line breaks
and blank lines included, or, with --doc_separator, the pieces between separators are. Re-running resumes:
finished shards (listed in meta.json, with a valid header) are kept and the stream continues where the first
missing or broken shard starts. Then: python train.py config/train_fineweb.py
"""

import glob
import itertools
import json
import os
import re
import sys
import time
from multiprocessing import Pool

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # repo root

from configurator import configure
from data.corpus import write_json
from lib.errors import install
from lib.streaming import document_text, open_text_stream
from lib.textfiles import read_text
from lib.tokenizer import get_tokenizer
from lib.tokens import read_tokens, write_tokens

install()  # a user's error is one line 'error: ...', Ctrl-C is 'interrupted' (lib/errors.py)

# -----------------------------------------------------------------------------
# what to read
# a Hugging Face dataset; or local files: a file, folder or glob of .jsonl/.json/.parquet/.txt (.gz too), or
# 'json' | 'parquet' | 'text' with data_files
dataset = "HuggingFaceFW/fineweb-edu"
doc_separator = ""  # plain text: '' = each file is one document; else what separates documents in a file, e.g.
# '\n\n' (blank lines) or '<|endoftext|>'; \n \t \r are read as escapes, line breaks around it are dropped
encoding = "utf-8"  # of plain-text files (e.g. latin-1, cp1252)
name = "sample-10BT"  # the dataset's config ('' for a dataset without configs; ignored for local files)
split = "train"  # the dataset split to read
text_field = "text"  # the record field holding the document text
data_files = ""  # local files for dataset='json'|'parquet'|'text' (a path or glob)
# what to write
out_dir = os.path.dirname(os.path.abspath(__file__))  # shards and meta.json go here
prefix = "fineweb"  # shard names: {prefix}_val_000000.bin, {prefix}_train_000001.bin, ...
shard_size = 100_000_000  # tokens per shard; the first shard is the validation split
max_tokens = -1  # stop after this many tokens in all (-1 = the whole dataset)
# how
num_proc = os.cpu_count() or 1  # tokenizer processes (the main one, which reads and writes, is mostly idle)
docs_per_task = 256  # documents per task sent to a worker
# -----------------------------------------------------------------------------


def tokenize(texts: list):
    """In a worker: <|endoftext|> + GPT-2 ids of each text -> (uint16 ids of all texts, token count per text)."""
    tok = get_tokenizer("gpt2")  # built once per process
    docs = tok.encode_batch(texts, num_threads=1)
    lengths = np.array([len(d) + 1 for d in docs], dtype=np.int64)
    ids = np.empty(int(lengths.sum()), dtype=np.uint16)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    ids[starts] = tok.eot_token
    for s, d in zip(starts, docs):
        ids[s + 1:s + 1 + len(d)] = d
    return ids, lengths


def shard_name(index: int) -> str:
    return f"{prefix}_{'val' if index == 0 else 'train'}_{index:06d}.bin"


def check_sizes(shard_size: int, max_tokens: int, num_proc: int, docs_per_task: int):
    if min(shard_size, num_proc, docs_per_task) < 1:
        raise ValueError(f"shard_size, num_proc and docs_per_task must be >= 1, got {shard_size!r}, {num_proc!r}, "
                         f"{docs_per_task!r}")
    if max_tokens == 0 or max_tokens < -1:
        raise ValueError(f"max_tokens must be -1 (the whole dataset) or > 0, got {max_tokens!r}")
    if 0 < max_tokens <= shard_size:  # what config/train_gpt2.py asks for: it streams its training data
        print(f"max_tokens={max_tokens:,} <= shard_size={shard_size:,}: only the validation shard is written "
              f"(train on a stream: --data_source=stream, as config/train_gpt2.py does; for training shards "
              f"too, use a larger --max_tokens or a smaller --shard_size)")


def unescape(separator: str) -> str:
    """\\n, \\t, \\r and \\\\ as the characters: a shell passes --doc_separator='\\n\\n' as backslashes."""
    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m.group(1)], separator)


def plain_text_files(dataset: str, data_files: str) -> list:
    """The .txt files (optionally compressed) that --dataset (or --dataset=text --data_files) names, or []
    when it names other data or a Hub dataset."""
    source = data_files if dataset == "text" else dataset
    if not source or not (os.path.exists(source) or glob.has_magic(source)):
        return []
    pattern = os.path.join(source, "*") if os.path.isdir(source) else source
    paths = [source] if os.path.isfile(source) else sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
    txt = lambda p: re.search(r"\.txt(\.gz|\.bz2|\.xz)?$", p.lower()) is not None
    return paths if paths and all(txt(p) for p in paths) else []


def text_documents(paths: list, separator: str, encoding: str):
    """The documents of plain-text files, in order: each file whole (its text exactly, CRLF read as LF), or the
    pieces between separators, without the line breaks next to a separator; blank pieces are no documents."""
    for path in paths:
        text = read_text(path, encoding)
        pieces = text.split(separator) if separator else [text]
        for piece in pieces:
            piece = piece.strip("\n") if separator else piece
            if piece.strip():
                yield piece


def previous_shards(out_dir: str, settings: dict, max_tokens: int):
    """What an earlier run left in out_dir that this one keeps -> (finished shards, True if nothing is left to do).

    Finished are the leading shards listed in meta.json whose file has a valid header and the recorded token
    count: full ones, and a shorter last one only if that run ended where this one would (end of the data, or
    the same max_tokens). A folder prepared with other settings is refused rather than mixed."""
    if not os.path.exists(os.path.join(out_dir, "meta.json")):
        return [], False
    with open(os.path.join(out_dir, "meta.json")) as f:
        old = json.load(f)
    changed = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
    if changed:
        raise ValueError(f"{out_dir!r} holds shards prepared with other settings (before, now): {changed}. Use "
                         f"another --out_dir, or delete its {settings['prefix']}_*.bin files and meta.json to start "
                         f"over")
    kept, total, shards = [], 0, old.get("shards", [])
    for i, entry in enumerate(shards):
        try:
            ok = len(read_tokens(os.path.join(out_dir, entry["file"]))) == entry["tokens"]
        except (FileNotFoundError, ValueError) as e:  # missing, truncated or foreign: written again
            print(f"shard {entry['file']} will be written again: {e}")
            ok = False
        full = entry["tokens"] == settings["shard_size"]
        same_end = old.get("complete") and i == len(shards) - 1 and (old.get("exhausted")
                                                                      or old.get("max_tokens") == max_tokens)
        if not ok or not (full or same_end) or 0 < max_tokens < total + entry["tokens"]:
            break
        kept.append(entry)
        total += entry["tokens"]
    return kept, bool(kept) and kept == shards and bool(old.get("complete"))


if __name__ == "__main__":
    config = configure(globals(), sys.argv[1:]); globals().update(config)
    check_sizes(shard_size, max_tokens, num_proc, docs_per_task)
    os.makedirs(out_dir, exist_ok=True)
    # plain-text files are read here, as whole documents (datasets' text builder would make each line one)
    txt_paths = plain_text_files(dataset, data_files)
    if doc_separator and not txt_paths:
        raise ValueError(f"--doc_separator={doc_separator!r} splits plain-text files, but {dataset!r} is no .txt "
                         f"file, folder or glob of them; drop --doc_separator, or pass the .txt files")
    separator = unescape(doc_separator)
    settings = {"dataset": dataset, "name": name, "split": split, "text_field": text_field, "data_files": data_files,
                "prefix": prefix, "shard_size": shard_size, "tokenizer": "gpt2", "vocab_size": 50257}
    if txt_paths:
        settings.update(doc_separator=separator)  # what a document is: a resume must agree
    done, complete = previous_shards(out_dir, settings, max_tokens)
    total = sum(e["tokens"] for e in done)
    if complete:
        print(f"all {len(done)} shards ({total:,} tokens) are already in {out_dir}; nothing to do")
        sys.exit(0)
    # where the next shard starts: a document, and a token within it (its <|endoftext|> is token 0)
    doc, offset = (done[-1]["end_doc"], done[-1]["end_token"]) if done else (0, 0)
    if done:
        print(f"resuming after {len(done)} finished shards ({total:,} tokens): skipping {doc:,} documents")
    meta = {**settings, "max_tokens": max_tokens, "shards": list(done), "complete": False}
    write_json(os.path.join(out_dir, "meta.json"), meta)

    from tqdm import tqdm
    get_tokenizer("gpt2")  # checks the BPE files once here; forked workers inherit the tokenizer
    t0 = time.time()
    # workers start before the stream opens: forking a process whose streaming threads are running is unsafe
    pool = Pool(num_proc) if num_proc > 1 else None
    if txt_paths:
        unit = f"the pieces between {separator!r}" if separator else "each file whole"
        print(f"reading {len(txt_paths):,} text file(s) of {dataset} as documents ({unit}) into {num_proc} "
              f"tokenizer process(es)")
        docs = itertools.islice(text_documents(txt_paths, separator, encoding), doc, None)
    else:
        print(f"streaming {dataset} (split {split!r}) into {num_proc} tokenizer process(es)")
        ds = open_text_stream(dataset, name, split, data_files or None)
        if doc:
            ds = ds.skip(doc)  # reads past the documents of the finished shards without tokenizing them

    def batches():
        if txt_paths:
            while True:
                texts = list(itertools.islice(docs, docs_per_task))
                if not texts:
                    return
                yield texts
        for batch in ds.iter(batch_size=docs_per_task):  # columns of docs_per_task records
            texts = batch.get(text_field, [])
            bad = [i for i, t in enumerate(texts) if not isinstance(t, str)] or ([] if text_field in batch else [0])
            if bad:  # a missing field or a record without text: the same clear error as the streaming loader
                document_text({k: v[bad[0]] for k, v in batch.items()}, text_field, dataset)
            yield texts

    shard = np.empty(shard_size, dtype=np.uint16)
    bar = tqdm(total=max_tokens if max_tokens > 0 else None, initial=total, unit="tok", unit_scale=True,
               desc=f"{prefix} shard {len(done)}")

    def finish_shard(n_tokens: int, end_doc: int, end_token: int):
        """Write the first n_tokens of the buffer as the next shard, and record where the one after starts."""
        entry = {"file": shard_name(len(meta["shards"])), "tokens": n_tokens, "end_doc": end_doc,
                 "end_token": end_token}
        write_tokens(os.path.join(out_dir, entry["file"]), shard[:n_tokens], header=True, vocab_size=50257)
        meta["shards"].append(entry)
        write_json(os.path.join(out_dir, "meta.json"), meta)  # after every shard: where to resume
        bar.set_description(f"{prefix} shard {len(meta['shards'])}")

    fill, docs_read, exhausted = 0, 0, True
    try:
        for ids, lengths in pool.imap(tokenize, batches()) if pool else map(tokenize, batches()):
            # pos: tokens of this batch used so far; its first document may have begun in the last finished shard
            pos, ends = offset if docs_read == 0 else 0, np.cumsum(lengths)
            while pos < len(ids) and total != max_tokens:
                n = min(len(ids) - pos, shard_size - fill, max_tokens - total if max_tokens > 0 else len(ids))
                shard[fill:fill + n] = ids[pos:pos + n]
                fill, pos, total = fill + n, pos + n, total + n
                bar.update(n)
                if fill == shard_size or total == max_tokens:
                    j = int(np.searchsorted(ends, pos, side="right"))  # the document holding token pos
                    finish_shard(fill, doc + docs_read + j, pos - (int(ends[j - 1]) if j else 0))
                    fill = 0
            docs_read += len(lengths)
            if total == max_tokens:
                exhausted = False
                break
        if fill:  # the end of the dataset: a last, shorter shard
            finish_shard(fill, doc + docs_read, 0)
    finally:
        bar.close()
        if pool:
            pool.terminate()
    if not meta["shards"]:
        raise ValueError(f"{dataset!r} (split {split!r}) yielded no text; check --dataset, --split and --text_field")
    # shards of an earlier, longer run (or of one that stopped between a shard and meta.json) would be read
    # by the loaders as part of the data: remove them
    for path in glob.glob(os.path.join(out_dir, f"{prefix}_*_[0-9]*.bin")):
        if os.path.basename(path) not in {e["file"] for e in meta["shards"]}:
            print(f"removing {path}: not part of this preparation")
            os.remove(path)
    meta.update(complete=True, exhausted=exhausted, total_tokens=total)
    write_json(os.path.join(out_dir, "meta.json"), meta)
    dt = time.time() - t0
    n_train = total - meta["shards"][0]["tokens"]
    print(f"{total:,} tokens in {len(meta['shards'])} shards (val {meta['shards'][0]['tokens']:,}, train "
          f"{n_train:,}) in {dt:.1f} s ({(total - sum(e['tokens'] for e in done)) / dt:,.0f} tokens/s), in {out_dir}")
    if n_train == 0 and max_tokens > 0 and total == max_tokens:
        print(f"the validation shard only, as asked (max_tokens={max_tokens:,}): train on a stream "
              f"(--data_source=stream, config/train_gpt2.py)")
    elif n_train == 0:
        print(f"WARNING: the dataset has only {total:,} tokens, all in the validation shard: nothing to train on. "
              f"Use a smaller --shard_size, e.g. --shard_size={max(total // 10, 1)}")

# a 50 MB local jsonl (13,853 documents) with --shard_size=5_000_000 on a busy 2-core machine:
# fineweb shard 3: : 14.4Mtok [00:16, 864ktok/s]
# 14,437,294 tokens in 3 shards (val 5,000,000, train 9,437,294) in 16.9 s (856,512 tokens/s), in data/fineweb
