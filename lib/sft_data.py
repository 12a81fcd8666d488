"""
finetune.py's records: one split read with every field checked (instructions, or texts with class labels, the
classes named), then encoded into token ids and labels with the loss mask on the prompt (lib/finetuning.py).
"""

import os
from typing import Optional

from lib.finetuning import encode_pair, format_prompt
from lib.logs import print0
from lib.progress import progress
from lib.records import load_records, report_bad
from lib.textfiles import COMPRESSIONS, RECORD_FORMATS

# used when a field key is at its default and the records lack that field but have one of these: the common
# {"prompt": ..., "response": ...} SFT layout, and GLUE's 'sentence' (SST-2, CoLA)
# used when a field key is at its default and the records lack that field but have one of these: the common
# {"prompt": ..., "response": ...} SFT layout, and GLUE's 'sentence' (SST-2, CoLA)
FIELD_FALLBACKS = {"instruction": ("prompt",), "output": ("response", "completion"), "text": ("sentence",)}


def read_split(dataset: str, split: str, fields: dict, names: Optional[list] = None, label_names=(), **load) -> tuple:
    """One split, every record checked -> (source, rows, class names or None). split: a split of the Hub dataset
    `dataset` ('train' of a local one), or a local file (folder, glob) of its own. fields: {config key: field},
    instruct: instruction_field, input_field (optional), output_field; classify: text_field, label_field (an int
    class id or a class name). rows: (where, instruction, input, output) or (where, text, class id), where =
    'FILE:LINE'. Class names: `names` (from the training split), else label_names, the Hub's ClassLabel names,
    the sorted string labels, or '0' .. the largest id. A missing, empty or mistyped field, or a label outside
    the classes, is an error naming each bad record, or skipped with a warning under skip_bad. load: keyword
    arguments of lib.records.load_records (name, header, encoding, skip_bad, cache_dir)."""
    load["require"] = {f: f"--{k}" for k, f in fields.items() if f.isdigit()}  # a column index: rec[f] is set
    ends = tuple(ext + c for ext in RECORD_FORMATS for c in ("", *COMPRESSIONS))
    local = lambda s: os.path.exists(s) or s.lower().endswith(ends)  # else a Hub name (or split)
    if local(split):
        recs = load_records(split, **load)
    elif split != "train" and local(dataset):
        raise ValueError(f"{dataset!r} is a local file, which holds one split; for split {split!r} pass a file of "
                         f"its own (e.g. --{'test' if split == 'test' else 'val'}_split=dev.jsonl)")
    else:
        recs = load_records(dataset, split, **load)
    first = recs.rows[0][1]
    fields = dict(fields)
    for key, field in fields.items():
        alt = [f for f in FIELD_FALLBACKS.get(field, ()) if field not in first and f in first]
        if key.replace("_field", "") == field and alt:  # the key is at its default
            print0(f"{recs.source}: no {field!r} field, using {alt[0]!r} (--{key}={alt[0]})")
            fields[key] = alt[0]
    classify = "label_field" in fields
    bad, rows = [], []
    for where, rec in recs.rows:
        problem = ""
        for key, field in fields.items():
            v, kinds = rec.get(field), (int, str) if key == "label_field" else (str,)
            if v is None and key != "input_field":
                present = sorted(k for k in rec if rec[k] is not None)
                problem = (f"no field {field!r} (the record's fields are {present}); fix the record, or name the "
                           f"field that holds it: --{key}={present[0] if present else 'NAME'}")
            elif v is not None and (not isinstance(v, kinds) or isinstance(v, bool)):
                expected = " or ".join(k.__name__ for k in kinds)
                problem = f"field {field!r} is {v!r} ({type(v).__name__}), expected {expected}"
            elif isinstance(v, str) and not v.strip() and key != "input_field":
                problem = f"field {field!r} is empty ({v!r}); fill it in or delete the record"
            if problem:
                break
        if problem:
            bad.append(f"{where}: {problem}")
        else:
            rows.append([where] + ["" if rec.get(f) is None else rec[f] for f in fields.values()])
    if classify and rows:
        labels = [r[2] for r in rows]
        if all(isinstance(v, str) and v.strip().lstrip("-").isdigit() for v in labels):
            labels = [int(v) for v in labels]  # ids written as text, as CSV and TSV files hold them
        kinds = {type(v).__name__: (r[0], v) for r, v in zip(rows, labels)}
        if len(kinds) > 1:
            raise ValueError(f"{recs.source}: field {fields['label_field']!r} mixes class names and ids (e.g. "
                             f"{' and '.join(f'{w}: {v!r}' for w, v in kinds.values())}); use one kind")
        hub = recs.label_names.get(fields["label_field"])
        names = names or ([str(n) for n in label_names] or hub or (sorted(set(labels)) if "str" in kinds else
                          [str(i) for i in range(max(0, *labels) + 1)]))
        kept = []
        for r, v in zip(rows, labels):
            k = names.index(v) if isinstance(v, str) and v in names else v
            if isinstance(k, int) and 0 <= k < len(names):
                kept.append((r[0], r[1], k))
            else:
                bad.append(f"{r[0]}: label {v!r} is none of the classes {names} (ids 0..{len(names) - 1}); fix the "
                           f"record, or name every class in id order: --label_names=\"{names + [str(v)]}\"")
        rows = kept
    report_bad(bad, load.get("skip_bad", False), recs.source)
    if not rows:
        raise ValueError(f"{recs.source}: no usable records (all {len(bad):,} were bad and skipped); fix them")
    return recs.source, [tuple(r) for r in rows], names


def encode_records(tok, rows: list, block_size: int, truncate: str, source: str, template: str = "alpaca"):
    """Token ids and labels per record -> (examples, counts of truncated / dropped records).
    rows: (where, instruction, input, output) -> (x, y) from encode_pair, y = -1 on the prompt; or
    (where, text, class id) -> (ids, class id). truncate: 'left' drops prompt tokens first (instruct)
    or keeps a text's end (classify), 'right' cuts the end, 'drop' skips the record."""
    examples, stats = [], dict(truncated=0, dropped=0)
    for where, *fields in progress(rows, desc=f"tokenizing {source}", disable=len(rows) < 5000):
        try:
            if len(fields) == 3:  # instruct
                x, y, cut = encode_pair(tok, format_prompt(fields[0], fields[1], template), fields[2], block_size,
                                        "prompt" if truncate == "left" else "right")
                example, learnable = (x, y), any(t != -1 for t in y)
            else:
                ids = tok.encode_ordinary(fields[0])
                cut = len(ids) > block_size
                example, learnable = (ids[-block_size:] if truncate == "left" else ids[:block_size], fields[1]), True
        except ValueError as e:  # e.g. a character outside a char-level vocabulary
            raise ValueError(f"{where}: {e}") from e
        if (cut and truncate == "drop") or not learnable:  # no response token fits: nothing to learn
            stats["dropped"] += 1
            continue
        stats["truncated"] += cut
        examples.append(example)
    if not examples:
        raise ValueError(f"{source}: no records left: all {len(rows):,} are too long for block_size {block_size} "
                         f"(truncate={truncate!r}); use a longer --block_size, or --truncate=left")
    return examples, stats
