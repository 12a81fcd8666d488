"""
Look inside prepared token files before training on them: token counts, vocabulary coverage, the most frequent
tokens decoded, <|endoftext|> (document) counts and a few decoded (x, y) training pairs.

    python data/inspect.py data/shakespeare_char           # a prepared folder: its train and val splits
    python data/inspect.py data/fineweb --split=val --num_pairs=2 --block_size=64
    python data/inspect.py data/shakespeare/val.bin         # one file: raw uint16 or a headered shard

The tokenizer comes from the folder's meta.pkl (characters) or else is GPT-2's.
"""

import os
import sys

if __name__ == "__main__":
    # run as a script, this file's folder comes first on sys.path, where the name inspect.py would hide the
    # standard library's inspect module (which torch imports): put the repo root there instead
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import json

import numpy as np

from configurator import configure
from lib.errors import install
from lib.progress import progress
from lib.tokenizer import CharTokenizer, get_tokenizer
from lib.tokens import read_tokens, token_files

# -----------------------------------------------------------------------------
path = ""  # a prepared folder or one token file (may also be given as the first argument)
split = ""  # for a folder: 'train' or 'val' ('' = both)
top_k = 15  # how many of the most frequent tokens to show
num_pairs = 3  # how many decoded (x, y) windows to show
block_size = 24  # tokens per shown window
seed = 1337  # which windows are shown
# -----------------------------------------------------------------------------


def load_tokenizer_for(folder: str):
    """(tokenizer, how it was chosen): meta.pkl's characters, else GPT-2."""
    meta_pkl = os.path.join(folder, "meta.pkl")
    if os.path.exists(meta_pkl):
        return CharTokenizer.load(meta_pkl), f"characters from {meta_pkl}"
    return get_tokenizer("gpt2"), "GPT-2: no meta.pkl in the folder"


def token_counts(files: list) -> np.ndarray:
    """How often each id occurs in the files, read in chunks so that shards of any size fit in memory."""
    counts = np.zeros(1 << 16, dtype=np.int64)
    for f in progress(files, desc="counting", unit="file", disable=len(files) < 4):
        data = read_tokens(f)
        for i in range(0, len(data), 1 << 24):
            counts += np.bincount(data[i:i + (1 << 24)], minlength=1 << 16)
    return counts


def show(tok, v: int) -> str:
    return repr(tok.decode([v]))


def report(name: str, files: list, tok, rng):
    lengths = [len(read_tokens(f)) for f in files]
    total = sum(lengths)
    print(f"\n== {name}: {total:,} tokens in {len(files)} file{'s' * (len(files) > 1)}"
          + (f" ({min(lengths):,} to {max(lengths):,} per file)" if len(files) > 1 else ""))
    if total == 0:
        return
    counts = token_counts(files)
    top = int(np.flatnonzero(counts).max())
    if top >= tok.n_vocab:
        raise ValueError(f"{name} holds token id {top}, but the tokenizer ({tok.name}) has only {tok.n_vocab:,} "
                         f"ids: these files were made with another tokenizer (a meta.pkl of another run?). "
                         f"Prepare them again with the script that wrote them")
    unique = int((counts > 0).sum())
    print(f"unique tokens: {unique:,} of {tok.n_vocab:,} ({unique / tok.n_vocab:.1%} of the vocabulary)")
    if tok.eot_token is not None:
        docs = int(counts[tok.eot_token])
        print(f"<|endoftext|>: {docs:,}" + (f" (documents of {total / docs:,.0f} tokens on average)" if docs else ""))
    print(f"most frequent {'characters' if tok.name == 'char' else 'tokens'}:")
    for v in np.argsort(-counts, kind="stable")[:min(top_k, unique)]:
        print(f"  {v:>6} {show(tok, v):<16} {counts[v]:>12,} {counts[v] / total:7.2%}")
    usable = [i for i, n in enumerate(lengths) if n > block_size]
    for k in range(num_pairs if usable else 0):
        i = int(rng.choice(usable))
        start = int(rng.integers(0, lengths[i] - block_size))
        ids = np.asarray(read_tokens(files[i])[start:start + block_size + 1], dtype=np.int64)
        x, y = ids[:-1], ids[1:]
        print(f"pair {k + 1} ({os.path.basename(files[i])} at token {start:,}):")
        print(f"  x: {tok.decode(x)!r}")
        print(f"  y: {tok.decode(y)!r}")
        print("  " + "  ".join(f"{show(tok, a)}->{show(tok, b)}" for a, b in zip(x[:6], y[:6])) + "  ...")


if __name__ == "__main__":
    install()  # a user's error is one line 'error: ...', Ctrl-C is 'interrupted' (lib/errors.py)
    argv = sys.argv[1:]
    if argv and not argv[0].startswith("--"):
        path = argv.pop(0)
    config = configure(globals(), argv); globals().update(config)
    if not path:
        raise ValueError("pass a prepared folder or a token file: python data/inspect.py data/shakespeare_char")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} does not exist; prepare it first, e.g. python data/shakespeare_char/"
                                f"prepare.py, then: python data/inspect.py data/shakespeare_char")
    if split not in ("", "train", "val"):
        raise ValueError(f"split must be 'train', 'val' or '' (both), got {split!r}")
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    tok, why = load_tokenizer_for(folder)
    print(f"{path}: tokenizer {tok.name}, {tok.n_vocab:,} ids ({why})")
    meta_json = os.path.join(folder, "meta.json")
    if os.path.exists(meta_json):
        with open(meta_json) as f:
            meta = json.load(f)
        print("meta.json: " + ", ".join(f"{k}={meta[k]!r}" for k in ("source", "origin", "dataset", "name",
                                                                      "text_bytes", "shard_size") if k in meta))
    rng = np.random.default_rng(seed)
    if os.path.isdir(path):
        for s in [split] if split else ["train", "val"]:
            report(s, token_files(path, s), tok, rng)
    else:
        report(os.path.basename(path), [path], tok, rng)
