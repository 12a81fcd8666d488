"""
Batches for training: from prepared token files (data/<dataset>/prepare.py), or streamed straight from a text
dataset with no prepare step.

    loader = BinLoader("data/shakespeare_char", "train", batch_size=12, block_size=64)
    x, y = loader.next_batch()   # (B, T) int64 each, y is x shifted by one token
    state = loader.state_dict()  # plain ints: resume exactly with loader.load_state_dict(state)

    loader = StreamingLoader("HuggingFaceFW/fineweb-edu", name="sample-10BT", batch_size=8, block_size=1024)
    loader = StreamingLoader("json", data_files="corpus.jsonl", ...)  # or a local file: "corpus.jsonl"

BinLoader batches are numbered globally: the k-th batch of rank r in a job of world_size ranks is global batch
k * world_size + r. A batch depends only on (seed, its global number), so 2 ranks draw exactly the batches
that 1 process draws in twice as many steps, and resuming needs nothing but the step count.
"""

import bisect
import bz2
import csv
import difflib
import encodings
import glob
import gzip
import json
import lzma
import os
import queue
import re
import threading
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from common import print0, read_tokens


def token_files(data_dir: str, split: str) -> list:
    """The token files of a split: data_dir/{split}.bin, or the shards data_dir/*_{split}_NNNNNN.bin."""
    single = os.path.join(data_dir, f"{split}.bin")
    if os.path.exists(single):
        return [single]
    shards = sorted(glob.glob(os.path.join(data_dir, f"*_{split}_[0-9]*.bin")))
    if not shards:
        prepare = os.path.join(data_dir, "prepare.py")
        if not os.path.exists(prepare):  # e.g. the --out_dir of a prepare script elsewhere
            prepare = f"data/<dataset>/prepare.py --out_dir={data_dir}"
        elif not os.path.relpath(prepare).startswith(".."):
            prepare = os.path.relpath(prepare)  # data/shakespeare/prepare.py when run from the repo root
        raise FileNotFoundError(f"no {split!r} token files in {data_dir!r} (looked for {split}.bin and "
                                f"*_{split}_NNNNNN.bin). Prepare the data first: python {prepare}")
    return shards


def _to_device(x: torch.Tensor, y: torch.Tensor, device: str):
    if device.startswith("cuda"):
        # pinned host memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


class BinLoader:
    """Windows of block_size + 1 tokens from uint16 token files, read through np.memmap.

    mode='random': each batch takes batch_size windows at random offsets (nanoGPT's get_batch); for corpora
    that fit many epochs. mode='sequential': batches tile the token stream in order, shard after shard, and
    wrap around at the end; for large sharded corpora read about once. No window crosses the end of a file.
    """

    def __init__(self, data_dir: str, split: str, batch_size: int, block_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 1337, mode: str = "random", device: str = "cpu"):
        if mode not in ("random", "sequential"):
            raise ValueError(f"mode must be 'random' or 'sequential', got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        self.files = token_files(data_dir, split)
        self.B, self.T = batch_size, block_size
        self.rank, self.world_size, self.seed, self.mode = rank, world_size, seed, mode
        self.device = device
        self.lengths = [len(read_tokens(f)) for f in self.files]  # also validates every shard's header
        if max(self.lengths) < block_size + 1:
            raise ValueError(f"the {split!r} split in {data_dir!r} has {max(self.lengths):,} tokens per file at "
                             f"most, fewer than block_size + 1 = {block_size + 1}; use a smaller --block_size or "
                             f"more data")
        # sequential mode: how many whole batches each file holds, and where each file's batches start
        per_batch = batch_size * block_size
        self.batches_per_file = [(n - 1) // per_batch for n in self.lengths]
        self.first_batch = np.cumsum([0] + self.batches_per_file)
        if mode == "sequential" and self.first_batch[-1] == 0:
            raise ValueError(f"the {split!r} split in {data_dir!r} is too short for one sequential batch of "
                             f"{batch_size} x {block_size} tokens (+1); longest file: {max(self.lengths):,} tokens")
        self.step = 0  # batches this rank has drawn

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "mode": self.mode, "world_size": self.world_size}

    def load_state_dict(self, state: dict):
        if state.get("mode", self.mode) != self.mode:
            raise ValueError(f"the saved loader state is for mode={state['mode']!r}, this loader uses "
                             f"mode={self.mode!r}; resume with the mode the run started with")
        self.seed = int(state.get("seed", self.seed))  # the saved sequence continues, whatever --seed says now
        # resuming on another number of ranks: continue after the same number of global batches
        consumed = int(state["step"]) * int(state.get("world_size", self.world_size))
        self.step = consumed // self.world_size

    def next_batch(self):
        g = self.step * self.world_size + self.rank  # global batch number
        self.step += 1
        if self.mode == "random":
            rng = np.random.default_rng([self.seed, g])
            # pick files in proportion to their usable length, then offsets within them
            usable = np.array([max(n - self.T, 0) for n in self.lengths], dtype=np.float64)
            fi = rng.choice(len(self.files), size=self.B, p=usable / usable.sum())
            maps = {}  # each file mapped once per batch: a long-lived np.memmap otherwise keeps growing in RAM
            rows = []
            for i in range(self.B):
                if fi[i] not in maps:
                    maps[fi[i]] = read_tokens(self.files[fi[i]])
                start = int(rng.integers(0, self.lengths[fi[i]] - self.T))
                rows.append(np.asarray(maps[fi[i]][start:start + self.T + 1], dtype=np.int64))
            buf = np.stack(rows)  # (B, T+1)
        else:
            g %= int(self.first_batch[-1])  # wrap around: the next epoch
            fi = int(np.searchsorted(self.first_batch, g, side="right") - 1)
            start = (g - int(self.first_batch[fi])) * self.B * self.T
            data = read_tokens(self.files[fi])
            flat = np.asarray(data[start:start + self.B * self.T + 1], dtype=np.int64)
            # rows overlap by one token: row i's last target is row i+1's first input
            buf = np.stack([flat[i * self.T:(i + 1) * self.T + 1] for i in range(self.B)])  # (B, T+1)
        x = torch.from_numpy(buf[:, :-1].copy())
        y = torch.from_numpy(buf[:, 1:].copy())
        return _to_device(x, y, self.device)

# ----------------------------------------------------------------------------------------------
# streaming: documents from a text dataset, tokenized on the fly

# extensions of local files and the `datasets` builder that reads them (compressed variants too)
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


def _builder_of(path: str) -> Optional[str]:
    stem = path[:-len(os.path.splitext(path)[1])] if path.endswith((".gz", ".zst", ".bz2", ".xz")) else path
    return LOCAL_BUILDERS.get(os.path.splitext(stem)[1].lower())


def open_text_stream(dataset: str, name: Optional[str] = None, split: str = "train", data_files=None):
    """A streaming `datasets` IterableDataset (nothing downloaded up front, no Arrow cache written).

    dataset: a Hugging Face dataset ('HuggingFaceFW/fineweb-edu'); a local file, folder or glob whose extension
    says how to read it ('corpus.jsonl', 'shards/*.parquet', 'books/' of .txt files, each file one document); or
    a builder for local files ('json', 'parquet', 'text', 'csv') with data_files. name: the dataset's config
    (ignored for local files).
    """
    from datasets import load_dataset
    if dataset in set(LOCAL_BUILDERS.values()):
        if not data_files:
            raise ValueError(f"dataset={dataset!r} reads local files: pass them too, e.g. --data_files=corpus.jsonl "
                             f"(or pass the file itself: --dataset=corpus.jsonl)")
        paths = [data_files] if isinstance(data_files, str) else list(data_files)
        missing = [p for p in paths if isinstance(p, str) and not glob.glob(p)]
        if missing:
            raise FileNotFoundError(f"data_files {missing!r} match no file (dataset={dataset!r})")
        builder, files, name = dataset, data_files, None
    elif os.path.exists(dataset) or glob.has_magic(dataset) or _builder_of(dataset):
        paths = [dataset] if os.path.isfile(dataset) else sorted(
            p for p in glob.glob(os.path.join(dataset, "*") if os.path.isdir(dataset) else dataset)
            if os.path.isfile(p) and _builder_of(p))
        if not paths:
            raise FileNotFoundError(f"dataset={dataset!r} is no file, and no folder or glob with files ending in "
                                    f"{sorted(LOCAL_BUILDERS)} (optionally compressed, e.g. .jsonl.gz)")
        builders = {_builder_of(p) for p in paths}
        if None in builders or len(builders) > 1:
            raise ValueError(f"dataset={dataset!r}: cannot tell how to read {paths[:5]!r}; expected files that all "
                             f"end in one of {sorted(LOCAL_BUILDERS)} (or use --dataset=json --data_files=...)")
        builder, files, name = builders.pop(), paths, None
        if all(os.path.getsize(p) == 0 for p in paths):
            raise ValueError(f"dataset={dataset!r}: {paths[:5]!r} {'is' if len(paths) == 1 else 'are'} empty")
    else:
        builder, files = dataset, data_files
    try:
        # a .txt file is one document (as data/fineweb/prepare.py reads it): one per line would drop every
        # line break and make each blank line an empty document
        whole = {"sample_by": "document"} if builder == "text" else {}
        return load_dataset(builder, name=name or None, split=split, streaming=True, data_files=files, **whole)
    except Exception as e:
        where = f"local files {files!r}" if builder != dataset or files else f"the Hugging Face dataset {dataset!r}"
        raise ValueError(f"could not open {where} (config {name!r}, split {split!r}): {type(e).__name__}: {e}. "
                         f"Check the name, --name and --split, the network for Hub datasets, or pass local files "
                         f"(--dataset=corpus.jsonl)") from e


def document_text(example: dict, text_field: str, dataset: str) -> str:
    """The text of one dataset record, or a clear error naming the fields that exist."""
    if text_field not in example:
        raise ValueError(f"records of {dataset!r} have no field {text_field!r}; their fields are "
                         f"{sorted(example)}: pass the one holding the text, e.g. --text_field={sorted(example)[0]}")
    text = example[text_field]
    if not isinstance(text, str):
        raise TypeError(f"field {text_field!r} of {dataset!r} holds {type(text).__name__} values ({text!r:.80}), "
                        f"expected str; pass the field holding the text with --text_field")
    return text


class StreamingLoader:
    """Batches straight from a text dataset, with no prepare step: the project's answer for corpora too large
    to prepare. Documents stream in (datasets streaming, each rank its own disjoint part via
    split_dataset_by_node), are tokenized with <|endoftext|> before each (as data/fineweb/prepare.py writes
    them), go through a shuffle buffer of shuffle_buffer documents, and are packed back to back into windows
    of block_size + 1 tokens: nothing is padded or dropped, and consecutive rows share one token as BinLoader's
    sequential mode does. At the end of the dataset the next epoch starts.

    state_dict() holds the stream position, the shuffle buffer's tokens and the partly served tokens, so a
    resumed run gets exactly the batches an uninterrupted run would. Each rank has its own state: under DDP
    gather them (torch.distributed.all_gather_object) and pass the list to load_state_dict on every rank.
    A background thread prepares up to `prefetch` batches ahead (0: everything happens in next_batch).
    """

    def __init__(self, dataset: str, name: Optional[str] = None, split: str = "train", text_field: str = "text",
                 batch_size: int = 8, block_size: int = 1024, rank: int = 0, world_size: int = 1, seed: int = 1337,
                 tokenizer=None, shuffle_buffer: int = 10000, device: str = "cpu", data_files=None,
                 prefetch: int = 2):
        for key, value, low in (("batch_size", batch_size, 1), ("block_size", block_size, 1),
                                ("shuffle_buffer", shuffle_buffer, 1), ("prefetch", prefetch, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"StreamingLoader: {key} must be an int >= {low}, got {value!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        if tokenizer is None:
            from tokenizer import get_tokenizer
            tokenizer = get_tokenizer("gpt2")
        self.tok = tokenizer
        self.dtype = np.uint16 if tokenizer.n_vocab <= 1 << 16 else np.int32
        self.dataset, self.name, self.split, self.data_files = dataset, name, split, data_files
        self.text_field, self.B, self.T = text_field, batch_size, block_size
        self.rank, self.world_size, self.seed, self.device = rank, world_size, seed, device
        self.shuffle_buffer, self.prefetch = shuffle_buffer, prefetch
        self.read_size = min(64, shuffle_buffer)  # documents read and tokenized together
        self._open(None)  # validates the dataset now, before any training starts
        self.epoch = 0  # passes over this rank's part of the dataset
        self.drawn = 0  # documents taken out of the shuffle buffer, all epochs
        self.buffer = []  # token arrays of the documents in the shuffle buffer (arrays never modified in place)
        self.tokens = np.zeros(0, dtype=self.dtype)  # drawn tokens not yet served; [0] is the next x[0, 0]
        self.state = self._snapshot()
        self.queue, self.thread = None, None

    def _open(self, hf_state: Optional[dict]):
        from datasets.distributed import split_dataset_by_node
        self.ds = split_dataset_by_node(open_text_stream(self.dataset, self.name, self.split, self.data_files),
                                        rank=self.rank, world_size=self.world_size)
        if hf_state is not None:
            self.ds.load_state_dict(hf_state)
        self.it = None  # iterator, created at the first read
        self.hf_state = hf_state
        self.exhausted = False  # the stream has no more documents in this epoch
        self.epoch_docs = 0  # documents read in this epoch (before hf_state, when resuming)

    def _read(self) -> list:
        """Up to read_size documents from the stream as token arrays, each starting with <|endoftext|>."""
        if self.it is None:
            self.it = iter(self.ds)
        texts = []
        for example in self.it:
            texts.append(document_text(example, self.text_field, self.dataset))
            if len(texts) == self.read_size:
                break
        self.hf_state = self.ds.state_dict()  # the position after the last document read
        self.exhausted = len(texts) < self.read_size
        self.epoch_docs += len(texts)
        eot = [] if self.tok.eot_token is None else [self.tok.eot_token]
        return [np.array(eot + ids, dtype=self.dtype) for ids in self.tok.encode_batch(texts)]

    def _draw(self) -> np.ndarray:
        """The next document's tokens, taken at random from the shuffle buffer, which is then topped up."""
        while len(self.buffer) <= self.shuffle_buffer - self.read_size and not self.exhausted:
            if self.drawn == 0 and not self.buffer and self.shuffle_buffer >= 1000:
                print0(f"filling the shuffle buffer: {self.shuffle_buffer:,} documents of {self.dataset} ...")
            self.buffer.extend(self._read())
        if not self.buffer:  # this epoch is used up: start the next one
            if self.epoch_docs == 0:
                raise ValueError(f"{self.dataset!r} (split {self.split!r}, rank {self.rank} of {self.world_size}) "
                                 f"yielded no documents")
            self.epoch += 1
            self._open(None)
            return self._draw()
        i = int(np.random.default_rng([self.seed, self.rank, self.drawn]).integers(len(self.buffer)))
        self.drawn += 1
        self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
        return self.buffer.pop()

    def _batch(self):
        """(x, y, state after this batch) on the CPU."""
        n = self.B * self.T + 1
        if len(self.tokens) < n:
            parts, have = [self.tokens], len(self.tokens)
            while have < n:
                parts.append(self._draw())
                have += len(parts[-1])
            self.tokens = np.concatenate(parts)
        buf = torch.from_numpy(self.tokens[:n].astype(np.int64))
        self.tokens = self.tokens[n - 1:]  # the last target is the next batch's first input
        x, y = buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)  # (B, T) each
        return x, y, self._snapshot()

    def _snapshot(self) -> dict:
        """Everything a resume needs. Cheap: the token arrays are never modified in place, so a shallow copy of
        the buffer list is a true copy."""
        return {"epoch": self.epoch, "drawn": self.drawn, "hf_state": self.hf_state, "exhausted": self.exhausted,
                "epoch_docs": self.epoch_docs, "buffer": list(self.buffer), "tokens": self.tokens}

    def _produce(self):
        try:
            while True:
                self.queue.put(self._batch())
        except BaseException as e:  # handed to next_batch, which raises it in the training loop
            self.queue.put(e)

    def next_batch(self):
        if self.prefetch == 0:
            x, y, self.state = self._batch()
        else:
            if self.thread is None:
                self.queue = queue.Queue(maxsize=self.prefetch)
                self.thread = threading.Thread(target=self._produce, daemon=True, name="StreamingLoader")
                self.thread.start()
            item = self.queue.get()
            if isinstance(item, BaseException):
                raise item
            x, y, self.state = item
        return _to_device(x, y, self.device)

    def state_dict(self) -> dict:
        """This rank's position after the batches served so far, in types torch.load(weights_only=True) reads."""
        s = self.state
        lengths = [len(d) for d in s["buffer"]]
        buffer = np.concatenate(s["buffer"]) if s["buffer"] else np.zeros(0, dtype=self.dtype)
        return {"rank": self.rank, "world_size": self.world_size, "seed": self.seed, "epoch": s["epoch"],
                "drawn": s["drawn"], "hf_state": s["hf_state"], "exhausted": s["exhausted"],
                "epoch_docs": s["epoch_docs"],
                "buffer": torch.from_numpy(buffer.copy()), "buffer_lengths": lengths,
                "tokens": torch.from_numpy(np.array(s["tokens"]))}

    def load_state_dict(self, state):
        """Continue from a state_dict(); under DDP, `state` may be the list of every rank's state."""
        if isinstance(state, (list, tuple)):
            if len(state) != self.world_size:
                raise ValueError(f"the saved loader states are for {len(state)} ranks, this job has "
                                 f"{self.world_size}; a streaming run resumes on the number of ranks it started with")
            state = state[self.rank]
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(f"the saved loader state belongs to rank {state['rank']} of {state['world_size']}, "
                             f"this loader is rank {self.rank} of {self.world_size}; save every rank's state "
                             f"(torch.distributed.all_gather_object) and pass the list")
        if self.thread is not None:
            raise RuntimeError("load_state_dict must be called before the first next_batch()")
        self.seed, self.epoch, self.drawn = int(state["seed"]), int(state["epoch"]), int(state["drawn"])
        self._open(state["hf_state"])
        self.exhausted, self.epoch_docs = bool(state["exhausted"]), int(state["epoch_docs"])
        buffer = state["buffer"].numpy().astype(self.dtype)
        self.buffer = list(np.split(buffer, np.cumsum(state["buffer_lengths"])[:-1])) if state["buffer_lengths"] else []
        self.tokens = state["tokens"].numpy().astype(self.dtype)
        self.state = self._snapshot()

# ----------------------------------------------------------------------------------------------
# records: the examples of finetune.py, align.py and eval.py, each with the FILE:LINE it came from

# how each local file is read, by extension (after .gz/.bz2/.xz); a file with no extension is sniffed
RECORD_FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".txt": "txt"}
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
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
            rows += _file_records(path, split, require, header, txt_records, encoding, bad)
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
    looks_local = lambda p: (os.path.exists(p) or glob.has_magic(p) or _format_of(p) in RECORD_FORMATS.values()
                             or p.startswith((".", "/", "~")) or p.endswith(os.sep))
    if len(parts) == 1 and not looks_local(parts[0]):
        return None
    paths = []
    for p in parts:
        p = os.path.expanduser(p)
        if os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p) if not f.startswith("."))
            files = [f for f in found if os.path.isfile(f) and _format_of(f) != "?"]
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


def _format_of(path: str) -> Optional[str]:
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


def _file_records(path: str, split: str, require: dict, header: Optional[bool], txt_records: str,
                  encoding: str, bad: list) -> list:
    """[(where, record dict, or a str saying what is wrong with it)] of one local file; file-wide problems go
    to `bad` (or raise, where no record of the file can be trusted)."""
    fmt = _format_of(path)
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
