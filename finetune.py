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
Ctrl-C or SIGTERM finishes the step and saves; the folder is all that continuing needs:
    python finetune.py --init_from=resume --out_dir=out-sft
Your own data, in .jsonl, .json, .csv, .tsv (any of them .gz/.bz2/.xz) or from the Hub, each bad record named:
    python finetune.py --dataset=sft.jsonl --prompt_template=none   # {"prompt": ..., "response": ...}, formatted
    python finetune.py --task=classify --dataset=train.tsv --val_split=dev.tsv --text_field=sentence
    python finetune.py --task=classify --dataset=nyu-mll/glue --name=sst2 --val_split=validation
Your own pre-trained model: --init_from=out-shakespeare (any checkpoint file or folder that holds a model).
LoRA instead of every weight (lib/lora.py; the checkpoint holds the merged weights, read by every script):
    python finetune.py config/finetune_alpaca.py --lora_rank=16 --lora_alpha=32 --learning_rate=2e-4

The default prompt template is Alpaca's (below): "### Instruction:" (and "### Input:") then "### Response:",
the response ended by <|endoftext|>. The loss is the mean over the response tokens of each optimizer step;
prompts and padding are masked (-1). With replay_batch_size > 0, windows of pre-training text (replay_dir) join every
micro-batch and their mean loss is added (x replay_weight), so the model keeps its language model while it learns
the task (config/journey_sft.py). Records are right-padded: with causal attention, padding after a token
never changes that token's output.
"""

import functools
import math
import os
import sys
import time

import numpy as np
import torch
from torch.nn import functional as F

from configurator import configure
from lib import checkpoint, lifecycle, logs, optim, tokens
from lib.errors import install
from lib.finetuning import (TEMPLATES, Finetuned, answer, class_metrics, class_report, freeze, pad_right,
                            padded_fraction, plan_batches, plot_confusion, template_marker)
from lib.lora import Merged, add_lora, check_settings, load_adapters, load_base, lora_entry, weights_hash
from lib.models import load_model
from lib.progress import progress
from lib.runtime import print0, setup_runtime
from lib.sft_data import encode_records, read_split
from lib.tokenizer import get_tokenizer, tokenizer_for
from model import GPT, GPTConfig

# ----------------------------------------------------------------------------------------------
# data: records from local files or the Hub, checked, tokenized, batched











def make_batch(examples: list, idx, pad_id: int):
    """The records idx as x (B, T) and labels y (B, T), right-padded, -1 where there is nothing to predict:
    instruct, the next token at response positions; classify, the class at each text's last real token (the
    only position whose causal view covers the whole text)."""
    rows = [examples[i] for i in idx]
    return pad_right([x for x, _ in rows], [y if isinstance(y, list) else [-1] * (len(x) - 1) + [y] for x, y in rows],
                     pad_id)

# ----------------------------------------------------------------------------------------------
# model: the GPT with outputs only where there are labels






@torch.no_grad()
def evaluate(model, examples: list, batches: list, pad_id: int, rt, num_classes: int = 0, desc: str = "") -> tuple:
    """(mean loss, accuracy, confusion matrix or None) per label over the batches: per response token
    (instruct) or per record (classify: confusion[true class, predicted class] counts). Rank r takes batches
    r, r + W, ...; the sums are all-reduced, so every rank returns the same numbers."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)  # (summed loss, correct, labels)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=rt.device)
    mine = batches[rt.ddp_rank::rt.ddp_world_size]
    # as many forwards on every rank (FSDP gathers weights in each): the ranks short of one repeat a batch, uncounted
    mine = mine + [batches[0]] * (-(-len(batches) // rt.ddp_world_size) - len(mine))
    for k, idx in enumerate(progress(mine, desc=desc, disable=not desc or len(mine) < 100)):
        x, y = (t.to(rt.device) for t in make_batch(examples, idx, pad_id))
        with rt.autocast():
            logits, loss = model(x, y, reduction="sum")
        if k * rt.ddp_world_size + rt.ddp_rank >= len(batches):
            continue  # the repeated batch
        target, pred = y[y != -1], logits.argmax(-1)
        sums += torch.stack([loss.double(), (pred == target).sum().double(), sums.new_tensor(len(target))])
        if num_classes:
            confusion.index_put_((target, pred), torch.ones_like(target), accumulate=True)
    if rt.ddp:
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(confusion)
    model.train()
    loss, acc = (sums[:2] / sums[2]).tolist()
    return loss, acc, confusion.cpu() if num_classes else None







# ----------------------------------------------------------------------------------------------
# defaults: each can be set by a config file or --key=value
# task and I/O
task = 'instruct'  # 'instruct' (loss on responses) or 'classify' (linear head on the last token)
out_dir = 'out-finetune'
init_from = 'gpt2'  # 'scratch', 'resume' (continue the run in out_dir), 'gpt2'..'gpt2-xl', or any checkpoint
ckpt_name = 'ckpt.pt'
overwrite = False  # True: a new run may replace the checkpoints in out_dir (else it stops, naming them)
always_save_checkpoint = True  # False: ckpt_name holds the best val loss only (a stop saves ckpt_last.pt)
predict = ''  # text: load init_from, print its response (instruct) or label + probabilities (classify), exit
# data
dataset = 'tatsu-lab/alpaca'  # a Hub dataset, or local .jsonl/.json/.csv/.tsv file(s), folder or glob
name = ''  # the Hub dataset's configuration, e.g. 'sst2' for dataset='nyu-mll/glue'
train_split = 'train'
val_split = ''  # split name or local file; '' = hold out val_fraction of the training records
val_fraction = 0.05  # share of the training records held out for validation (seeded)
test_split = ''  # classify: split name or local file also scored at each eval ('test' for IMDB); '' = none
max_records = 0  # 0 = all; N = at most N (random, seeded) records per split, for quick runs
skip_bad_records = False  # True: skip (and count) bad records instead of stopping at them
header = None  # CSV/TSV: None = guess whether the first row names the columns, True or False to say so
encoding = 'utf-8'  # of local files (a UTF-8 or UTF-16 byte-order mark is honoured); e.g. 'latin-1'
cache_dir = ''  # folder for datasets' cache; '' = its default (~/.cache/huggingface/datasets)
instruction_field = 'instruction'  # records without it may hold 'prompt' (used then); CSV/TSV: a name or index
input_field = 'input'  # optional, may be missing or empty
output_field = 'output'  # else 'response' or 'completion'
prompt_template = 'alpaca'  # 'alpaca' (with input: its Input section), or 'none': the prompt as it is
text_field = 'text'  # else 'sentence'
label_field = 'label'  # integer class ids or class-name strings
label_names = []  # class names in id order; [] = the dataset's ClassLabel names, the sorted strings, or '0'..
truncate = 'left'  # over block_size: 'left' cuts the start (instruct: prompt tokens only), 'right' the end, 'drop'
batching = 'sorted'  # 'sorted': batches of records of similar length (little padding); 'random'
# replay (instruct): pre-training text in every step, so the model keeps the language it was trained on
replay_dir = ''  # a folder of prepared token files (its train split), e.g. 'data/shakespeare'; '' = none
replay_batch_size = 0  # windows of block_size tokens from it per micro-batch (per GPU); 0 = no replay
replay_weight = 1.0  # the loss = the responses' mean + replay_weight x the replayed tokens' mean
# model (init_from='scratch' only: checkpoints bring their own shape)
n_layer = 12
n_head = 12
n_embd = 768
bias = True
dropout = 0.0  # for every init_from; 0.1 is a common choice when fine-tuning on little data
block_size = 1024  # tokens per record at most; a model with a longer window is cropped to this
n_trainable_layers = -1  # -1 = train all; k >= 0: freeze all but the last k blocks (+ final LayerNorm, head)
# LoRA (lib/lora.py): freeze the model, train a rank-r update of the Linear layers named; saved merged
lora_rank = 0  # 0 = off (full fine-tuning); r > 0: adapters of rank r (4..16 are usual)
lora_alpha = 16.0  # the update is scaled by lora_alpha / lora_rank (Hu et al. 2021, section 4.1)
lora_dropout = 0.0  # dropout on the adapters' input
lora_targets = 'c_attn,c_proj,c_fc'  # which of each block's Linear layers: c_attn, c_proj (attn and mlp), c_fc
lora_norms = False  # True: the LayerNorms train too (whole; the frozen LM head's logit scale is ln_f's gain)
# optimization: AdamW, linear warmup then cosine decay to min_lr at max_iters
batch_size = 8  # records per micro-batch (per GPU)
gradient_accumulation_steps = 1  # micro-batches per optimizer step (per GPU)
epochs = 3.0  # passes over the training records
max_iters = 0  # optimizer steps; 0 = derived from epochs
learning_rate = 5e-5
min_lr = 0.0
warmup_iters = 100
decay_lr = True  # False: constant learning_rate after the warmup
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0  # 0 = off
# evaluation and logging
eval_interval = 200
eval_iters = 20  # batches per split at each eval
final_eval = True  # classify: accuracy, per-class F1 and confusion.png on the full val and test splits
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
fsdp = False  # under torchrun: shard parameters, gradients and AdamW states over the ranks (FSDP2) instead of DDP's copies
fsdp_cpu_offload = False  # with fsdp: keep them in CPU memory (a model too big for the GPUs' memory, slower)
seed = 1337

# ----------------------------------------------------------------------------------------------
if __name__ == "__main__":  # tests import the helpers above; the run is below
    install()  # a user's error is one line 'error: ...', Ctrl-C is 'interrupted' (lib/errors.py)
    explicit = set()  # the keys set by config files or --key=value
    config = configure(globals(), sys.argv[1:], explicit=explicit)
    ckpt = None
    if config["init_from"] == "resume" and not config["predict"]:  # the saved config is the base
        config, ckpt = lifecycle.resume_run(config, explicit, ("sft", "classify"), "finetune.py",
                                  ("epochs", "sample_interval", "num_samples", "max_new_tokens", "final_eval", "fsdp",
                                   "fsdp_cpu_offload"))
    globals().update(config)
    for key, valid in (("task", ("instruct", "classify")), ("truncate", ("left", "right", "drop")),
                       ("batching", ("sorted", "random")), ("prompt_template", TEMPLATES)):
        if config[key] not in valid:
            raise ValueError(f"{key} must be one of {valid}, got {config[key]!r}; e.g. --{key}={valid[0]}")
    for key in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval",
                "block_size"):
        if config[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {config[key]!r}")
    if not (0 < val_fraction < 1 or val_split):
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r} (or name a split: --val_split=...)")
    for key, ok, accepted in [(k, config[k] >= 0, "0 or more") for k in ("max_records", "learning_rate", "min_lr",
                              "warmup_iters", "max_iters", "weight_decay", "grad_clip", "replay_batch_size",
                              "replay_weight")] + \
            [("epochs", epochs > 0, "more than 0"), ("dropout", 0 <= dropout < 1, "in [0, 1)")]:
        if not ok:
            raise ValueError(f"{key} must be {accepted}, got {config[key]!r}")
    own = [s for s in (val_split, test_split) if s and os.path.exists(s) and os.path.exists(dataset)
           and os.path.samefile(s, dataset)]
    if own:  # align.py refuses the same mistake: held-out records that are trained on measure nothing
        raise ValueError(f"--val_split/--test_split={own[0]!r} is the training file itself (--dataset={dataset!r}); "
                         f"name a held-out file, or leave --val_split='' to hold out val_fraction of the records")
    if replay_batch_size and (task != "instruct" or not replay_dir):
        raise ValueError(f"replay (replay_batch_size={replay_batch_size}) mixes pre-training text into instruction "
                         f"tuning: it needs task='instruct' and a folder of token files, got task={task!r}, "
                         f"replay_dir={replay_dir!r}; e.g. --replay_dir=data/shakespeare (python "
                         f"data/shakespeare/prepare.py writes it)")
    check_settings(lora_rank, lora_alpha, lora_dropout, lora_targets, fsdp)
    if lora_rank and (init_from == "scratch" or n_trainable_layers != -1):
        raise ValueError(f"LoRA (lora_rank={lora_rank}) adapts a pre-trained model and trains nothing else: it takes "
                         f"neither init_from='scratch' nor n_trainable_layers (got init_from={init_from!r}, "
                         f"n_trainable_layers={n_trainable_layers}); e.g. --init_from=gpt2 --n_trainable_layers=-1")
    if not predict:
        lifecycle.check_out_dir(out_dir, init_from, overwrite, "finetune.py")
    rt = setup_runtime(device, dtype, training=True)
    master, world = rt.master_process, rt.ddp_world_size
    torch.manual_seed(seed + rt.ddp_rank)  # the head's init, and dropout (different on each rank)

    # ------------------------------------------------------------------------------------------
    # --predict: run a fine-tuned model on one text, then exit
    if predict:
        gpt, ckpt, tok = load_model(init_from, out_dir, rt.device, ckpt_name=ckpt_name)
        if task == "classify" or (ckpt or {}).get("kind") == "classify":
            if "head" not in (ckpt or {}):
                raise ValueError(f"init_from={init_from!r} has no classification head: train one first (python "
                                 f"finetune.py config/finetune_imdb.py), then pass its out_dir with --init_from=resume")
            model = Finetuned(gpt, len(ckpt["labels"])).to(rt.device).eval()
            model.head.load_state_dict(ckpt["head"])
            examples, _ = encode_records(tok, [("--predict", predict, 0)], gpt.config.block_size,
                                         ckpt["config"].get("truncate", "left"), "--predict")
            with torch.no_grad(), rt.autocast():
                logits, _ = model(*(t.to(rt.device) for t in make_batch(examples, [0], 0)))
            probs = F.softmax(logits.float(), dim=-1)[0].tolist()
            k = int(np.argmax(probs))
            print0(f"label: {ckpt['labels'][k]} ({probs[k]:.4f})")
            print0("probabilities: " + ", ".join(f"{n}={p:.4f}" for n, p in zip(ckpt["labels"], probs)))
        else:
            template = ((ckpt or {}).get("config") or {}).get("prompt_template", prompt_template)
            with rt.autocast():
                print0(answer(gpt.eval(), tok, predict, "", max_new_tokens, template))
        sys.exit(0)

    # ------------------------------------------------------------------------------------------
    # data: read and check every record before building the model
    rng = np.random.default_rng(seed)
    raw, names = {}, None  # split -> (source, [(where, fields...)]); class names
    fields = dict(instruction_field=instruction_field, input_field=input_field, output_field=output_field) \
        if task == "instruct" else dict(text_field=text_field, label_field=label_field)
    splits = (("train", train_split), ("val", val_split), ("test", test_split if task == "classify" else ""))
    for split, which in splits:
        if which:
            source, rows, names = read_split(dataset, which, fields, names, label_names, name=name, header=header,
                                             encoding=encoding, skip_bad=skip_bad_records, cache_dir=cache_dir)
            order = rng.permutation(len(rows))[:max_records or None]  # seeded: a random subset, in random order
            raw[split] = (source, [rows[i] for i in order])
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
    if task == "instruct" and prompt_template != "none":  # a template around a finished prompt: wrapped twice
        marked = [(w, template_marker(p)) for _, recs in raw.values() for w, p, *_ in recs if template_marker(p)]
        if marked:
            print0(f"WARNING: {len(marked):,} prompts look formatted already ({marked[0][0]} contains "
                   f"{marked[0][1]!r}), and prompt_template={prompt_template!r} wraps each in its template again. "
                   f"If the records hold finished prompts: --prompt_template=none")

    # ------------------------------------------------------------------------------------------
    # model, tokenizer, tokens
    if init_from == "scratch":
        tok = get_tokenizer("gpt2")
        gpt = GPT(GPTConfig(block_size=block_size, vocab_size=50304, n_layer=n_layer, n_head=n_head,
                            n_embd=n_embd, dropout=dropout, bias=bias))  # 50257 ids padded to a multiple of 64
    elif ckpt is not None:  # resume: the checkpoint that resume_run read
        # a LoRA run's merged weights are not its unmerged ones: its base is re-read (and checked by its hash)
        gpt = load_base(ckpt["lora"], dropout, block_size) if lora_rank else checkpoint.float_model(ckpt, dropout)
        tok = tokenizer_for(ckpt)
    else:
        gpt, start, tok = checkpoint.load_float_model(init_from, out_dir, "cpu", dropout, ckpt_name)
    if block_size < gpt.config.block_size:
        gpt.crop_block_size(block_size)
    if lora_rank:  # where the frozen base comes from, and which it is: what an exact resume re-reads
        base, base_hash = ((ckpt["lora"]["base"], ckpt["lora"]["base_sha256"]) if ckpt is not None else
                           (os.path.abspath(start["path"]), weights_hash(gpt)))
    T = gpt.config.block_size
    if block_size > T:
        print0(f"note: block_size {block_size} exceeds the model's window; using {T}")
    pad_id = tok.eot_token if tok.eot_token is not None else 0  # any id: padding is never a label

    data = {}  # split -> (examples, lengths)
    for split, (source, rows) in raw.items():
        examples, n = encode_records(tok, rows, T, truncate, source, prompt_template)
        data[split] = (examples, [len(e[0]) for e in examples])
        lengths = data[split][1]
        print0(f"{split}: {len(examples):,} records from {source}, {sum(lengths):,} tokens (mean "
               f"{np.mean(lengths):.0f}, max {max(lengths)}), {n['truncated']:,} of them truncated to {T} tokens")
        if n["dropped"]:
            print0(f"WARNING: {split}: skipped {n['dropped']:,} records too long for {T} tokens (truncate={truncate!r};"
                   f" --truncate=left keeps what fits)")
    train_examples, train_lengths = data["train"]
    replay = None  # windows of pre-training text: batch g of the loader is a pure function of (seed, g), so a resume
    if replay_batch_size:  # needs only the step count
        replay = tokens.BinLoader(replay_dir, "train", replay_batch_size, T, rt.ddp_rank, world, seed,
                                  vocab_size=gpt.config.vocab_size)
        print0(f"replay: {replay_batch_size} x {T} tokens of {replay_dir} per micro-batch, weight {replay_weight:g}")
    n_labels = np.array([1 if isinstance(y, int) else len(y) - y.count(-1) for _, y in train_examples])
    plan = functools.lru_cache(maxsize=2)(lambda epoch: plan_batches(train_lengths, batch_size, seed, epoch, batching))
    nb = len(plan(0))
    batch_of = lambda g: plan(g // nb)[g % nb]  # micro-batch g of the run (all ranks, in order)
    print0(f"batches: {nb:,} per epoch of up to {batch_size} records, {batching}; padding is "
           f"{padded_fraction(train_lengths, plan(0)):.1%} of the tokens (in random order: "
           f"{padded_fraction(train_lengths, plan_batches(train_lengths, batch_size, seed, 0, 'random')):.1%})")
    # a fixed random sample of each split for the evals during training
    eval_sets = {k: (ex, plan_batches(ln, batch_size, seed + 1, 0)[:eval_iters]) for k, (ex, ln) in data.items()}
    steps_per_epoch = nb / (gradient_accumulation_steps * world)
    max_iters = max_iters or max(1, math.ceil(epochs * steps_per_epoch))  # not saved: a resumed run derives it again
    print0(f"{max_iters:,} iterations = {max_iters / steps_per_epoch:.2f} epochs; {batch_size} x "
           f"{gradient_accumulation_steps} x {world} records per iteration (batch x accumulation x GPUs)")
    decay_iters = max(max_iters, warmup_iters + 1)  # the cosine ends with the run (a warmup as long: no decay)
    optim.check_schedule(learning_rate, warmup_iters, decay_iters, max_iters, min_lr, decay_lr)

    # ------------------------------------------------------------------------------------------
    # what trains, the optimizer, resume
    model = Finetuned(gpt, len(names) if task == "classify" else 0)
    if ckpt is not None:
        if ckpt.get("labels") != (names if task == "classify" else None):
            raise ValueError(f"{ckpt['path']!r} was trained on the classes {ckpt.get('labels')}, but the data now "
                             f"holds {names}; resume with the data it was trained on, or start a new run from it: "
                             f"--init_from={out_dir!r} --out_dir=NEW_DIR")
        if model.head is not None:
            model.head.load_state_dict(ckpt["head"])
    if lora_rank:
        n_wrapped = add_lora(gpt, lora_rank, lora_alpha, lora_dropout, lora_targets, lora_norms)  # freezes the rest
        if ckpt is not None:
            load_adapters(gpt, ckpt["lora"]["adapters"])
    else:
        freeze(gpt, n_trainable_layers)
    model.to(rt.device)
    train_model = lifecycle.wrap(model, rt, compile, dynamic=True, shard=fsdp, cpu_offload=fsdp_cpu_offload)
    optimizer = optim.make_optimizer(gpt, weight_decay, learning_rate, (beta1, beta2), rt.device_type)
    if model.head is not None:
        optimizer.add_param_group({"params": [model.head.weight], "weight_decay": weight_decay})
        optimizer.add_param_group({"params": [model.head.bias], "weight_decay": 0.0})
        print0(f"classes: {names}")
    params = [p for g in optimizer.param_groups for p in g["params"]]  # the trainable ones
    n_all, n_train = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in params)
    frozen = f" (the last {n_trainable_layers} blocks, ln_f{', head' * (task == 'classify')})"
    if lora_rank:
        frozen = (f" (LoRA: rank {lora_rank}, alpha {lora_alpha:g} on {n_wrapped} Linear layers "
                  f"({lora_targets}){', head' * (task == 'classify')})")
    print0(f"parameters: {n_all / 1e6:.2f}M, trainable {n_train / 1e6:.2f}M" + frozen * (n_trainable_layers >= 0
                                                                                        or lora_rank > 0))
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == "float16")  # fp16 only: loss scaling
    iter_num, best_val_loss = 0, float("inf")
    if ckpt is not None:
        iter_num, best_val_loss = lifecycle.restore(ckpt["resume"], optimizer, scaler, rt, model)
    ckpt = None  # free the loaded weights
    shown = raw["val"][1][:num_samples] if task == "instruct" and not fsdp else []  # held-out instructions to answer
    if fsdp and task == "instruct" and sample_interval:
        print0("note: no sample answers under FSDP (generation runs on rank 0 alone); the evaluations go on")

    # ------------------------------------------------------------------------------------------
    # what the loop calls: checkpoints, evaluation, logs
    log_path = os.path.join(out_dir, "log.jsonl")
    if master:
        lifecycle.lock_out_dir(out_dir)  # one run per out_dir: a second one stops here, naming the first
        lifecycle.start_log(out_dir, iter_num if init_from == "resume" else None)  # a resume logs the rest again
    wandb_run = None
    if wandb_log and master:
        wandb_run = logs.init_wandb(wandb_project, wandb_run_name, config, wandb_mode, out_dir)

    def log(rec: dict):
        logs.record(log_path, rec, wandb_run)

    def save(name: str):
        """out_dir/name with everything an exact resume needs (a collective under DDP: the RNG of every rank)."""
        extra = dict(head=model.head, labels=names) if model.head is not None else {}  # a module: gathered
        if lora_rank:  # the merged weights for every script; the adapters and the base's hash for a resume
            extra["lora"] = lora_entry(gpt, base, base_hash, lora_rank, lora_alpha, lora_dropout, lora_targets,
                                       lora_norms)
        lifecycle.save_run(os.path.join(out_dir, name), "classify" if task == "classify" else "sft",
                 Merged(gpt) if lora_rank else gpt, config, tok.meta(), rt,
                 iter_num, ("val_loss", best_val_loss), optimizer, scaler, root=model, **extra)

    def run_eval():
        rec = {"type": "eval", "iter": iter_num}
        for split, (examples, batches) in eval_sets.items():
            rec[f"{split}_loss"], rec[f"{split}_acc"], _ = evaluate(model, examples, batches, pad_id, rt)
        if not math.isfinite(rec["val_loss"]):
            lifecycle.stop_non_finite("val loss", rec["val_loss"], iter_num, rt, out_dir)
        print0(f"eval {iter_num}: " + ", ".join(f"{k} {v:.4f}" for k, v in rec.items() if k not in ("type", "iter")))
        if master:
            log(rec)
            recs = logs.read_jsonl(log_path)
            for kind in ("loss", "acc"):
                curves = {k: ([r["iter"] for r in recs if k in r], [r[k] for r in recs if k in r])
                          for k in [kind] + [f"{s}_{kind}" for s in eval_sets]}
                logs.plot_curves(os.path.join(out_dir, f"{kind}.png"), curves, f"finetune.py task={task}, {dataset}",
                            ylabel=kind)
        return rec["val_loss"]

    # ------------------------------------------------------------------------------------------
    # training loop
    stop = lifecycle.catch_signals()
    G, start_iter, t_start = gradient_accumulation_steps, iter_num, time.time()
    if iter_num == 0:
        run_eval()  # the starting model's loss, a baseline
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)  # since the last log line: summed loss, correct,
    counts = np.zeros(4)  # replayed tokens' summed loss; on the host: labels, real tokens, all tokens, replayed labels
    t_log, window, saved_at = time.time(), 0, iter_num
    while iter_num < max_iters:
        lr = optim.lr_at(iter_num, learning_rate, warmup_iters, decay_iters, min_lr, decay_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        # one optimizer step: G micro-batches on each of the world ranks; micro-batch m of rank r is batch
        # (iter_num * G + m) * world + r of the run. The loss is the mean over every label of the whole step, so
        # each micro-batch's summed loss is divided by the step's label count, known from the plan without any
        # communication; the factor world undoes DDP's averaging of the gradients over the ranks.
        step = [batch_of((iter_num * G + m) * world + r) for m in range(G) for r in range(world)]
        total = float(sum(n_labels[idx].sum() for idx in step))
        replayed = replay_batch_size * T * G * world  # the replayed labels of the step: every position of a window
        for micro in range(G):
            idx = step[micro * world + rt.ddp_rank]
            x, y = make_batch(train_examples, idx, pad_id)
            if replay is not None:  # the replayed windows as more rows, the records padded to their length T
                replay.step = iter_num * G + micro  # this rank's batch (iter_num * G + micro) * world + rank
                xr, yr = replay.next_batch()
                x = torch.cat([F.pad(x, (0, T - x.size(1)), value=pad_id), xr.cpu()])  # (B + R, T)
                y = torch.cat([F.pad(y, (0, T - y.size(1)), value=-1), yr.cpu()])  # (B + R, T)
            x, y = x.to(rt.device), y.to(rt.device)
            k = int(n_labels[idx].sum())  # labels of the records: the first k of the row-major labelled positions
            lifecycle.sync_gradients(train_model, micro == G - 1)  # averaged over the ranks at the last only
            with rt.autocast():
                logits, nll = train_model(x, y, reduction="none")  # (K,) per label, float32
            loss, replay_loss = nll[:k].sum(dtype=torch.float64), nll[k:].sum(dtype=torch.float64)
            replay_term = replay_weight * replay_loss * (world / max(replayed, 1))  # 0 without replay
            scaler.scale(loss * (world / total) + replay_term).backward()
            sums += torch.stack([loss.detach(), (logits[:k].detach().argmax(-1) == y[y != -1][:k]).sum().double(),
                                 replay_loss.detach()])
            counts += [k, sum(train_lengths[i] for i in idx) + nll.numel() - k, x.numel(), nll.numel() - k]
        scaler.unscale_(optimizer)  # clip and log the true gradient norm (a no-op unless fp16)
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num, window = iter_num + 1, window + 1
        stopping = stop.agreed(rt)
        eval_due = iter_num % eval_interval == 0 or iter_num == max_iters
        if iter_num % log_interval == 0 or eval_due or stopping:  # and before any save: is the loss finite?
            totals = torch.cat([sums, torch.tensor(counts, device=rt.device)])
            if rt.ddp:
                torch.distributed.all_reduce(totals)
            loss_sum, correct, replay_sum, count, real, padded, replay_count = totals.tolist()
            if not math.isfinite(loss_sum + replay_sum):
                lifecycle.stop_non_finite("training loss", (loss_sum + replay_sum) / count, iter_num, rt, out_dir)
            dt = time.time() - t_log
            rec = {"type": "train", "iter": iter_num, "loss": loss_sum / count, "acc": correct / count, "lr": lr,
                   "grad_norm": lifecycle.grad_norm(norm), "tok_per_s": real / dt}
            if replay is not None:
                rec["replay_loss"] = replay_sum / replay_count
            print0(f"iter {iter_num}: loss {rec['loss']:.4f}, acc {rec['acc']:.3f}, lr {lr:.2e}, norm "
                   f"{rec['grad_norm']:.2f}, {dt * 1000 / window:.1f}ms/iter, {rec['tok_per_s']:,.0f} tok/s, padding "
                   f"{1 - real / padded:.1%}" + (f", replay loss {rec['replay_loss']:.4f}" if replay else ""))
            if master:
                log(rec)
            sums.zero_()
            counts[:] = 0
            t_log, window = time.time(), 0
        if eval_due:
            val_loss = run_eval()
            improved, best_val_loss = val_loss < best_val_loss, min(best_val_loss, val_loss)
            if improved or always_save_checkpoint:
                save(ckpt_name)
                saved_at = iter_num
        if master and shown and sample_interval and (iter_num % sample_interval == 0 or iter_num == max_iters):
            gpt.eval()
            for where, instruction, inp, reference in shown:
                with rt.autocast():
                    reply = answer(gpt, tok, instruction, inp, max_new_tokens, prompt_template)
                print0(f"sample {iter_num}: {instruction!r}" + (f" + {inp!r}" if inp else "") +
                       f"\n  -> {reply!r}\n  reference: {reference!r}")
                log({"type": "sample", "iter": iter_num, "instruction": instruction, "input": inp,
                        "response": reply})
            gpt.train()
        if stopping:
            if saved_at != iter_num:  # a run that keeps its best checkpoint keeps it: the stop goes to ckpt_last.pt
                save(ckpt_name if always_save_checkpoint else checkpoint.last_name(ckpt_name))
            lifecycle.stop_exit(stopping, rt, sys.argv, out_dir)
        if eval_due:
            t_log = time.time()  # log lines time the training steps, not evaluations, samples and saves

    # ------------------------------------------------------------------------------------------
    # summary: classification scored on every record of val and test, not a sample
    confusions = {}
    for split in ("val", "test") if task == "classify" and final_eval else ():
        if split in data:
            examples, lengths = data[split]
            loss, acc, confusions[split] = evaluate(model, examples, plan_batches(lengths, batch_size, seed, 0),
                                                    pad_id, rt, len(names), desc=f"final {split}")
            print0(f"final {split}: accuracy {acc:.4f} on {len(examples):,} records, loss {loss:.4f}\n"
                   + class_report(confusions[split], names))
            if master:
                m = class_metrics(confusions[split])
                log({"type": "final", "iter": iter_num, f"final_{split}_acc": acc, f"final_{split}_loss": loss,
                        f"final_{split}_f1": m["f1"], f"final_{split}_confusion": confusions[split].tolist()})
    if master and confusions:
        plot_confusion(os.path.join(out_dir, "confusion.png"), confusions, names, os.path.basename(dataset))
        print0(f"confusion matrices in {os.path.join(out_dir, 'confusion.png')}")
    if master:
        total = time.time() - t_start
        print0(f"done: {iter_num - start_iter:,} iterations in {total:.1f} s, best val loss {best_val_loss:.4f}, peak "
               f"memory {lifecycle.peak_memory(rt)}; metrics in {log_path}")
        log({"type": "summary", "iter": iter_num, "best_val_loss": best_val_loss, "total_s": total})
    lifecycle.end_run(rt, wandb_run)
