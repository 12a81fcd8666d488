"""
Align a language model with human preferences: Direct Preference Optimization and close relatives.

DPO (Rafailov et al. 2023, arXiv:2305.18290) trains the policy on preference pairs (prompt, chosen, rejected)
against a frozen reference model, by default the starting checkpoint (usually an SFT model from finetune.py):
no reward model, no sampling. loss_type='ipo' (Azar et al. 2023, arXiv:2310.12036) and loss_type='cdpo'
(conservative DPO, label smoothing for noisy labels; Mitchell 2023) change only the loss.

    python align.py config/align_hh.py --init_from=out-sft                       # Anthropic/hh-rlhf, from the Hub
    python align.py --init_from=out-sft --dataset=pairs.jsonl --val_split=val.jsonl --device=cpu --compile=False
    torchrun --standalone --nproc_per_node=8 align.py config/align_hh.py --init_from=out-sft
    python align.py --init_from=resume --out_dir=out-align-hh                    # continue a run exactly

Records, in three layouts: {"chosen": conversation, "rejected": conversation} (hh-rlhf's, split at the last
"\\n\\nAssistant:"); {"prompt": ..., "chosen": response, "rejected": response}; or {"instruction": ...,
"input": ... (optional), "chosen": ..., "rejected": ...} with --prompt_template=alpaca (finetune.py's template).
Writes out_dir/ckpt.pt (kind 'dpo': every script that takes a model reads it), out_dir/log.jsonl, out_dir/align.png.
"""

import copy
import dataclasses
import hashlib
import math
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from common import (MAY_CHANGE, append_jsonl, catch_signals, check_schedule, gather_objects, init_wandb, last_name,
                    load_model, lr_at, make_checkpoint, model_from_checkpoint, pad_right, plot_curves, print0,
                    progress, read_jsonl, restore_rng, resume_run, resume_state, rng_state, save_checkpoint,
                    setup_runtime, start_log, stop_exit, tokenizer_for)
from configurator import configure
from dataloader import load_records, local_paths, report_bad
from finetune import Finetuned, encode_pair, format_prompt

_ASSISTANT = "\n\nAssistant:"  # hh-rlhf's turn marker (underscore: not a config key)
_LOSS_TYPES = ("dpo", "cdpo", "ipo")


# ----------------------------------------------------------------------------------------------
# data: records -> (prompt, chosen, rejected) strings -> token ids


def split_hh(text: str, where: str) -> tuple:
    """An hh-rlhf conversation -> (prompt up to and including the last '\\n\\nAssistant:', final response)."""
    k = text.rfind(_ASSISTANT)
    if k < 0:
        raise ValueError(f"{where}: no {_ASSISTANT!r} turn in {text[:300]!r}. hh-rlhf records are whole "
                         f"conversations ending in an Assistant turn; records with a separate prompt need a "
                         f"'prompt' field")
    k += len(_ASSISTANT)
    return text[:k], text[k:]


def preference_triples(rows: list, source: str, template: str = "none", drop_mismatched: bool = False,
                       skip_bad: bool = False):
    """Records [(where, {field: value})] (dataloader.load_records' rows) of one of three layouts -> ([(where,
    prompt, chosen, rejected)], number of identical pairs dropped, number of mismatched pairs dropped).
    Layouts: {'chosen', 'rejected'} (whole hh-rlhf conversations), {'prompt', 'chosen', 'rejected'}, and
    {'instruction', 'input' (optional), 'chosen', 'rejected'} (Raschka's DPO chapter, rasbt/LLMs-from-scratch
    ch07/04_preference-tuning-with-dpo), whose instruction and input become one prompt through
    finetune.format_prompt, so template='alpaca' is required there. A record that does not fit is a bad record,
    named 'FILE:LINE' (dataloader.report_bad: one error listing them, or skipped with skip_bad)."""
    fields = set().union(*(rec for _, rec in rows))
    layout = [k for k in ("prompt", "instruction") if k in fields] or ["hh"]
    if len(layout) > 1:
        raise ValueError(f"{source}: records have 'prompt' and 'instruction' fields, so which one is the prompt is "
                         f"ambiguous; keep one of them")
    layout = layout[0]
    if template == "alpaca" and layout == "hh":
        raise ValueError(f"{source}: prompt_template='alpaca' needs records with a 'prompt' or 'instruction' field; "
                         f"hh-rlhf conversations carry their own Human/Assistant turns (use --prompt_template=none)")
    if template == "none" and layout == "instruction":
        raise ValueError(f"{source}: records with 'instruction' (and 'input') fields need a template that joins them "
                         f"into one prompt: --prompt_template=alpaca (finetune.py's, for models it fine-tuned); or "
                         f"give each record a ready 'prompt' field instead")
    need = ("chosen", "rejected") + ((layout,) if layout != "hh" else ())
    triples, bad, identical, mismatched = [], [], 0, 0
    for where, rec in rows:
        missing = [f for f in need if rec.get(f) is None]
        if missing:
            bad.append(f"{where}: no field {missing[0]!r} (the record's fields are {sorted(rec)}); every record of "
                       f"{source} needs {list(need)}")
            continue
        v = {f: rec[f] for f in need}
        if layout == "instruction":
            v["input"] = rec.get("input") or ""  # optional: missing, null and "" are no input
        wrong = next((f for f in v if not isinstance(v[f], str)), None)
        if wrong:
            bad.append(f"{where}: field {wrong!r} must be a string, got {type(v[wrong]).__name__} {v[wrong]!r:.200}")
            continue
        c, r = v["chosen"], v["rejected"]
        if layout == "hh":
            try:
                p, c = split_hh(c, f"{where}: field 'chosen'")
                p_r, r = split_hh(r, f"{where}: field 'rejected'")
            except ValueError as e:
                bad.append(str(e))
                continue
            if p != p_r:
                if not drop_mismatched:
                    at = next((j for j, (x, y) in enumerate(zip(p, p_r)) if x != y), min(len(p), len(p_r)))
                    bad.append(f"{where}: 'chosen' and 'rejected' differ before their last {_ASSISTANT!r} turn (at "
                               f"character {at}: {p[at:at + 60]!r} vs {p_r[at:at + 60]!r}), so they do not answer "
                               f"the same prompt. Fix the record, or drop such pairs with --drop_mismatched=True")
                mismatched += drop_mismatched
                continue
        elif not v[layout].strip():
            bad.append(f"{where}: field {layout!r} is empty; every pair needs a prompt to condition on")
            continue
        else:
            p = v[layout] if template == "none" else format_prompt(v[layout], v.get("input", ""))
        if c == r:
            identical += 1  # no preference to learn from
            continue
        triples.append((where, p, c, r))
    report_bad(bad, skip_bad, source)
    return triples, identical, mismatched


def encode_triples(tok, triples: list, block_size: int, source: str, verbose: bool = True, skip_bad: bool = False):
    """[(where, prompt, chosen, rejected)] -> ([(chosen ids, rejected ids, prompt tokens k)], truncated, empty).

    Each side is finetune.encode_pair's prompt + response (+ <|endoftext|>), cut prompt-first to block_size + 1
    ids; the first k ids of both sides are the same prompt tokens, the rest is the response. A record that does
    not tokenize (a character outside a char-level vocabulary) is a bad record."""
    id_dtype = np.uint16 if tok.n_vocab <= 2 ** 16 else np.int32
    pairs, bad, truncated, empty = [], [], 0, 0
    for where, p, c, r in progress(triples, f"tokenizing {source}", unit="pairs",
                                   disable=not verbose or len(triples) < 10000):  # under a second: no display
        try:
            xc, yc, tc = encode_pair(tok, p, c, block_size, truncate="prompt")
            xr, yr, tr = encode_pair(tok, p, r, block_size, truncate="prompt")
        except ValueError as e:
            bad.append(f"{where}: {e}")
            continue
        nc, nr = sum(t != -1 for t in yc), sum(t != -1 for t in yr)  # response tokens that are targets
        if nc == 0 or nr == 0:
            empty += 1  # e.g. an empty response and a tokenizer without <|endoftext|>: nothing to score
            continue
        ids_c, ids_r = xc + yc[-1:], xr + yr[-1:]  # encode_pair's x + the last target = the kept ids
        kc, kr = len(ids_c) - nc, len(ids_r) - nr  # prompt tokens kept on each side
        # encode_pair cut each side's prompt to fit its own response; keep the same (shorter) prompt suffix on
        # both sides so that the two responses are scored in the same context
        k = min(kc, kr)
        pairs.append((np.array(ids_c[kc - k:], dtype=id_dtype), np.array(ids_r[kr - k:], dtype=id_dtype), k))
        truncated += bool(tc or tr)
    report_bad(bad, skip_bad, source)
    return pairs, truncated, empty


def collate(pairs: list, idx, device: str):
    """Pairs idx -> x, y (2B, T): the B chosen sequences then the B rejected ones, right-padded; y is -1 on
    prompt and padding positions (as encode_pair makes it), so only response tokens are scored."""
    seqs = [(pairs[i][0], pairs[i][2]) for i in idx] + [(pairs[i][1], pairs[i][2]) for i in idx]
    # the target of position t is token t + 1: responses start at k, so targets before k - 1 are prompt
    x, y = pad_right([ids[:-1] for ids, _ in seqs],
                     [np.concatenate([np.full(k - 1, -1), ids[k:]]) for ids, k in seqs], pad_id=0)
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def fingerprint(pairs: list) -> str:
    """sha256 of the tokenized pairs: a resumed run checks that it trains on the same data."""
    h = hashlib.sha256()
    for ids_c, ids_r, k in pairs:
        h.update(ids_c.tobytes() + b"|" + ids_r.tobytes() + b"|" + str(k).encode())
    return h.hexdigest()

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


def preference_metrics(policy, ref, ntok, loss_type: str, beta: float, label_smoothing: float) -> dict:
    """Metrics over pairs from (N, 2) log-probs [chosen, rejected] of policy and reference and the (N, 2)
    response token counts. Reward accuracy counts ties (policy == reference, e.g. at step 0) as one half."""
    losses, cr, rr = preference_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], loss_type, beta,
                                     label_smoothing)
    m = cr - rr
    return {"loss": losses.mean().item(), "reward_acc": ((m > 0).float() + 0.5 * (m == 0).float()).mean().item(),
            "reward_margin": m.mean().item(), "reward_chosen": cr.mean().item(), "reward_rejected": rr.mean().item(),
            "logp_chosen": policy[:, 0].mean().item(), "logp_rejected": policy[:, 1].mean().item(),
            "logp_margin": (policy[:, 0] - policy[:, 1]).mean().item(),
            # mean log(pi / ref) per response token, chosen and rejected together: how far the policy moved
            "logp_drift": ((policy - ref).sum() / ntok.sum()).item()}


@torch.no_grad()
def pair_logps(model, pairs: list, batch_size: int, rt, desc: str = "") -> torch.Tensor:
    """Response log-probs of every pair under model in eval mode -> (N, 2) float32 on the CPU, columns chosen
    and rejected. Length-sorted batches keep padding small; under DDP each rank does every world_size-th."""
    training = model.training
    model.eval()
    out = torch.zeros(len(pairs), 2)
    order = sorted(range(len(pairs)), key=lambda i: -max(len(pairs[i][0]), len(pairs[i][1])))
    order = order[rt.ddp_rank::rt.ddp_world_size]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in progress(batches, desc, unit="batches", disable=not desc, leave=False):
        lp = sequence_logps(model, *collate(pairs, idx, rt.device), rt).cpu()  # (2B,)
        out[idx] = torch.stack([lp[:len(idx)], lp[len(idx):]], dim=1)
    if rt.ddp:  # every rank filled its own rows with the rest zero: a sum gathers them
        out = out.to(rt.device)
        torch.distributed.all_reduce(out)
        out = out.cpu()
    model.train(training)
    return out


def response_tokens(pairs: list) -> torch.Tensor:
    return torch.tensor([[len(c) - k, len(r) - k] for c, r, k in pairs], dtype=torch.float32)  # (N, 2)

# ----------------------------------------------------------------------------------------------
# defaults (python align.py config/align_hh.py --key=value ...)
# I/O
out_dir = "out-align"
init_from = "gpt2"  # 'resume' (continue the run in out_dir), a GPT-2 name, or any model checkpoint (e.g. 'out-sft')
ckpt_name = "ckpt.pt"
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
label_smoothing = 0.0  # cdpo: assumed probability that a preference label is flipped, in (0, 0.5)
rpo_alpha = 0.0  # > 0: plus rpo_alpha x the chosen response's NLL per token (RPO: Pang et al. 2024, arXiv:2404.19733;
# TRL's rpo_alpha), which keeps DPO from lowering the likelihood of the chosen answers along with the rejected ones
precompute_ref = False  # True: reference log-probs computed once up front; no reference model held in memory
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
seed = 1337

# ----------------------------------------------------------------------------------------------
if __name__ == "__main__":  # tests import the helpers above; the run is below
    explicit = set()  # the keys set by config files or flags: what a resumed run may change
    config = configure(globals(), sys.argv[1:], explicit=explicit)
    resume = config["init_from"] == "resume"
    ckpt = None
    if resume:  # the saved run's config is the base: --init_from=resume --out_dir=X alone continues X
        # learning_rate may change too: a leg that diverged continues from its last good checkpoint with a lower one
        config, ckpt = resume_run(config, explicit, ("dpo",), "align.py", MAY_CHANGE + ("learning_rate",))
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
    if loss_type != "cdpo" and label_smoothing != 0:
        raise ValueError(f"label_smoothing={label_smoothing!r} only applies to loss_type='cdpo' (got "
                         f"loss_type={loss_type!r}); use --loss_type=cdpo or --label_smoothing=0")
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
        model, tok = model_from_checkpoint(ckpt, dropout).to(rt.device), tokenizer_for(ckpt)
        ref_from = ckpt["ref_init_from"]
    else:
        print0(f"loading the starting model from {init_from!r}")
        model, ckpt, tok = load_model(init_from, out_dir, rt.device, dropout, ckpt_name, for_training=True)
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
        check_schedule(learning_rate, warmup_iters, iters, iters, min_lr, decay=lr_schedule == "cosine")

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
            ref_model = load_model(ref_from, device=rt.device, ckpt_name=ckpt_name)[0]
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
    # optimizer, the state of a resumed run, compile, DDP
    optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), rt.device_type)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == "float16")  # fp16 only: loss scaling
    iter_num, best_val_loss = 0, float("inf")
    if resume:
        state = ckpt["resume"]
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):  # empty unless the run used float16
            scaler.load_state_dict(state["scaler"])
        iter_num, best_val_loss = state["iter_num"], state["best"]["value"]
        restore_rng(state["rng"], rt)
        if ckpt.get("data_fingerprint") != data_hash:
            print0("WARNING: the training data differ from the checkpoint's run; resuming on the new data, so the "
                   "run does not continue exactly (restore the data files the run started with to continue it)")
    ckpt = state = None  # free the optimizer state and reference log-probs held twice
    train_model = Finetuned(model)  # the same weights; logits at the response tokens only
    if compile:
        print0("compiling the model... (takes a minute)")
        train_model = torch.compile(train_model)
    if rt.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_model = DDP(train_model, device_ids=[rt.ddp_local_rank] if rt.device_type == "cuda" else None)
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
        start_log(out_dir, iter_num if resume else None)  # a resume logs again what came after its checkpoint
    wandb_run = init_wandb(wandb_project, wandb_run_name, config, wandb_mode, out_dir) if wandb_log and master else None

    def evaluate() -> dict:
        """Held-out metrics (every rank calls this: pair_logps shares the pairs out), logged and plotted."""
        pol = pair_logps(model, val, batch_size, rt, "eval" if sys.stderr.isatty() else "")  # no bar in a log
        ref = ref_logps["val"] if ref_logps is not None else pair_logps(ref_model, val, batch_size, rt)
        m = preference_metrics(pol, ref, val_tokens, loss_type, beta, label_smoothing)
        if not math.isfinite(m["loss"]):
            stop_non_finite("held-out loss", m["loss"])
        print0(f"eval iter {iter_num}: val loss {m['loss']:.4f}, reward acc {m['reward_acc']:.3f}, margin "
               f"{m['reward_margin']:.4f}, chosen {m['reward_chosen']:.4f}, rejected {m['reward_rejected']:.4f}, "
               f"logp margin {m['logp_margin']:.3f}, drift {m['logp_drift']:+.4f}/token")
        if master:
            append_jsonl(log_path, {"iter": iter_num, "split": "val", **m})
            recs = read_jsonl(log_path)  # the whole run, resumed legs included
            curves = {c: tuple(zip(*[(r["iter"], r[k]) for r in recs if r["split"] == split])) or ([], [])
                      for c, split, k in (("train loss", "train", "loss"), ("val loss", "val", "loss"),
                                             ("val reward accuracy", "val", "reward_acc"))}
            plot_curves(os.path.join(out_dir, "align.png"), curves, f"{loss_type} (beta={beta})",
                        ylabel="loss / accuracy")
            if wandb_run:
                wandb_run.log({f"val/{k}": v for k, v in m.items()}, step=iter_num)
        return m

    def save(file: str, reason: str):
        """Write out_dir/file atomically with everything an exact resume needs (a collective under DDP)."""
        global saved_at
        saved_at = iter_num
        rngs = gather_objects(rng_state(), rt)  # every rank's dropout stream
        if master:
            run_state = resume_state(iter_num, "dpo_val_loss", best_val_loss, optimizer.state_dict(),
                                     scaler.state_dict(), rngs)
            save_checkpoint(make_checkpoint("dpo", model.state_dict(), dataclasses.asdict(model.config), config,
                                            tok.meta(), run_state, ref_init_from=ref_from, ref_logps=ref_logps,
                                            data_fingerprint=data_hash), os.path.join(out_dir, file))
            print0(f"saved {os.path.join(out_dir, file)} (iteration {iter_num:,}, {reason})")

    def stop_non_finite(what: str, value: float):
        """Exit at once: saving weights that produce nan/inf would only destroy the last good checkpoint."""
        sys.exit(f"ERROR: the {what} became {value} at iteration {iter_num:,}: the weights are broken, so nothing was "
                 f"saved. Continue from the last good checkpoint in {out_dir!r} (if any) with a lower learning rate: "
                 f"python align.py --init_from=resume --out_dir={out_dir} --learning_rate={learning_rate / 10:g}")

    # ------------------------------------------------------------------------------------------
    # training loop: one optimizer step per iteration; evaluate (and save) every eval_interval steps
    stop = catch_signals()  # SIGINT/SIGTERM: finish the step, save, print the resume command
    start_iter, saved_at, t_start = iter_num, iter_num, time.time()
    if iter_num == 0 or eval_only:
        m = evaluate()  # the baseline: policy == reference, loss log 2 and reward accuracy 0.5 exactly
        best_val_loss = min(best_val_loss, m["loss"])
    if iter_num >= iters and not eval_only:
        print0(f"nothing to do: the run is at iteration {iter_num:,} and max_iters is {iters:,}")
    t0, tokens_seen, last_log = time.time(), 0, iter_num  # throughput since the last log line, evals excluded
    while iter_num < iters and not eval_only:
        lr = lr_at(iter_num, learning_rate, warmup_iters, iters, min_lr, decay=lr_schedule == "cosine")
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        sums = torch.zeros(2, device=rt.device)  # loss, reward accuracy over the step's micro-batches
        for micro in range(accum):
            idx = batch_indices(iter_num, micro)
            x, y = collate(train, idx, rt.device)
            tokens_seen += sum(len(train[i][0]) + len(train[i][1]) - 2 for i in idx)  # both sides, no padding
            if rt.ddp:  # all-reduce gradients on the last micro-step only
                train_model.require_backward_grad_sync = micro == accum - 1
            lp = sequence_logps(train_model, x, y, rt)  # (2B,) chosen rows first
            pc, pr = lp[:len(idx)], lp[len(idx):]
            if ref_logps is not None:
                rc, rr = ref_logps["train"][idx].to(rt.device).unbind(1)
            else:
                with torch.no_grad():
                    rc, rr = sequence_logps(ref_model, x, y, rt).split(len(idx))
            losses, cr, rrw = preference_loss(pc, pr, rc, rr, loss_type, beta, label_smoothing)
            if rpo_alpha:
                losses = losses - rpo_alpha * pc / (y[:len(idx)] != -1).sum(1).clamp(min=1)
            scaler.scale(losses.mean() / accum).backward()
            acc = ((cr > rrw).float() + 0.5 * (cr == rrw).float()).mean()  # ties count one half
            sums += torch.stack([losses.detach().mean(), acc]) / accum
        if grad_clip:
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip).item()
        else:
            norm = float("nan")
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        if rt.ddp:  # log the mean over all ranks' pairs
            torch.distributed.all_reduce(sums)
            sums /= world
        loss, acc = sums.tolist()
        if not math.isfinite(loss):
            stop_non_finite("training loss", loss)
        if iter_num % log_interval == 0 or iter_num == iters:
            dt = time.time() - t0
            tok_s = tokens_seen * world / dt  # tokens fed to the policy (prompt + response, both sides)
            print0(f"iter {iter_num}: loss {loss:.4f}, reward acc {acc:.3f}, lr {lr:.2e}, grad norm {norm:.3f}, "
                   f"{dt * 1000 / (iter_num - last_log):.0f} ms/iter, {tok_s:,.0f} tok/s", flush=True)
            if master:
                append_jsonl(log_path, {"iter": iter_num, "split": "train", "loss": loss, "reward_acc": acc,
                                        "lr": lr, "grad_norm": norm, "tok_per_s": tok_s})
                if wandb_run:
                    wandb_run.log({"train/loss": loss, "train/reward_acc": acc, "lr": lr, "grad_norm": norm,
                                   "tok_per_s": tok_s}, step=iter_num)
            t0, tokens_seen, last_log = time.time(), 0, iter_num
        stopping = stop.agreed(rt)  # the same on every rank
        if iter_num % eval_interval == 0 or iter_num == iters:
            t_eval = time.time()
            m = evaluate()
            improved = m["loss"] < best_val_loss
            best_val_loss = min(best_val_loss, m["loss"])
            if improved or always_save_checkpoint:
                save(ckpt_name, "best held-out loss" if improved else "always_save_checkpoint")
            t0 += time.time() - t_eval
        if stopping:
            if saved_at != iter_num:  # a run that keeps its best model in ckpt_name saves this state beside it
                save(ckpt_name if always_save_checkpoint else last_name(ckpt_name), f"{signal.Signals(stopping).name}")
            if wandb_run:
                wandb_run.finish()
            stop_exit(stopping, rt, sys.argv, out_dir)

    # ------------------------------------------------------------------------------------------
    # summary
    if master:
        if rt.device_type == "cuda":
            peak = f"{torch.cuda.max_memory_allocated() / 2 ** 20:,.0f} MiB CUDA allocated"
        else:
            import resource  # Unix; ru_maxrss is in KiB on Linux (bytes on macOS)
            peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10:,.0f} MiB peak RSS"
        evals = [r for r in read_jsonl(log_path) if r["split"] == "val"]  # the whole run, resumed legs included
        a, b = (evals[0], evals[-1]) if evals else (None, None)
        held_out = (f"held-out reward acc {a['reward_acc']:.3f} -> {b['reward_acc']:.3f}, loss {a['loss']:.4f} -> "
                    f"{b['loss']:.4f} (iterations {a['iter']:,} -> {b['iter']:,}); " if evals else "")
        print0(f"done: {iter_num - start_iter} iterations in {time.time() - t_start:.1f} s; {held_out}peak memory "
               f"{peak}")
    if wandb_run:
        wandb_run.finish()
    if rt.ddp:
        torch.distributed.destroy_process_group()
