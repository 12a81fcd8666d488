"""GGUF export (lib/gguf_export.py): the file read back with gguf's own reader holds every tensor under
llama.cpp's gpt2 names, equal to ours (f32, f16 to f16's rounding, q8_0 to its quantization), and the metadata
llama.cpp needs; bias=False models get zero biases; character-level and padded tables are handled."""

import numpy as np
import pytest
import torch

from lib.tokenizer import CharTokenizer, get_tokenizer
from model import GPT, GPTConfig

gguf = pytest.importorskip("gguf")
from lib.gguf_export import export_gguf, gguf_tensors  # noqa: E402


def tiny(bias=True, vocab_size=50304):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=64, bias=bias)).eval()


def read(path):
    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in r.tensors}
    return fields, tensors


def as_float(t):
    """A tensor of the reader as float32 in our (out, in) layout (ggml's shape is reversed)."""
    shape = tuple(int(n) for n in reversed(t.shape))
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """exported(bias, out_type) -> (model, fields, tensors): tiny(bias) written once as a file of out_type and read
    back (gguf's reader takes seconds over GPT-2's 50,257 tokens and 50,000 merges)."""
    files = {}

    def get(bias: bool, out_type: str):
        if (bias, out_type) not in files:
            model = tiny(bias=bias)
            path = str(tmp_path_factory.mktemp("gguf") / f"m-{out_type}.gguf")
            export_gguf(model, path, get_tokenizer("gpt2"), out_type=out_type)
            files[bias, out_type] = (model, *read(path))
        return files[bias, out_type]
    return get


@pytest.mark.parametrize("out_type,tol", [("f32", 0.0), ("f16", 1e-3), ("q8_0", 2e-3)])
def test_every_tensor_read_back(exported, out_type, tol):
    model, fields, tensors = exported(True, out_type)
    want = gguf_tensors(model, 50257)
    assert set(tensors) == set(want)
    assert len(tensors) == 4 + 2 * 12  # embeddings, final norm (2), and 12 per block; no output.weight (tied)
    assert tensors["token_embd.weight"].shape.tolist() == [64, 50257]  # ggml order; the 47 padding rows cut
    for name, v in want.items():
        got = as_float(tensors[name])
        assert got.shape == v.shape, name
        np.testing.assert_allclose(got, v, atol=tol, rtol=0, err_msg=name)
        if v.ndim == 1:  # norms and biases stay f32 in every file type
            assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32
    # the real rows of the table, exactly (f32) or nearly
    wte = model.transformer.wte.weight.detach()[:50257].numpy()
    np.testing.assert_allclose(as_float(tensors["token_embd.weight"]), wte, atol=tol, rtol=0)
    qtype = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[out_type]
    assert tensors["blk.0.attn_qkv.weight"].tensor_type == gguf.GGMLQuantizationType[qtype]
    assert fields["general.architecture"] == "gpt2"
    assert fields["gpt2.context_length"] == 32 and fields["gpt2.embedding_length"] == 64
    assert fields["gpt2.block_count"] == 2 and fields["gpt2.attention.head_count"] == 2
    assert fields["gpt2.feed_forward_length"] == 256
    assert abs(fields["gpt2.attention.layer_norm_epsilon"] - 1e-5) < 1e-9
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == 50257 and tokens[50256] == "<|endoftext|>" and tokens[464] == "The"
    assert tokens[995] == "Ġworld"  # byte-level strings: Ġ is the space
    assert fields["tokenizer.ggml.token_type"][50256] == 3 and fields["tokenizer.ggml.token_type"][0] == 1
    merges = fields["tokenizer.ggml.merges"]
    assert len(merges) == 50000 and merges[0] == "Ġ t"
    assert fields["tokenizer.ggml.bos_token_id"] == fields["tokenizer.ggml.eos_token_id"] == 50256
    assert fields["tokenizer.ggml.add_bos_token"] is False


def test_bias_false_gets_zero_biases(exported):
    _, _, tensors = exported(False, "f32")
    for name in ("output_norm.bias", "blk.1.attn_norm.bias", "blk.1.attn_qkv.bias", "blk.1.ffn_down.bias"):
        assert not as_float(tensors[name]).any(), name
    assert as_float(tensors["blk.1.attn_qkv.bias"]).shape == (192,)
    assert set(tensors) == set(exported(True, "f32")[2])  # the same names as a model with biases


def test_refusals(tmp_path):
    chars = CharTokenizer(list("abcdefghijklmnop"))
    with pytest.raises(ValueError, match="end-of-text id"):
        export_gguf(tiny(vocab_size=16), str(tmp_path / "c.gguf"), chars)
    with pytest.raises(ValueError, match="smaller than GPT-2"):
        export_gguf(tiny(vocab_size=1000), str(tmp_path / "s.gguf"), get_tokenizer("gpt2"))
    with pytest.raises(ValueError, match="q8_0"):
        export_gguf(tiny(), str(tmp_path / "x.gguf"), get_tokenizer("gpt2"), out_type="q4")


def test_command_line_exports_a_checkpoint_and_refuses_characters(tmp_path):
    import os
    import sys

    from conftest import run_script

    from lib.checkpoint import make_checkpoint, save_checkpoint
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model = tiny(bias=False)
    save_checkpoint(make_checkpoint("pretrain", model.state_dict(), vars(model.config), {}, {"tokenizer": "gpt2"}),
                    str(tmp_path / "ckpt.pt"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))  # where gguf was found
    r = run_script(["load_openai.py", f"--init_from={tmp_path}", f"--export_gguf={tmp_path / 'm.gguf'}",
                    "--gguf_type=q8_0"], env=env, cwd=root, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "wrote" in r.stdout and "(q8_0" in r.stdout
    fields, tensors = read(str(tmp_path / "m.gguf"))
    assert fields["general.file_type"] == 7 and len(tensors) == 28  # MOSTLY_Q8_0
    chars = CharTokenizer(list("abcdefghijklmnop"))
    small = tiny(vocab_size=16)
    save_checkpoint(make_checkpoint("pretrain", small.state_dict(), vars(small.config), {}, chars.meta()),
                    str(tmp_path / "char.pt"))
    r = run_script(["load_openai.py", f"--init_from={tmp_path / 'char.pt'}", f"--export_gguf={tmp_path / 'c.gguf'}"],
                   env=env, cwd=root, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: the model's tokenizer is 'char'")
    assert not (tmp_path / "c.gguf").exists()
