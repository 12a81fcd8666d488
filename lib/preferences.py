"""
Preference pairs for align.py, as datasets hold them: hh-rlhf's conversations, {prompt, chosen, rejected}, or
Alpaca-style {instruction, input, chosen, rejected}; encoded prompt + response with the loss mask on the response,
and collated chosen rows first.
"""

import hashlib

import numpy as np
import torch

from lib.finetuning import encode_pair, format_prompt, pad_right
from lib.progress import progress
from lib.records import report_bad

_ASSISTANT = "\n\nAssistant:"  # hh-rlhf's turn marker


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
    """Records [(where, {field: value})] (lib.records.load_records' rows) of one of three layouts -> ([(where,
    prompt, chosen, rejected)], number of identical pairs dropped, number of mismatched pairs dropped).
    Layouts: {'chosen', 'rejected'} (whole hh-rlhf conversations), {'prompt', 'chosen', 'rejected'}, and
    {'instruction', 'input' (optional), 'chosen', 'rejected'} (Raschka's DPO chapter, rasbt/LLMs-from-scratch
    ch07/04_preference-tuning-with-dpo), whose instruction and input become one prompt through
    lib.finetuning.format_prompt, so template='alpaca' is required there. A record that does not fit is a bad record,
    named 'FILE:LINE' (lib.records.report_bad: one error listing them, or skipped with skip_bad)."""
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

    Each side is lib.finetuning.encode_pair's prompt + response (+ <|endoftext|>), cut prompt-first to block_size + 1
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


def response_tokens(pairs: list) -> torch.Tensor:
    return torch.tensor([[len(c) - k, len(r) - k] for c, r, k in pairs], dtype=torch.float32)  # (N, 2)
