"""
Scoring tokens with model.py's own trunk, the one implementation that eval.py (perplexity, LAMBADA, HellaSwag) and
quantize.py's report share: score_batch (log-probs of the last tokens of right-padded rows), sliding_windows and
perplexity (a long text in overlapping windows, every token scored once).
"""

import math

import numpy as np
import torch
from torch.nn import functional as F

from lib.finetuning import pad_right
from lib.progress import progress


@torch.no_grad()
def score_batch(model, rows: list, n_vocab: int, rt) -> list:
    """rows: [(ids, n)] token sequences whose last n tokens are scored given everything before them.
    Returns [(log-probs (n,) float64, greedy (n,) bool: the target was the argmax)]."""
    inputs = [ids[:-1] for ids, _ in rows]
    x, _ = pad_right(inputs, [[-1] * len(ids) for ids in inputs], pad_id=0)  # (B, T) right-padded with token 0
    counts = [n for _, n in rows]
    row = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(counts))  # (N,) row of each scored token
    pos = torch.cat([torch.arange(len(ids) - 1 - n, len(ids) - 1) for ids, n in rows])  # (N,) its input position
    targets = torch.as_tensor(np.concatenate([np.asarray(ids[-n:], dtype=np.int64) for ids, n in rows]))
    with rt.autocast():
        # padding only at the right end needs no attention mask: causal attention never lets a real position
        # see a later (pad) one, so a row's scores are the same alone or in any batch
        h, _ = model(x.to(rt.device), return_hidden=True)  # (B, T, C) final hidden states
    # the logits of the scored tokens in float32, also under bf16 autocast: close calls between endings stay exact
    h = h[row.to(h.device), pos.to(h.device)].float()  # (N, C) where the scored tokens are predicted
    # ids beyond the tokenizer's (GPT-2's 50257 in a 50304 table) are never text: normalise over real ids only,
    # computing only theirs where the head is a plain matrix (dense logits: ~15% faster than slicing all of them)
    head = model.lm_head
    vocab_rows = head.weight[:n_vocab] if type(head) is torch.nn.Linear and head.bias is None else None
    logp, greedy = [], []
    for k in range(0, len(h), 1024):  # at most 1024 x 50257 float32 logits (200 MB) at a time
        hk = h[k:k + 1024]
        lg = (F.linear(hk, vocab_rows) if vocab_rows is not None else head(hk)[:, :n_vocab]).float()  # (<=1024, V)
        tg = targets[k:k + 1024].to(lg.device)
        logp.append(-F.cross_entropy(lg, tg, reduction="none"))
        greedy.append(lg.argmax(dim=-1) == tg)
    logp, greedy = torch.cat(logp).double().cpu(), torch.cat(greedy).cpu()
    return list(zip(logp.split(counts), greedy.split(counts)))


def sliding_windows(n: int, window: int, stride: int) -> list:
    """Windows over n tokens for perplexity -> [(begin, end, n_new)]: tokens[begin:end] (at most window + 1:
    the model reads the first `window`) with the last n_new scored. Windows start every `stride` tokens and
    each scores only the tokens the previous ones did not, so every token but the first is scored exactly once,
    past the first window with at least window - stride + 1 tokens of context (Hugging Face's "Perplexity of
    fixed-length models" recipe). stride == window is plain chunking."""
    spans, done, begin = [], 0, 0  # done: index of the last token scored so far (token 0 never is)
    while done < n - 1:
        end = min(begin + window + 1, n)
        spans.append((begin, end, end - 1 - done))
        done, begin = end - 1, begin + stride
    return spans


def text_tokens(tokenizer, text: str) -> np.ndarray:
    """A text's ids after <|endoftext|> (when the tokenizer has one), so that its first token is scored too, as
    GPT-2 sees the start of a document."""
    return np.asarray([tokenizer.eot_token] * (tokenizer.eot_token is not None) + tokenizer.encode_ordinary(text))


def all_reduce_sums(sums: dict, rt) -> dict:
    """Add up every rank's sums (DDP), in float64."""
    if not rt.ddp:
        return sums
    t = torch.tensor(list(sums.values()), dtype=torch.float64, device=rt.device)
    torch.distributed.all_reduce(t)
    return dict(zip(sums, t.tolist()))


def perplexity(model, tokenizer, files: list, window: int, stride: int, batch_size: int, n_vocab: int, rt,
               desc: str = "perplexity") -> tuple:
    """files: [(name, token array)] -> (tokens scored, {nll, ppl, bits_per_byte}), every token but each file's
    first scored once in windows of `window` tokens moving by `stride`. Under DDP each rank takes every
    world_size-th window and the sums are all-reduced. Bits per byte leave <|endoftext|> out: it stands for no text."""
    jobs = [(tokens, span) for _, tokens in files for span in sliding_windows(len(tokens), window, stride)]
    jobs = jobs[rt.ddp_rank::rt.ddp_world_size]
    eot = tokenizer.eot_token
    s = {"tokens": 0, "nll": 0.0, "text_nll": 0.0, "bytes": 0}
    for k in progress(range(0, len(jobs), batch_size), desc=desc, unit="batch", disable=not desc):
        rows = [(np.asarray(t[b:e], dtype=np.int64), n) for t, (b, e, n) in jobs[k:k + batch_size]]
        for (ids, n), (logp, _) in zip(rows, score_batch(model, rows, n_vocab, rt)):
            text = ids[-n:] != eot
            s["tokens"] += n
            s["nll"] -= float(logp.sum())
            s["text_nll"] -= float(logp[torch.from_numpy(text)].sum())
            s["bytes"] += len(tokenizer.token_bytes(ids[-n:][text]))  # exact bytes: BPE tokens may split characters
    s = all_reduce_sums(s, rt)
    nll = s["nll"] / s["tokens"]
    return int(s["tokens"]), {"nll": nll, "ppl": math.exp(nll),
                              "bits_per_byte": s["text_nll"] / math.log(2) / max(s["bytes"], 1)}, int(s["bytes"])
