"""
Fine-tune a GPT for one job: follow instructions (task='instruct', supervised fine-tuning on Alpaca-style
records) or classify text (task='classify', a linear head on the last token, e.g. IMDB sentiment).

Instruction following, GPT-2 124M on Stanford Alpaca (52k records), then ask it something:
    python finetune.py config/finetune_alpaca.py   # OpenAI's weights are downloaded once, by load_openai.py
    python sample.py --init_from=resume --out_dir=out-sft --instruct="Name three primary colors."
Sentiment classification, GPT-2 124M on IMDB, then classify a sentence:
    python finetune.py config/finetune_imdb.py
    python finetune.py config/finetune_imdb.py --init_from=resume --predict="What a wonderful film"
Several GPUs:
    torchrun --standalone --nproc_per_node=8 finetune.py config/finetune_alpaca.py
Your own data: --dataset=my.jsonl (instruct: fields instruction, input (optional), output; classify: text,
label, also .csv). Your own pre-trained model: --init_from=out-shakespeare (a checkpoint file or folder).

The prompt template is Alpaca's (below): "### Instruction:" (and "### Input:") then "### Response:", the
response ended by <|endoftext|>. The loss counts response tokens only; prompts and padding are masked (-1).
Records are right-padded: with causal attention, padding after a token never changes that token's output.
"""

import math
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

from common import (append_jsonl, init_wandb, load_model, plot_curves, print0, rng_state, save_checkpoint,
                    set_rng_state, setup_runtime)
from configurator import configure
from model import GPT, GPTConfig
from tokenizer import get_tokenizer

# ----------------------------------------------------------------------------------------------
# prompt template and loss masking (shared: align.py and sample.py import these)

# Alpaca's prompt layout (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT)
PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def format_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for an instruction (and optional input); the response follows it directly."""
    if input:
        return PROMPT_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def encode_pair(tok, prompt: str, response: str, block_size: int, truncate: str = "right"):
    """Token ids and training labels for prompt + response (+ <|endoftext|> when the tokenizer has one).

    Returns (x, y, truncated): x = ids[:-1], y = ids[1:] with -1 wherever the target is a prompt token, so
    the loss (ignore_index=-1) counts response tokens only. len(x) <= block_size. When prompt + response is
    too long: truncate='right' cuts the end; truncate='prompt' drops prompt tokens from the left first (the
    response matters more), then cuts the end if the response alone is still too long.
    """
    if truncate not in ("right", "prompt"):
        raise ValueError(f"truncate must be 'right' or 'prompt', got {truncate!r}")
    p = tok.encode_ordinary(prompt)
    r = tok.encode_ordinary(response) + ([tok.eot_token] if tok.eot_token is not None else [])
    n = block_size + 1  # x and y of length block_size come from block_size + 1 ids
    truncated = len(p) + len(r) > n
    if truncated and truncate == "prompt":
        p = p[max(len(p) - max(n - len(r), 1), 0):]  # keep at least one prompt token to condition on
    ids = (p + r)[:n]
    x = ids[:-1]
    y = [t if i + 1 >= len(p) else -1 for i, t in enumerate(ids[1:])]
    return x, y, truncated


@torch.no_grad()
def answer(model, tok, instruction: str, input: str = "", max_new_tokens: int = 128) -> str:
    """The model's greedy response to an instruction, cut at <|endoftext|> (call model.eval() first)."""
    ids = tok.encode_ordinary(format_prompt(instruction, input))
    device = next(model.parameters()).device
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature=0.0,
                         stop_token=tok.eot_token)
    new = out[0, len(ids):].tolist()
    if tok.eot_token in new:
        new = new[:new.index(tok.eot_token)]
    return tok.decode(new).strip()

# ----------------------------------------------------------------------------------------------
# data: records from the Hub or local files, checked, tokenized, batched


def load_split(dataset: str, split: str, dataset_config: str = "", cache_dir: str = ""):
    """One split as a datasets.Dataset -> (dataset, its name for messages). A split of a Hub dataset, or a
    local .json/.jsonl/.csv file: `dataset` itself (split 'train') or a file given as the split."""
    import datasets
    is_file = lambda s: s.lower().endswith((".json", ".jsonl", ".csv")) or os.path.isfile(s)  # else: the Hub
    path = split if is_file(split) else dataset if is_file(dataset) else None
    if path == dataset and split != "train":
        raise ValueError(f"{dataset!r} is a local file, which holds one split; for split {split!r} pass another "
                         f"file (e.g. --test_split=test.jsonl)")
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file {path!r} does not exist (expected a .json, .jsonl or .csv file)")
        builder = "csv" if path.lower().endswith(".csv") else "json"
        return datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache_dir or None), repr(path)
    try:
        ds = datasets.load_dataset(dataset, dataset_config or None, split=split, cache_dir=cache_dir or None)
    except Exception as e:  # no network, unknown name or split: the fix is the same
        raise ValueError(f"could not load split {split!r} of the Hugging Face dataset {dataset!r} ({type(e).__name__}: "
                         f"{e}). Check the name, or download the data elsewhere and pass the file: "
                         f"--dataset=data.jsonl") from e
    return ds, f"{dataset!r} split {split!r}"


def column(ds, field: str, key: str, source: str, required: bool = True, kinds=(str,)) -> list:
    """One field of every record, checked: a missing or mistyped value is an error naming the record.
    key: the config key that names this field."""
    if field not in ds.column_names and not required:
        return [""] * len(ds)
    values = ds[field] if field in ds.column_names else [None] * len(ds)
    for i, v in enumerate(values):
        if v is None and required:
            raise ValueError(f"{source}: record {i} has no {field!r} field (the fields are {ds.column_names}); fix "
                             f"the record, or name the field: --{key}=NAME")
        if v is not None and not isinstance(v, kinds):
            raise ValueError(f"{source}: record {i} field {field!r} is {v!r} ({type(v).__name__}), expected "
                             f"{' or '.join(k.__name__ for k in kinds)}")
    return ["" if v is None else v for v in values]


def class_names(ds, labels: list, label_field: str, label_names: list, source: str) -> list:
    """Class names in id order: label_names, else the dataset's ClassLabel names, else the sorted string
    labels, else '0' .. str(largest label)."""
    if len({isinstance(v, str) for v in labels}) > 1:
        raise ValueError(f"{source}: field {label_field!r} mixes strings and integers; use one kind")
    if label_names:
        return [str(n) for n in label_names]
    if getattr(ds.features.get(label_field), "names", None):
        return list(ds.features[label_field].names)
    if isinstance(labels[0], str):
        return sorted(set(labels))
    return [str(i) for i in range(max(labels) + 1)]


def label_ids(labels: list, names: list, source: str) -> list:
    """Labels as class ids in [0, len(names)): integers are range-checked, strings looked up in names."""
    out = []
    for i, v in enumerate(labels):
        k = names.index(v) if isinstance(v, str) and v in names else v
        if isinstance(k, str):
            raise ValueError(f"{source}: record {i} has label {v!r}, which is none of the classes {names}; fix the "
                             f"record, or list every class in id order: --label_names=\"{names + [v]}\"")
        if not 0 <= k < len(names):
            raise ValueError(f"{source}: record {i} has label {v!r}, outside [0, {len(names)}) for the classes "
                             f"{names}; fix the record, or name every class in id order: --label_names=\"[...]\"")
        out.append(int(k))
    return out


def encode_records(tok, rows: list, block_size: int, truncate: str, source: str):
    """Token ids and labels per record -> (examples, counts of truncated / dropped / empty records).
    rows: (record index, instruction, input, output) -> (x, y) from encode_pair, y = -1 on the prompt; or
    (record index, text, class id) -> (ids, class id). truncate: 'left' drops prompt tokens first (instruct)
    or keeps a text's end (classify), 'right' cuts the end, 'drop' skips the record."""
    from tqdm import tqdm
    examples, stats = [], dict(truncated=0, dropped=0, empty=0)
    for i, *fields in tqdm(rows, desc=f"tokenizing {source}", disable=len(rows) < 5000):
        instruct = len(fields) == 3
        if not fields[0].strip() or (instruct and not fields[2].strip()):  # no instruction / output / text
            stats["empty"] += 1
            continue
        try:
            if instruct:
                x, y, cut = encode_pair(tok, format_prompt(fields[0], fields[1]), fields[2], block_size,
                                        "prompt" if truncate == "left" else "right")
                example, learnable = (x, y), any(t != -1 for t in y)
            else:
                ids = tok.encode_ordinary(fields[0])
                cut = len(ids) > block_size
                example, learnable = (ids[-block_size:] if truncate == "left" else ids[:block_size], fields[1]), True
        except ValueError as e:  # e.g. a character outside a char-level vocabulary
            raise ValueError(f"{source}: record {i}: {e}") from e
        if (cut and truncate == "drop") or not learnable:  # no response token fits: nothing to learn
            stats["dropped"] += 1
            continue
        stats["truncated"] += cut
        examples.append(example)
    if not examples:
        raise ValueError(f"{source}: no records left after filtering: {len(rows)} read, {stats['empty']} empty, "
                         f"{stats['dropped']} too long for block_size {block_size} (truncate={truncate!r}); fix the "
                         f"data, or use a longer --block_size or --truncate=left")
    return examples, stats


def plan_batches(lengths: list, batch_size: int, seed: int, epoch: int, mode: str = "sorted") -> list:
    """One epoch of batches (arrays of record indices), a pure function of (seed, epoch), so resuming needs
    only the iteration count. 'sorted': shuffle, sort each window of 64 batches by length, cut it into
    batches and shuffle those, so records of similar length share a batch (little padding) while the order
    stays random (the "megabatch" idea of Hugging Face's LengthGroupedSampler). 'random': a plain shuffle."""
    rng = np.random.default_rng([seed, epoch])
    order, lengths = rng.permutation(len(lengths)), np.asarray(lengths)
    if mode == "sorted":
        w = batch_size * 64
        windows = np.split(order, range(w, len(order), w))
        order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in windows])  # longest first
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[j] for j in rng.permutation(len(batches))] if mode == "sorted" else batches


def padded_fraction(lengths: list, batches: list) -> float:
    """Share of the positions of right-padded batches that are padding."""
    lengths = np.asarray(lengths)
    return 1.0 - lengths.sum() / sum(len(b) * lengths[b].max() for b in batches)


def make_batch(examples: list, idx, pad_id: int):
    """Right-pad the records idx into x (B, T) and labels y (B, T), -1 where there is nothing to predict:
    instruct, the next token at response positions; classify, the class at each text's last real token."""
    rows = [examples[i] for i in idx]
    T = max(len(r[0]) for r in rows)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    y = torch.full((len(rows), T), -1, dtype=torch.long)  # (B, T)
    for r, (ids, label) in enumerate(rows):
        x[r, :len(ids)] = torch.tensor(ids)
        if isinstance(label, list):
            y[r, :len(label)] = torch.tensor(label)
        else:
            y[r, len(ids) - 1] = label  # the only position whose causal view covers the whole text
    return x, y

# ----------------------------------------------------------------------------------------------
# model: the GPT with outputs only where there are labels


class Finetuned(nn.Module):
    """The GPT with logits computed only at labelled positions: the LM head at response tokens (instruct),
    or a linear head at each text's last real token (classify, num_classes > 0), the way GPT-1 (Radford et
    al. 2018, section 3.3) classifies. Skipping the 50k-way LM head (a small GPT's largest matmul) at prompt
    and padding positions saves its cost there: 20% of a training step for a 4-layer, 128-wide model whose
    records are half prompt."""

    def __init__(self, gpt, num_classes: int = 0):
        super().__init__()
        self.gpt = gpt
        self.head = nn.Linear(gpt.config.n_embd, num_classes) if num_classes else None
        if self.head is not None:
            torch.nn.init.normal_(self.head.weight, mean=0.0, std=0.02)  # GPT-2's init for every Linear
            torch.nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor):
        """idx (B, T) ids, targets (B, T) labels, -1 where none -> (logits (N, vocab or classes), mean loss)
        at the N labelled positions, in row-major order."""
        t = self.gpt.transformer
        pos = torch.arange(idx.size(1), device=idx.device)  # (T,)
        x = t.drop(t.wte(idx) + t.wpe(pos))  # (B, T, C), as in GPT.forward
        for i, block in enumerate(t.h):
            x, _ = block(x, i)
        keep = targets.reshape(-1) != -1  # (B*T,)
        x = t.ln_f(x.reshape(-1, x.size(-1))[keep])  # (N, C); LayerNorm is per token, so gather first
        logits = (self.gpt.lm_head if self.head is None else self.head)(x)  # (N, vocab or classes)
        return logits, F.cross_entropy(logits.float(), targets.reshape(-1)[keep])


def freeze(gpt, n_trainable_layers: int) -> None:
    """Train only the last n_trainable_layers blocks and the final LayerNorm (a classification head stays
    trainable); -1 trains everything. Frozen weights get no gradient, so autograd skips their backward."""
    n = gpt.config.n_layer
    if not -1 <= n_trainable_layers <= n:
        raise ValueError(f"n_trainable_layers must be -1 (all) or in [0, {n}] for this {n}-layer model, got "
                         f"{n_trainable_layers!r}")
    if n_trainable_layers >= 0:
        for p in gpt.parameters():
            p.requires_grad = False
        for p in [*gpt.transformer.h[n - n_trainable_layers:].parameters(), *gpt.transformer.ln_f.parameters()]:
            p.requires_grad = True


@torch.no_grad()
def evaluate(model, examples: list, batches: list, pad_id: int, rt, desc: str = "") -> tuple:
    """(mean loss, accuracy) per label over the batches: per response token (instruct) or per record."""
    from tqdm import tqdm
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for idx in tqdm(batches, desc=desc, disable=not desc):
        x, y = (t.to(rt.device) for t in make_batch(examples, idx, pad_id))
        with rt.autocast():
            logits, loss = model(x, y)
        n = len(logits)
        loss_sum, count = loss_sum + loss.item() * n, count + n
        correct += int((logits.argmax(-1) == y[y != -1]).sum())
    model.train()
    return loss_sum / count, correct / count

# ----------------------------------------------------------------------------------------------
# defaults: each can be set by a config file or --key=value
# task and I/O
task = 'instruct'  # 'instruct' (loss on responses) or 'classify' (linear head on the last token)
out_dir = 'out-finetune'
init_from = 'gpt2'  # 'scratch', 'resume' (out_dir/ckpt_name), 'gpt2'..'gpt2-xl', or a checkpoint file/folder
ckpt_name = 'ckpt.pt'
always_save_checkpoint = True  # False: write the checkpoint only when val loss improves
predict = ''  # text: load init_from, print its response (instruct) or label + probabilities (classify), exit
# data
dataset = 'tatsu-lab/alpaca'  # Hugging Face dataset name, or a local .json / .jsonl / .csv file
dataset_config = ''  # Hub config name, e.g. 'sst2' for dataset='glue'
train_split = 'train'
val_split = ''  # split name or local file; '' = hold out val_fraction of the training records
val_fraction = 0.05  # share of the training records held out for validation (seeded)
test_split = ''  # classify: split name or local file also scored at each eval ('test' for IMDB); '' = none
max_records = 0  # 0 = all; N = at most N (random, seeded) records per split, for quick runs
cache_dir = ''  # folder for datasets' cache; '' = its default (~/.cache/huggingface/datasets)
instruction_field = 'instruction'
input_field = 'input'  # optional, may be missing or empty
output_field = 'output'
text_field = 'text'
label_field = 'label'  # integer class ids or class-name strings
label_names = []  # class names in id order; [] = the dataset's ClassLabel names, the sorted strings, or '0'..
truncate = 'left'  # over block_size: 'left' cuts the start (instruct: prompt tokens only), 'right' the end, 'drop'
batching = 'sorted'  # 'sorted': batches of records of similar length (little padding); 'random'
# model (init_from='scratch' only: checkpoints bring their own shape)
n_layer = 12
n_head = 12
n_embd = 768
bias = True
dropout = 0.0  # for every init_from; 0.1 is a common choice when fine-tuning on little data
block_size = 1024  # tokens per record at most; a model with a longer window is cropped to this
n_trainable_layers = -1  # -1 = train all; k >= 0: freeze all but the last k blocks (+ final LayerNorm, head)
# optimization: AdamW, linear warmup then cosine decay to min_lr
batch_size = 8  # records per micro-batch (per GPU)
gradient_accumulation_steps = 1  # micro-batches per optimizer step (per GPU)
epochs = 3.0  # passes over the training records
max_iters = 0  # optimizer steps; 0 = derived from epochs
learning_rate = 5e-5
min_lr = 0.0
warmup_iters = 100
decay_lr = True
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0  # 0 = off
# evaluation and logging
eval_interval = 200
eval_iters = 20  # batches per split at each eval
final_eval = True  # classify: accuracy on the full val and test splits after training
log_interval = 10
sample_interval = 200  # instruct: show greedy answers to held-out instructions every N iters; 0 = off
num_samples = 3  # held-out instructions shown
max_new_tokens = 128
wandb_log = False
wandb_project = 'llm-e2e'
wandb_run_name = 'finetune'
wandb_mode = 'online'  # 'online', 'offline' or 'disabled'
# system
device = 'auto'  # 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'
dtype = 'auto'  # 'auto', 'float32', 'bfloat16' or 'float16'
compile = False  # torch.compile the training forward (dynamic shapes: batch lengths vary)
seed = 1337

# ----------------------------------------------------------------------------------------------
if __name__ == "__main__":  # the helpers above are imported by align.py and sample.py; the run is below
    config = configure(globals(), sys.argv[1:]); globals().update(config)
    for key, valid in (("task", ("instruct", "classify")), ("truncate", ("left", "right", "drop")),
                       ("batching", ("sorted", "random"))):
        if config[key] not in valid:
            raise ValueError(f"{key} must be one of {valid}, got {config[key]!r}")
    for key in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval",
                "block_size"):
        if config[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {config[key]!r}")
    if not (0 < val_fraction < 1 or val_split):
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r} (or name a split: --val_split=...)")
    rt = setup_runtime(device, dtype)
    master, world = rt.master_process, rt.ddp_world_size
    torch.manual_seed(seed + rt.ddp_rank)  # the head's init, and dropout (different on each rank)

    # ------------------------------------------------------------------------------------------
    # --predict: run a fine-tuned model on one text, then exit
    if predict:
        gpt, ckpt, tok = load_model(init_from, out_dir, rt.device, ckpt_name=ckpt_name)
        if task == "classify" or (ckpt or {}).get("task") == "classify":
            if "head" not in (ckpt or {}):
                raise ValueError(f"init_from={init_from!r} has no classification head: train one first (python "
                                 f"finetune.py config/finetune_imdb.py), then pass its out_dir with --init_from=resume")
            model = Finetuned(gpt, len(ckpt["labels"])).to(rt.device).eval()
            model.head.load_state_dict(ckpt["head"])
            examples, _ = encode_records(tok, [(0, predict, 0)], gpt.config.block_size,
                                         ckpt["config"].get("truncate", "left"), "--predict")
            with torch.no_grad(), rt.autocast():
                logits, _ = model(*(t.to(rt.device) for t in make_batch(examples, [0], 0)))
            probs = F.softmax(logits.float(), dim=-1)[0].tolist()
            k = int(np.argmax(probs))
            print0(f"label: {ckpt['labels'][k]} ({probs[k]:.4f})")
            print0("probabilities: " + ", ".join(f"{n}={p:.4f}" for n, p in zip(ckpt["labels"], probs)))
        else:
            with rt.autocast():
                print0(answer(gpt.eval(), tok, predict, "", max_new_tokens))
        sys.exit(0)

    # ------------------------------------------------------------------------------------------
    # data: read and check every record before building the model
    rng = np.random.default_rng(seed)
    raw, names = {}, None  # split -> (source, [(record index, fields...)]); class names
    for name, split in (("train", train_split), ("val", val_split), ("test", test_split if task == "classify" else "")):
        if not split:
            continue
        ds, source = load_split(dataset, split, dataset_config, cache_dir)
        if len(ds) == 0:
            raise ValueError(f"{source} has no records")
        if task == "instruct":
            cols = [column(ds, instruction_field, "instruction_field", source),
                    column(ds, input_field, "input_field", source, required=False),
                    column(ds, output_field, "output_field", source)]
        else:
            labels = column(ds, label_field, "label_field", source, kinds=(int, str))
            names = names or class_names(ds, labels, label_field, label_names, source)
            cols = [column(ds, text_field, "text_field", source), label_ids(labels, names, source)]
        order = rng.permutation(len(ds))[:max_records or None]  # seeded: a random subset, in random order
        raw[name] = (source, [(int(i), *(c[i] for c in cols)) for i in order])
    if "val" not in raw:  # hold out val_fraction of the (shuffled) training records
        source, rows = raw["train"]
        n_val = max(1, round(len(rows) * val_fraction))
        if len(rows) <= n_val:
            raise ValueError(f"{source} has {len(rows)} record(s): too few to hold out {n_val} for validation; "
                             f"add records or pass --val_split=FILE")
        raw["val"], raw["train"] = (source + " (held out)", rows[:n_val]), (source, rows[n_val:])
    raw = {k: raw[k] for k in ("train", "val", "test") if k in raw}
    if task == "classify" and len(names) < 2:
        raise ValueError(f"{raw['train'][0]}: found only the classes {names}; classification needs at least 2")

    # ------------------------------------------------------------------------------------------
    # model, tokenizer, tokens
    if init_from == "scratch":
        tok, ckpt = get_tokenizer("gpt2"), None
        gpt = GPT(GPTConfig(block_size=block_size, vocab_size=50304, n_layer=n_layer, n_head=n_head,
                            n_embd=n_embd, dropout=dropout, bias=bias))  # 50257 ids padded to a multiple of 64
    else:
        gpt, ckpt, tok = load_model(init_from, out_dir, "cpu", dropout=dropout, ckpt_name=ckpt_name)
    if block_size < gpt.config.block_size:
        gpt.crop_block_size(block_size)
    T = gpt.config.block_size
    if block_size > T:
        print0(f"note: block_size {block_size} exceeds the model's window; using {T}")
    pad_id = tok.eot_token if tok.eot_token is not None else 0  # any id: padding is never a label

    data = {}  # split -> (examples, lengths)
    for name, (source, rows) in raw.items():
        examples, n = encode_records(tok, rows, T, truncate, source)
        lengths = [len(e[0]) for e in examples]
        data[name] = (examples, lengths)
        print0(f"{name}: {len(examples):,} records from {source}, {sum(lengths):,} tokens (mean "
               f"{np.mean(lengths):.0f}, max {max(lengths)}), {n['truncated']:,} of them truncated to {T} tokens")
        if n["dropped"] or n["empty"]:
            print0(f"WARNING: {name}: skipped {n['empty']:,} records with an empty text and {n['dropped']:,} too long "
                   f"for {T} tokens (truncate={truncate!r}; --truncate=left keeps what fits)")
    train_examples, train_lengths = data["train"]
    plan = {}  # epoch -> its batches (the current epoch only)

    def train_batches(epoch):
        if epoch not in plan:
            plan.clear()
            plan[epoch] = plan_batches(train_lengths, batch_size, seed, epoch, batching)
        return plan[epoch]

    nb = len(train_batches(0))
    print0(f"batches: {nb:,} per epoch of up to {batch_size} records, {batching}; padding is "
           f"{padded_fraction(train_lengths, train_batches(0)):.1%} of the tokens (in random order: "
           f"{padded_fraction(train_lengths, plan_batches(train_lengths, batch_size, seed, 0, 'random')):.1%})")
    # a fixed random sample of each split for the evals during training
    eval_sets = {k: (ex, plan_batches(ln, batch_size, seed + 1, 0)[:eval_iters]) for k, (ex, ln) in data.items()}
    steps_per_epoch = nb / (gradient_accumulation_steps * world)
    max_iters = max_iters or max(1, math.ceil(epochs * steps_per_epoch))
    print0(f"{max_iters:,} iterations = {max_iters / steps_per_epoch:.2f} epochs; {batch_size} x "
           f"{gradient_accumulation_steps} x {world} records per iteration (batch x accumulation x GPUs)")

    # ------------------------------------------------------------------------------------------
    # what trains, the optimizer, resume
    model = Finetuned(gpt, len(names) if task == "classify" else 0)
    freeze(gpt, n_trainable_layers)
    model.to(rt.device)
    optimizer = gpt.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), rt.device_type)
    if model.head is not None:
        optimizer.add_param_group({"params": [model.head.weight], "weight_decay": weight_decay})
        optimizer.add_param_group({"params": [model.head.bias], "weight_decay": 0.0})
        print0(f"classes: {names}")
    params = [p for g in optimizer.param_groups for p in g["params"]]  # the trainable ones
    n_all, n_train = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in params)
    frozen = f" (the last {n_trainable_layers} blocks, ln_f{', head' * (task == 'classify')})"
    print0(f"parameters: {n_all / 1e6:.2f}M, trainable {n_train / 1e6:.2f}M" + frozen * (n_trainable_layers >= 0))
    iter_num, best_val_loss = 0, float("inf")
    if init_from == "resume":
        if ckpt.get("task") != task or ckpt.get("labels") != (names if task == "classify" else None):
            raise ValueError(f"{os.path.join(out_dir, ckpt_name)!r} was written for task={ckpt.get('task')!r}, labels "
                             f"{ckpt.get('labels')}, not task={task!r}, labels {names}; resume with the config that "
                             f"wrote it, or start a new run from it: --init_from={out_dir!r} --out_dir=NEW")
        if ckpt["config"]["n_trainable_layers"] != n_trainable_layers:
            raise ValueError(f"n_trainable_layers={n_trainable_layers} differs from the resumed run's "
                             f"{ckpt['config']['n_trainable_layers']}; resume with the same value")
        if model.head is not None:
            model.head.load_state_dict(ckpt["head"])
        optimizer.load_state_dict(ckpt["optimizer"])
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        set_rng_state(ckpt["rng"])
        print0(f"resuming at iteration {iter_num} (best val loss {best_val_loss:.4f})")
    ckpt = None  # free the loaded weights
    train_model = model
    if compile:
        print0("compiling the model... (takes a minute)")
        train_model = torch.compile(model, dynamic=True)  # batch lengths vary
    if rt.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_model = DDP(train_model, device_ids=[rt.ddp_local_rank] if rt.device_type == "cuda" else None)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == "float16")  # fp16 only: loss scaling
    wandb_run = init_wandb(wandb_project, wandb_run_name, config, wandb_mode, out_dir) if wandb_log and master else None
    shown = raw["val"][1][:num_samples] if task == "instruct" else []  # held-out instructions to answer

    def get_lr(it):
        if it < warmup_iters:  # linear warmup
            return learning_rate * (it + 1) / (warmup_iters + 1)
        if not decay_lr:
            return learning_rate
        ratio = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)  # cosine decay

    # ------------------------------------------------------------------------------------------
    # training loop
    log_path, history = os.path.join(out_dir, "log.jsonl"), {}
    os.makedirs(out_dir, exist_ok=True)
    start_iter, t_start, t0 = iter_num, time.time(), time.time()
    real_tokens = all_tokens = count = window = 0  # since the last log line
    loss_sum = correct = 0.0
    while True:
        last_iter = iter_num >= max_iters
        t_pause = time.time()  # evals and samples are not training time
        if master and (iter_num % eval_interval == 0 or last_iter) and (iter_num > start_iter or start_iter == 0):
            rec = {"iter": iter_num}
            for name, (examples, batches) in eval_sets.items():
                rec[f"{name}_loss"], rec[f"{name}_acc"] = evaluate(model, examples, batches, pad_id, rt)
            print0(f"eval {iter_num}: " + ", ".join(f"{k} {v:.4f}" for k, v in rec.items() if k != "iter"))
            if not math.isfinite(rec["val_loss"]):  # never overwrite a good checkpoint with broken weights
                raise RuntimeError(f"val loss is {rec['val_loss']} at iteration {iter_num}; the last good checkpoint "
                                   f"is in {out_dir!r}: resume from it with a lower --learning_rate")
            for k, v in rec.items():
                history.setdefault(k, ([], []))[0].append(iter_num)
                history[k][1].append(v)
            for kind in ("loss", "acc"):
                curves = {k: v for k, v in history.items() if k.endswith(kind)}
                plot_curves(os.path.join(out_dir, f"{kind}.png"), curves, f"finetune.py task={task}, {dataset}",
                            ylabel=kind)
            append_jsonl(log_path, rec)
            if wandb_run is not None:
                wandb_run.log(rec, step=iter_num)
            if iter_num > start_iter and (rec["val_loss"] < best_val_loss or always_save_checkpoint):
                best_val_loss = min(best_val_loss, rec["val_loss"])
                # train.py's keys (sample.py reads them), plus what this task adds
                ckpt = {"model": gpt.state_dict(), "model_args": asdict(gpt.config), "config": config,
                        "optimizer": optimizer.state_dict(), "iter_num": iter_num, "best_val_loss": best_val_loss,
                        "tokenizer": tok.meta(), "task": task, "rng": rng_state()}
                if model.head is not None:
                    ckpt.update(head=model.head.state_dict(), labels=names)
                save_checkpoint(ckpt, os.path.join(out_dir, ckpt_name))
                print0(f"saved checkpoint to {os.path.join(out_dir, ckpt_name)}")
        if master and shown and sample_interval and (iter_num % sample_interval == 0 or last_iter):
            gpt.eval()
            for i, instruction, inp, reference in shown:
                with rt.autocast():
                    reply = answer(gpt, tok, instruction, inp, max_new_tokens)
                print0(f"sample {iter_num}: {instruction!r}" + (f" + {inp!r}" if inp else "") +
                       f"\n  -> {reply!r}\n  reference: {reference!r}")
                append_jsonl(log_path, {"iter": iter_num, "instruction": instruction, "input": inp, "response": reply})
            gpt.train()
        t0 += time.time() - t_pause
        if last_iter:
            break

        # one optimizer step: gradient_accumulation_steps micro-batches on each rank
        lr = get_lr(iter_num)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(gradient_accumulation_steps):
            g = (iter_num * gradient_accumulation_steps + micro) * world + rt.ddp_rank  # global micro-batch number
            idx = train_batches(g // nb)[g % nb]
            x, y = (t.to(rt.device) for t in make_batch(train_examples, idx, pad_id))
            if rt.ddp:  # sync gradients on the last micro-step only
                train_model.require_backward_grad_sync = micro == gradient_accumulation_steps - 1
            with rt.autocast():
                logits, loss = train_model(x, y)
            scaler.scale(loss / gradient_accumulation_steps).backward()
            n = len(logits)
            loss_sum, count = loss_sum + loss.detach() * n, count + n
            correct += (logits.detach().argmax(-1) == y[y != -1]).sum()
            real_tokens, all_tokens = real_tokens + sum(train_lengths[i] for i in idx), all_tokens + x.numel()
        norm = 0.0
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num, window = iter_num + 1, window + 1

        if iter_num % log_interval == 0 and master:
            dt = time.time() - t0
            lossf, acc = float(loss_sum) / count, float(correct) / count
            if not math.isfinite(lossf):
                raise RuntimeError(f"loss is {lossf} at iteration {iter_num}; the last good checkpoint is in "
                                   f"{out_dir!r}: resume from it with a lower --learning_rate")
            tok_s = real_tokens * world / dt
            print0(f"iter {iter_num}: loss {lossf:.4f}, acc {acc:.3f}, lr {lr:.2e}, norm {norm:.2f}, "
                   f"{dt * 1000 / window:.1f}ms/iter, {tok_s:,.0f} tok/s, "
                   f"padding {1 - real_tokens / all_tokens:.1%}")
            rec = {"loss": lossf, "acc": acc, "lr": lr, "norm": norm, "tok_per_s": tok_s}
            append_jsonl(log_path, {"iter": iter_num, **rec})
            if wandb_run is not None:
                wandb_run.log(rec, step=iter_num)
            t0, real_tokens, all_tokens, count, window, loss_sum, correct = time.time(), 0, 0, 0, 0, 0.0, 0.0

    # ------------------------------------------------------------------------------------------
    # summary
    if master and task == "classify" and final_eval:  # every record of val and test, not a sample
        for name in ("val", "test"):
            if name in data:
                examples, lengths = data[name]
                loss, acc = evaluate(model, examples, plan_batches(lengths, batch_size, seed, 0), pad_id, rt,
                                     desc=f"final {name}")
                print0(f"final {name}: accuracy {acc:.4f} on {len(examples):,} records, loss {loss:.4f}")
                append_jsonl(log_path, {"iter": iter_num, f"final_{name}_acc": acc, f"final_{name}_loss": loss})
    if master:
        mem = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if rt.device_type == "cuda" else ""
        print0(f"done: {iter_num} iterations in {time.time() - t_start:.1f}s, best val loss {best_val_loss:.4f}{mem}; "
               f"metrics in {log_path}")
    if wandb_run is not None:
        wandb_run.finish()
    if rt.ddp:
        torch.distributed.destroy_process_group()
