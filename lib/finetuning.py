"""
What finetune.py and align.py share: the prompt template, prompt + response encoded with the loss mask,
right-padded batches, and the GPT with outputs only where there are labels (the LM head at response tokens, or a
classification head at the last token), computed by model.py's own trunk.
"""

import os

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

# Alpaca's prompt layout (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT)
PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
TEMPLATES = ("alpaca", "none")  # 'none': the prompt as it is (records formatted already), input after a blank line
# what a prompt formatted already tends to contain: Alpaca's, hh-rlhf's, ChatML's and Llama-2's turn markers
TEMPLATE_MARKERS = ("### Response:", "### Instruction:", "\n\nAssistant:", "<|im_start|>", "[/INST]")


def format_prompt(instruction: str, input: str = "", template: str = "alpaca") -> str:
    """The prompt for an instruction (and optional input) in a template; the response follows it directly."""
    if template not in TEMPLATES:
        raise ValueError(f"prompt_template must be one of {TEMPLATES}, got {template!r}")
    if template == "none":
        return f"{instruction}\n\n{input}" if input else instruction
    if input:
        return PROMPT_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def chat_prompt(turns: list, template: str = "alpaca") -> str:
    """A conversation [(message, reply), ..., (message, '')] as one prompt in a template: each earlier turn as a
    finished instruction and response, the last message's response to come. Alpaca's header is written once."""
    if template not in TEMPLATES:
        raise ValueError(f"prompt_template must be one of {TEMPLATES}, got {template!r}")
    if template == "none":
        return "".join(f"{m}\n\n{r}\n\n" for m, r in turns[:-1]) + turns[-1][0]
    header = PROMPT_NO_INPUT[:PROMPT_NO_INPUT.index("### Instruction:")]
    turn = PROMPT_NO_INPUT[len(header):]  # '### Instruction:\n{instruction}\n\n### Response:\n'
    return header + "".join(turn.format(instruction=m) + f"{r}\n\n" for m, r in turns[:-1]) + \
        turn.format(instruction=turns[-1][0])


def template_marker(text: str) -> str:
    """The first turn marker of a known template in text ('' if none): a sign that it is formatted already."""
    return next((m for m in TEMPLATE_MARKERS if m in text), "")


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
def answer(model, tok, instruction: str, input: str = "", max_new_tokens: int = 128, template: str = "alpaca") -> str:
    """The model's greedy response to an instruction, cut at <|endoftext|> (call model.eval() first)."""
    ids = tok.encode_ordinary(format_prompt(instruction, input, template))
    device = next(model.parameters()).device
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature=0.0,
                         stop_token=tok.eot_token)
    new = out[0, len(ids):].tolist()
    if tok.eot_token in new:
        new = new[:new.index(tok.eot_token)]
    return tok.decode(new).strip()


def pad_right(xs: list, ys: list, pad_id: int):
    """Sequences of token ids and their labels (same lengths) -> x, y LongTensors (B, T), right-padded: x with
    pad_id, y with -1 (ignored by the loss). With causal attention, padding after a token never changes that
    token's output, so padded and unpadded rows give the same logits where it matters."""
    T = max(len(s) for s in xs)
    x = torch.full((len(xs), T), pad_id, dtype=torch.long)  # (B, T)
    y = torch.full((len(xs), T), -1, dtype=torch.long)  # (B, T)
    for r, (ids, labels) in enumerate(zip(xs, ys)):
        assert len(ids) == len(labels), f"row {r}: {len(ids)} ids but {len(labels)} labels"
        x[r, :len(ids)] = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        y[r, :len(labels)] = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    return x, y


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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"):
        """idx (B, T) ids, targets (B, T) labels, -1 where none -> (logits (N, vocab or classes), loss: the
        mean or the sum over the N labelled positions, or reduction='none': each one's (N,)), in row-major order."""
        h, _ = self.gpt(idx, return_hidden=True)  # (B, T, C) after ln_f: model.py's own trunk
        keep = targets.reshape(-1) != -1  # (B*T,)
        x = h.reshape(-1, h.size(-1))[keep]  # (N, C) the labelled positions only
        logits = (self.gpt.lm_head if self.head is None else self.head)(x)  # (N, vocab or classes)
        loss = F.cross_entropy(logits.float(), targets.reshape(-1)[keep], reduction="none")  # (N,)
        if reduction == "none":
            return logits, loss
        return logits, loss.sum(dtype=torch.float64) if reduction == "sum" else loss.mean()  # a sum: exact


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


def class_metrics(confusion: torch.Tensor) -> dict:
    """Per-class precision, recall, F1 and support from confusion[true, predicted] counts, each a list in class
    order; a class never predicted (or never present) scores 0 there, as scikit-learn's zero_division=0."""
    c = confusion.double()
    tp, predicted, support = c.diag(), c.sum(0), c.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), 0.0)
    recall = torch.where(support > 0, tp / support.clamp(min=1), 0.0)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), 0.0)
    return dict(precision=precision.tolist(), recall=recall.tolist(), f1=f1.tolist(), support=support.long().tolist())


def class_report(confusion: torch.Tensor, names: list) -> str:
    """A table of per-class precision, recall, F1 and support with macro averages, then the confusion matrix:
    on an imbalanced set (e.g. 87% of one class) accuracy alone hides a class the model never finds."""
    m, w = class_metrics(confusion), max(12, *(len(n) for n in names))
    lines = [f"{'class':<{w}} precision    recall        f1   support"]
    for k, name in enumerate(names):
        lines.append(f"{name:<{w}} {m['precision'][k]:9.4f} {m['recall'][k]:9.4f} {m['f1'][k]:9.4f} "
                     f"{m['support'][k]:9,}")
    macro = [sum(m[key]) / len(names) for key in ("precision", "recall", "f1")]
    lines.append(f"{'macro avg':<{w}} {macro[0]:9.4f} {macro[1]:9.4f} {macro[2]:9.4f} {sum(m['support']):9,}")
    cw = max(9, *(len(n) + 1 for n in names))
    lines.append(f"confusion (rows: true class, columns: predicted)\n{'':<{w}}" + "".join(f"{n:>{cw}}" for n in names))
    lines += [f"{name:<{w}}" + "".join(f"{int(v):>{cw},}" for v in row) for name, row in zip(names, confusion.tolist())]
    return "\n".join(lines)


def plot_confusion(path: str, confusions: dict, names: list, title: str):
    """Confusion matrices {split: confusion} as PNG heatmaps side by side, counts written in, atomically."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    k = len(names)
    fig, axes = plt.subplots(1, len(confusions), figsize=((2 + 0.8 * k) * len(confusions), 1.5 + 0.8 * k),
                             squeeze=False)
    for ax, (split, c) in zip(axes[0], confusions.items()):
        ax.imshow(c.numpy(), cmap="Blues")
        for (i, j), v in np.ndenumerate(c.numpy()):
            ax.text(j, i, f"{v:,}", ha="center", va="center", color="white" if v > c.max() / 2 else "black")
        ax.set(xticks=range(k), yticks=range(k), xticklabels=names, yticklabels=names, xlabel="predicted",
               ylabel="true class", title=f"{split}: accuracy {c.diag().sum() / c.sum():.1%} of {int(c.sum()):,}")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
