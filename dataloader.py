"""
Batches for training, from prepared token files (data/<dataset>/prepare.py).

    loader = BinLoader("data/shakespeare_char", "train", batch_size=12, block_size=64)
    x, y = loader.next_batch()   # (B, T) int64 each, y is x shifted by one token
    state = loader.state_dict()  # plain ints: resume exactly with loader.load_state_dict(state)

Batches are numbered globally: the k-th batch of rank r in a job of world_size ranks is global batch
k * world_size + r. A batch depends only on (seed, its global number), so 2 ranks draw exactly the batches
that 1 process draws in twice as many steps, and resuming needs nothing but the step count.
"""

import glob
import os

import numpy as np
import torch

from common import read_tokens


def token_files(data_dir: str, split: str) -> list:
    """The token files of a split: data_dir/{split}.bin, or the shards data_dir/*_{split}_NNNNNN.bin."""
    single = os.path.join(data_dir, f"{split}.bin")
    if os.path.exists(single):
        return [single]
    shards = sorted(glob.glob(os.path.join(data_dir, f"*_{split}_[0-9]*.bin")))
    if not shards:
        name = os.path.basename(os.path.normpath(data_dir))
        raise FileNotFoundError(f"no {split!r} token files in {data_dir!r} (looked for {split}.bin and "
                                f"*_{split}_NNNNNN.bin). Prepare the data first: python data/{name}/prepare.py")
    return shards


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
        self.files = token_files(data_dir, split)
        self.B, self.T = batch_size, block_size
        self.rank, self.world_size, self.seed, self.mode = rank, world_size, seed, mode
        self.device = device
        self.lengths = [len(read_tokens(f)) for f in self.files]
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
        return {"step": self.step, "seed": self.seed, "mode": self.mode}

    def load_state_dict(self, state: dict):
        self.step = int(state["step"])

    def next_batch(self):
        g = self.step * self.world_size + self.rank  # global batch number
        self.step += 1
        if self.mode == "random":
            rng = np.random.default_rng([self.seed, g])
            # pick files in proportion to their usable length, then offsets within them
            usable = np.array([max(n - self.T, 0) for n in self.lengths], dtype=np.float64)
            fi = rng.choice(len(self.files), size=self.B, p=usable / usable.sum())
            rows = []
            for i in range(self.B):
                data = read_tokens(self.files[fi[i]])  # re-mapped per batch: np.memmap otherwise leaks pages
                start = int(rng.integers(0, self.lengths[fi[i]] - self.T))
                rows.append(np.asarray(data[start:start + self.T + 1], dtype=np.int64))
            buf = np.stack(rows)  # (B, T+1)
        else:
            g %= int(self.first_batch[-1])  # wrap around: the next epoch
            fi = int(np.searchsorted(self.first_batch, g, side="right") - 1)
            start = (g - int(self.first_batch[fi])) * self.B * self.T
            data = read_tokens(self.files[fi])
            flat = np.asarray(data[start:start + self.B * self.T + 1], dtype=np.int64)
            buf = np.stack([flat[i * self.T:(i + 1) * self.T + 1] for i in range(self.B)])  # (B, T+1)
        x = torch.from_numpy(buf[:, :-1].copy())
        y = torch.from_numpy(buf[:, 1:].copy())
        if self.device.startswith("cuda"):
            # pinned host memory lets the copy overlap with compute
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)
