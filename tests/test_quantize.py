"""
quantize.py: int8 / int4 weight-only quantization. Rounding error bounds, the int4 packing, the fused kernels
against the dequantized weights, checkpoint sizes and the checkpoint contract, logits close to fp32, the static-cache
decoder against model.generate (eager, and traced whole by torch.compile), bad input, and the script end to end
(report, then sample.py loading the quantized checkpoint). Tiny models (2 layers, 2 heads, 32 dims), CPU.
"""

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import quantize as Q
import torch
from torch.nn import functional as F

from lib.checkpoint import load_checkpoint, make_checkpoint, resume_state, save_checkpoint
from lib.decode import StaticDecoder, decode_step, prefill
from lib.models import load_model
from lib.quant import (Int4Linear, Int8Linear, WeightOnlyQuantizer, dequantize_int4, int4_kernel, linear_bytes,
                       memory_bytes, pack_int4, prepare_for_device, quantize_int4, quantize_int8,
                       quantized_model_from_checkpoint, unpack_int4)
from lib.tokenizer import CharTokenizer
from lib.tokens import write_tokens
from model import GPT, GPTConfig, KVCache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20
# tiny models need no threads; a busy machine makes extra threads wait on each other
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def tiny(n_embd=32, vocab_size=64, seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=32, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=n_embd)).eval()


def quantized(model: GPT, mode: str, group_size: int = 32, quantize_head: bool = True) -> GPT:
    """Quantize, then rebuild from the checkpoint entries, as loading a saved file does."""
    q = WeightOnlyQuantizer(mode, group_size, quantize_head)
    ckpt = {"model_args": asdict(model.config), "model": q.quantize(model),
            "quantization": {"mode": mode, "group_size": group_size, "quantize_head": quantize_head}}
    return quantized_model_from_checkpoint(ckpt).eval()


def weights(seed=0):
    """Weight matrices (32, 128) with a zero row, an outlier and a wide spread of row scales."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(32, 128, generator=g) * torch.logspace(-3, 1, 32)[:, None]
    w[3] = 0.0
    w[5, 7] = 50.0
    return w


def test_int8_error_is_at_most_half_a_step():
    w = weights()
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (32,) and int(q.abs().max()) <= 127
    err = (w - q.float() * s[:, None]).abs()
    assert bool((err <= s[:, None] / 2 * (1 + 1e-6)).all()), f"worst error / step: {(err / s[:, None]).max():.4f}"
    assert bool((q[3] == 0).all())  # a zero row stays exactly zero


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_error_is_at_most_half_a_step(group_size):
    w = weights(1)
    packed, s, z = quantize_int4(w, group_size)
    assert packed.dtype == torch.uint8 and packed.shape == (32, 64)  # two codes per byte
    assert s.shape == z.shape == (32, 128 // group_size)
    err = (w - dequantize_int4(packed, s, z)).abs().view(32, -1, group_size)
    step = s[..., None]
    # float rounding of (q - 8) * s + z adds a few ulps of the group's largest value
    slack = 1e-6 * w.abs().view(32, -1, group_size).amax(-1, keepdim=True)
    assert bool((err <= step / 2 + slack).all()), f"worst error / step: {(err / step).max():.4f}"


def test_int4_packing_round_trips_all_16_values():
    hi, lo = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    codes = torch.stack([hi.flatten(), lo.flatten()], dim=1).view(1, 512)  # every (even, odd) pair of codes
    packed = pack_int4(codes)
    assert packed.shape == (1, 256) and sorted(packed[0].tolist()) == list(range(256))  # all byte values
    assert torch.equal(unpack_int4(packed), codes.to(torch.uint8))


@pytest.mark.parametrize("out_features", [48, 40])  # 40: not a multiple of 16, the plain dequantize path
def test_kernels_match_the_dequantized_weights(out_features):
    """The CPU kernels take bf16 activations and return bf16 sums: compared with the fp32 matmul of the same
    (bf16-rounded) inputs and dequantized weights, to bf16's precision, 2^-8 of the largest output."""
    torch.manual_seed(0)
    w, b = torch.randn(out_features, 64) * 0.05, torch.randn(out_features)
    x = torch.randn(2, 5, 64)  # (B, T, C)
    xr = x.bfloat16().float()
    q8, s8 = quantize_int8(w)
    m8 = Int8Linear(64, out_features, bias=True)
    m8.weight, m8.scales, m8.bias = q8, s8, b
    expected = F.linear(xr, q8.float() * s8[:, None], b)
    torch.testing.assert_close(m8(x), expected, rtol=0, atol=2 ** -8 * float(expected.abs().max()))
    packed, s4, z4 = quantize_int4(w, 32)
    m4 = Int4Linear(64, out_features, bias=True, group_size=32)
    m4.weight, m4.scales, m4.zeros, m4.bias = packed, s4, z4, b
    fused = out_features % 16 == 0
    expected = F.linear(xr if fused else x, dequantize_int4(packed, s4, z4), b)
    atol = 2 ** -8 * float(expected.abs().max()) if fused else 1e-5
    torch.testing.assert_close(m4(x), expected, rtol=0, atol=atol)
    torch.testing.assert_close(m4(x[:, :1]), expected[:, :1], rtol=0, atol=atol)  # again, after re-packing
    assert int4_kernel(torch.device("cpu"), out_features, 64) == ("cpu-int4pack" if fused else "dequantize")
    assert m4.layout == ("cpu-int4pack" if fused else "plain")


@pytest.mark.parametrize("mode,tolerance", [("int8", 0.02), ("int4", 0.10)])
def test_quantized_logits_stay_close_to_fp32(mode, tolerance):
    """Tolerance on ||logits_q - logits|| / ||logits||, over 64 positions and 3 seeds: int8's step is 1/127 of a
    row's largest weight and int4's (group of 32) 1/15 of its range; measured about 0.7% and 4%."""
    for seed in range(3):
        model = tiny(seed=seed)
        idx = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            ref, _ = model(idx)
            for head in (True, False):
                out, _ = quantized(model, mode, quantize_head=head)(idx)
                rel = ((out - ref).norm() / ref.norm()).item()
                assert rel < tolerance, f"{mode} seed {seed} quantize_head={head}: relative error {rel:.4f}"


def test_quantized_model_layout_and_generation():
    model = tiny()
    qm = quantized(model, "int4")
    assert qm.transformer.wte is qm.lm_head and isinstance(qm.lm_head, Int8Linear)  # still tied
    assert sum(isinstance(m, Int4Linear) for m in qm.modules()) == 8  # 4 Linears in each of 2 blocks
    assert not any(t.is_meta for t in qm.state_dict().values())
    assert memory_bytes(qm) < memory_bytes(model) / 3
    prompt = torch.tensor([[1, 2, 3]])
    out = qm.generate(prompt, 10, temperature=0.0)
    assert torch.equal(out, qm.generate(prompt, 10, temperature=0.0, use_cache=False))  # cache == no cache
    tied = quantized(model, "int8", quantize_head=False)
    assert tied.lm_head.weight is tied.transformer.wte.weight and tied.lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize("mode", ["fp32", "int8", "int4"])
def test_static_decoder_matches_generate_and_compiles_whole(mode):
    """decode_step re-states model.forward for one token over a whole-window cache: its greedy tokens must be
    model.generate's, for float and quantized models, calls after calls (the cache is reused across prompts and
    batch sizes). torch.compile must trace prefill once for any prompt length and the step (fullgraph) once for
    every position (backend='eager': dynamo only, fast on a CPU; the CUDA tests run inductor and CUDA graphs)."""
    model = tiny(n_embd=64)
    m = model if mode == "fp32" else quantized(model, mode)
    decoder = StaticDecoder(m)
    for prompt, new in ((torch.tensor([[1, 2, 3]]), 20), (torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]]), 12)):
        expected = m.generate(prompt, new, temperature=0.0)
        assert torch.equal(decoder.generate(prompt, new), expected), mode
    torch._dynamo.reset()
    traced = StaticDecoder(m)  # what compile=True does, with dynamo's 'eager' backend
    prepare_for_device(m, torch.device("cpu"))
    traced.prefill = torch.compile(prefill, dynamic=True, backend="eager")
    traced.step = torch.compile(decode_step, fullgraph=True, backend="eager")
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for prompt in (torch.tensor([[1, 2, 3, 4, 5, 6, 7]]), torch.tensor([[4, 3, 2, 1]])):
        assert torch.equal(traced.generate(prompt, 24), m.generate(prompt, 24, temperature=0.0))
    # two prompt lengths and 46 positions: one graph for prefill, one for the step
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 2
    with torch.no_grad():  # the step's logits and cache entries, not just its argmax, against model.forward's
        cache = KVCache(m.config, 1)
        m(prompt, cache=cache)  # positions 0-3
        k, v = cache.k.clone(), cache.v.clone()  # the whole window, zero from position 4 on
        ref, _ = m(torch.tensor([[7]]), cache=cache)  # position 4
        out = decode_step(m, torch.tensor([[7]]), torch.tensor([4]), k, v)
    torch.testing.assert_close(out, ref[:, -1], rtol=0, atol=1e-5)
    torch.testing.assert_close((k, v), (cache.k, cache.v), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"prompt \+ new tokens <= block_size \(32\), got a prompt of 4 and "
                                         r"max_new_tokens=29; model.generate slides the window"):
        decoder.generate(prompt, 29)


def test_saved_checkpoints_are_smaller_by_the_expected_factor(tmp_path):
    model = tiny(n_embd=128)
    save_checkpoint({"model": model.state_dict(), "model_args": asdict(model.config)}, tmp_path / "weights.pt")
    # a float checkpoint as train.py writes it: the contract's layout, with what resuming needs
    adam = torch.optim.AdamW(model.parameters()).state_dict()
    float_ckpt = make_checkpoint("pretrain", model.state_dict(), asdict(model.config), {"dataset": "x"},
                                 {"tokenizer": "gpt2"}, resume=resume_state(7, "val_loss", 2.5, optimizer=adam))
    save_checkpoint(float_ckpt, tmp_path / "ckpt.pt")
    fp32 = linear_bytes(model.state_dict(), model)
    assert fp32 == 4 * 2 * (128 * 384 + 128 * 128 + 128 * 512 + 512 * 128)
    for mode in ("int8", "int4"):
        q = WeightOnlyQuantizer(mode, 64)
        source = str(tmp_path / "ckpt.pt")
        ckpt = Q.quantized_checkpoint(model, load_checkpoint(source), None, q, source)
        assert ckpt["kind"] == "quantized" and ckpt["resume"] is None  # no optimizer state: inference only
        assert ckpt["quantization"]["source"] == source and ckpt["quantization"]["source_iter"] == 7
        assert ckpt["config"] == {"dataset": "x"} and ckpt["tokenizer"] == {"tokenizer": "gpt2"}
        save_checkpoint(ckpt, tmp_path / f"ckpt_{mode}.pt")
        loaded = load_checkpoint(str(tmp_path / f"ckpt_{mode}.pt"))  # weights_only: plain tensors only
        sd = loaded["model"]
        qbytes = linear_bytes(sd, model)
        if mode == "int8":  # 1 byte a weight, a 4-byte scale a row
            assert sd["transformer.h.0.mlp.c_fc.weight"].dtype == torch.int8
            assert qbytes == fp32 // 4 + 4 * 2 * (384 + 128 + 512 + 128)
        else:  # half a byte a weight, a 4-byte scale and zero per 64 weights: 5 bits instead of 32
            assert sd["transformer.h.0.mlp.c_fc.weight"].dtype == torch.uint8
            assert qbytes == fp32 // 8 + fp32 // 32
            assert fp32 / qbytes == pytest.approx(6.4)
        ratio = os.path.getsize(tmp_path / "weights.pt") / os.path.getsize(tmp_path / f"ckpt_{mode}.pt")
        assert ratio > (3.5 if mode == "int8" else 5.0), f"{mode}: file only {ratio:.2f}x smaller"
        # every script loads it by name; training from it is refused, naming the float file to train from instead
        qm, loaded, _ = load_model(str(tmp_path / f"ckpt_{mode}.pt"))
        assert loaded["kind"] == "quantized" and isinstance(qm.lm_head, Int8Linear)
        with pytest.raises(ValueError, match=rf"is {mode}-quantized: .* cannot be trained\. Train from the float "
                                             rf"checkpoint instead: --init_from={re.escape(source)}"):
            load_model(str(tmp_path / f"ckpt_{mode}.pt"), for_training=True)


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match=r"mode must be one of \('int8', 'int4'\), got 'int3'"):
        WeightOnlyQuantizer("int3")
    with pytest.raises(ValueError, match=r"group_size must be one of .* for int4, got 48"):
        WeightOnlyQuantizer("int4", 48)
    wide = tiny(n_embd=96)  # 96 input columns: groups of 64 do not fit
    with pytest.raises(ValueError, match=r"--group_size=64 does not divide the width of transformer.h.0.attn.c_attn "
                                         r"\(in_features=96\)"):
        WeightOnlyQuantizer("int4", 64).quantize(wide)
    model = tiny()
    done = {"model_args": asdict(model.config), "model": {}, "quantization": {"mode": "int8"}}
    with pytest.raises(ValueError, match=r"'ckpt_int8.pt' is already quantized \('int8'\); quantize the float"):
        Q.quantized_checkpoint(model, done, None, WeightOnlyQuantizer("int4"), "ckpt_int8.pt")
    bad = {**done, "quantization": {"mode": "fp8"}}
    with pytest.raises(ValueError, match=r"entry should be a dict with mode in .* got \{'mode': 'fp8'\}"):
        quantized_model_from_checkpoint(bad)


def test_report_perplexity_is_eval_pys(tmp_path, monkeypatch):
    """quantize.py's perplexity is eval.py's, one implementation (lib/perplexity.py): the text after <|endoftext|>,
    sliding windows moving by half the window; the same model on the same text gives the same number, exactly."""
    import eval as ev
    from lib.perplexity import perplexity
    from lib.runtime import Runtime
    from lib.tokenizer import get_tokenizer
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    tok, model = get_tokenizer("gpt2"), tiny(vocab_size=50304).eval()
    texts = Q.heldout_tokens(tok, "", str(path), "", n_tokens=10 ** 6)
    assert texts["text"][0][1][0] == tok.eot_token and len(texts["text"][0][1]) == 1 + len(tok.encode_ordinary(TEXT))
    cpu = Runtime("cpu", "cpu", "float32")
    ours = perplexity(model, tok, texts["text"], 32, 16, 8, tok.n_vocab, cpu, desc="")[1]["ppl"]
    for key, value in dict(text_file=str(path), dataset="", stride=0, limit=0, batch_size=8, encoding="utf-8").items():
        monkeypatch.setattr(ev, key, value, raising=False)
    assert ev.eval_perplexity(model, tok, 32, tok.n_vocab, cpu)[1]["ppl"] == ours
    tasks = tmp_path / "tasks.jsonl"  # the task file's first records within the same token budget, at least one
    lines = ("To be, or not", "to be", "that is the question")
    tasks.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    sizes = [len(ids) for _, ids in Q.heldout_tokens(tok, "", "", str(tasks), n_tokens=10 ** 6)["task"]]
    assert len(sizes) == 3 and all(n >= 3 for n in sizes)
    for budget, kept in ((sizes[0] + sizes[1], 2), (sizes[0] + sizes[1] - 1, 1), (1, 1)):
        assert len(Q.heldout_tokens(tok, "", "", str(tasks), budget)["task"]) == kept
    (tmp_path / "one.txt").write_text("")
    with pytest.raises(ValueError, match=r"holds fewer than 2 tokens; perplexity needs at least 2"):
        Q.heldout_tokens(tok, "", str(tmp_path / "one.txt"), "", 100)


def test_script_quantizes_reports_and_sample_loads_it(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    ids = np.array(tok.encode(TEXT), dtype=np.uint16)
    data = tmp_path / "data"
    data.mkdir()
    write_tokens(str(data / "val.bin"), ids)
    model = tiny(vocab_size=tok.n_vocab)
    save_checkpoint({"model": model.state_dict(), "model_args": asdict(model.config), "optimizer": {},
                     "iter_num": 3, "best_val_loss": 9.0, "config": {}, "tokenizer": tok.meta()}, tmp_path / "ckpt.pt")
    run = [sys.executable, "quantize.py", f"--out_dir={tmp_path}", "--device=cpu"]
    r = subprocess.run(run + ["--mode=int8"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "block Linear weights:" in r.stdout and (tmp_path / "ckpt_int8.pt").exists()
    r = subprocess.run(run + ["--mode=int4", "--group_size=32", "--report=True", f"--dataset={data}",
                              "--eval_iters=2", "--batch_size=2", "--decode_tokens=4", "--decode_repeats=1"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    table = r.stdout[r.stdout.index("\nmode"):]
    for row in ("fp32", "bf16", "int8", "int4 g32", "ppl (vs fp32, bf16)", "decode tok/s", "int8 kernel, bf16",
                "int4 kernel, bf16"):
        assert row in table, table
    report = json.loads((tmp_path / "quant_report.json").read_text())
    assert [row["mode"] for row in report["rows"]] == ["fp32", "bf16", "int8", "int4 g32"]
    for row in report["rows"]:
        assert row["ppl"] > 1 and row["decode_tok_s"] > 0 and row["disk_bytes"] > 0 and row["memory_bytes"] > 0
    fp32, bf16, int8, _ = report["rows"]
    assert fp32["change_pct"] == 0 and bf16["change_vs_bf16_pct"] == 0 and bf16["disk_bytes"] < fp32["disk_bytes"]
    assert int8["change_pct"] == pytest.approx(100 * (int8["ppl"] / fp32["ppl"] - 1))
    assert int8["change_vs_bf16_pct"] == pytest.approx(100 * (int8["ppl"] / bf16["ppl"] - 1))
    assert report["rows"][2]["linear_ratio"] > 3.5 and report["rows"][3]["linear_ratio"] > 5
    assert report["metric"] == "ppl" and abs(int8["change_pct"]) < 1.0
    r = subprocess.run(run + ["--mode=int8", "--report=True", f"--dataset={data}", "--task_file=missing.jsonl"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--task_file='missing.jsonl' does not exist" in r.stderr, r.stderr[-2000:]
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    r = subprocess.run(run + ["--mode=int8", "--report=True", f"--dataset={data}", "--limit=-5", "--overwrite=True"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--limit must be 0 or more, got -5" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    # sample.py loads the quantized checkpoint by name, like any other
    r = subprocess.run([sys.executable, "sample.py", "--init_from=resume", f"--out_dir={tmp_path}",
                        "--ckpt_name=ckpt_int4.pt", "--start=All:", "--num_samples=1", "--max_new_tokens=12",
                        "--device=cpu", "--temperature=0"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "All:" in r.stdout
