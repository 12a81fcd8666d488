"""
What attention heads do, as scores: previous-token and induction scores (Olsson et al. 2022, "In-context Learning
and Induction Heads", arXiv:2209.11895), entropy and first-token sink, and the repeated-random-tokens probe that
finds induction heads. attention_viz.py shows them for a checkpoint; train.py --track_heads=True logs the best
of each layer at every evaluation, with the in-context loss, to watch the heads form.
"""

import os
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from lib.tokens import read_tokens, token_files


@torch.no_grad()
def attention_maps(model, idx: torch.Tensor) -> torch.Tensor:
    """The model's own attention probabilities for token ids idx (B, T): (n_layer, B, nh, T, T) float32 on the
    CPU. Run it under the autocast context of the chosen dtype, if any."""
    _, _, attns = model(idx.to(next(model.parameters()).device), return_attn=True)
    return torch.stack([a.float().cpu() for a in attns])


def head_stats(att: torch.Tensor) -> dict:
    """att (..., T, T) -> {entropy, sink, prev}, each (...), averaged over the query positions 1..T-1
    (position 0 can only attend to itself). entropy in nats: uniform attention at position t gives log(t+1)."""
    p = att[..., 1:, :]  # (..., T-1, T)
    entropy = -torch.special.xlogy(p, p).sum(-1).mean(-1)  # xlogy: 0 log 0 = 0
    # attention to the first token, an "attention sink" (Xiao et al. 2023, arXiv:2309.17453, section 3.1)
    sink = p[..., 0].mean(-1)
    prev = torch.diagonal(att, offset=-1, dim1=-2, dim2=-1).mean(-1)  # weight of token t on token t-1
    return {"entropy": entropy, "sink": sink, "prev": prev}


def induction_score(att: torch.Tensor, start: int, L: int) -> torch.Tensor:
    """att (..., T, T) on `start` prefix tokens, then L random tokens r, then r again -> (...): the mean
    attention from each token of the second copy to the token that followed its first occurrence, the
    "prefix matching" score of induction heads (Olsson et al. 2022, arXiv:2209.11895, section 2)."""
    q = torch.arange(start + L, start + 2 * L)  # second-copy positions
    return att[..., q, q - L + 1].mean(-1)  # the first occurrence is at q - L; its successor at q - L + 1


def repeated_random_tokens(n_vocab: int, eot, block_size: int, L: int, batch: int, seed: int,
                           ids: Optional[list] = None):
    """(batch, start + 2L) ids: [<|endoftext|> where the vocabulary has one] + r + r, r drawn without
    replacement so that every token of r occurs once in it, from `ids` (e.g. the ids that occur in the training
    data: a token the model never saw has an untrained embedding, and no head can match it) or else from the
    whole vocabulary. Returns (ids, start, L) with L capped to fit."""
    start = 0 if eot is None else 1
    pool = torch.tensor(sorted(set(range(n_vocab) if ids is None else ids) - {eot}), dtype=torch.long)
    L = min(L, (block_size - start) // 2, len(pool))  # <|endoftext|> is never drawn into r
    if L < 2:
        raise ValueError(f"the induction sequence needs L >= 2 tokens, got L={L} (block_size={block_size}, "
                         f"{len(pool)} ids to draw from); raise --induction_len")
    g = torch.Generator().manual_seed(seed)
    r = torch.stack([pool[torch.randperm(len(pool), generator=g)[:L]] for _ in range(batch)])  # (batch, L)
    prefix = torch.full((batch, start), eot if eot is not None else 0, dtype=torch.long)
    return torch.cat([prefix, r, r], dim=1), start, L


def data_token_ids(data_dir: str, limit: int = 20_000_000) -> list:
    """The token ids that occur in the train split of data_dir (its first `limit` tokens: a GPT-2 corpus of
    billions of tokens has met nearly every id it will by then). np.bincount over 20M uint16 takes ~0.1 s."""
    seen = np.zeros(65536, dtype=bool)
    left = limit
    for path in token_files(data_dir, "train"):
        tokens = read_tokens(path)[:left]
        seen[:1 + int(tokens.max(initial=0))] |= np.bincount(tokens, minlength=1) > 0
        left -= len(tokens)
        if left <= 0:
            break
    return np.flatnonzero(seen).tolist()


def flag_heads(scores: torch.Tensor, threshold: float) -> list:
    """scores (n_layer, nh) -> [(layer, head, score)] at or above threshold, highest first."""
    hits = [(l, h, float(scores[l, h])) for l in range(scores.size(0)) for h in range(scores.size(1))
            if scores[l, h] >= threshold]
    return sorted(hits, key=lambda x: -x[2])


@torch.no_grad()
def token_losses(model, text: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """text (B, T) -> (B, T) float32 on the CPU: column k is the loss of token k given tokens 0..k-1 (column 0, with
    no context, is NaN). Forwarded `chunk` windows at a time: a GPT-2's logits for 8 x 1024 tokens are 1.6 GB."""
    out = []
    for x in text.split(chunk):
        logits, _ = model(x[:, :-1].to(next(model.parameters()).device))  # (b, T-1, vocab): predicts tokens 1..T-1
        loss = F.cross_entropy(logits.float().transpose(1, 2), x[:, 1:].to(logits.device), reduction="none")
        out.append(torch.cat([torch.full_like(loss[:, :1], float("nan")), loss], 1).cpu())  # (b, T)
    return torch.cat(out)


def in_context_loss(losses: torch.Tensor) -> float:
    """token_losses' (B, T) -> the mean loss of the last eighth of the positions, T*7/8..T-1, minus that of the
    positions T/16..T/8-1 (224..255 minus 16..31 for T = 256): Olsson et al.'s "in-context learning score", the
    500th token's loss minus the 50th's (arXiv:2209.11895, section 2), scaled to a short context. Negative: later
    tokens are predicted better, from what came earlier in the window."""
    T = losses.size(1)
    return float(losses[:, T * 7 // 8:].mean() - losses[:, T // 16:T // 8].mean())


def layer_scores(model, text: torch.Tensor, probe: tuple) -> dict:
    """The best head of each layer: {"prev_token": [n_layer], "induction": [n_layer], "in_context_loss"}. text (B, T):
    ids of real text (from the validation split) for the in-context loss and, on its first 8 windows, the
    previous-token score; probe: repeated_random_tokens' (ids, start, L) for the induction score. Run it under
    autocast like a forward pass; the model is put in eval mode and back."""
    was_training = model.training
    model.eval()
    prev = head_stats(attention_maps(model, text[:8]))["prev"].mean(1)  # (n_layer, nh), mean over the batch
    ids, start, L = probe
    ind = induction_score(attention_maps(model, ids), start, L).mean(1)  # (n_layer, nh)
    icl = in_context_loss(token_losses(model, text))
    model.train(was_training)
    return {"prev_token": [round(float(v), 4) for v in prev.max(1).values],
            "induction": [round(float(v), 4) for v in ind.max(1).values], "in_context_loss": round(icl, 4)}


def plot_heads(path: str, records: list, title: str = ""):
    """Two panels from a log's records: the loss (train log lines and evaluations) and, per layer, the best
    previous-token and induction scores of the "heads" records with their in-context loss, against the iteration.
    Written atomically."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss", "train (log lines)"), ("val_loss", "val")):
        pts = [(r["iter"], r[key]) for r in records if r.get(key) is not None]
        if pts:
            ax1.plot(*zip(*pts), label=label)
    heads = [r for r in records if r["type"] == "heads"]
    for key, style in (("prev_token", "--"), ("induction", "-")):
        for layer in range(len(heads[0][key]) if heads else 0):
            ax2.plot([r["iter"] for r in heads], [r[key][layer] for r in heads], style, marker="o", markersize=3,
                     color=f"C{layer}", label=f"layer {layer} {key.replace('_', '-')}")  # a colour per layer
    icl = [(r["iter"], r["in_context_loss"]) for r in heads if r.get("in_context_loss") is not None]
    if icl:  # on its own axis, right of the scores: a phase change shows as a jump there and a drop here
        ax3 = ax2.twinx()
        ax3.plot(*zip(*icl), ":", color="k", label="in-context loss (right axis)")
        ax3.set_ylabel("in-context loss (nats)")
        ax3.legend(fontsize=8, loc="upper right")
    ax1.set_ylabel("loss")
    ax2.set_ylabel("best head's score")
    ax2.set_ylim(0, 1)
    for ax in (ax1, ax2):
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center left" if ax is ax2 else "best")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
