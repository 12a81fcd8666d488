"""
Pre-train a GPT: on one CPU or many GPUs, from scratch, from a checkpoint or from OpenAI's GPT-2 weights.

A baby GPT on Shakespeare's plays, in about two minutes on a 2-core CPU (what `make demo` runs):
    python data/shakespeare_char/prepare.py
    python train.py config/train_shakespeare_char.py
    python sample.py --init_from=resume --out_dir=out-shakespeare-char

GPT-2 (124M) on FineWeb-Edu with 8 GPUs on one node (DDP):
    python data/fineweb/prepare.py
    torchrun --standalone --nproc_per_node=8 train.py config/train_fineweb.py

The same on 2 nodes of 8 GPUs: run this on both, with --node_rank=1 on the second:
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 \
        train.py config/train_fineweb.py

Continue a run exactly where it stopped (Ctrl-C or SIGTERM first saves a checkpoint); the saved config is
the base, so the folder is all it needs (--max_iters=N and other reporting keys may change between legs):
    python train.py --init_from=resume --out_dir=out-shakespeare-char
Start from any checkpoint that holds a model (fine-tuned, aligned, imported; not a quantized one):
    python train.py config/train_shakespeare.py --init_from=out-sft

Every default below can be changed by config files and --key=value, in that order.
"""

import math
import os
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

from configurator import configure
from lib import checkpoint, heads, lifecycle, logs, optim, tokens
from lib.errors import install
from lib.runtime import peak_flops as device_peak_flops  # peak_flops is a config key
from lib.runtime import print0, setup_runtime
from lib.tokenizer import load_tokenizer
from model import GPT, GPTConfig

install()  # a user's error is one line 'error: ...', Ctrl-C is 'interrupted' (lib/errors.py)

# ----------------------------------------------------------------------------------------------
# defaults: GPT-2 (124M) on FineWeb-Edu, as in config/train_fineweb.py, which says where each number comes from
# I/O
out_dir = "out"  # ckpt.pt, log.jsonl and loss.png are written here
eval_interval = 1000  # iterations between evaluations (and checkpoints)
eval_iters = 100  # batches per split in each evaluation (0: no evaluation, checkpoints only)
eval_only = False  # evaluate once and exit
log_interval = 10  # iterations between log lines (each one waits for the device to catch up)
always_save_checkpoint = True  # True: save at every evaluation; False: ckpt_name holds the best only (a stop saves ckpt_last.pt)
save_best = False  # also keep the model with the lowest val loss in out_dir/ckpt_best.pt
init_from = "scratch"  # 'scratch', 'resume' (continue the run in out_dir), 'gpt2'..'gpt2-xl', or any checkpoint file/folder
overwrite = False  # True: a new run may replace the checkpoints in out_dir (else it stops, naming them)
ckpt_name = "ckpt.pt"  # checkpoint file in out_dir
sample_interval = 0  # iterations between text samples from sample_prompt (0: off)
sample_prompt = "\n"  # a fixed prompt, so that successive samples show what the model learned
sample_tokens = 200  # tokens per sample
track_heads = False  # each evaluation logs every layer's best previous-token and induction score (+ heads.png)
# Weights & Biases
wandb_log = False  # log config, metrics and samples to Weights & Biases
wandb_project = "llm-e2e"
wandb_run_name = "gpt2-124m"
wandb_mode = "online"  # 'online', 'offline' (no network; later: wandb sync DIR) or 'disabled'
# data
dataset = "fineweb"  # data/<dataset>/ holds the token files written by data/<dataset>/prepare.py
data_dir = ""  # '' = data/<dataset> next to this script; or any folder with train/val token files
data_source = "bin"  # 'bin': the prepared token files; 'stream': tokenize stream_dataset while training
data_order = "sequential"  # 'random' windows (small corpora, many epochs) or 'sequential' (sharded corpora)
stream_dataset = "HuggingFaceFW/fineweb-edu"  # for 'stream': a Hugging Face dataset or local .jsonl/.parquet/.txt
stream_name = "sample-10BT"  # its configuration ('' = none)
stream_text_field = "text"  # the record field holding the text
shuffle_buffer = 10000  # documents in the streaming shuffle buffer
total_batch_size = 524288  # tokens per optimizer step over all ranks; 0 = batch_size * block_size * ranks
batch_size = 16  # sequences per micro-step and rank; gradient accumulation makes up total_batch_size
block_size = 1024  # context length in tokens
# model (from scratch only: 'resume' and 'gpt2*' take the shape from the checkpoint)
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0  # 0 for pre-training, 0.1+ for fine-tuning
bias = True  # biases in Linears and LayerNorms, as in GPT-2; False is a little faster
# the optimizer and the learning-rate schedule
optimizer = "adamw"  # 'adamw', or 'muon': Muon for the 2-D weights inside the blocks, AdamW for the rest
learning_rate = 6e-4  # peak learning rate (of AdamW)
max_iters = 19073  # optimizer steps in total
flops_budget = 0.0  # training FLOPs of the whole run; > 0 derives max_iters (and lr_decay_iters) from it, e.g. 1e15
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip the global gradient norm to this (0: no clipping; the norm is logged either way)
decay_lr = True  # after the warmup: cosine decay to min_lr; False: constant learning_rate (warmup_iters=0: none)
warmup_iters = 715  # iterations of linear warmup
lr_decay_iters = 19073  # where the cosine reaches min_lr (usually max_iters)
min_lr = 6e-5  # usually learning_rate / 10
muon_lr = 0.02  # Muon's peak learning rate; the schedule scales it alike (its minimum: muon_lr * min_lr / learning_rate)
muon_momentum = 0.95  # Muon's Nesterov momentum
muon_ns_steps = 5  # Newton-Schulz iterations that orthogonalize each Muon update
muon_ns_dtype = "auto"  # their precision: 'auto' (bfloat16 where it is native, else float32), 'bfloat16', 'float32'
muon_weight_decay = 0.1  # Muon's own decay, apart from AdamW's weight_decay: a step shrinks by lr x this at Muon's lr
# system
device = "auto"  # 'auto' (CUDA, then MPS, then CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'
dtype = "auto"  # 'auto' (bf16 on CUDA, fp16 + loss scaling on GPUs without bf16, fp32 elsewhere), 'float32', 'bfloat16', 'float16'
compile = True  # torch.compile the model for training steps (the first steps are slow while it compiles)
fsdp = False  # under torchrun: shard parameters, gradients and AdamW states over the ranks (FSDP2) instead of DDP's copies
fsdp_cpu_offload = False  # with fsdp: keep them in CPU memory (a model too big for the GPUs' memory, slower)
seed = 1337
peak_flops = 0.0  # FLOP/s of one device for MFU; 0: a guess (GPU: its bf16 datasheet peak; CPU: rough, set it)
_explicit = set()  # the keys that config files and --key=value set
config = configure(globals(), sys.argv[1:], explicit=_explicit); globals().update(config)
ckpt = None
if init_from == "resume":  # continue the run in out_dir: its saved config is the base, reporting keys may change
    config, ckpt = lifecycle.resume_run(config, _explicit, ("pretrain",), "train.py", (
        "lr_decay_iters", "sample_interval", "sample_prompt", "sample_tokens", "save_best", "data_dir", "peak_flops",
        "fsdp", "fsdp_cpu_offload"))
    globals().update(config)
# ----------------------------------------------------------------------------------------------
# checks that need neither data nor model: a typo fails in a second, not after loading

for key, allowed in dict(data_source=("bin", "stream"), data_order=("random", "sequential"),
                         wandb_mode=("online", "offline", "disabled"), optimizer=("adamw", "muon"),
                         muon_ns_dtype=("auto", "bfloat16", "float32")).items():
    if config[key] not in allowed:
        raise ValueError(f"{key} must be one of {allowed}, got {config[key]!r}; e.g. --{key}={allowed[0]}")
for key, ok, accepted in [(k, config[k] >= 1, "at least 1") for k in ("batch_size", "block_size", "eval_interval",
                           "log_interval", "sample_tokens", "n_layer", "n_head", "n_embd", "muon_ns_steps")] + \
        [(k, config[k] >= 0, "0 or more") for k in ("max_iters", "eval_iters", "sample_interval", "warmup_iters",
                                                    "total_batch_size", "learning_rate", "min_lr", "weight_decay",
                                                    "grad_clip", "muon_lr", "flops_budget", "muon_weight_decay")] + \
        [(k, 0 <= config[k] < 1, "in [0, 1)") for k in ("dropout", "beta1", "beta2", "muon_momentum")] + \
        [("n_embd", n_embd % max(n_head, 1) == 0, f"a multiple of n_head={n_head}")]:
    if not ok:
        raise ValueError(f"{key} must be {accepted}, got {config[key]!r}")
if fsdp and config["optimizer"] == "muon":
    raise ValueError("optimizer='muon' is not offered with fsdp=True: Newton-Schulz needs each whole matrix, which "
                     "FSDP shards over the ranks; use --optimizer=adamw with FSDP, or Muon with DDP (--fsdp=False)")
lifecycle.check_out_dir(out_dir, init_from, overwrite, "train.py")
if init_from not in ("scratch", "resume") + checkpoint.GPT2_NAMES and not os.path.exists(init_from):
    raise ValueError(f"init_from must be 'scratch', 'resume', one of {checkpoint.GPT2_NAMES} or an existing checkpoint "
                     f"file or folder, got {init_from!r}")
optim.check_schedule(learning_rate, warmup_iters, lr_decay_iters, max_iters, min_lr, decay_lr)

rt = setup_runtime(device, dtype, training=True)
master, W = rt.master_process, rt.ddp_world_size
# Gradient accumulation is derived, not configured: total = batch_size * block_size * ranks * grad_accum
tokens_per_micro = batch_size * block_size * W
total_batch_size = total_batch_size or tokens_per_micro
if total_batch_size % tokens_per_micro:
    fix = max(1, round(total_batch_size / tokens_per_micro)) * tokens_per_micro
    raise ValueError(f"total_batch_size={total_batch_size:,} tokens is not a multiple of batch_size * block_size * "
                     f"ranks = {batch_size} * {block_size} * {W} = {tokens_per_micro:,}; use e.g. "
                     f"--total_batch_size={fix} or change batch_size")
grad_accum = total_batch_size // tokens_per_micro
torch.manual_seed(seed + rt.ddp_rank)  # dropout differs per rank; DDP copies rank 0's initial weights to all

# ----------------------------------------------------------------------------------------------
# data: prepared token files (BinLoader) or a text dataset tokenized on the fly (StreamingLoader)

data_dir = data_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", dataset)
# what the token files hold, from the meta.json (and meta.pkl) their prepare script wrote; checked against the model
tok_meta, data_ids, max_id = ({"tokenizer": "gpt2"}, 50257, None) if data_source == "stream" else \
    tokens.data_tokenizer(data_dir)
data_vocab = 50304 if tok_meta["tokenizer"] == "gpt2" else data_ids  # GPT-2's 50257 ids padded to a multiple of 64


def bin_loader(split: str, seed_: int) -> tokens.BinLoader:
    return tokens.BinLoader(data_dir, split, batch_size, block_size, rt.ddp_rank, W, seed_, data_order, rt.device)


if data_source == "bin":
    train_loader = bin_loader("train", seed)
else:
    from lib.streaming import StreamingLoader
    train_loader = StreamingLoader(stream_dataset, name=stream_name or None, split="train",
                                   text_field=stream_text_field, batch_size=batch_size, block_size=block_size,
                                   rank=rt.ddp_rank, world_size=W, seed=seed, shuffle_buffer=shuffle_buffer,
                                   device=rt.device)
# Evaluation reads the same batches every time (a fixed sample of each split; seed + 1: not the first training
# batches), so successive evaluations differ only by the model. The ranks share the batches out.
eval_loaders = {}
for split in (("train", "val") if data_source == "bin" else ("val",)) if eval_iters else ():
    try:
        eval_loaders[split] = bin_loader(split, seed + 1)
    except FileNotFoundError:
        if data_source == "bin":
            raise
        print0(f"WARNING: no prepared validation split in {data_dir!r}, so no val loss; prepare one with "
               f"python data/fineweb/prepare.py --max_tokens=100_000_000, or point --data_dir at one")
eval_start = {split: loader.state_dict() for split, loader in eval_loaders.items()}
sizes = {s: f"{s} {sum(l.lengths):,}" for s, l in {"train": train_loader, **eval_loaders}.items() if hasattr(l, "lengths")}
shown = os.path.relpath(data_dir)
shown = data_dir if shown.startswith("..") else shown  # short when below the working directory
print0(f"data: {'streaming ' + stream_dataset + ', ' if data_source == 'stream' else ''}{shown} "
       f"({tok_meta['tokenizer']} tokens, vocab {data_vocab}): " + ", ".join(sizes.values()) + f" tokens, {data_order}")

# ----------------------------------------------------------------------------------------------
# model, optimizer, and the state of a resumed run

iter_num, best_val_loss = 0, float("inf")
if init_from == "scratch":
    model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                          vocab_size=data_vocab, dropout=dropout, bias=bias)).to(rt.device)
    saved_tok = tok_meta
elif init_from == "resume":  # the shape and everything else come from the checkpoint (lifecycle.resume_run above)
    model = checkpoint.float_model(ckpt, dropout).to(rt.device)
    saved_tok = ckpt["tokenizer"] or {"tokenizer": "gpt2"}
else:  # a model to start from: GPT-2's weights, or any checkpoint that holds one (a quantized one is refused)
    if init_from in checkpoint.GPT2_NAMES and tok_meta["tokenizer"] != "gpt2":
        raise ValueError(f"init_from={init_from!r} needs GPT-2 token ids, but {data_dir!r} is character-level "
                         f"(it has a meta.pkl); use a GPT-2-tokenized dataset, e.g. --dataset=shakespeare")
    # every rank loads; downloads take turns on a lock file, so the first downloads and the others read the file
    model, ckpt, tok = checkpoint.load_float_model(init_from, out_dir, rt.device, dropout, ckpt_name)
    saved_tok = tok.meta()
    if ckpt is not None:
        print0(f"starting from {ckpt['path']} ({ckpt['kind']}" + (f", iteration {ckpt['resume']['iter_num']:,}"
               if ckpt["resume"] else "") + "): its weights, a new run")
    if block_size < model.config.block_size:
        model.crop_block_size(block_size)  # e.g. GPT-2's 1024 positions cut to 256 for faster fine-tuning
# GPT-2 ids fit any table of at least 50257 rows; a character vocabulary must be the very same one
vocab = model.config.vocab_size
if saved_tok != tok_meta or (vocab < 50257 if tok_meta["tokenizer"] == "gpt2" else vocab != data_vocab):
    raise ValueError(f"init_from={init_from!r} does not fit the data: the checkpoint's vocabulary is "
                     f"{saved_tok['tokenizer']} ({vocab} ids), the data's {tok_meta['tokenizer']} ({data_vocab} ids, "
                     f"{data_dir!r}); use data prepared with the model's tokenizer")
if max_id is None and data_source == "bin":  # no meta.json to say: small files are read through now
    max_id = tokens.largest_id([f for loader in (train_loader, *eval_loaders.values()) for f in loader.files])
if max_id is not None and max_id >= vocab:
    raise ValueError(f"the token files in {data_dir!r} hold ids up to {max_id} (their meta.json, or read now), "
                     f"beyond the model's vocabulary of {vocab} ids; prepare the data with the model's tokenizer")
for loader in (train_loader, *eval_loaders.values()):
    loader.vocab_size = vocab  # and every batch is checked as it is read (files without a meta.json too)
model.train()
model_args = asdict(model.config)

train_model = lifecycle.wrap(model, rt, compile, shard=fsdp, cpu_offload=fsdp_cpu_offload)  # runs the steps
optimizer = optim.make_optimizer(model, weight_decay, learning_rate, (beta1, beta2), rt.device_type, optimizer,
                                 muon_lr=muon_lr, muon_momentum=muon_momentum, muon_ns_steps=muon_ns_steps,
                                 muon_ns_dtype=muon_ns_dtype, muon_weight_decay=muon_weight_decay)  # name -> object
scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == "float16")  # fp16 needs loss scaling
if init_from == "resume":
    iter_num, best_val_loss = lifecycle.restore(ckpt["resume"], optimizer, scaler, rt, model, train_loader)
ckpt = None  # free the memory

# MFU: achieved FLOP/s (6N + attention per token, PaLM appendix B; model.flops_per_token) over peak FLOP/s
peak, peak_why = (peak_flops, "--peak_flops") if peak_flops else device_peak_flops(rt.device)
flops_per_token = model.flops_per_token(block_size)
if flops_budget:  # a compute budget: C = flops_per_token * tokens, so iterations = C / (flops_per_token * batch)
    # an IsoFLOP sweep (Hoffmann et al. 2022, arXiv:2203.15556, section 3.2) is then one sweep config over sizes
    max_iters = lr_decay_iters = config["max_iters"] = config["lr_decay_iters"] = \
        max(1, round(flops_budget / (flops_per_token * total_batch_size)))
    optim.check_schedule(learning_rate, warmup_iters, lr_decay_iters, max_iters, min_lr, decay_lr)
    print0(f"compute: flops_budget {flops_budget:.3g} FLOPs / ({flops_per_token:,} FLOPs per token x "
           f"{total_batch_size:,} tokens per iteration) -> max_iters = lr_decay_iters = {max_iters:,}")
print0(f"model: {model.num_params() / 1e6:.2f}M parameters ({', '.join(f'{k}={v}' for k, v in model_args.items())})")
print0(f"batch: {total_batch_size:,} tokens per iteration = {batch_size} sequences x {block_size} tokens x {W} "
       f"rank(s) x {grad_accum} accumulation step(s); {max_iters:,} iterations = {max_iters * total_batch_size:,} "
       f"tokens")
print0(f"MFU against {peak / 1e12:.1f} TFLOP/s per device ({peak_why})" if peak else "MFU: no peak known, set "
       "--peak_flops")
if config["optimizer"] == "muon":
    ns_dtype, ns_why = optim.pick_ns_dtype(muon_ns_dtype, rt.device_type)
    hidden = optimizer.muon.param_groups[0]["params"]
    rest = sum(p.numel() for g in optimizer.adamw.param_groups for p in g["params"])
    print0(f"optimizer: Muon for the {len(hidden)} matrices inside the blocks ({sum(p.numel() for p in hidden):,} "
           f"parameters; lr {muon_lr:g}, momentum {muon_momentum:g}, Nesterov, {muon_ns_steps} Newton-Schulz steps in "
           f"{str(ns_dtype)[6:]}: {ns_why}), AdamW for the embeddings, LayerNorms and biases ({rest:,} parameters; "
           f"lr {learning_rate:g}, betas {beta1:g}/{beta2:g}); weight decay {muon_weight_decay:g} (Muon, at its lr), "
           f"{weight_decay:g} (AdamW)")
else:
    print0(f"optimizer: AdamW (lr {learning_rate:g}, betas {beta1:g}/{beta2:g}, weight decay {weight_decay:g})")

# ----------------------------------------------------------------------------------------------
# what the loop calls: learning rate, evaluation, samples, checkpoints, logs


@torch.no_grad()
def evaluate() -> dict:
    """Mean loss over the same eval_iters batches of each split; rank r takes batches r, r + W, ..."""
    model.eval()
    out = {}
    for split, loader in eval_loaders.items():
        loader.load_state_dict(eval_start[split])
        total = torch.zeros(2, device=rt.device)  # (sum of losses, batches)
        for k in range(rt.ddp_rank, -(-eval_iters // W) * W, W):  # as many forwards on every rank (FSDP gathers)
            x, y = loader.next_batch()
            with rt.autocast():
                _, loss = model(x, y)
            total += torch.stack([loss.float(), torch.ones((), device=rt.device)]) * (k < eval_iters)
        if rt.ddp:
            dist.all_reduce(total)
        out[split] = (total[0] / total[1]).item()
    model.train()
    return out


if sample_interval and (master or fsdp):  # under FSDP every rank takes part in generating
    tok = load_tokenizer(tok_meta)
    prompt_ids = tok.encode(sample_prompt)  # fails now, not mid-run, on characters outside the vocabulary
if track_heads and (master or fsdp):  # watching heads form: the same text and probe at every evaluation
    if data_source != "bin":
        raise ValueError("track_heads=True draws its probe from the prepared token files: use data_source='bin'")
    text_loader = bin_loader("val", seed + 2)  # real text: the in-context loss on 64 windows, previous-token on 8
    heads_text = torch.cat([text_loader.next_batch()[0] for _ in range(-(-64 // batch_size))])[:64]  # (64, T)
    # induction: 8 random sequences of ids that occur in the training data, each repeated (lib/heads.py)
    heads_probe = heads.repeated_random_tokens(vocab, load_tokenizer(tok_meta).eot_token, block_size, block_size // 2,
                                               8, seed, heads.data_token_ids(data_dir))


@torch.no_grad()
def sample_text() -> str:
    """A sample from the fixed prompt with fixed randomness: successive samples differ only by the model."""
    model.eval()
    gen = torch.Generator(device=rt.device).manual_seed(seed)  # its own generator: training's RNG is untouched
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=rt.device)
    with rt.autocast():
        out = model.generate(idx, sample_tokens, temperature=0.8, top_k=200, generator=gen)
    model.train()
    return tok.decode(out[0, idx.size(1):].tolist())


def save(name: str):
    """Write out_dir/name atomically with everything an exact resume needs (a collective under DDP)."""
    loader = train_loader.state_dict()
    loader = lifecycle.gather_objects(loader, rt) if data_source == "stream" else loader  # a stream: every rank's
    lifecycle.save_run(os.path.join(out_dir, name), "pretrain", model, config, tok_meta, rt, iter_num,
                       ("val_loss", best_val_loss), optimizer, scaler, loader)


log_path, png_path = os.path.join(out_dir, "log.jsonl"), os.path.join(out_dir, "loss.png")
if master:
    lifecycle.lock_out_dir(out_dir)  # one run per out_dir: a second one stops here, naming the first
    lifecycle.start_log(out_dir, iter_num if init_from == "resume" else None)  # a resume logs again what followed
wandb_run = None
if wandb_log and master:
    wandb_run = logs.init_wandb(wandb_project, wandb_run_name, config, wandb_mode, out_dir)
samples, plotted_at, plotted_t = [], 0, time.time()  # wandb's sample table; the iteration and time loss.png shows
PLOT_EVERY_S = 120  # a drawing costs ~0.1 s on a CPU (the first 0.5 s more, importing matplotlib): 2-10 small steps


def log(rec: dict):
    """A line of log.jsonl (and wandb); loss.png drawn at the end, and after an evaluation once PLOT_EVERY_S have
    passed since the start or the last drawing (so a run of a minute or two draws it once)."""
    global plotted_at, plotted_t
    logs.record(log_path, rec, wandb_run)
    due = rec["type"] == "summary" or (rec["type"] == "eval" and time.time() - plotted_t >= PLOT_EVERY_S)
    if due and rec["iter"] > 0 and rec["iter"] != plotted_at:
        plotted_t = time.time()
        recs = logs.read_jsonl(log_path)
        curves = {name: ([r["iter"] for r in recs if r.get(key) is not None],
                         [r[key] for r in recs if r.get(key) is not None])
                  for name, key in (("train (log lines)", "loss"), ("train", "train_loss"), ("val", "val_loss"))}
        logs.plot_curves(png_path, curves, title=f"{out_dir}: loss")
        if track_heads:
            heads.plot_heads(os.path.join(out_dir, "heads.png"), recs, f"{out_dir}: loss and heads")
        plotted_at = rec["iter"]


def run_eval() -> dict:
    t = time.time()
    losses = evaluate()
    for split, value in losses.items():
        if not math.isfinite(value):
            lifecycle.stop_non_finite(f"evaluation's {split} loss", value, iter_num, rt, out_dir)
    if track_heads and (master or fsdp):  # under FSDP every rank takes part in the forward passes
        with rt.autocast():
            scores = heads.layer_scores(model, heads_text, heads_probe)
        print0(f"heads {iter_num}: best previous-token score per layer " + " ".join(f"{v:.2f}" for v in
               scores["prev_token"]) + ", induction " + " ".join(f"{v:.2f}" for v in scores["induction"])
               + f", in-context loss {scores['in_context_loss']:.3f}")
        if master:
            log({"type": "heads", "iter": iter_num, **scores})
    if master and losses:
        best = min(best_val_loss, losses.get("val", float("inf")))
        print0(f"eval {iter_num}: " + ", ".join(f"{s} loss {v:.4f}" for s, v in losses.items())
               + (f" (best val {best:.4f})" if "val" in losses else "") + f", {time.time() - t:.1f} s", flush=True)
        log({"type": "eval", "iter": iter_num, "train_loss": losses.get("train"), "val_loss": losses.get("val"),
                "eval_s": time.time() - t})
    return losses


stop = lifecycle.catch_signals()  # SIGINT/SIGTERM: finish the step, save, print how to resume

# ----------------------------------------------------------------------------------------------
# training loop

t_start = time.time()
if eval_only or (iter_num == 0 and eval_iters):
    run_eval()  # the untrained model's loss, a baseline (about ln(vocab) for a good initialisation)
if eval_only:
    sys.exit(0)
if iter_num >= max_iters:
    print0(f"nothing to do: the run is at iteration {iter_num:,} and max_iters is {max_iters:,}")
if rt.device_type == "cuda":
    torch.cuda.reset_peak_memory_stats(rt.device)
BIG = 2 ** 62
loss_sum = torch.zeros((), device=rt.device)  # summed micro-step losses since the last log line
first_bad = torch.full((), BIG, dtype=torch.long, device=rt.device)  # first iteration with a non-finite loss
t_log, iters_logged, train_time, saved_at = time.time(), 0, 0.0, -1
while iter_num < max_iters:
    lr = optim.lr_at(iter_num, learning_rate, warmup_iters, lr_decay_iters, min_lr, decay_lr)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # an optimizer may run some groups at a multiple
    step_loss = torch.zeros((), device=rt.device)
    for micro in range(grad_accum):
        x, y = train_loader.next_batch()
        lifecycle.sync_gradients(train_model, micro == grad_accum - 1)  # averaged over the ranks at the last only
        with rt.autocast():
            _, loss = train_model(x, y)
        scaler.scale(loss / grad_accum).backward()
        step_loss += loss.detach()
    scaler.unscale_(optimizer)  # clip and log the true gradient norm (a no-op unless fp16)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    # no host sync per step: the checks run on the device and are read at the next log line
    first_bad = torch.where(torch.isfinite(step_loss), first_bad, first_bad.clamp(max=iter_num + 1))
    loss_sum += step_loss
    iter_num += 1
    iters_logged += 1
    stopping = stop.agreed(rt)  # all ranks stop together: one that left alone would leave the others waiting
    last = iter_num == max_iters
    eval_due = iter_num % eval_interval == 0 or last
    sample_due = sample_interval and (master or fsdp) and (iter_num % sample_interval == 0 or last)  # FSDP: all
    if iter_num % log_interval == 0 or eval_due or stopping:
        if rt.ddp:
            dist.all_reduce(loss_sum)
            dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
        lossf = loss_sum.item() / (iters_logged * grad_accum * W)  # waits for the device: once per log line
        if first_bad.item() < BIG:
            lifecycle.stop_non_finite("loss", lossf, first_bad.item(), rt, out_dir)
        dt = time.time() - t_log
        train_time += dt
        tok_s = total_batch_size * iters_logged / dt
        mfu = flops_per_token * tok_s / (peak * W) if peak else None
        mem = torch.cuda.max_memory_allocated(rt.device) / 2 ** 30 if rt.device_type == "cuda" else None
        print0(f"iter {iter_num}/{max_iters} | loss {lossf:.4f} | lr {lr:.2e} | norm {lifecycle.grad_norm(norm):.4f} | "
               f"{dt * 1000 / iters_logged:.1f} ms/iter | {tok_s:,.0f} tok/s | MFU "
               + (f"{mfu * 100:.2f}%" if mfu is not None else "-") + (f" | mem {mem:.2f} GiB" if mem else ""),
               flush=True)
        if master:
            log({"type": "train", "iter": iter_num, "loss": lossf, "lr": lr, "grad_norm": lifecycle.grad_norm(norm),
                    "ms_per_iter": dt * 1000 / iters_logged, "tok_per_s": tok_s, "mfu": mfu, "mem_gib": mem})
        loss_sum.zero_()
        iters_logged, t_log = 0, time.time()
    if eval_due:
        losses = run_eval()
        improved = losses.get("val", float("inf")) < best_val_loss
        best_val_loss = min(best_val_loss, losses.get("val", float("inf")))
        if always_save_checkpoint or improved or "val" not in losses:
            save(ckpt_name)
            saved_at = iter_num
        if save_best and improved:
            save("ckpt_best.pt")
    if sample_due:
        text = sample_text()
        print0(f"sample {iter_num}: {text!r}")
        samples.append([iter_num, text])
        if master:
            logs.append_jsonl(log_path, {"type": "sample", "iter": iter_num, "text": text})
        if wandb_run is not None:
            import wandb
            wandb_run.log({"samples": wandb.Table(columns=["iter", "text"], data=samples)}, step=iter_num)
    if stopping:
        if saved_at != iter_num:  # a best-only ckpt_name keeps the best model: the state goes to ckpt_last.pt
            save(ckpt_name if always_save_checkpoint else checkpoint.last_name(ckpt_name))
        lifecycle.stop_exit(stopping, rt, sys.argv, out_dir)
    if eval_due or sample_due:
        t_log = time.time()  # log lines time the training steps, not evaluations, samples and saves

# ----------------------------------------------------------------------------------------------
# summary

total_time = time.time() - t_start
if master:
    best = f"{best_val_loss:.4f}" if best_val_loss < float("inf") else "-"
    print0(f"done: {iter_num:,} iterations in {total_time:.1f} s ({train_time:.1f} s of training steps), best val "
           f"loss {best}, peak memory {lifecycle.peak_memory(rt)}")
    log({"type": "summary", "iter": iter_num, "best_val_loss": best_val_loss if best != "-" else None,
         "total_s": total_time, "train_s": train_time, "tokens": iter_num * total_batch_size,
         "flops": iter_num * total_batch_size * flops_per_token,  # training FLOPs as model.flops_per_token counts
         "params": model.num_params(non_embedding=False), "params_non_embedding": model.num_params(
             non_embedding=False) - model.transformer.wte.weight.numel() - model.transformer.wpe.weight.numel()})
    print0(f"written: {os.path.join(out_dir, ckpt_name)}, {log_path}, {png_path}")
lifecycle.end_run(rt, wandb_run)
