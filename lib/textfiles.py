"""
Local text files as users have them: an encoding (a UTF-8 or UTF-16 byte-order mark honoured, a bad byte named
with its line), .gz/.bz2/.xz compression, and records in CSV (RFC 4180), TSV, JSON, JSONL or TXT, each bad record
named as FILE:LINE. lib/records.py builds on it; eval.py and data/fineweb/prepare.py read text with read_text.
"""

import bisect
import bz2
import csv
import gzip
import json
import lzma
import os
import re
from typing import Optional

from lib.logs import print0

# how each local file is read, by extension (after .gz/.bz2/.xz); a file with no extension is sniffed
RECORD_FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".txt": "txt"}
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def format_of(path: str) -> Optional[str]:
    """'jsonl', 'json', 'csv', 'tsv', 'txt', '' (no extension: sniff), '?' (unknown) or None (not a file name)."""
    stem, ext = os.path.splitext(os.path.basename(path))
    if ext.lower() in COMPRESSIONS:
        stem, ext = os.path.splitext(stem)
    if ext.lower() in RECORD_FORMATS:
        return RECORD_FORMATS[ext.lower()]
    return "" if not ext else "?" if os.path.isfile(path) else None


def _read_bytes(path: str, encoding: str):
    """A file's bytes, decompressed by its extension, without a UTF-8 BOM -> (bytes, encoding to decode them)."""
    opener = COMPRESSIONS.get(os.path.splitext(path)[1].lower(), open)
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, lzma.LZMAError) as e:  # not gzip/bz2/xz data, or a truncated file
        raise ValueError(f"{path}: cannot decompress it ({type(e).__name__}: {e}); download it again, or "
                         f"decompress it yourself and pass the plain file") from e
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") and encoding.lower().replace("-", "") in ("utf8", "utf8sig"):
        data, encoding = data.decode("utf-16").encode("utf-8"), "utf-8"  # a UTF-16 BOM says what it is
    if encoding.lower().replace("-", "") == "utf8" and data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # the UTF-8 BOM that Excel and Notepad write
    return data, encoding


def read_text(path: str, encoding: str = "utf-8") -> str:
    """The whole text of a plain-text file (optionally .gz/.bz2/.xz), CRLF read as LF and a BOM dropped; bytes
    that do not decode are a ValueError naming FILE:LINE and the encoding to try."""
    data, encoding = _read_bytes(path, encoding)
    try:
        return data.decode(encoding).replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line_end = data.find(b"\n", e.start)
        raw = data[line_start:line_end if line_end >= 0 else len(data)]
        at = UnicodeDecodeError(e.encoding, raw, e.start - line_start, e.end - line_start, e.reason)
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: {_encoding_problem(raw, at, encoding)}") from e


def _decoded_lines(path: str, encoding: str) -> list:
    """[(line number, text without its line end, or None when the line does not decode)] and the first decoding
    problem, as 'what is wrong, and the fix' ('' if none)."""
    data, encoding = _read_bytes(path, encoding)
    lines, problem = [], ""
    for i, raw in enumerate(data.split(b"\n")):
        raw = raw[:-1] if raw.endswith(b"\r") else raw  # CRLF
        try:
            lines.append((i + 1, raw.decode(encoding)))
        except UnicodeDecodeError as e:
            lines.append((i + 1, None))
            problem = problem or _encoding_problem(raw, e, encoding)
    if lines and lines[-1][1] == "":  # the newline that ends the last line starts no line
        lines.pop()
    return lines, problem


def _encoding_problem(raw: bytes, e: UnicodeDecodeError, encoding: str) -> str:
    bad = raw[e.start:e.start + 1]
    if raw.count(b"\x00") > len(raw) // 4:
        guess = "utf-16"
    else:
        try:
            raw.decode("cp1252")
            guess = "cp1252"  # Windows Western European: what Excel writes; a superset of latin-1's letters
        except UnicodeDecodeError:
            guess = "latin-1"
    if guess == encoding.lower():
        guess = "utf-8"
    return (f"not valid {encoding} (byte {bad!r} at column {e.start + 1}: {raw[max(0, e.start - 20):e.start + 10]!r});"
            f" the file is probably {guess}: pass --encoding={guess}")


def _sniff(lines: list) -> str:
    """The format of a file with no extension, from its first lines: JSON lines, JSON, TSV, CSV or text."""
    sample = [t for _, t in lines[:50] if t is not None and t.strip()]
    if not sample:
        return "txt"
    first = sample[0].lstrip()
    if first.startswith("{"):
        return "jsonl" if len(sample) > 1 or first.rstrip().endswith("}") else "json"
    if first.startswith("["):
        return "json"
    for fmt, delim in (("tsv", "\t"), ("csv", ",")):
        counts = {len(row) for row in csv.reader(sample[:20], delimiter=delim)}
        if len(counts) == 1 and counts.pop() > 1:  # every line splits into the same number (>1) of columns
            return fmt
    return "txt"


def file_records(path: str, split: str, require: dict, header: Optional[bool], txt_records: str,
                  encoding: str, bad: list) -> list:
    """[(where, record dict, or a str saying what is wrong with it)] of one local file; file-wide problems go
    to `bad` (or raise, where no record of the file can be trusted)."""
    fmt = format_of(path)
    if fmt == "?":
        raise ValueError(f"{path}: cannot tell how to read a {os.path.splitext(path)[1]!r} file; records are read "
                         f"from {', '.join(sorted(RECORD_FORMATS))} files (optionally .gz/.bz2/.xz)")
    lines, problem = _decoded_lines(path, encoding)
    if not any(t is None or t.strip() for _, t in lines):
        bad.append(f"{path}: the file is empty; remove it from the data, or fill it")
        return []
    if fmt == "":
        fmt = _sniff(lines)
        print0(f"{path}: no extension, read as {fmt.upper()} (rename it to .{fmt} to say so)")
    undecodable = {n for n, t in lines if t is None}
    if undecodable and (fmt == "json" or (fmt == "txt" and txt_records == "file")):
        bad.append(f"{path}:{min(undecodable)}: {problem}")  # one document: unreadable without the right encoding
        return []
    if fmt == "jsonl":
        return [(f"{path}:{n}", problem if t is None else _json_line(t)) for n, t in lines if t is None or t.strip()]
    if fmt == "json":
        return _json_file(path, "\n".join(t for _, t in lines), split, bad)
    if fmt == "txt":
        if txt_records == "file":
            return [(f"{path}:1", {"text": "\n".join(t for _, t in lines)})]
        return [(f"{path}:{n}", problem if t is None else {"text": t}) for n, t in lines if t is None or t.strip()]
    return _delimited(path, lines, "\t" if fmt == "tsv" else ",", header, require, problem, bad)


def _json_line(text: str):
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        return f"invalid JSON ({e.msg} at column {e.colno}: {text[max(0, e.pos - 30):e.pos + 10]!r}); fix the line"
    if not isinstance(rec, dict):
        return (f"a JSON line must be one record, an object {{\"field\": value, ...}}; this one is a "
                f"{type(rec).__name__}: {text[:60]!r}")
    return rec


def _json_file(path: str, text: str, split: str, bad: list) -> list:
    """A JSON file: a list of records, {split: [records], ...}, or one record; each with the line it starts on.
    A file of JSON lines named .json is read as JSON lines."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON lines in a .json file
            return [(f"{path}:{n}", _json_line(t)) for n, t in enumerate(text.split("\n"), 1) if t.strip()]
        bad.append(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}: "
                   f"{text[max(0, e.pos - 30):e.pos + 10]!r}); fix the file (one error stops a JSON document: "
                   f"none of its records can be read until then)")
        return []
    newlines = [i for i, c in enumerate(text) if c == "\n"]
    line_of = lambda pos: bisect.bisect_right(newlines, pos) + 1
    dec, ws = json.JSONDecoder(), re.compile(r"[\s,:]*")
    start = ws.match(text, 0).end()  # skip whitespace, and the ',' / ':' between items
    if isinstance(doc, dict) and any(isinstance(v, list) for v in doc.values()):
        if split not in doc:
            raise ValueError(f"{path}: a JSON object of splits {sorted(doc)} and no split {split!r}; pass one of "
                             f"them as the split, or a file holding a list of records")
        pos = start + 1
        while True:  # walk the object's items to the split's list, to know the line of each record
            pos = ws.match(text, pos).end()
            key, pos = dec.raw_decode(text, pos)
            pos = ws.match(text, pos).end()
            if key == split:
                start = pos
                break
            _, pos = dec.raw_decode(text, pos)
        doc = doc[split]
        if not isinstance(doc, list):
            raise ValueError(f"{path}: split {split!r} holds a {type(doc).__name__}, expected a list of records")
    if isinstance(doc, dict):
        return [(f"{path}:{line_of(start)}", doc)]
    if not isinstance(doc, list):
        raise ValueError(f"{path}: holds a JSON {type(doc).__name__}, expected a list of records "
                         f"[{{\"field\": value, ...}}, ...] (or JSON lines: one record per line, in a .jsonl file)")
    out, pos = [], start + 1
    for rec in doc:
        pos = ws.match(text, pos).end()
        line = line_of(pos)
        _, pos = dec.raw_decode(text, pos)
        out.append((f"{path}:{line}", rec if isinstance(rec, dict) else
                    f"expected a record {{\"field\": value, ...}}, got a {type(rec).__name__}: {rec!r:.60}"))
    return out


def _has_header(rows: list) -> bool:
    """Whether the first of these CSV/TSV rows looks like a header: some column is numeric (or holds a few
    repeated values) below it while its first cell is not, and no column says otherwise."""
    first, body = rows[0], rows[1:51]
    number = lambda s: re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", s) is not None
    votes = 0
    for j, cell in enumerate(first):
        col = [r[j] for r in body if j < len(r)]
        if not col or not cell.strip():
            continue
        if all(number(v) for v in col):
            votes += 1 if not number(cell) else -100
        elif len(col) >= 4 and len(set(col)) <= len(col) // 2:  # a column of labels
            votes += 1 if cell not in set(col) else -100
    if votes:
        return votes > 0
    # no column says: a header is a row of names (words without spaces, none repeated below)
    name = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
    return any(c for c in first) and all(not c or (name.fullmatch(c) and c not in {r[j] for r in body if j < len(r)})
                                         for j, c in enumerate(first))


def _delimited(path: str, lines: list, delim: str, header: Optional[bool], require: dict, problem: str,
               bad: list) -> list:
    """CSV (RFC 4180 quoting, values may span lines) or TSV (one record per line, no quoting) records."""
    csv.field_size_limit(2 ** 31 - 1)  # a long document in one cell is fine (the default limit is 128 KiB)
    feed = iter([t if t is not None else "" for _, t in lines])
    if delim == "\t":
        reader = csv.reader(feed, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        feed = (t + "\n" for t in feed)  # line ends inside quoted values are kept, as LF
        reader = csv.reader(feed, strict=True)
    undecodable = {n for n, t in lines if t is None}
    rows, line = [], 0  # [(first line, last line, cells or a str saying what is wrong)]
    while True:
        try:
            cells = next(reader)
            if cells:
                rows.append((line + 1, reader.line_num, cells))
        except StopIteration:
            break
        except csv.Error as e:
            rows.append((line + 1, reader.line_num, f"malformed CSV ({e}): a quote opened on line {line + 1} "
                         f"is never closed, or a quoted value has text after its closing quote; quote the "
                         f"whole value and double any quote inside it (\"\")"))
        line = reader.line_num
    # an undecodable line (read as an empty one) spoils the row it belongs to, or is a bad row of its own
    covered = set()
    for a, b_, _ in rows:
        covered.update(range(a, b_ + 1))
    rows = [(a, b_, problem if undecodable & set(range(a, b_ + 1)) else c) for a, b_, c in rows]
    rows = sorted(rows + [(n, n, problem) for n in undecodable - covered])
    table = [c for _, _, c in rows if isinstance(c, list)]
    if not table:
        return [(f"{path}:{a}", c) for a, _, c in rows]
    names = [f for f in require if not f.isdigit()]
    if header is None:
        header = any(f in table[0] for f in names) or _has_header(table)
        print0(f"{path}: first row read as the header {table[0]!r:.100} (pass --header=False if it is a record)"
               if header else f"{path}: no header row, columns 0..{len(table[0]) - 1} (pass --header=True if "
               f"the first row, {table[0]!r:.60}, is one)")
    ncols = len(table[0])
    if header:
        columns = [c if c.strip() else str(j) for j, c in enumerate(table[0])]
        rows = rows[1:] if rows[0][2] is table[0] else rows
    else:
        columns = [str(j) for j in range(ncols)]
    kind = "TSV" if delim == "\t" else "CSV"
    for f, flag in require.items():  # fields are the same for every row: check them once, for the file
        if f.isdigit() and int(f) >= ncols:
            raise ValueError(f"{path}: column {f} does not exist; the file has {ncols} columns (0..{ncols - 1}); "
                             f"pass {flag}=N with N one of them")
        if not f.isdigit() and f not in columns:
            if header:
                raise ValueError(f"{path}:1: no column {f!r}; the header row names {columns}: pass {flag}=NAME "
                                 f"with one of them, or a column index ({flag}=0)")
            raise ValueError(f"{path}: no column {f!r}: this {kind} file has no header row (its first row is "
                             f"{table[0]!r:.120}), so its columns are 0..{ncols - 1}: pass {flag}=N (e.g. "
                             f"{flag}={ncols - 1}), or --header=True if the first row is a header")
    index_fields = [f for f in require if f.isdigit()]
    out = []
    for a, _, cells in rows:
        where = f"{path}:{a}"
        if isinstance(cells, str):
            out.append((where, cells))
        elif len(cells) != ncols:
            out.append((where, f"{len(cells)} columns, but the {'header' if header else 'first row'} has {ncols}"
                        + (": a tab inside a value? A TSV value holds no tabs or line breaks" if delim == "\t" else
                           ": a comma inside a value that is not quoted? Quote it: \"a, b\"")))
        else:
            rec = dict(zip(columns, cells))
            rec.update({f: cells[int(f)] for f in index_fields})
            out.append((where, rec))
    return out
