"""
Loaders: BinLoader over real uint16 token files (raw and headered shards) and StreamingLoader over a real local
jsonl through `datasets` streaming: window bounds, rank partitions, exact resume, lossless packing, clear errors.
"""

import io
import json

import numpy as np
import pytest
import torch

from lib.streaming import StreamingLoader, open_text_stream
from lib.tokenizer import get_tokenizer
from lib.tokens import BinLoader, largest_id, write_tokens


def roundtrip(state):
    """A loader state through torch.save / torch.load(weights_only=True), as in a checkpoint."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.fixture
def shards(tmp_path):
    """Three headered train shards with consecutive ids (0..999, 1000..1599, 1600..2299) and a raw val.bin."""
    for i, (a, b) in enumerate([(0, 1000), (1000, 1600), (1600, 2300)]):
        write_tokens(str(tmp_path / f"toy_train_{i + 1:06d}.bin"), np.arange(a, b), header=True, vocab_size=50257)
    write_tokens(str(tmp_path / "val.bin"), np.arange(5000, 5100))
    return str(tmp_path)

# ----------------------------------------------------------------------------------------------
# BinLoader


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_windows_never_cross_a_file_end(shards, mode):
    loader = BinLoader(shards, "train", batch_size=8, block_size=32, mode=mode)
    ends = {999, 1599, 2299}
    for _ in range(60):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (8, 32) and x.dtype == torch.int64
        assert torch.equal(y, x + 1)  # consecutive ids: the window lies inside one file and y is x shifted
        for row in y:  # the last target is still in the file that holds the first input
            assert not any(int(row[0]) <= e < int(row[-1]) for e in ends)


def test_sequential_tiles_the_stream_and_ranks_split_it(shards):
    single = BinLoader(shards, "train", batch_size=2, block_size=16, mode="sequential")
    batches = [single.next_batch()[0] for _ in range(8)]
    # rows overlap by one token, so consecutive rows in a file continue each other
    assert torch.equal(batches[0].flatten(), torch.arange(0, 32))
    assert batches[1][0, 0] == 32
    ranks = [BinLoader(shards, "train", batch_size=2, block_size=16, rank=r, world_size=2, mode="sequential")
             for r in range(2)]
    seen = [[ranks[r].next_batch()[0] for _ in range(4)] for r in range(2)]
    for k in range(4):  # global batch k * world_size + rank
        assert torch.equal(seen[0][k], batches[2 * k]) and torch.equal(seen[1][k], batches[2 * k + 1])
    starts = [{int(b[0, 0]) for b in s} for s in seen]
    assert not starts[0] & starts[1]  # disjoint data


def test_random_mode_ranks_interleave_and_resume_exactly(shards):
    single = BinLoader(shards, "train", batch_size=4, block_size=8, seed=7)
    batches = [single.next_batch()[0] for _ in range(6)]
    r1 = BinLoader(shards, "train", batch_size=4, block_size=8, seed=7, rank=1, world_size=2)
    assert torch.equal(r1.next_batch()[0], batches[1]) and torch.equal(r1.next_batch()[0], batches[3])
    assert not torch.equal(batches[0], batches[1])
    # resume: a fresh loader (even built with another seed) continues from the saved state
    first = BinLoader(shards, "train", batch_size=4, block_size=8, seed=7)
    for _ in range(4):
        first.next_batch()
    resumed = BinLoader(shards, "train", batch_size=4, block_size=8, seed=99)
    resumed.load_state_dict(roundtrip(first.state_dict()))
    assert torch.equal(resumed.next_batch()[0], batches[4]) and torch.equal(resumed.next_batch()[0], batches[5])
    # resumed on 2 ranks: rank 0 continues with global batch 4
    r0 = BinLoader(shards, "train", batch_size=4, block_size=8, rank=0, world_size=2)
    r0.load_state_dict(roundtrip(first.state_dict()))
    assert torch.equal(r0.next_batch()[0], batches[4])


def test_bin_loader_errors(shards, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no 'test' token files .*Prepare the data first: python "
                                                r"data/<dataset>/prepare.py --out_dir="):
        BinLoader(shards, "test", batch_size=2, block_size=8)
    with pytest.raises(ValueError, match=r"has 100 tokens per file at most, fewer than block_size \+ 1 = 129"):
        BinLoader(shards, "val", batch_size=2, block_size=128)
    with pytest.raises(ValueError, match=r"too short for one sequential batch of 8 x 64 tokens"):
        BinLoader(shards, "val", batch_size=8, block_size=64, mode="sequential")
    with pytest.raises(ValueError, match=r"mode must be 'random' or 'sequential', got 'shuffled'"):
        BinLoader(shards, "val", batch_size=2, block_size=8, mode="shuffled")
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\), got 2"):
        BinLoader(shards, "val", batch_size=2, block_size=8, rank=2, world_size=2)
    with open(tmp_path / "toy_train_000002.bin", "r+b") as f:
        f.truncate(1500)
    with pytest.raises(ValueError, match=r"toy_train_000002.bin' is truncated or corrupt"):
        BinLoader(shards, "train", batch_size=2, block_size=8)
    loader = BinLoader(shards, "val", batch_size=2, block_size=8)
    with pytest.raises(ValueError, match=r"saved loader state is for mode='sequential'"):
        loader.load_state_dict({"step": 3, "mode": "sequential"})

# ----------------------------------------------------------------------------------------------
# StreamingLoader on a local jsonl


@pytest.fixture
def docs(tmp_path, monkeypatch):
    """Two jsonl files (two stream shards) of 20 short documents each; the HF cache goes to tmp_path and the
    Hub is never asked (hermetic)."""
    import datasets.config
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    rng = np.random.default_rng(0)
    words = "the king queen of and to my lord thou art sweet love night day come go".split()
    texts = [" ".join(rng.choice(words, size=rng.integers(5, 40))) + f" ({i})." for i in range(40)]
    files = []
    for k in range(2):
        files.append(str(tmp_path / f"part{k}.jsonl"))
        with open(files[-1], "w") as f:
            f.writelines(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts[20 * k:20 * k + 20]))
    return files, texts


def streamed(loader, n):
    """The token stream the loader serves: the inputs of n batches, row after row."""
    return torch.cat([loader.next_batch()[0].flatten() for _ in range(n)]).tolist()


def split_docs(ids: list, eot: int) -> list:
    """Token ids -> the documents between <|endoftext|> tokens (each starts with one)."""
    cuts = [i for i, t in enumerate(ids) if t == eot] + [len(ids)]
    return [tuple(ids[a:b]) for a, b in zip(cuts, cuts[1:])]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_streaming_packing_is_lossless_across_epochs(docs, prefetch):
    files, texts = docs
    tok = get_tokenizer("gpt2")
    epoch = [t for text in texts for t in [tok.eot_token] + tok.encode_ordinary(text)]
    loader = StreamingLoader("json", data_files=files, batch_size=3, block_size=16, shuffle_buffer=1,
                             prefetch=prefetch)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (3, 16) and x.dtype == torch.int64
    assert torch.equal(x.flatten()[1:], y.flatten()[:-1])  # rows continue each other; y is x shifted
    n = 2 * len(epoch) // 48 + 2
    got = x.flatten().tolist() + streamed(loader, n - 1)
    assert got == (epoch * 3)[:len(got)]  # every token once, in order, and the next epoch right after


def test_streaming_shuffle_keeps_every_document(docs):
    files, texts = docs
    tok = get_tokenizer("gpt2")
    expected = sorted(tuple([tok.eot_token] + tok.encode_ordinary(t)) for t in texts)
    n_tokens = sum(map(len, expected))
    loader = StreamingLoader(files[0].replace("part0", "part*"), batch_size=2, block_size=16, shuffle_buffer=8)
    got = split_docs(streamed(loader, n_tokens // 32 + 1)[:n_tokens], tok.eot_token)
    assert sorted(got) == expected  # the first epoch is a permutation of the documents ...
    assert got != [tuple([tok.eot_token] + tok.encode_ordinary(t)) for t in texts]  # ... not the file order


def test_streaming_resume_is_exact(docs):
    """Saved mid-epoch (a full shuffle buffer, a partly served document), resumed past the end of the epoch."""
    files, _ = docs

    def make():
        return StreamingLoader("json", data_files=files, batch_size=2, block_size=16, shuffle_buffer=8, seed=3)

    full = make()
    expected = [full.next_batch() for _ in range(40)]
    first = make()
    for _ in range(15):
        first.next_batch()
    state = roundtrip([first.state_dict()])  # as train.py saves it: one state per rank
    resumed = make()
    resumed.load_state_dict(state)
    for x, y in expected[15:]:
        x2, y2 = resumed.next_batch()
        assert torch.equal(x, x2) and torch.equal(y, y2)


@pytest.mark.parametrize("n_files", [1, 2])  # 'examples' and 'shards' strategies of split_dataset_by_node
def test_streaming_ranks_read_disjoint_documents(docs, n_files):
    files, texts = docs
    tok = get_tokenizer("gpt2")
    texts = texts[:20 * n_files]
    per_rank = []
    for rank in range(2):
        loader = StreamingLoader("json", data_files=files[:n_files], batch_size=1, block_size=16, rank=rank,
                                 world_size=2, shuffle_buffer=1, prefetch=0)
        got = split_docs(streamed(loader, 40), tok.eot_token)[:-1]  # the last document may be cut
        per_rank.append({tok.decode(d[1:]) for d in got})
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] <= set(texts) and len(per_rank[0] | per_rank[1]) >= len(texts) * 0.8


def test_streaming_errors(docs, tmp_path):
    files, _ = docs
    loader = StreamingLoader("json", data_files=files, batch_size=2, block_size=8, text_field="body", prefetch=1)
    with pytest.raises(ValueError, match=r"have no field 'body'; their fields are \['n', 'text'\]"):
        loader.next_batch()
    with pytest.raises(TypeError, match=r"field 'n' .* holds int values"):
        StreamingLoader("json", data_files=files, text_field="n", prefetch=0).next_batch()
    with pytest.raises(FileNotFoundError, match=r"dataset='missing.jsonl' is no file"):
        StreamingLoader("missing.jsonl")
    with pytest.raises(ValueError, match=r"dataset='json' reads local files: pass them too"):
        open_text_stream("json")
    with pytest.raises(FileNotFoundError, match=r"data_files \['nope/\*.jsonl'\] match no file"):
        open_text_stream("json", data_files=["nope/*.jsonl"])
    with pytest.raises(ValueError, match=r"block_size must be an int >= 1, got 0"):
        StreamingLoader("json", data_files=files, block_size=0)
    r1 = StreamingLoader("json", data_files=files, rank=1, world_size=2, block_size=8)
    r0_state = StreamingLoader("json", data_files=files, rank=0, world_size=2, block_size=8).state_dict()
    with pytest.raises(ValueError, match=r"belongs to rank 0 of 2, this loader is rank 1 of 2"):
        r1.load_state_dict(r0_state)
    with pytest.raises(ValueError, match=r"states are for 1 ranks, this job has 2"):
        r1.load_state_dict([r0_state])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty.jsonl'\] is empty"):
        StreamingLoader(str(empty), block_size=8)
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": "a single document"}) + "\n")
    with pytest.raises(ValueError, match=r"one.jsonl' \(split 'train', rank 1 of 2\) yielded no documents"):
        StreamingLoader(str(one), block_size=8, rank=1, world_size=2).next_batch()


def test_ids_beyond_the_vocabulary_are_refused_as_batches_are_read(tmp_path):
    """A corpus with no meta.json to say what it holds: the loader checks every batch against the model's
    vocabulary (else torch's IndexError from deep inside the embedding), naming the split, folder and id."""
    ids = np.arange(200, dtype=np.uint16)
    ids[150] = 60000
    write_tokens(str(tmp_path / "train.bin"), ids)
    assert largest_id([str(tmp_path / "train.bin")]) == 60000 and largest_id([str(tmp_path / "train.bin")], 10) is None
    loader = BinLoader(str(tmp_path), "train", batch_size=1, block_size=199, mode="sequential", vocab_size=50304)
    with pytest.raises(ValueError, match=r"'train' token files in .* hold id 60000, beyond the model's vocabulary of "
                                         r"50,304 ids"):
        loader.next_batch()
    ok = BinLoader(str(tmp_path), "train", batch_size=1, block_size=100, mode="sequential", vocab_size=50304)
    x, y = ok.next_batch()  # ids 0..100: within the vocabulary
    assert x.shape == (1, 100)
