"""
Align a language model with human preferences: Direct Preference Optimization and close relatives.

DPO (Rafailov et al. 2023, arXiv:2305.18290) trains the policy on preference pairs (prompt, chosen, rejected)
against a frozen reference model, by default the starting checkpoint (usually an SFT model from finetune.py):
no reward model, no sampling. loss_type='ipo' (Azar et al. 2023, arXiv:2310.12036) and loss_type='cdpo'
(conservative DPO, label smoothing for noisy labels; Mitchell 2023) change only the loss.

    python align.py config/align_hh.py --init_from=out-sft                       # Anthropic/hh-rlhf, from the Hub
    python align.py --init_from=out-sft --dataset=pairs.jsonl --val_split=val.jsonl --device=cpu --compile=False
    torchrun --standalone --nproc_per_node=8 align.py config/align_hh.py --init_from=out-sft
    python align.py config/align_hh.py --init_from=out-sft --lora_rank=16 --lora_alpha=32   # LoRA adapters only
    python align.py --init_from=resume --out_dir=out-align-hh                    # continue a run exactly

Records, in three layouts: {"chosen": conversation, "rejected": conversation} (hh-rlhf's, split at the last
"\\n\\nAssistant:"); {"prompt": ..., "chosen": response, "rejected": response}; or {"instruction": ...,
"input": ... (optional), "chosen": ..., "rejected": ...} with --prompt_template=alpaca (finetune.py's template).
Writes out_dir/ckpt.pt (kind 'dpo': every script that takes a model reads it), out_dir/log.jsonl, out_dir/loss.png
and out_dir/reward.png.
"""

import copy
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from configurator import configure
from lib import checkpoint, lifecycle, logs, optim
from lib.errors import install
from lib.finetuning import Finetuned
from lib.lora import Merged, add_lora, check_settings, load_adapters, load_base, lora_entry, weights_hash
from lib.preferences import collate, encode_triples, fingerprint, preference_triples, response_tokens
from lib.progress import progress
from lib.records import load_records, local_paths
from lib.runtime import print0, setup_runtime
from lib.tokenizer import tokenizer_for

_LOSS_TYPES = ("dpo", "cdpo", "ipo")


# ----------------------------------------------------------------------------------------------
# data: records -> (prompt, chosen, rejected) strings -> token ids











# ----------------------------------------------------------------------------------------------
# log-probabilities and the preference losses


def sequence_logps(model, x, y, rt):
    """log pi(response | prompt) per row: the log-probs of the targets summed where y != -1 -> (N,). model: a GPT,
    or a Finetuned (compiled or DDP-wrapped) around one, which computes logits at the response tokens only: the
    50k-way LM head skips the prompt and the padding (the journey's questions: about 100 prompt tokens before a
    4-token answer)."""
    if hasattr(model, "transformer"):  # a GPT (Finetuned holds it as .gpt)
        model = Finetuned(model)
    with rt.autocast():
        _, nll = model(x, y, reduction="none")  # (K,) at the K labelled positions, row-major; float32
    rows = torch.arange(y.size(0), device=y.device).repeat_interleave(y.size(1))[y.reshape(-1) != -1]  # (K,)
    return torch.zeros(y.size(0), device=y.device).index_add(0, rows, -nll.float())


def preference_loss(pc, pr, rc, rr, loss_type: str = "dpo", beta: float = 0.1, label_smoothing: float = 0.0):
    """Per-pair losses and implicit rewards from the policy's (pc, pr) and reference's (rc, rr) sequence
    log-probs of the chosen and rejected responses -> (losses, chosen rewards, rejected rewards), each (B,)."""
    h = (pc - rc) - (pr - rr)  # how much more the policy prefers chosen over rejected than the reference does
    if loss_type == "ipo":
        # IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17): regress h to 1/(2 tau) instead of pushing it to
        # infinity, so deterministic preferences cannot drive the policy arbitrarily far from the reference.
        # Sequence log-probs as in the paper (TRL divides them by the response length instead).
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        # DPO (Rafailov et al. 2023, arXiv:2305.18290, eq. 7): -log sigmoid(beta * h). cDPO (Mitchell 2023,
        # "A note on DPO with noisy preferences"): each label is flipped with probability label_smoothing, so
        # the target is a soft label and the optimum stays finite. label_smoothing=0 is plain DPO.
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    # implicit rewards beta * log(pi / ref) (DPO paper, section 5)
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


# what every log line records, train and held-out alike (held-out ones prefixed val_); reward_acc is strict as TRL's
# rewards/accuracies (chosen reward > rejected reward; a tie, e.g. every pair at step 0, counts 0)
LOGGED = ("loss", "dpo_loss", "nll", "reward_acc", "reward_margin")


def pair_terms(pc, pr, rc, rr, nc, nr, loss_type: str = "dpo", beta: float = 0.1, label_smoothing: float = 0.0,
               rpo_alpha: float = 0.0, ipo_per_token: bool = False) -> dict:
    """Per-pair terms (each (B,)) from the policy's (pc, pr) and the reference's (rc, rr) sequence log-probs of the
    chosen and rejected responses, and their token counts (nc, nr): loss = dpo_loss + rpo_alpha * nll, what training
    minimises; dpo_loss, the preference loss of loss_type alone (dpo, cdpo or ipo); nll, the chosen response's NLL
    per token; reward_chosen, reward_rejected and reward_margin (chosen - rejected), the implicit rewards."""
    if loss_type == "ipo" and ipo_per_token:  # TRL's IPO: log-probs averaged over each response's tokens
        losses, cr, rj = preference_loss(pc / nc, pr / nr, rc / nc, rr / nr, loss_type, beta, label_smoothing)
    else:
        losses, cr, rj = preference_loss(pc, pr, rc, rr, loss_type, beta, label_smoothing)
    nll = -pc / nc.clamp(min=1)
    return {"loss": losses + rpo_alpha * nll if rpo_alpha else losses, "dpo_loss": losses, "nll": nll,
            "reward_chosen": cr, "reward_rejected": rj, "reward_margin": cr - rj}


def preference_metrics(policy, ref, ntok, loss_type: str, beta: float, label_smoothing: float,
                       rpo_alpha: float = 0.0, ipo_per_token: bool = False) -> dict:
    """Metrics over pairs from (N, 2) log-probs [chosen, rejected] of policy and reference and the (N, 2)
    response token counts: the means of pair_terms, the strict reward accuracy, and how far the policy moved."""
    t = pair_terms(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], ntok[:, 0], ntok[:, 1], loss_type, beta,
                   label_smoothing, rpo_alpha, ipo_per_token)
    out = {k: v.mean().item() for k, v in t.items()}
    out["reward_acc"] = (t["reward_margin"] > 0).float().mean().item()  # strict: a tie is not a win
    out.update({"logp_chosen": policy[:, 0].mean().item(), "logp_rejected": policy[:, 1].mean().item(),
                "logp_margin": (policy[:, 0] - policy[:, 1]).mean().item(),
                # mean log(pi / ref) per response token, chosen and rejected together: how far the policy moved
                "logp_drift": ((policy - ref).sum() / ntok.sum()).item()})
    return {k: out[k] for k in (*LOGGED, *sorted(set(out) - set(LOGGED)))}


@torch.no_grad()
def pair_logps(model, pairs: list, batch_size: int, rt, desc: str = "") -> torch.Tensor:
    """Response log-probs of every pair under model in eval mode -> (N, 2) float32 on the CPU, columns chosen
    and rejected. Length-sorted batches keep padding small; under DDP each rank does every world_size-th."""
    training = model.training
    model.eval()
    out = torch.zeros(len(pairs), 2)
    order = sorted(range(len(pairs)), key=lambda i: -max(len(pairs[i][0]), len(pairs[i][1])))
    mine = order[rt.ddp_rank::rt.ddp_world_size]
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    # as many forwards on every rank (FSDP gathers weights in each): a rank short of one repeats one, uncounted
    n = -(-(-(-len(order) // rt.ddp_world_size)) // batch_size)
    for k, idx in enumerate(progress(batches + [order[:1]] * (n - len(batches)), desc, unit="batches",
                                     disable=not desc, leave=False)):
        lp = sequence_logps(model, *collate(pairs, idx, rt.device), rt).cpu()  # (2B,)
        if k < len(batches):
            out[idx] = torch.stack([lp[:len(idx)], lp[len(idx):]], dim=1)
    if rt.ddp:  # every rank filled its own rows with the rest zero: a sum gathers them
        out = out.to(rt.device)
        torch.distributed.all_reduce(out)
        out = out.cpu()
    model.train(training)
    return out



# ----------------------------------------------------------------------------------------------
# defaults (python align.py config/align_hh.py --key=value ...)
# I/O
out_dir = "out-align"
init_from = "gpt2"  # 'resume' (continue the run in out_dir), a GPT-2 name, or any model checkpoint (e.g. 'out-sft')
ckpt_name = "ckpt.pt"
overwrite = False  # True: a new run may replace the checkpoints in out_dir (else it stops, naming them)
eval_interval = 50  # iterations between held-out evaluations (and checkpoints)
log_interval = 10  # iterations between training log lines
always_save_checkpoint = True  # False: save only when the held-out loss improves (a stop goes to ckpt_last.pt)
eval_only = False  # evaluate the starting model on the held-out pairs, then exit
wandb_log = False
wandb_project = "align"
wandb_run_name = "dpo"
wandb_mode = "online"  # 'online' | 'offline' (no network; `wandb sync` later) | 'disabled'
# data: local files (.jsonl, .json, .csv, .tsv; also .gz/.bz2/.xz; folders, globs) or a Hugging Face dataset
dataset = "Anthropic/hh-rlhf"  # Hub name, or local file(s) of training pairs (comma-separated), e.g. train.jsonl.gz
name = ""  # the Hub dataset's configuration, if it has several
dataset_dir = ""  # subfolder of the Hub dataset, e.g. 'harmless-base' or 'helpful-base' for hh-rlhf
train_split = "train"  # Hub split of the training pairs
val_split = "test"  # Hub split or local file(s) of held-out pairs; '' = hold val_pairs out of the training pairs
val_pairs = 512  # held-out pairs evaluated at each eval (a fixed random subset)
max_records = 0  # read at most this many training records (0 = all), for quick runs
cache_dir = ""  # folder for datasets' cache; '' = its default (~/.cache/huggingface/datasets)
encoding = "utf-8"  # of local files (a BOM is honoured); e.g. 'latin-1', 'cp1252'
header = None  # CSV/TSV: None guesses whether the first row names the columns; True or False says so
skip_bad_records = False  # True: skip (and count) records that are broken or do not fit a layout, else an error
prompt_template = "none"  # 'alpaca': finetune.py's template around 'prompt' or 'instruction' + 'input' fields
drop_mismatched = False  # True: drop hh-layout pairs whose two sides differ before the last turn (else error)
block_size = 512  # longest prompt + response in tokens; longer pairs lose prompt tokens from the left
# method
loss_type = "dpo"  # 'dpo' | 'cdpo' (label-smoothed DPO) | 'ipo'
beta = 0.1  # strength of the pull to the reference: higher = stay closer (DPO paper: 0.1; IPO's tau)
ipo_per_token = False  # ipo: False = summed log-probs, as the paper (eq. 17), target margin 1/(2 beta) per response;
# True = log-probs averaged over each response's tokens, as TRL's loss_type='ipo': the same beta then asks for a margin
# of 1/(2 beta) per token, about L times more for L-token responses (raise beta by ~L to keep the paper's pull)
label_smoothing = 0.0  # cdpo: assumed probability that a preference label is flipped, in (0, 0.5)
rpo_alpha = 0.0  # > 0: plus rpo_alpha x the chosen response's NLL per token (RPO: Pang et al. 2024, arXiv:2404.19733;
# TRL's rpo_alpha), which keeps DPO from lowering the likelihood of the chosen answers along with the rejected ones
precompute_ref = False  # True: reference log-probs computed once up front; no reference model held in memory
# LoRA (lib/lora.py): freeze the policy, train a rank-r update of the Linear layers named; saved merged
lora_rank = 0  # 0 = off (every weight trains); r > 0: adapters of rank r
lora_alpha = 16.0  # the update is scaled by lora_alpha / lora_rank (Hu et al. 2021, section 4.1)
lora_dropout = 0.0  # dropout on the adapters' input
lora_targets = "c_attn,c_proj,c_fc"  # which of each block's Linear layers: c_attn, c_proj (attn and mlp), c_fc
lora_norms = False  # True: the LayerNorms train too (whole; the frozen LM head's logit scale is ln_f's gain)
# optimization
batch_size = 8  # preference pairs per micro-step per process (2 sequences each)
total_batch_pairs = 64  # pairs per optimizer step, all processes; grad accumulation is derived from it
max_iters = 0  # optimizer steps; 0 = one epoch over the training pairs
learning_rate = 1e-6
warmup_iters = 150  # linear warmup from 0 (DPO paper, appendix B: 150 steps)
lr_schedule = "constant"  # 'constant' after warmup (DPO paper) | 'cosine' decay to min_lr at max_iters
min_lr = 1e-7
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip the gradient norm (0 = off)
dropout = 0.0  # dropout makes the policy's log-probs noisy at step 0; TRL disables it for DPO too
# system
device = "auto"  # 'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps'
dtype = "auto"  # 'auto' | 'float32' | 'bfloat16' | 'float16'
compile = False  # torch.compile the training forward (batches vary in length: expect a few recompiles)
fsdp = False  # under torchrun: shard parameters, gradients and AdamW states over the ranks (FSDP2) instead of DDP's copies
fsdp_cpu_offload = False  # with fsdp: keep them in CPU memory (a model too big for the GPUs' memory, slower)
seed = 1337

# ----------------------------------------------------------------------------------------------
if __name__ == "__main__":  # tests import the helpers above; the run is below
    install()  # a user's error is one line 'error: ...', Ctrl-C is 'interrupted' (lib/errors.py)
    explicit = set()  # the keys set by config files or flags: what a resumed run may change
    config = configure(globals(), sys.argv[1:], explicit=explicit)
    resume = config["init_from"] == "resume"
    ckpt = None
    if resume:  # the saved run's config is the base: --init_from=resume --out_dir=X alone continues X
        config, ckpt = lifecycle.resume_run(config, explicit, ("dpo",), "align.py", ("fsdp", "fsdp_cpu_offload"))
    globals().update(config)
    # checks that need neither data nor model: a typo fails in a second, not after loading
    for key, allowed in dict(loss_type=_LOSS_TYPES, prompt_template=("none", "alpaca"),
                             lr_schedule=("constant", "cosine")).items():
        if config[key] not in allowed:
            raise ValueError(f"{key} must be one of {allowed}, got {config[key]!r}; e.g. --{key}={allowed[0]}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (DPO paper: 0.1), got {beta!r}")
    if loss_type == "cdpo" and not 0 < label_smoothing < 0.5:
        raise ValueError(f"loss_type='cdpo' needs 0 < label_smoothing < 0.5, got {label_smoothing!r}; e.g. "
                         f"--label_smoothing=0.1")
    if not (isinstance(rpo_alpha, (int, float)) and rpo_alpha >= 0):
        raise ValueError(f"rpo_alpha must be a number >= 0 (0 = plain {loss_type}), got {rpo_alpha!r}; e.g. "
                         f"--rpo_alpha=1.0")
    if ipo_per_token and loss_type != "ipo":
        raise ValueError(f"ipo_per_token=True only applies to loss_type='ipo' (got loss_type={loss_type!r}); use "
                         f"--loss_type=ipo or --ipo_per_token=False")
    if loss_type != "cdpo" and label_smoothing != 0:
        raise ValueError(f"label_smoothing={label_smoothing!r} only applies to loss_type='cdpo' (got "
                         f"loss_type={loss_type!r}); use --loss_type=cdpo or --label_smoothing=0")
    check_settings(lora_rank, lora_alpha, lora_dropout, lora_targets, fsdp)
    for key in ("batch_size", "total_batch_pairs", "val_pairs", "eval_interval", "log_interval", "block_size"):
        if config[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {config[key]!r}")
    local, local_val = local_paths(dataset), val_split and local_paths(val_split)  # a missing file: an error now
    # a folder (or glob) is all its files: a held-out file among them would be trained on
    held_out_names = ("test", "val", "validation")
    leak = sorted(set(local or []) & set(local_val or [])) or [
        p for p in (local or []) if not local_val and os.path.basename(p).split(".")[0] in held_out_names]
    if leak:
        raise ValueError(f"--dataset={dataset!r} includes held-out pairs {leak}, which would be trained on; name the "
                         f"training and the held-out files apart, e.g. --dataset=DIR/train.jsonl.gz "
                         f"--val_split=DIR/test.jsonl.gz")
    lifecycle.check_out_dir(out_dir, init_from, overwrite, "align.py")
    rt = setup_runtime(device, dtype, training=True)
    master, world = rt.master_process, rt.ddp_world_size
    if total_batch_pairs % (batch_size * world):
        raise ValueError(f"total_batch_pairs={total_batch_pairs} must be a multiple of batch_size * processes = "
                         f"{batch_size} * {world}; e.g. --total_batch_pairs={batch_size * world * 8}")
    accum = total_batch_pairs // (batch_size * world)
    start_path = os.path.join(init_from, ckpt_name) if os.path.isdir(init_from) else init_from
    if not resume and os.path.abspath(start_path) == os.path.abspath(os.path.join(out_dir, ckpt_name)):
        raise ValueError(f"init_from={init_from!r} is this run's own checkpoint, which training would overwrite; "
                         f"choose another out_dir, or --init_from=resume to continue an align.py run")
    torch.manual_seed(seed + rt.ddp_rank)

    # ------------------------------------------------------------------------------------------
    # the policy, and where the reference comes from
    if resume:
        # a LoRA run's merged weights are not its unmerged ones: its base is re-read (and checked by its hash)
        model = load_base(ckpt["lora"], dropout) if lora_rank else checkpoint.float_model(ckpt, dropout)
        model, tok = model.to(rt.device), tokenizer_for(ckpt)
        ref_from = ckpt["ref_init_from"]
    else:
        print0(f"loading the starting model from {init_from!r}")
        model, ckpt, tok = checkpoint.load_float_model(init_from, out_dir, rt.device, dropout, ckpt_name)
        ref_from = os.path.abspath(ckpt["path"]) if ckpt else init_from  # a file, or a GPT-2 name
    ckpt = ckpt or {}
    ckpt.pop("model", None)  # the weights now live in the model: do not hold a second copy
    if block_size > model.config.block_size:
        raise ValueError(f"block_size={block_size} exceeds the model's context of {model.config.block_size} tokens; "
                         f"use --block_size={model.config.block_size} or less")
    print0(f"policy: {model.num_params():,} parameters; reference: {ref_from!r}")

    # ------------------------------------------------------------------------------------------
    # data: every record read and checked, then tokenized
    def read_pairs(source: str, split: str, limit: int = 0):
        """(prompt, chosen, rejected) triples of a file list or Hub split, every bad record named -> (triples,
        identical, mismatched, name for messages)."""
        recs = load_records(source, split, name, header=header, encoding=encoding, skip_bad=skip_bad_records,
                            max_records=limit, data_dir=dataset_dir, cache_dir=cache_dir)
        return (*preference_triples(recs.rows, recs.source, prompt_template, drop_mismatched, skip_bad_records),
                recs.source)

    train_t, ident, mism, train_src = read_pairs(dataset, train_split, max_records)
    rng = np.random.default_rng(seed)
    if not val_split or (local and not local_val):  # a local file has no 'test' split: hold pairs out
        if len(train_t) <= val_pairs:
            raise ValueError(f"{train_src} has {len(train_t)} usable pairs, too few to hold out val_pairs={val_pairs} "
                             f"and train on the rest; lower --val_pairs or pass held-out pairs: --val_split=val.jsonl")
        perm = rng.permutation(len(train_t))
        val_t, train_t = [train_t[i] for i in perm[:val_pairs]], [train_t[i] for i in sorted(perm[val_pairs:])]
        val_src = f"{train_src} (held out)"
        print0(f"held-out pairs: {val_pairs} of the training pairs" + (f" (no split {val_split!r} in local files; "
               f"pass --val_split=val.jsonl for separate ones)" if val_split else ""))
    else:
        val_t, vi, vm, val_src = read_pairs(val_split if local_val else dataset, val_split)
        val_t = [val_t[i] for i in sorted(rng.permutation(len(val_t))[:val_pairs])]
        ident, mism = ident + vi, mism + vm
    train, trunc, empty = encode_triples(tok, train_t, block_size, train_src, master, skip_bad_records)
    val, vtrunc, vempty = encode_triples(tok, val_t, block_size, val_src, master, skip_bad_records)
    if len(train) < total_batch_pairs or not val:
        raise ValueError(f"after filtering, {len(train)} training and {len(val)} held-out pairs remain: need at least "
                         f"total_batch_pairs={total_batch_pairs} and 1; use more data or --total_batch_pairs")
    del train_t, val_t  # the strings: hh-rlhf's are a few hundred MB
    n_tok = sum(len(c) + len(r) - 2 for c, r, _ in train)
    print0(f"data: {len(train):,} training pairs ({n_tok:,} tokens), {len(val):,} held-out pairs; dropped "
           f"{ident:,} with identical responses, {mism:,} with mismatched prompts, {empty + vempty:,} with no "
           f"response tokens; {trunc + vtrunc:,} ({(trunc + vtrunc) / (len(train) + len(val)):.1%}) truncated "
           f"prompt-first to block_size {block_size}")
    data_hash = fingerprint(train) + fingerprint(val)
    steps_per_epoch = len(train) // total_batch_pairs
    iters = max_iters or steps_per_epoch
    print0(f"{total_batch_pairs} pairs per step = {batch_size} per micro-step x {accum} grad accum x {world} "
           f"processes; {iters:,} iterations ({iters / steps_per_epoch:.2f} epochs)")
    if not eval_only:  # warn now about a schedule that cannot do what its numbers say
        optim.check_schedule(learning_rate, warmup_iters, iters, iters, min_lr, decay=lr_schedule == "cosine")

    # ------------------------------------------------------------------------------------------
    # the reference: stored log-probs (resume), precomputed once, or a frozen copy held alongside
    ref_model, ref_logps = None, None
    val_tokens = response_tokens(val)
    param_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20
    if resume and ckpt.get("ref_logps") is not None and ckpt.get("data_fingerprint") == data_hash:
        ref_logps = ckpt["ref_logps"]
        print0(f"reference log-probs: restored from the checkpoint ({len(train) + len(val):,} pairs)")
    else:
        if resume:
            print0(f"loading the reference model from {ref_from!r}")
            ref_model = checkpoint.load_float_model(ref_from, device=rt.device, ckpt_name=ckpt_name)[0]
        else:  # the starting weights: the policy itself before its first step, or a copy to keep
            ref_model = model if precompute_ref else copy.deepcopy(model)
        if precompute_ref:
            # the reference's log-probs never change: one pass now instead of one forward per step, and
            # neither its weights nor its activations stay in memory (pair_logps runs under no_grad, eval mode)
            ref_logps = {"train": pair_logps(ref_model, train, batch_size, rt, "reference log-probs (train)"),
                         "val": pair_logps(ref_model, val, batch_size, rt, "reference log-probs (val)")}
            ref_model = None
            print0(f"reference log-probs: precomputed for {len(train) + len(val):,} pairs; no reference model "
                   f"held ({param_mib:,.1f} MiB of parameters saved)")
        else:
            ref_model.eval().requires_grad_(False)  # frozen: no gradients, not in the optimizer, no dropout
            print0(f"reference model: frozen copy in memory ({param_mib:,.1f} MiB of parameters)")

    # ------------------------------------------------------------------------------------------
    # LoRA on the policy (the reference above stays its plain start), optimizer, a resumed run's state, compile, DDP
    if lora_rank:
        base, base_hash = ((ckpt["lora"]["base"], ckpt["lora"]["base_sha256"]) if resume else
                           (ref_from, weights_hash(model)))
        n_wrapped = add_lora(model, lora_rank, lora_alpha, lora_dropout, lora_targets, lora_norms)  # freezes the rest
        if resume:
            load_adapters(model, ckpt["lora"]["adapters"])
        print0(f"LoRA: rank {lora_rank}, alpha {lora_alpha:g} on {n_wrapped} Linear layers ({lora_targets}): "
               f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters")
    policy = Finetuned(model)  # the same weights; logits at the response tokens only
    train_model = lifecycle.wrap(policy, rt, compile, shard=fsdp, cpu_offload=fsdp_cpu_offload)  # FSDP: policy is the root
    optimizer = optim.make_optimizer(model, weight_decay, learning_rate, (beta1, beta2), rt.device_type)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == "float16")  # fp16 only: loss scaling
    iter_num, best_val_loss = 0, float("inf")
    if resume:
        state = ckpt["resume"]
        iter_num, best_val_loss = lifecycle.restore(state, optimizer, scaler, rt, policy)
        if ckpt.get("data_fingerprint") != data_hash:
            print0("WARNING: the training data differ from the checkpoint's run; resuming on the new data, so the "
                   "run does not continue exactly (restore the data files the run started with to continue it)")
    ckpt = state = None  # free the optimizer state and reference log-probs held twice
    perms = {}  # epoch -> its shuffle of the training pairs (the current epoch only)

    def batch_indices(it, micro):
        """The pairs of one micro-step: step `it` takes the next total_batch_pairs of its epoch's shuffle; as
        in a single process with world * accum micro-steps, rank r does micro-steps r, r + world, ...
        A batch depends only on (seed, it, micro): resuming needs nothing but iter_num."""
        epoch, step = divmod(it, steps_per_epoch)
        if epoch not in perms:
            perms.clear()
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(len(train))
        start = step * total_batch_pairs + (micro * world + rt.ddp_rank) * batch_size
        return perms[epoch][start:start + batch_size].tolist()

    # ------------------------------------------------------------------------------------------
    # logs, evaluation, checkpoints
    log_path = os.path.join(out_dir, "log.jsonl")
    if master:
        lifecycle.lock_out_dir(out_dir)  # one run per out_dir: a second one stops here, naming the first
        lifecycle.start_log(out_dir, iter_num if resume else None)  # a resume logs again what came after its checkpoint
    wandb_run = None
    if wandb_log and master:
        wandb_run = logs.init_wandb(wandb_project, wandb_run_name, config, wandb_mode, out_dir)

    def log(rec: dict):
        logs.record(log_path, rec, wandb_run)

    def evaluate() -> dict:
        """Held-out metrics (every rank calls this: pair_logps shares the pairs out), logged and plotted."""
        pol = pair_logps(policy, val, batch_size, rt, "eval" if sys.stderr.isatty() else "")  # no bar in a log
        ref = ref_logps["val"] if ref_logps is not None else pair_logps(ref_model, val, batch_size, rt)
        m = preference_metrics(pol, ref, val_tokens, loss_type, beta, label_smoothing, rpo_alpha, ipo_per_token)
        if not math.isfinite(m["loss"]):
            lifecycle.stop_non_finite("held-out loss", m["loss"], iter_num, rt, out_dir)
        print0(f"eval iter {iter_num}: val loss {m['loss']:.4f}, dpo loss {m['dpo_loss']:.4f}, nll {m['nll']:.4f}, "
               f"reward acc {m['reward_acc']:.3f}, margin {m['reward_margin']:.4f}, chosen {m['reward_chosen']:.4f}, "
               f"rejected {m['reward_rejected']:.4f}, logp margin {m['logp_margin']:.3f}, drift "
               f"{m['logp_drift']:+.4f}/token")
        if master:
            log({"type": "eval", "iter": iter_num, **{f"val_{k}": v for k, v in m.items()}})
            recs = logs.read_jsonl(log_path)  # the whole run, resumed legs included
            series = lambda t, k: tuple(zip(*[(r["iter"], r[k]) for r in recs if r.get("type") == t and k in r]))
            title = f"{loss_type} (beta={beta}" + (f", rpo_alpha={rpo_alpha:g})" if rpo_alpha else ")")
            # losses and accuracies apart: train and held-out of the same quantity on one plot
            for file, keys, ylabel in (("loss.png", ("dpo_loss", "nll"), "loss"),
                                       ("reward.png", ("reward_acc",), "reward accuracy (strict)")):
                curves = {f"{split} {k}": series(t, p + k) or ([], []) for k in keys
                          for split, t, p in (("train", "train", ""), ("val", "eval", "val_"))}
                logs.plot_curves(os.path.join(out_dir, file), curves, title, ylabel=ylabel)
        return m

    def save(file: str):
        """Write out_dir/file atomically with everything an exact resume needs (a collective under DDP)."""
        lora = dict(lora=lora_entry(model, base, base_hash, lora_rank, lora_alpha, lora_dropout, lora_targets,
                                     lora_norms)
                    ) if lora_rank else {}  # the merged weights for every script; adapters and base for a resume
        lifecycle.save_run(os.path.join(out_dir, file), "dpo", Merged(model) if lora_rank else model, config,
                           tok.meta(), rt, iter_num, ("dpo_val_loss", best_val_loss), optimizer, scaler,
                           root=policy, ref_init_from=ref_from, ref_logps=ref_logps, data_fingerprint=data_hash,
                           **lora)

    # ------------------------------------------------------------------------------------------
    # training loop: one optimizer step per iteration; evaluate (and save) every eval_interval steps
    stop = lifecycle.catch_signals()  # SIGINT/SIGTERM: finish the step, save, print the resume command
    start_iter, saved_at, t_start = iter_num, iter_num, time.time()
    if iter_num == 0 or eval_only:
        m = evaluate()  # the baseline: policy == reference, dpo loss log 2, every reward 0: reward accuracy 0
        best_val_loss = min(best_val_loss, m["dpo_loss"])
    if iter_num >= iters and not eval_only:
        print0(f"nothing to do: the run is at iteration {iter_num:,} and max_iters is {iters:,}")
    params = [p for p in model.parameters() if p.requires_grad]
    sums = torch.zeros(len(LOGGED), device=rt.device)  # since the last log line: the step means of LOGGED, summed
    BIG = 2 ** 62
    first_bad = torch.full((), BIG, dtype=torch.long, device=rt.device)  # first step with a non-finite loss
    t0, tokens_seen, last_log = time.time(), 0, iter_num  # throughput since the last log line, evals excluded
    while iter_num < iters and not eval_only:
        lr = optim.lr_at(iter_num, learning_rate, warmup_iters, iters, min_lr, decay=lr_schedule == "cosine")
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        for micro in range(accum):
            idx = batch_indices(iter_num, micro)
            x, y = collate(train, idx, rt.device)
            tokens_seen += sum(len(train[i][0]) + len(train[i][1]) - 2 for i in idx)  # both sides, no padding
            if rt.ddp:  # all-reduce gradients on the last micro-step only
                lifecycle.sync_gradients(train_model, micro == accum - 1)
            lp = sequence_logps(train_model, x, y, rt)  # (2B,) chosen rows first
            pc, pr = lp[:len(idx)], lp[len(idx):]
            if ref_logps is not None:
                rc, rr = ref_logps["train"][idx].to(rt.device).unbind(1)
            else:
                with torch.no_grad():
                    rc, rr = sequence_logps(ref_model, x, y, rt).split(len(idx))
            nc, nr = (y != -1).sum(1).float().split(len(idx))  # response tokens of each side
            t = pair_terms(pc, pr, rc, rr, nc, nr, loss_type, beta, label_smoothing, rpo_alpha, ipo_per_token)
            scaler.scale(t["loss"].mean() / accum).backward()
            t["reward_acc"] = (t["reward_margin"] > 0).float()  # strict, as the held-out one
            sums += torch.stack([t[k].detach().mean() for k in LOGGED]) / accum
        first_bad = torch.where(torch.isfinite(sums[0]), first_bad, first_bad.clamp(max=iter_num + 1))
        scaler.unscale_(optimizer)  # clip and log the true gradient norm (a no-op unless fp16)
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        stopping = stop.agreed(rt)  # the same on every rank
        eval_due = iter_num % eval_interval == 0 or iter_num == iters
        # no host sync per step: the step's figures are read at log lines, and before any save (are they finite?)
        if iter_num % log_interval == 0 or iter_num == iters or eval_due or stopping:
            if rt.ddp:
                torch.distributed.all_reduce(first_bad, op=torch.distributed.ReduceOp.MIN)
            if first_bad.item() < BIG:
                lifecycle.stop_non_finite("training loss", float(sums[0]), first_bad.item(), rt, out_dir)
        if iter_num % log_interval == 0 or iter_num == iters:
            if rt.ddp:  # the mean over all ranks' pairs
                torch.distributed.all_reduce(sums)
            t = dict(zip(LOGGED, (sums / (world * (iter_num - last_log))).tolist()))
            dt = time.time() - t0
            tok_s = tokens_seen * world / dt  # tokens fed to the policy (prompt + response, both sides)
            print0(f"iter {iter_num}: loss {t['loss']:.4f}, dpo loss {t['dpo_loss']:.4f}, nll {t['nll']:.4f}, reward "
                   f"acc {t['reward_acc']:.3f}, margin {t['reward_margin']:.4f}, lr {lr:.2e}, grad norm "
                   f"{lifecycle.grad_norm(norm):.3f}, {dt * 1000 / (iter_num - last_log):.0f} ms/iter, {tok_s:,.0f} tok/s", flush=True)
            if master:
                log({"type": "train", "iter": iter_num, **t, "lr": lr, "grad_norm": lifecycle.grad_norm(norm), "tok_per_s": tok_s})
            sums.zero_()
            t0, tokens_seen, last_log = time.time(), 0, iter_num
        if eval_due:
            t_eval = time.time()
            m = evaluate()
            improved = m["dpo_loss"] < best_val_loss  # the preference loss: what "best" means for every loss_type
            best_val_loss = min(best_val_loss, m["dpo_loss"])
            if improved or always_save_checkpoint:
                save(ckpt_name)
                saved_at = iter_num
            t0 += time.time() - t_eval
        if stopping:
            if saved_at != iter_num:  # a run that keeps its best model in ckpt_name saves this state beside it
                save(ckpt_name if always_save_checkpoint else checkpoint.last_name(ckpt_name))
            lifecycle.stop_exit(stopping, rt, sys.argv, out_dir)

    # ------------------------------------------------------------------------------------------
    # summary
    if master:
        evals = [r for r in logs.read_jsonl(log_path) if r.get("type") == "eval"]  # all legs of the run
        a, b = (evals[0], evals[-1]) if evals else (None, None)
        held_out = (f"held-out reward acc {a['val_reward_acc']:.3f} -> {b['val_reward_acc']:.3f}, dpo loss "
                    f"{a['val_dpo_loss']:.4f} -> {b['val_dpo_loss']:.4f}, nll {a['val_nll']:.4f} -> "
                    f"{b['val_nll']:.4f} (iterations {a['iter']:,} -> {b['iter']:,}); " if evals else "")
        total = time.time() - t_start
        print0(f"done: {iter_num - start_iter} iterations in {total:.1f} s; {held_out}peak memory {lifecycle.peak_memory(rt)}")
        log({"type": "summary", "iter": iter_num, "best_val_loss": best_val_loss, "total_s": total})
    lifecycle.end_run(rt, wandb_run)
