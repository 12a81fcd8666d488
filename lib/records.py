"""
Records for fine-tuning, alignment and evaluation, as users have them: CSV (RFC 4180), TSV, JSON, JSONL, TXT, each
also .gz/.bz2/.xz, files without extension (sniffed), folders, globs, comma lists, Hub datasets. Every bad record
is reported as FILE:LINE with what is wrong and the fix, all at once, before any model is built.
"""

import difflib
import encodings
import glob
import os
from dataclasses import dataclass, field
from typing import Optional

from lib.runtime import print0
from lib.textfiles import RECORD_FORMATS, file_records, format_of

# records: the examples of finetune.py, align.py and eval.py, each with the FILE:LINE it came from

MAX_LISTED = 10  # bad records listed in an error; the rest are counted


@dataclass
class Records:
    rows: list  # [(where, record)]: where is 'FILE:LINE' (or 'DATASET[i]' on the Hub), record a dict of fields
    source: str  # what was read, for messages
    label_names: dict = field(default_factory=dict)  # {field: class names} of a Hub dataset's ClassLabel columns
    skipped: int = 0  # bad records skipped under skip_bad
    bad: list = field(default_factory=list)  # 'where: what is wrong, and the fix' of each bad record


def load_records(source: str, split: str = "train", name: str = "", require=(), header: Optional[bool] = None,
                 txt_records: str = "line", encoding: str = "utf-8", skip_bad: bool = False, max_records: int = 0,
                 data_dir: str = "", cache_dir: str = "", report: bool = True) -> Records:
    """Every record of a local file, folder, glob or comma-separated list of them, or of one split of a Hub
    dataset, checked before any training starts.

    Local files are read with the standard library, so each record keeps its FILE:LINE: .jsonl, .json (a list
    of records, or {split: [records]}), .csv (RFC 4180 quoting), .tsv (one record per line, no quoting, as GLUE
    writes it), .txt (txt_records='line': one record {'text': line} per non-blank line; 'file': the whole file
    is one record), each optionally .gz/.bz2/.xz; a file with no extension is sniffed (JSON lines, TSV, CSV or
    text). UTF-8 (a BOM is dropped; a UTF-16 BOM is honoured) or `encoding`; CRLF line ends read as LF.
    CSV/TSV: header=None guesses whether the first row is a header (True/False say so); without one the
    columns are named '0', '1', ...; a required field may also be a column index ('1'). Values are strings.
    Anything else is a Hub dataset: datasets.load_dataset(source, name, split=split, data_dir=data_dir).

    require: the fields every record needs, or {field: the flag that names it} for the fixes the messages
    suggest (e.g. {'sentence': '--text_field'}); a missing, null or empty (whitespace) value is a bad record.
    Bad records (invalid JSON, a missing or empty field, a wrong column count, an undecodable line, an empty
    file) raise one ValueError listing each as 'FILE:LINE: what is wrong, and the fix'; skip_bad=True skips
    them with one WARNING line instead. report=False leaves both to the caller (Records.bad), who adds the
    problems its own checks find and reports all at once with report_bad. max_records > 0 keeps the first
    ones. Returns Records.
    """
    require = dict(require) if isinstance(require, dict) else {f: f"--{f}_field" for f in require}
    if txt_records not in ("line", "file"):
        raise ValueError(f"txt_records must be 'line' (one record per line of a .txt file) or 'file' (one record "
                         f"per file), got {txt_records!r}")
    if encodings.search_function(encoding) is None:  # the standard library's codecs (not a package's hook)
        raise ValueError(f"unknown encoding {encoding!r}; pass e.g. --encoding=utf-8, latin-1 or cp1252")
    paths = local_paths(source)
    bad = []  # 'where: problem' of every bad record
    if paths is None:
        recs = _hub_records(source, split, name, data_dir, cache_dir, max_records)
        what = f"{source!r}" + (f" (name {name!r}, split {split!r})" if name else f" (split {split!r})")
        rows = [(f"{source} ({split}) record {i}", r) for i, r in enumerate(recs.rows)]
        label_names = recs.label_names
    else:
        what = repr(source)
        rows, label_names = [], {}
        for path in paths:
            rows += file_records(path, split, require, header, txt_records, encoding, bad)
            if max_records and len(rows) >= max_records:
                break
    good = []
    for where, rec in rows:
        if isinstance(rec, str):  # already judged bad while reading
            bad.append(f"{where}: {rec}")
            continue
        problem = _record_problem(rec, require)
        if problem:
            bad.append(f"{where}: {problem}")
        else:
            good.append((where, rec))
    if max_records:
        good = good[:max_records]
    if report:
        report_bad(bad, skip_bad, what)
    if not good and not (bad and not report):
        raise ValueError(f"{what} holds no records" + (f" ({len(bad)} bad ones skipped)" if bad else "") +
                         f"; pass a file with records in it (formats: {', '.join(sorted(RECORD_FORMATS))}, "
                         f"optionally .gz/.bz2/.xz)")
    return Records(good, what, label_names, len(bad) if report else 0, bad)


def report_bad(bad: list, skip_bad: bool, source: str, flag: str = "--skip_bad_records=True"):
    """Bad records ('where: problem' strings): raise one ValueError listing them, or under skip_bad print one
    WARNING line with their count. For checks of your own too (e.g. a label outside the classes)."""
    if not bad:
        return
    if skip_bad:
        print0(f"WARNING: skipped {len(bad):,} bad record{'s' if len(bad) > 1 else ''} of {source} (the first: "
               f"{bad[0]}); fix them to train on them")
        return
    listed = "\n".join(bad[:MAX_LISTED]) + (f"\n... and {len(bad) - MAX_LISTED:,} more" if len(bad) > MAX_LISTED else "")
    raise ValueError(f"{listed}\n{len(bad):,} bad record{'s' if len(bad) > 1 else ''} in {source}: fix "
                     f"{'them' if len(bad) > 1 else 'it'}, or skip bad records with {flag}")


def _record_problem(rec: dict, require: dict) -> str:
    for f, flag in require.items():
        if rec.get(f) is None:
            fields = sorted(k for k in rec if rec[k] is not None)
            # the suggestion: a field of a similar name, else the one holding the longest text
            close = difflib.get_close_matches(f, fields, n=1)
            longest = sorted(fields, key=lambda k: -len(rec[k]) if isinstance(rec[k], str) else 0)
            guess = (close or longest or ["NAME"])[0]
            return (f"no field {f!r} (the record's fields are {fields}); fix the record, or name the field that "
                    f"holds it: {flag}={guess}")
        if isinstance(rec[f], str) and not rec[f].strip():
            return f"field {f!r} is empty ({rec[f]!r}); fill it in or delete the record"
    return ""


def local_paths(source: str) -> Optional[list]:
    """The local files a source names (a file, folder, glob, or comma-separated list of them; a folder's files
    with a known extension, or none), sorted, or None for a Hub dataset name."""
    parts = [p.strip() for p in source.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"no dataset given ({source!r}): pass a file (--dataset=train.jsonl), a folder, a glob, "
                         f"or a Hugging Face dataset name (--dataset=nyu-mll/glue --name=sst2)")
    looks_local = lambda p: (os.path.exists(p) or glob.has_magic(p) or format_of(p) in RECORD_FORMATS.values()
                             or p.startswith((".", "/", "~")) or p.endswith(os.sep))
    if len(parts) == 1 and not looks_local(parts[0]):
        return None
    paths = []
    for p in parts:
        p = os.path.expanduser(p)
        if os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p) if not f.startswith("."))
            files = [f for f in found if os.path.isfile(f) and format_of(f) != "?"]
            if len(files) < len([f for f in found if os.path.isfile(f)]):
                print0(f"WARNING: {p!r}: ignoring files that are no records: "
                       f"{[os.path.basename(f) for f in found if os.path.isfile(f) and f not in files][:5]}")
        elif glob.has_magic(p):
            files = sorted(f for f in glob.glob(p) if os.path.isfile(f))
        elif os.path.isfile(p):
            files = [p]
        else:
            raise FileNotFoundError(f"data file {p!r} does not exist" + (f" (in {source!r})" if len(parts) > 1 else "")
                                    + "; pass an existing file, folder or glob")
        if not files:
            raise FileNotFoundError(f"{p!r} matches no data files (formats: {', '.join(sorted(RECORD_FORMATS))}, "
                                    f"optionally .gz/.bz2/.xz, or no extension)")
        paths += files
    return paths


def _hub_records(source: str, split: str, name: str, data_dir: str, cache_dir: str, max_records: int) -> Records:
    """One split of a Hugging Face Hub dataset as Records (wheres added by the caller)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("reading a Hugging Face dataset needs the datasets package: pip install datasets") from e
    what = f"the Hugging Face dataset {source!r}" + (f" (name {name!r}, split {split!r})" if name else
                                                   f" (split {split!r})")
    try:
        ds = datasets.load_dataset(source, name or None, split=split, data_dir=data_dir or None,
                                   cache_dir=cache_dir or None)
    except Exception as e:  # name, configuration, split or network: say which to pass instead
        msg = str(e).strip().split("\n")[0]
        low = msg.lower()
        if "config" in low and ("missing" in low or "not found" in low or "available" in low):
            fix = "pass its configuration with --name=CONFIG, one of those the message names"
        elif "split" in low:
            fix = "pass one of the splits the message names"
        elif isinstance(e, (ConnectionError, TimeoutError)) or "connect" in low or "offline" in low or "resolve" in low:
            fix = ("no network: run where the Hub is reachable, or download the data and pass the local file "
                   "(--dataset=train.jsonl)")
        else:
            fix = (f"check the name (owner/dataset, e.g. nyu-mll/glue), the network, or pass a local file "
                   f"(--dataset=train.jsonl); there is no local file or folder {source!r}")
        raise ValueError(f"could not load {what}: {type(e).__name__}: {msg}; {fix}") from e
    if max_records:
        ds = ds.select(range(min(max_records, len(ds))))
    label_names = {f: list(t.names) for f, t in ds.features.items() if getattr(t, "names", None)}
    return Records(ds.to_list(), what, label_names)
