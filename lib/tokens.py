"""
Token files and the batches train.py reads from them: raw uint16 (nanoGPT's train.bin / val.bin) or shards with
a header (data/fineweb), memory-mapped.

    loader = BinLoader("data/shakespeare_char", "train", batch_size=12, block_size=64)
    x, y = loader.next_batch()   # (B, T) int64 each, y is x shifted by one token
    state = loader.state_dict()  # plain ints: resume exactly with loader.load_state_dict(state)

BinLoader batches are numbered globally: the k-th batch of rank r in a job of world_size ranks is global batch
k * world_size + r. A batch depends only on (seed, its global number), so 2 ranks draw exactly the batches
that 1 process draws in twice as many steps, and resuming needs nothing but the step count.
"""

import glob
import os
from typing import Optional

import numpy as np
import torch

from lib.tokenizer import CharTokenizer, read_meta_json, read_meta_pkl

HEADER_BYTES = 1024  # 128 little-endian int64 values
# Low 16 bits 0xFFFF: read as uint16 tokens, a header starts with id 65535, which no vocabulary below
# 65535 ids can produce, so a headered file is never mistaken for a raw one.
SHARD_MAGIC = 0x4C4C4D45_FFFF  # 'LLME' + 0xFFFF
SHARD_VERSION = 1


def write_tokens(path: str, tokens, header: bool = False, vocab_size: int = 0):
    """Write uint16 token ids atomically (temporary name, then rename), with a shard header if asked."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2 ** 16):
        raise ValueError(f"token ids must fit in uint16 for {path!r}: found range [{tokens.min()}, {tokens.max()}]")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        if header:
            h = np.zeros(HEADER_BYTES // 8, dtype="<i8")
            h[:4] = [SHARD_MAGIC, SHARD_VERSION, tokens.size, vocab_size]
            f.write(h.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    os.replace(tmp, path)


def read_tokens(path: str) -> np.memmap:
    """Memory-map a token file (raw uint16 or headered shard) without reading it into RAM; a truncated or
    foreign shard is refused with a clear error."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"token file {path!r} does not exist")
    size = os.path.getsize(path)
    offset = 0
    if size >= HEADER_BYTES and np.fromfile(path, dtype="<i8", count=1)[0] == SHARD_MAGIC:
        h = np.fromfile(path, dtype="<i8", count=HEADER_BYTES // 8)
        if h[1] != SHARD_VERSION:
            raise ValueError(f"{path!r} is a token shard of version {h[1]}, this code reads version {SHARD_VERSION}")
        expected = HEADER_BYTES + 2 * int(h[2])
        if size != expected:
            raise ValueError(f"{path!r} is truncated or corrupt: its header promises {int(h[2]):,} tokens "
                             f"({expected:,} bytes) but the file has {size:,} bytes; delete it and re-run the "
                             f"prepare script that wrote it")
        offset = HEADER_BYTES
    elif size % 2:
        raise ValueError(f"{path!r} has an odd number of bytes ({size:,}): not a uint16 token file")
    if size == offset:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r", offset=offset)


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


def data_tokenizer(data_dir: str) -> tuple:
    """What the token files of data_dir hold, from what its prepare script wrote beside them -> (tokenizer meta, as a
    checkpoint stores it; ids the data may hold; the largest id recorded, or None). Characters: the vocabulary of
    meta.json or nanoGPT's meta.pkl (both there: they must agree); GPT-2's BPE otherwise. A meta.json that says
    characters with no vocabulary is an error: its ids read as GPT-2's would train in silence on noise."""
    meta_json, meta_pkl = os.path.join(data_dir, "meta.json"), os.path.join(data_dir, "meta.pkl")
    described = read_meta_json(meta_json) if os.path.exists(meta_json) else {}
    if described.get("tokenizer", "char" if os.path.exists(meta_pkl) else "gpt2") != "char":
        return {"tokenizer": "gpt2"}, 50257, described.get("max_id")
    if "itos" not in described and not os.path.exists(meta_pkl):
        raise FileNotFoundError(f"{data_dir!r} holds character-level token files (its meta.json says so) but no "
                                f"vocabulary (meta.pkl, or itos in meta.json): prepare it again, e.g. python "
                                f"data/shakespeare_char/prepare.py")
    tok = CharTokenizer.load(meta_pkl if os.path.exists(meta_pkl) else meta_json)
    if os.path.exists(meta_pkl) and "itos" in described:
        pkl = read_meta_pkl(meta_pkl)
        if not isinstance(pkl, dict) or CharTokenizer.from_meta(pkl).chars != tok.chars:
            raise ValueError(f"{meta_pkl!r} and the meta.json beside it describe different vocabularies: the meta.pkl "
                             f"belongs to another corpus. Prepare the data again with its prepare script")
    return tok.meta(), tok.n_vocab, described.get("max_id")


def largest_id(files: list, limit: int = 100_000_000) -> Optional[int]:
    """The largest token id in files when they hold at most `limit` tokens in all (200 MB: about 0.1 s), else None
    (BinLoader(vocab_size=...) checks every batch as it is read either way)."""
    sizes = [len(read_tokens(f)) for f in files]
    if sum(sizes) > limit:
        return None
    return max((int(read_tokens(f).max()) for f, n in zip(files, sizes) if n), default=None)


def _to_device(x: torch.Tensor, y: torch.Tensor, device: str):
    if device.startswith("cuda"):
        # pinned host memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


class BinLoader:
    """Windows of block_size + 1 tokens from uint16 token files. mode='random': batch_size windows at random offsets
    (nanoGPT's get_batch), for corpora read many times. mode='sequential': batches tile the files in order and wrap
    around, for large sharded corpora read about once. No window crosses the end of a file."""

    def __init__(self, data_dir: str, split: str, batch_size: int, block_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 1337, mode: str = "random", device: str = "cpu",
                 vocab_size: Optional[int] = None):
        if mode not in ("random", "sequential"):
            raise ValueError(f"mode must be 'random' or 'sequential', got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        self.files, self.split = token_files(data_dir, split), split
        self.B, self.T = batch_size, block_size
        self.rank, self.world_size, self.seed, self.mode = rank, world_size, seed, mode
        self.device, self.vocab_size = device, vocab_size  # ids at or beyond vocab_size are refused, batch by batch
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
        if self.vocab_size is not None and buf.max() >= self.vocab_size:  # else torch's IndexError, deep inside
            raise ValueError(f"{self.split!r} token files in {os.path.dirname(self.files[0])!r} hold id {buf.max()}, "
                             f"beyond the model's vocabulary of {self.vocab_size:,} ids: the data was prepared with "
                             f"another tokenizer. Prepare it with the model's (e.g. python data/shakespeare/prepare.py "
                             f"for GPT-2's) or train a model on this data from scratch")
        x = torch.from_numpy(buf[:, :-1].copy())
        y = torch.from_numpy(buf[:, 1:].copy())
        return _to_device(x, y, self.device)
