"""
The CUDA paths, on a GPU; without one the whole module is skipped, so CPU machines and CI pass. bf16 autocast
training against fp32; train.py with compile=True, evaluation and sampling in one run, counting recompiles; the
flash-attention SDPA kernel chosen for GPT-2's training shapes; cached greedy decoding equal to uncached in fp32
and close in bf16, seeded sampling on a CUDA generator; the compiled static-cache decoder (CUDA graphs) equal to
model.generate; int8/int4 matmuls against the dequantized weights; fused AdamW; fp16 with a GradScaler through
overflowing steps; DDP over NCCL under torchrun; a resumed run continuing the same losses; pinned-memory batches.
About 3 minutes on an H100, most of it compiling.

    python -m pytest tests/test_cuda.py -q -rs      # on a CUDA machine (runs/gpu_check.sh runs it first)

Tiny models (2 layers, 2 heads, 32 dims) except where a shape is the point. train.py runs as real processes, with
the Triton and inductor caches and HOME in a temporary folder.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from lib.checkpoint import load_checkpoint
from lib.decode import StaticDecoder
from lib.optim import make_optimizer
from lib.quant import (Int4Linear, Int8Linear, WeightOnlyQuantizer, dequantize_int4, quantize_int4, quantize_int8,
                       quantized_model_from_checkpoint)
from lib.tokens import BinLoader
from model import GPT, GPTConfig, KVCache
from test_train import char_data  # three sonnets as prepared char data

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() "
                                                                      "is False)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV = "cuda"
TINY = ["--device=cuda", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16",
        "--batch_size=4", "--total_batch_size=0", "--data_order=random", "--eval_iters=2", "--log_interval=1",
        "--warmup_iters=2", "--learning_rate=1e-2", "--min_lr=1e-3", "--seed=7"]


@pytest.fixture(scope="module", autouse=True)
def hermetic_caches(tmp_path_factory):
    """Triton's and inductor's compile caches in a temporary folder (Triton's default is under HOME)."""
    folder = tmp_path_factory.mktemp("compile-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_CACHE_DIR", str(folder / "triton"))
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(folder / "inductor"))
        yield


@pytest.fixture
def no_tf32():
    """fp32 references in true fp32: setup_runtime turns TF32 on for the process."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tiny(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    shape = dict(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32) | kw
    return GPT(GPTConfig(**shape)).to(DEV)


def train(tmp_path, *args, launcher=(sys.executable,), extra_env=None) -> subprocess.CompletedProcess:
    """train.py as its own process (or processes, under torchrun); it must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HOME": str(tmp_path / "home"),
           **(extra_env or {})}
    r = subprocess.run([*launcher, "train.py", *TINY, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"train.py failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def records(out_dir, kind: str) -> list:
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [rec for rec in map(json.loads, f) if rec["type"] == kind]

# ----------------------------------------------------------------------------------------------
# numerics of training on the device


def test_bf16_autocast_training_step_is_close_to_fp32(no_tf32):
    """One forward, backward and fused AdamW step of the same model on the same batch, in fp32 and under bf16
    autocast. bf16 keeps 8 significant bits (relative rounding 2^-9 per operation): through 2 blocks the loss
    moves by well under 1% and the gradient keeps its direction (cosine > 0.99). AdamW's first step moves every
    weight by about lr times the sign of its gradient, so the steps agree wherever the gradients' signs do:
    for at least 95% of the weights (the rest have gradients near zero, whose sign rounding can flip)."""
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randint(0, 64, (8, 32), device=DEV, generator=g)
    y = torch.roll(x, -1, dims=1)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny()
        opt = make_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        opt.step()
        step = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
        out[dtype] = loss.item(), grad, step
    (l32, g32, s32), (l16, g16, s16) = out[torch.float32], out[torch.bfloat16]
    assert abs(l16 - l32) / l32 < 0.01, f"loss fp32 {l32:.5f}, bf16 {l16:.5f}"
    cos = F.cosine_similarity(g32, g16, dim=0).item()
    assert cos > 0.99, f"gradient cosine similarity {cos:.4f}"
    same = ((s16 - s32).abs() < 0.5e-3).float().mean().item()
    assert same > 0.95, f"only {100 * same:.1f}% of the weights moved alike"


def test_fused_adamw_matches_the_reference_implementation():
    """make_optimizer picks the fused CUDA kernel; three steps on the same gradients land where torch's
    single-tensor for-loop AdamW does, to fp32 rounding."""
    a, b = tiny(), tiny()
    opt_a = make_optimizer(a, 0.1, 1e-3, (0.9, 0.95), "cuda")
    assert opt_a.defaults["fused"] is True
    groups = [{"params": [p for p in b.parameters() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in b.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    opt_b = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), foreach=False, fused=False)
    g = torch.Generator(device=DEV).manual_seed(1)
    for _ in range(3):
        for pa, pb in zip(a.parameters(), b.parameters()):
            pa.grad = torch.randn(pa.shape, device=DEV, generator=g)
            pb.grad = pa.grad.clone()
        opt_a.step()
        opt_b.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_fp16_grad_scaler_survives_overflowing_steps(tmp_path):
    """fp16 autocast with a GradScaler in train.py's order (scale, backward, unscale_, clip, step, update) on the
    fused AdamW. With a scale of 2^30 the first backwards overflow fp16 (max 65504: the logits' gradients are about
    scale / 256 tokens until the scale is below 2^24): such a step must leave the weights untouched and halve the
    scale, until the scale fits and the steps apply and stay finite. Then train.py itself with --dtype=float16."""
    model = tiny()
    opt = make_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cuda")
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 30)
    g = torch.Generator(device=DEV).manual_seed(2)
    x = torch.randint(0, 64, (8, 32), device=DEV, generator=g)
    y = torch.roll(x, -1, dims=1)
    skipped = applied = 0
    for i in range(40):
        before = [p.detach().clone() for p in model.parameters()]
        scale = scaler.get_scale()
        with torch.autocast("cuda", dtype=torch.float16):
            _, loss = model(x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        moved = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        if scaler.get_scale() < scale:  # an overflow: skipped, scale halved
            assert not moved and scaler.get_scale() == scale / 2, (scale, scaler.get_scale())
            skipped += 1
        else:
            assert moved and i > 0, f"step {i} applied at a scale of {scale}"  # the first one must overflow
            applied += 1
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert skipped >= 3 and applied >= 20, (skipped, applied)
    data = char_data(tmp_path / "data")
    r = train(tmp_path, f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}", "--dtype=float16", "--max_iters=20",
              "--eval_interval=20")
    assert "dtype: float16" in r.stdout
    losses = [s["loss"] for s in records(tmp_path / "out", "train")]
    assert len(losses) == 20 and all(np.isfinite(losses)) and np.mean(losses[-5:]) < losses[0] - 0.3, losses


def test_compiled_training_with_evaluation_and_sampling_does_not_keep_recompiling(tmp_path):
    """compile=True compiles the training model once; evaluation and sampling run the plain module (other shapes,
    eval mode), and switching between them must not make dynamo recompile at every evaluation. Counted from
    TORCH_LOGS=recompiles: at most one recompile over 3 evaluations and 3 samples."""
    data = char_data(tmp_path / "data")
    out = tmp_path / "out"
    r = train(tmp_path, f"--data_dir={data}", f"--out_dir={out}", "--compile=True", "--max_iters=30",
              "--eval_interval=10", "--sample_interval=10", "--sample_tokens=24", "--sample_prompt=So long",
              "--log_interval=5", extra_env={"TORCH_LOGS": "recompiles"})
    recompiles = [line for line in (r.stdout + r.stderr).splitlines() if "Recompiling function" in line]
    assert len(recompiles) <= 1, "\n".join(recompiles)
    assert "compiling the model with torch.compile" in r.stdout
    samples = [rec["text"] for rec in records(out, "sample")]
    assert len(samples) == 3 and all(len(s) > 0 for s in samples)
    evals = records(out, "eval")
    assert [e["iter"] for e in evals] == [0, 10, 20, 30] and evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5

# ----------------------------------------------------------------------------------------------
# attention kernels and decoding


def test_flash_attention_is_the_sdpa_kernel_for_gpt2_training_shapes():
    """GPT-2's attention at training shapes (B=4, 12 heads of 64, T=1024, causal, bf16): the profiler must show
    the flash-attention op in the forward and the backward; forcing SDPBackend.FLASH_ATTENTION must run and give
    the same output (it is the same kernel)."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip(f"flash attention needs sm80 or newer, this GPU is sm{torch.cuda.get_device_capability()}")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    from model import CausalSelfAttention
    torch.manual_seed(0)
    attn = CausalSelfAttention(GPTConfig(n_embd=768, n_head=12, block_size=1024)).to(DEV).train()
    x = torch.randn(4, 1024, 768, device=DEV, requires_grad=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _ = attn(x)
        y.float().sum().backward()
        return y.detach()
    step()  # warm-up outside the profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        y_default = step()
        torch.cuda.synchronize()
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention" in ops, sorted(o for o in ops if "attention" in o)
    assert "aten::_scaled_dot_product_flash_attention_backward" in ops, sorted(o for o in ops if "attention" in o)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        y_flash = step()
    assert torch.equal(y_flash, y_default)


def test_cached_greedy_decoding_equals_uncached(no_tf32):
    """fp32: the KV cache changes only the order of float sums, so greedy tokens are identical, through a full
    window and its re-read (40 tokens after a 5-token prompt in a 32-position window). bf16 autocast: the two paths
    round differently. Teacher-forced on the same 24 tokens, the cached logits stay within 3% of the largest
    logit of the uncached ones (about 0.6% measured on a CPU in bf16: one rounding of the largest logit) and
    pick the same argmax at 90% of the positions or more (near-ties may flip). Seeded sampling on a CUDA
    generator reproduces."""
    model = tiny().eval()
    prompt = torch.randint(0, 64, (2, 5), device=DEV, generator=torch.Generator(device=DEV).manual_seed(3))
    cached = model.generate(prompt, 40, temperature=0.0)
    assert torch.equal(cached, model.generate(prompt, 40, temperature=0.0, use_cache=False))
    seq = torch.randint(0, 64, (2, 24), device=DEV, generator=torch.Generator(device=DEV).manual_seed(4))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        full, _ = model(seq)
        cache = KVCache(model.config, 2)
        steps = [model(seq[:, :8], cache=cache)[0][:, -1]]
        steps += [model(seq[:, t:t + 1], cache=cache)[0][:, -1] for t in range(8, 23)]
    assert cache.k.dtype == torch.bfloat16  # the cache holds what autocast produced
    inc, ref = torch.stack(steps, dim=1).float(), full[:, 7:23].float()
    worst = ((inc - ref).abs().max() / ref.abs().max()).item()
    agree = (inc.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert worst < 0.03 and agree >= 0.9, f"largest difference {100 * worst:.2f}% of the largest logit, argmax " \
                                          f"agreement {100 * agree:.0f}%"
    a = model.generate(prompt, 20, temperature=1.0, top_k=10, seed=5)
    assert torch.equal(a, model.generate(prompt, 20, temperature=1.0, top_k=10, seed=5))
    assert not torch.equal(a, model.generate(prompt, 20, temperature=1.0, top_k=10, seed=6))


def test_compiled_static_decoder_equals_generate_without_recompiling(no_tf32):
    """lib.decode.StaticDecoder(compile=True) on an int8 model: prefill compiled once for any prompt length, the
    one-token step compiled once (fullgraph, the int8 matmuls fused with their dequantization) and replayed as a
    CUDA graph. Greedy tokens equal model.generate's (fp32 activations: only the order of float sums differs);
    prompts of two lengths, two graphs in all. (bench.py --decode_compile=True compiles the float and int4 ones.)"""
    from dataclasses import asdict
    model = tiny(n_embd=64).eval().cpu()
    q = WeightOnlyQuantizer("int8")
    ckpt = {"model_args": asdict(model.config), "model": q.quantize(model),
            "quantization": {"mode": "int8", "group_size": None, "quantize_head": True}}
    model = quantized_model_from_checkpoint(ckpt).to(DEV).eval()
    torch._dynamo.reset()
    decoder = StaticDecoder(model, compile=True)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for length, new in ((4, 20), (9, 16), (4, 20)):
        prompt = torch.randint(0, 64, (1, length), device=DEV, generator=torch.Generator(device=DEV).manual_seed(length))
        assert torch.equal(decoder.generate(prompt, new), model.generate(prompt, new, temperature=0.0)), length
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    assert graphs == 2, f"{graphs} graphs compiled for prefill + step"


def test_int8_and_int4_cuda_matmuls_match_the_dequantized_weights():
    """Int8Linear (dequantize on the fly, eagerly and in a compiled one-row matmul) and torch's own CUDA int8
    kernel, and Int4Linear's tinygemm kernel (sm80+, groups of 32/64/128), against F.linear with the dequantized
    weight in fp32 on the same bf16-rounded input: to bf16's precision, 2^-7 of the largest output."""
    torch.manual_seed(0)
    w, b = torch.randn(64, 256, device=DEV) * 0.05, torch.randn(64, device=DEV)
    x = torch.randn(3, 5, 256, device=DEV).bfloat16()
    q8, s8 = quantize_int8(w)
    m8 = Int8Linear(256, 64, bias=True).to(DEV)
    m8.weight, m8.scales, m8.bias = q8, s8, b
    expected = F.linear(x.float(), q8.float() * s8[:, None], b)
    tol = 2 ** -7 * float(expected.abs().max())
    torch.testing.assert_close(m8(x).float(), expected, rtol=0, atol=tol)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # fp32 input under autocast: the matmul runs in bf16
        out = m8(x.float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=tol)
    row = x[:1, :1]  # (1, 1, 256): decoding's one row, the matmul the compiled step fuses with the dequantization
    compiled = torch.compile(m8, fullgraph=True, options={"coordinate_descent_tuning": True})
    torch.testing.assert_close(compiled(row).float(), expected[:1, :1], rtol=0, atol=tol)
    if torch._C._dispatch_has_kernel_for_dispatch_key("aten::_weight_int8pack_mm", "CUDA"):  # torch >= 2.9
        kernel = torch._weight_int8pack_mm(x.view(15, 256), q8, s8)  # what bench.py times next to Int8Linear
        torch.testing.assert_close(kernel.float() + b, expected.view(15, 64), rtol=0, atol=tol)
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the int4 tinygemm kernel needs sm80 or newer")
    for group_size in (32, 64, 128):
        packed, s4, z4 = quantize_int4(w, group_size)
        m4 = Int4Linear(256, 64, bias=True, group_size=group_size).to(DEV)
        m4.weight, m4.scales, m4.zeros, m4.bias = packed, s4, z4, b
        expected = F.linear(x.float(), dequantize_int4(packed, s4, z4), b)
        out = m4(x)
        assert m4.layout == "cuda-int4pack" and out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), expected, rtol=0, atol=2 ** -7 * float(expected.abs().max()),
                                   msg=lambda m: f"group {group_size}: {m}")

# ----------------------------------------------------------------------------------------------
# runs: DDP over NCCL, resume, batches


@pytest.mark.parametrize("nproc", [1, 2])
def test_ddp_over_nccl_under_torchrun(tmp_path, nproc):
    """train.py under torchrun with NCCL (NCCL_DEBUG=INFO shows it initialising) follows one plain process with
    nproc times the accumulation: the same batches, gradients averaged instead of accumulated, so the losses agree
    to float rounding (fp32 with TF32 matmuls: 5e-3)."""
    if torch.cuda.device_count() < nproc:
        pytest.skip(f"{nproc} ranks need {nproc} GPUs, this machine has {torch.cuda.device_count()}")
    data = char_data(tmp_path / "data")
    args = [f"--data_dir={data}", "--dtype=float32", f"--total_batch_size={4 * 16 * nproc}", "--max_iters=8",
            "--lr_decay_iters=8", "--eval_interval=8"]
    train(tmp_path, *args, f"--out_dir={tmp_path / 'one'}")
    ddp = train(tmp_path, *args, f"--out_dir={tmp_path / 'ddp'}", extra_env={"NCCL_DEBUG": "INFO"},
                launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"))
    assert f"DDP world size {nproc}" in ddp.stdout and "NCCL INFO" in ddp.stdout + ddp.stderr
    assert ddp.stdout.count("iter 8/8 |") == 1  # only rank 0 prints
    a, b = records(tmp_path / "one", "train"), records(tmp_path / "ddp", "train")
    np.testing.assert_allclose([s["loss"] for s in b], [s["loss"] for s in a], rtol=0, atol=5e-3)
    assert load_checkpoint(str(tmp_path / "ddp"))["resume"]["iter_num"] == 8


def test_resume_on_cuda_continues_the_same_losses(tmp_path):
    """12 iterations in one run, and 6 then a resume to 12: the same losses. Dropout draws from the CUDA generator,
    whose state the checkpoint restores (a fresh one would move the losses by 1e-2 and more). Not bit-identical:
    CUDA kernels may sum in a different order from run to run, hence 1e-4."""
    data = char_data(tmp_path / "data")
    args = [f"--data_dir={data}", "--dtype=float32", "--dropout=0.1", "--total_batch_size=128", "--lr_decay_iters=12",
            "--eval_interval=12"]
    train(tmp_path, *args, "--max_iters=12", f"--out_dir={tmp_path / 'full'}")
    train(tmp_path, *args, "--max_iters=6", f"--out_dir={tmp_path / 'part'}")
    assert load_checkpoint(str(tmp_path / "part"))["resume"]["iter_num"] == 6
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "train.py", "--init_from=resume", f"--out_dir={tmp_path / 'part'}",
                        "--max_iters=12"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    full, part = records(tmp_path / "full", "train"), records(tmp_path / "part", "train")
    assert [s["iter"] for s in part] == list(range(1, 13))
    np.testing.assert_allclose([s["loss"] for s in part[6:]], [s["loss"] for s in full[6:]], rtol=0, atol=1e-4)


def test_batches_arrive_on_the_gpu_through_pinned_memory(tmp_path):
    """BinLoader(device='cuda') copies through pinned memory without blocking: the batches on the GPU are the
    CPU loader's, batch for batch."""
    data = char_data(tmp_path / "data")
    cpu, gpu = BinLoader(data, "train", 4, 16, seed=3), BinLoader(data, "train", 4, 16, seed=3, device=DEV)
    for _ in range(3):
        (xc, yc), (xg, yg) = cpu.next_batch(), gpu.next_batch()
        assert xg.is_cuda and yg.is_cuda
        assert torch.equal(xg.cpu(), xc) and torch.equal(yg.cpu(), yc)

