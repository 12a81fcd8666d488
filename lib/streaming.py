"""
Batches straight from a text dataset with no prepare step: a Hub dataset or local .jsonl/.parquet/.txt/.csv
files, tokenized while training, resumable exactly.

    loader = StreamingLoader("HuggingFaceFW/fineweb-edu", name="sample-10BT", batch_size=8, block_size=1024)
    loader = StreamingLoader("json", data_files="corpus.jsonl", ...)  # or a local file: "corpus.jsonl"
"""

import glob
import os
import queue
import threading
from typing import Optional

import numpy as np
import torch

from lib.runtime import print0
from lib.tokenizer import get_tokenizer
from lib.tokens import _to_device

# extensions of local files and the `datasets` builder that reads them (compressed variants too)
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


def _builder_of(path: str) -> Optional[str]:
    stem = path[:-len(os.path.splitext(path)[1])] if path.endswith((".gz", ".zst", ".bz2", ".xz")) else path
    return LOCAL_BUILDERS.get(os.path.splitext(stem)[1].lower())


def open_text_stream(dataset: str, name: Optional[str] = None, split: str = "train", data_files=None):
    """A streaming `datasets` IterableDataset (nothing downloaded up front, no Arrow cache written). dataset: a Hugging
    Face dataset; a local file, folder or glob whose extension says how to read it ('corpus.jsonl', 'books/' of .txt
    files, each one document); or a builder ('json', 'parquet', 'text', 'csv') with data_files."""
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
    """Documents stream in (each rank its own disjoint part), are tokenized with <|endoftext|> before each (as
    data/fineweb/prepare.py writes them), pass a shuffle buffer of shuffle_buffer documents and are packed back to
    back into windows of block_size + 1 tokens, nothing padded or dropped; then the next epoch. A background
    thread prepares up to `prefetch` batches ahead. state_dict() is this rank's exact position (under DDP pass
    every rank's, as a list, to load_state_dict)."""

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
        """Everything a resume needs (cheap: the token arrays are never modified in place)."""
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
