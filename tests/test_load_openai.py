"""
load_openai.py: the numpy-only TensorFlow checkpoint reader on a fixture written by TensorFlow itself
(tests/fixtures/make_tf_checkpoint.py), the OpenAI -> ours mapping against the Hugging Face path, the
four released configs, and downloads against a local HTTP server on 127.0.0.1 (no network).
"""

import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from lib.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from lib.download import download
from lib.gpt2_weights import (OPENAI_FILES, PRETRAINED, config_from_openai, fetch_pretrained, load_dir, load_pretrained,
                              openai_shapes, pretrained_config, pretrained_urls, state_dict_from_openai)
from lib.models import load_model, model_from_checkpoint
from lib.quant import WeightOnlyQuantizer
from lib.tf_checkpoint import crc32c, read_tf_checkpoint, read_tf_index
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TF_DIR = os.path.join(ROOT, "tests", "fixtures", "gpt2_tiny_tf")
HF_DIR = os.path.join(ROOT, "tests", "fixtures", "gpt2_tiny_hf")
DATA = "model.ckpt.data-00000-of-00001"


def copy_fixture(tmp_path, src=TF_DIR):
    dst = tmp_path / os.path.basename(src)
    shutil.copytree(src, dst)
    return dst

# ----------------------------------------------------------------------------------------------
# TF tensor-bundle reader


def test_crc32c_matches_reference():
    """Known vector (RFC 3720 B.4 check value) and a bitwise reference across the 1 KiB chunk seams."""
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0

    def slow(data):
        crc = 0xFFFFFFFF
        for b in data:
            crc ^= b
            for _ in range(8):
                crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        return crc ^ 0xFFFFFFFF

    rng = np.random.default_rng(0)
    for n in (1, 1023, 1024, 1025, 3 * 1024 + 7):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert crc32c(data) == slow(data), n
    data = rng.integers(0, 256, 40 * 1024 + 3, dtype=np.uint8).tobytes()
    assert crc32c(data, lanes=7) == crc32c(data) == slow(data)  # several batches of lanes


def test_reader_returns_the_exact_arrays():
    """Every tensor TF wrote equals, bit for bit, the same numbers written by safetensors."""
    from safetensors.numpy import load_file
    entries = read_tf_index(os.path.join(TF_DIR, "model.ckpt.index"))
    assert entries.pop("") == {"num_shards": 1}
    assert entries["model/h0/attn/c_attn/w"]["shape"] == [1, 32, 96]
    arrays = read_tf_checkpoint(os.path.join(TF_DIR, "model.ckpt"))
    assert set(arrays) == set(entries) == set(openai_shapes(config_from_openai(
        json.load(open(os.path.join(TF_DIR, "hparams.json"))))))
    hf = load_file(os.path.join(HF_DIR, "model.safetensors"))
    for name, a in arrays.items():
        parts = name.split("/")[1:]
        if parts[0].startswith("h"):
            parts[0] = "h." + parts[0][1:]
        leaf = {"g": "weight", "b": "bias", "w": "weight"}.get(parts[-1])
        key = ".".join(parts[:-1] + [leaf]) if leaf else ".".join(parts) + ".weight"
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a[0] if a.ndim == 3 else a, hf[key], err_msg=name)


def test_tf_and_hf_layouts_give_the_same_model():
    """Both layouts of the fixture load into equal weights and equal logits (tests/test_model.py checks the
    Hugging Face path against transformers' GPT2LMHeadModel)."""
    m_tf = load_dir(TF_DIR).eval()
    m_hf = load_dir(HF_DIR).eval()
    assert m_tf.config == m_hf.config and m_tf.config.vocab_size == 96  # taken from the file, not padded
    assert m_tf.lm_head.weight is m_tf.transformer.wte.weight  # still tied after loading
    for k, v in m_hf.state_dict().items():
        assert torch.equal(m_tf.state_dict()[k], v), k
    idx = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(m_tf(idx)[0], m_hf(idx)[0])
    m_drop = load_dir(TF_DIR, dropout=0.1)
    assert m_drop.config.dropout == 0.1 and m_drop.transformer.h[0].attn.dropout == 0.1


def test_corrupt_or_truncated_checkpoints_are_refused(tmp_path):
    d = copy_fixture(tmp_path)
    data = bytearray((d / DATA).read_bytes())
    data[5000] ^= 0x01  # one flipped bit inside a tensor
    (d / DATA).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"corrupt: crc32c mismatch for tensor 'model/h0/"):
        load_dir(str(d))
    load_dir(str(d), verify=False)  # the check is what caught it
    (d / DATA).write_bytes(bytes(data[:-100]))
    with pytest.raises(ValueError, match=r"is truncated: tensor 'model/wte' needs bytes"):
        load_dir(str(d), verify=False)
    index = bytearray((d / "model.ckpt.index").read_bytes())
    index[20] ^= 0x01
    (d / "model.ckpt.index").write_bytes(bytes(index))
    with pytest.raises(ValueError, match=r"crc32c mismatch in the block at byte 0"):
        read_tf_index(str(d / "model.ckpt.index"))
    (d / "model.ckpt.index").write_bytes(b"not a table" * 10)
    with pytest.raises(ValueError, match=r"not a TensorFlow checkpoint index"):
        read_tf_index(str(d / "model.ckpt.index"))


def test_names_and_shapes_are_checked(tmp_path):
    arrays = read_tf_checkpoint(os.path.join(TF_DIR, "model.ckpt"))
    config = config_from_openai(json.load(open(os.path.join(TF_DIR, "hparams.json"))))
    bad = dict(arrays)
    bad["model/h9/attn/c_attn/w"] = bad.pop("model/h1/attn/c_attn/w")
    with pytest.raises(ValueError, match=r"missing \['model/h1/attn/c_attn/w'\], unused \['model/h9/attn/c_attn/w'\]"):
        state_dict_from_openai(bad, config)
    bad = dict(arrays, **{"model/h0/mlp/c_fc/w": arrays["model/h0/mlp/c_fc/w"][0]})  # leading 1 dropped
    with pytest.raises(ValueError, match=r"shape mismatch for model/h0/mlp/c_fc/w: the checkpoint has \(32, 128\), "
                                         r"hparams.json implies \(1, 32, 128\)"):
        state_dict_from_openai(bad, config)
    d = copy_fixture(tmp_path)
    hp = json.load(open(d / "hparams.json"))
    (d / "hparams.json").write_text(json.dumps(dict(hp, n_ctx=64)))
    with pytest.raises(ValueError, match=r"shape mismatch for model/wpe: the checkpoint has \(32, 32\)"):
        load_dir(str(d))
    (d / "hparams.json").write_text(json.dumps({"n_embd": 32}))
    with pytest.raises(ValueError, match=r"not a GPT-2 hparams.json: missing \['n_vocab', 'n_ctx', 'n_head'"):
        load_dir(str(d))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds neither OpenAI's layout .* it has \[\]"):
        load_dir(str(tmp_path / "empty"))


def test_cli_from_dir_writes_an_imported_checkpoint_and_hf_folder(tmp_path):
    from transformers import GPT2LMHeadModel
    out, hf = tmp_path / "out", tmp_path / "hf"
    r = subprocess.run([sys.executable, "load_openai.py", f"--from_dir={TF_DIR}", f"--out_dir={out}", "--check",
                        f"--export_hf={hf}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"wrote {out / 'ckpt.pt'}: python sample.py --init_from={out}" in r.stdout
    assert "loaded " + TF_DIR + " in " in r.stdout and "resume" not in r.stdout
    # a 96-token vocabulary is not GPT-2's: said twice, as the checkpoint is written and as --check is skipped
    assert "WARNING: vocab_size 96 is smaller than GPT-2's 50257" in r.stdout
    assert "WARNING: --check skipped: it needs GPT-2's tokenizer" in r.stdout
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["kind"] == "imported" and ckpt["resume"] is None and ckpt["model_args"]["vocab_size"] == 96
    assert ckpt["config"]["from_dir"] == TF_DIR and ckpt["origin"] == {"from_dir": TF_DIR}
    idx = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(1))
    model, _, _ = load_model(str(out))  # --init_from=<that folder>, as every script loads it
    with torch.no_grad():
        ref = load_dir(HF_DIR).eval()(idx)[0]
        torch.testing.assert_close(model.eval()(idx)[0], ref)
        torch.testing.assert_close(GPT2LMHeadModel.from_pretrained(str(hf)).eval()(idx).logits, ref)


def tiny_checkpoint(path, bias: bool, seed: int = 0):
    """A 2-layer model whose every weight (biases and LayerNorm gains too) is random, saved as a real checkpoint."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=32, vocab_size=50304, n_layer=2, n_head=2, n_embd=32, bias=bias))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    save_checkpoint(make_checkpoint("pretrain", model.state_dict(), vars(model.config), {}, {"tokenizer": "gpt2"}),
                    str(path))
    return model.eval()


@pytest.mark.parametrize("bias", [False, True])
def test_export_hf_from_any_checkpoint_matches_transformers(tmp_path, bias):
    """--init_from=CKPT --export_hf=DIR: transformers opens the folder and computes our logits; a bias-free
    model is exported with zero biases, which is exactly what no bias is."""
    from transformers import GPT2LMHeadModel
    ours = tiny_checkpoint(tmp_path / "ckpt.pt", bias)
    r = subprocess.run([sys.executable, "load_openai.py", f"--init_from={tmp_path / 'ckpt.pt'}",
                        f"--export_hf={tmp_path / 'hf'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert ("bias=False: exported as zero biases" in r.stdout) == (not bias) and "WARNING" not in r.stdout
    hf = GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    assert all(hf.state_dict()[f"transformer.h.{i}.mlp.c_fc.bias"].abs().sum() == 0 for i in range(2)) != bias
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (hf(idx).logits - ours(idx)[0]).abs().max().item()
    assert err < 1e-4, f"exported logits differ by {err}"


def test_cli_refuses_what_it_cannot_do(tmp_path, monkeypatch):
    import runpy

    import quantize as Q
    model = tiny_checkpoint(tmp_path / "ckpt.pt", bias=False)
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    save_checkpoint(Q.quantized_checkpoint(model, ckpt, None, WeightOnlyQuantizer("int8"), str(tmp_path / "ckpt.pt")),
                    str(tmp_path / "q.pt"))
    cases = [([f"--init_from={tmp_path / 'q.pt'}", f"--export_hf={tmp_path / 'hf'}"],
              r"q.pt' is quantized; export the float checkpoint it was made from, --init_from=.*ckpt.pt"),
             ([f"--init_from={tmp_path / 'ckpt.pt'}", f"--out_dir={tmp_path / 'o'}"],
              r"--init_from='.*ckpt.pt' is already a checkpoint: use it as it is, or --export_hf=DIR"),
             ([f"--init_from={tmp_path / 'ckpt.pt'}"], r"--init_from='.*ckpt.pt' needs --out_dir=DIR .*--export_hf=DIR"),
             ([f"--from_dir={TF_DIR}", "--init_from=gpt2", "--check"], r"pass one of --from_dir=.* and --init_from='gpt2'")]
    for argv, match in cases:
        monkeypatch.setattr(sys, "argv", ["load_openai.py", *argv])
        with pytest.raises(ValueError, match=match):
            runpy.run_path(os.path.join(ROOT, "load_openai.py"), run_name="__main__")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "o").exists()

# ----------------------------------------------------------------------------------------------
# the released sizes


def test_released_configs_urls_and_parameter_counts():
    """124M / 355M / 774M / 1558M: the parameter counts (tied embeddings, position table included) that
    OpenAI's folder names round."""
    counts = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}
    for name, n in counts.items():
        with torch.device("meta"):
            model = GPT(pretrained_config(name))
        assert model.num_params(non_embedding=False) == n, name
        folder = PRETRAINED[name][0]
        assert round(n / 1e6) == int(folder[:-1]) or name == "gpt2-large"  # 774.03 -> "774M"
        assert pretrained_urls(name)["model.ckpt.index"] == \
            f"https://openaipublic.blob.core.windows.net/gpt-2/models/{folder}/model.ckpt.index"
        assert pretrained_urls(name, "hf")["model.safetensors"] == \
            f"https://huggingface.co/openai-community/{name}/resolve/main/model.safetensors"
    with pytest.raises(ValueError, match=r"unknown GPT-2 model 'gpt2-small'; valid: gpt2, gpt2-medium, gpt2-large, "
                                         r"gpt2-xl"):
        load_pretrained("gpt2-small")
    with pytest.raises(ValueError, match=r"source must be 'openai' .* or 'hf' .*, got 'tf'"):
        pretrained_urls("gpt2", "tf")

# ----------------------------------------------------------------------------------------------
# downloads, against a local server


class Handler(BaseHTTPRequestHandler):
    """Serves files {path: bytes} with Range support; can cut a reply short once, add headers, ignore Range."""
    files, extra_headers, cut_once, fail_next, log = {}, {}, {}, {}, []
    ignore_range = False

    def do_GET(self):
        self.log.append((self.path, self.headers.get("Range")))
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        if self.fail_next.get(self.path) and self.path not in self.cut_once:
            self.fail_next[self.path] -= 1
            self.send_error(503)
            return
        start, rng = 0, self.headers.get("Range")
        if rng and not self.ignore_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        for k, v in self.extra_headers.get(self.path, {}).items():
            self.send_header(k, v)
        self.end_headers()
        cut = self.cut_once.pop(self.path, None)
        self.wfile.write(body if cut is None else body[:cut])
        if cut is not None:
            self.close_connection = True  # the client sees the connection drop mid-body

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Handler.files, Handler.extra_headers, Handler.cut_once, Handler.fail_next, Handler.log = {}, {}, {}, {}, []
    Handler.ignore_range = False
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", Handler
    httpd.shutdown()
    httpd.server_close()


BLOB = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
MD5 = base64.b64encode(hashlib.md5(BLOB).digest()).decode()


def test_download_full_and_resumed(server, tmp_path):
    url, h = server
    h.files["/a.bin"] = BLOB
    h.extra_headers["/a.bin"] = {"Content-MD5": MD5}
    path = str(tmp_path / "a.bin")
    assert download(url + "/a.bin", path, backoff=0) == path
    assert open(path, "rb").read() == BLOB and not os.path.exists(path + ".part")
    # interrupted, retried within the same call: the retry asks only for the rest
    h.cut_once["/a.bin"] = 100_000
    h.log.clear()
    download(url + "/a.bin", str(tmp_path / "b.bin"), backoff=0, chunk_size=1000)
    assert open(tmp_path / "b.bin", "rb").read() == BLOB
    assert h.log == [("/a.bin", None), ("/a.bin", "bytes=100000-")]
    # interrupted, then the server fails (503) until the retries run out: nothing under the real name...
    h.cut_once["/a.bin"], h.fail_next["/a.bin"] = 123_000, 2
    with pytest.raises(ConnectionError, match=r"^could not download .*: 2 attempt\(s\) in a row failed \(.*503"):
        download(url + "/a.bin", str(tmp_path / "c.bin"), retries=2, backoff=0, chunk_size=1000)
    assert not os.path.exists(tmp_path / "c.bin") and os.path.getsize(tmp_path / "c.bin.part") == 123_000
    h.log.clear()  # ... and a later run resumes the partial file
    download(url + "/a.bin", str(tmp_path / "c.bin"), backoff=0)
    assert h.log == [("/a.bin", "bytes=123000-")] and open(tmp_path / "c.bin", "rb").read() == BLOB
    # a server that ignores Range: the partial file is discarded and the download starts over
    h.ignore_range = True
    (tmp_path / "d.bin.part").write_bytes(b"stale bytes")
    download(url + "/a.bin", str(tmp_path / "d.bin"), backoff=0)
    assert open(tmp_path / "d.bin", "rb").read() == BLOB


def test_download_rejects_corrupt_files_and_reports_errors(server, tmp_path):
    url, h = server
    h.files["/a.bin"] = BLOB
    h.extra_headers["/a.bin"] = {"Content-MD5": base64.b64encode(hashlib.md5(b"other").digest()).decode()}
    path = tmp_path / "a.bin"
    with pytest.raises(ValueError, match=r"downloaded corrupt: md5 [0-9a-f]{32}, expected"):
        download(url + "/a.bin", str(path), retries=2, backoff=0)
    assert not path.exists() and not os.path.exists(str(path) + ".part")
    assert len(h.log) == 2  # a corrupt download is retried from scratch before giving up
    with pytest.raises(ValueError, match=r"downloaded corrupt: sha256"):
        download(url + "/a.bin", str(path), sha256="0" * 64, retries=1, backoff=0)
    with pytest.raises(FileNotFoundError, match=r"/missing.bin answered 404 Not Found"):
        download(url + "/missing.bin", str(path), backoff=0)
    with socket.socket() as s:  # a port with nothing listening: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionError, match=r"(?s)^no network connection to 127.0.0.1:\d+: could not download .*: "
                                              r"2 attempt\(s\) in a row failed.*python load_openai.py --from_dir=DIR "
                                              r"--out_dir=OUT\ngpt2 is these files.*then: python load_openai.py "
                                              r"--from_dir=DIR --out_dir=out-gpt2, and use --init_from=out-gpt2$"):
        fetch_pretrained("gpt2", cache_dir=str(tmp_path / "c"), openai_url=f"http://127.0.0.1:{port}", retries=2,
                            backoff=0)
    assert not path.exists()


def test_fetch_and_load_pretrained_from_a_mirror(server, tmp_path):
    """The whole OpenAI-layout fetch (with encoder.json / vocab.bpe checked against their known sha256), and
    the Hub layout with its X-Linked-Etag sha256, from a local mirror; the tiny files are not gpt2's shape,
    which load_pretrained notices."""
    from lib.tokenizer import _bpe_file
    sha256 = lambda data: hashlib.sha256(data).hexdigest()
    url, h = server
    for f in ("hparams.json", "model.ckpt.index", DATA):
        h.files[f"/124M/{f}"] = open(os.path.join(TF_DIR, f), "rb").read()
    for f in ("encoder.json", "vocab.bpe"):
        h.files[f"/124M/{f}"] = _bpe_file(f)
    for f in ("config.json", "model.safetensors"):
        data = open(os.path.join(HF_DIR, f), "rb").read()
        h.files[f"/openai-community/gpt2/resolve/main/{f}"] = data  # the Hub states an LFS file's sha256:
        h.extra_headers[f"/openai-community/gpt2/resolve/main/{f}"] = {"X-Linked-Etag": f'"{sha256(data)}"'}
    cache = str(tmp_path / "cache")
    folder, fresh = fetch_pretrained("gpt2", cache_dir=cache, openai_url=url, backoff=0)
    assert fresh and folder == os.path.join(cache, "openai", "124M")
    files = lambda d: sorted(f for f in os.listdir(d) if not f.endswith(".lock"))  # the downloader's lock files
    assert files(folder) == sorted(OPENAI_FILES)
    with pytest.raises(ValueError, match=r"describe GPTConfig\(block_size=32, vocab_size=96, n_layer=2.*not gpt2"):
        load_pretrained("gpt2", cache_dir=cache, openai_url=url, backoff=0)
    h.log.clear()
    folder, fresh = fetch_pretrained("gpt2", "hf", cache_dir=cache, hf_url=url, backoff=0)
    assert fresh and files(folder) == ["config.json", "model.safetensors"]
    assert not fetch_pretrained("gpt2", "hf", cache_dir=cache, hf_url=url)[1] and len(h.log) == 2  # cached
    # only the Hub's copy cached: load_pretrained(source='openai') uses it, contacting nobody (port 9 is closed)
    cache2 = str(tmp_path / "cache2")
    fetch_pretrained("gpt2", "hf", cache_dir=cache2, hf_url=url)
    with pytest.raises(ValueError, match=r"the files in '.*cache2/hf/gpt2' describe GPTConfig\(block_size=32"):
        load_pretrained("gpt2", cache_dir=cache2, openai_url="http://127.0.0.1:9", retries=1)
    h.files["/124M/vocab.bpe"] = b"#version: 0.2\n"  # not OpenAI's file: its known sha256 rejects it
    with pytest.raises(ValueError, match=r"vocab.bpe downloaded corrupt: sha256"):
        fetch_pretrained("gpt2", cache_dir=str(tmp_path / "c2"), openai_url=url, retries=1, backoff=0)
