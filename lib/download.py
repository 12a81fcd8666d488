"""
One downloader for weights, evaluation sets and corpora: streamed with a progress bar, resumed after an
interruption, retried, verified (size and checksums), renamed into place only when complete, one process at a time.
"""

import hashlib
import os
import sys
import time
from typing import Optional


def _announced_checksums(response) -> dict:
    """Checksums the server states: Azure's Content-MD5 (base64 MD5 of the whole blob; on a ranged reply it
    is x-ms-blob-content-md5) and the Hub's X-Linked-Etag (sha256 of an LFS file, on the redirect)."""
    import base64
    out = {}
    for r in (*response.history, response):
        md5 = r.headers.get("x-ms-blob-content-md5") or (r.status_code == 200 and r.headers.get("Content-MD5"))
        if md5:
            out["md5"] = base64.b64decode(md5).hex()
        etag = r.headers.get("X-Linked-Etag", "").strip('"')
        if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag):
            out["sha256"] = etag
    return out


def _checksum_mismatch(path: str, expect: dict) -> Optional[str]:
    """None if the file's digests match every expected one, else a description of the first mismatch."""
    if not expect:
        return None
    hashes = {k: hashlib.new(k) for k in expect}
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            for h in hashes.values():
                h.update(block)
    for k, h in hashes.items():
        if h.hexdigest() != expect[k]:
            return f"{k} {h.hexdigest()}, expected {expect[k]}"
    return None


def download(url: str, path: str, sha256: Optional[str] = None, retries: int = 4, backoff: float = 1.0,
             timeout: float = 30.0, chunk_size: int = 1 << 16, hint: str = "") -> str:
    """Fetch url to path -> path. Streamed with a progress bar, resumed from path + '.part' with an HTTP Range
    request after an interruption, retried (retries = failures in a row without progress, waiting backoff,
    2*backoff, ... seconds), size and checksum (sha256 given, or announced by the server) verified, and renamed
    to path only when complete. An existing path is taken as done: only this function writes it. Processes that
    download the same file at once (DDP ranks, nodes sharing a home directory) take turns on a lock file, so the
    first downloads and the others find the file. hint: the offline fix, added to a connection error.
    A connection lost mid-chunk loses that chunk's bytes (requests raises before returning them), so chunks
    stay small."""
    import fcntl
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if os.path.exists(path):  # another process finished it while this one waited
            return path
        return _download(url, path, sha256, retries, backoff, timeout, chunk_size, hint)


def _download(url, path, sha256, retries, backoff, timeout, chunk_size, hint) -> str:
    import requests
    from tqdm import tqdm
    part, failures, error, reached = path + ".part", 0, None, False
    expect = {"sha256": sha256} if sha256 else {}
    while failures < retries:
        have = os.path.getsize(part) if os.path.exists(part) else 0
        got = 0
        try:
            with requests.get(url, headers={"Range": f"bytes={have}-"} if have else {}, stream=True,
                              timeout=timeout) as r:
                reached = True
                if r.status_code == 404:
                    raise FileNotFoundError(f"{url} answered 404 Not Found: check the name and the base URL")
                if r.status_code == 416 and have:  # nothing past our end: the partial file may be whole already
                    total = int(r.headers.get("Content-Range", "*/-1").rsplit("/", 1)[1])
                elif r.status_code >= 400:
                    raise requests.HTTPError(f"{url} answered {r.status_code} {r.reason}", response=r)
                else:
                    if not sha256:
                        expect.update(_announced_checksums(r))
                    if r.status_code == 206 and r.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                        total = int(r.headers["Content-Range"].rsplit("/", 1)[1])  # "bytes 100-199/200"
                    else:  # a full reply (the server ignored Range, or this is the first try): start over
                        have = 0
                        total = int(r.headers["Content-Length"]) if "Content-Length" in r.headers else None
                    with open(part, "ab" if have else "wb") as f, \
                            tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                                 desc=os.path.basename(path), leave=False, disable=not sys.stderr.isatty()) as bar:
                        for chunk in r.iter_content(chunk_size):
                            f.write(chunk)
                            bar.update(len(chunk))
                            got += len(chunk)
        except (requests.ConnectionError, requests.Timeout, requests.HTTPError,
                requests.exceptions.ChunkedEncodingError) as e:  # the last: connection lost mid-body
            if isinstance(e, requests.HTTPError) and e.response is not None and 400 <= e.response.status_code < 500 \
                    and e.response.status_code not in (408, 429):
                raise ValueError(f"{url}: {e}") from e
            error = e
        else:
            size = os.path.getsize(part)
            if total is not None and size < total:
                error = ConnectionError(f"the connection closed after {size:,} of {total:,} bytes")
            elif total is not None and size > total:
                os.remove(part)
                got, error = 0, ConnectionError(f"the partial file had {size:,} bytes, more than the {total:,} "
                                                f"the server has")
            else:
                bad = _checksum_mismatch(part, expect)
                if bad is None:
                    os.replace(part, path)
                    checked = " and ".join(["size"] + sorted(expect))
                    print(f"downloaded {url} ({size:,} bytes, {checked} verified) -> {path}")
                    return path
                os.remove(part)  # corrupt: never resume from it
                got, error = 0, ValueError(f"{url} downloaded corrupt: {bad}")
        failures = 0 if got else failures + 1  # bytes kept reset the count: a flaky link still finishes
        if failures < retries:
            wait = backoff * 2 ** max(failures - 1, 0)
            print(f"WARNING: download of {url} failed ({error}); retrying in {wait:g} s")
            time.sleep(wait)
    if isinstance(error, ValueError):
        raise error
    offline = "" if reached else f"no network connection to {url.split('/')[2]}: "
    raise ConnectionError(f"{offline}could not download {url}: {retries} attempt(s) in a row failed ({error})."
                          + (f" {hint}" if hint else "")) from error
