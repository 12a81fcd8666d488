"""
How fast is the model on this machine? Peak matmul FLOP/s, training throughput and MFU, and decoding speed
(prefill, KV cache, no cache, quantized weights), optionally side by side with Hugging Face transformers'
GPT2LMHeadModel of the same shape, all in one process so that the ratios hold on a busy machine.

    python bench.py                                    # GPT-2 124M shape, the device's default dtype
    python bench.py --compare_hf=True --json=bench.json
    python bench.py --compare_hf=True --train=False --new_tokens=256   # decoding only, longer generations
    python bench.py --device=cuda --compile=True       # bf16 autocast and torch.compile for training
    python bench.py --compare_hf=True --threads=1      # one core: steadier figures on a shared machine

Every figure is the median of --repeats runs with min and max; the runs of ours and of the reference (and of
each quantization mode) take turns, so a load spike slows all of them alike. Weights are random (decoding is
greedy and always produces new_tokens tokens), so nothing is downloaded.
"""

import json as json_lib
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict

import torch

from common import print0, setup_runtime
from configurator import configure
from model import GPT, GPTConfig, KVCache

# ----------------------------------------------------------------------------------------------
# model shape: GPT-2 (124M)
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024  # model context (position table); the training length is seq_len
vocab_size = 50304  # GPT-2's 50257 padded to a multiple of 64
bias = True  # GPT2LMHeadModel always has biases: --compare_hf needs True
# what to measure
peak = True  # peak matmul FLOP/s in the working dtype (the MFU reference)
train = True  # training steps: forward, backward, AdamW
decode = True  # prefill and generation, with and without the KV cache
compare_hf = False  # the same measurements on transformers' GPT2LMHeadModel (random init)
quant_modes = "int8,int4"  # also decode with these weight-only quantized copies (quantize.py); '' = none
group_size = 64  # int4 group size
# shapes and repeats
peak_size = 0  # n of the n x n x n peak matmul; 0 = 2048 on CPU, 8192 on GPUs
batch_size = 4  # training sequences per step
seq_len = 256  # training sequence length (<= block_size)
prefill_len = 256  # prompt tokens of the prefill measurement
prompt_len = 16  # prompt tokens of the generation measurements
new_tokens = 128  # tokens generated per run, batch 1, greedy
repeats = 5  # timed runs per measurement (median, min, max)
warmup = 1  # untimed runs first (compilation, allocator, caches)
# system
device = "auto"  # 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'
dtype = "auto"  # 'auto' (bf16 on CUDA, fp32 on CPU where bf16 autocast measured ~4x slower), 'float32', 'bfloat16'
compile = False  # torch.compile both models for the training steps (decoding stays eager: see below)
threads = 0  # CPU threads for torch (0 = torch's default: one per core; 1 is steadier on a shared machine)
seed = 1337
json = ""  # also write every figure to this JSON file
config = configure(globals(), sys.argv[1:]); globals().update(config)
# ----------------------------------------------------------------------------------------------
# checks before any work

for key in ("batch_size", "seq_len", "prefill_len", "prompt_len", "new_tokens", "repeats"):
    if config[key] < 1:
        raise ValueError(f"{key} must be at least 1, got {config[key]!r}")
if max(seq_len, prefill_len, prompt_len + new_tokens) > block_size:
    raise ValueError(f"seq_len ({seq_len}), prefill_len ({prefill_len}) and prompt_len + new_tokens "
                     f"({prompt_len + new_tokens}) must fit in block_size ({block_size}); e.g. --new_tokens=128")
modes = [m for m in quant_modes.split(",") if m]
from quantize import WeightOnlyQuantizer, quantized_model_from_checkpoint  # noqa: E402 (after the checks)
quantizers = {m: WeightOnlyQuantizer(m, group_size) for m in modes}  # raises on an unknown mode
if compare_hf:
    if not bias:
        raise ValueError("--compare_hf needs --bias=True: GPT2LMHeadModel always has biases")
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as e:
        raise ImportError("--compare_hf needs transformers: pip install transformers") from e

rt = setup_runtime(device, dtype)
if threads > 0:
    torch.set_num_threads(threads)
torch.manual_seed(seed)
cfg = GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                dropout=0.0, bias=bias)
load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0  # Unix only
cores = os.cpu_count()
print0(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
       f"load average {load:.2f} on {cores} cores")
if rt.device_type == "cpu" and load > 0.5 * cores:
    print0(f"WARNING: the machine is busy (load {load:.1f} on {cores} cores): absolute figures are low and noisy; "
           f"the ratios still compare like with like. Re-run on a quiet machine for absolute numbers")


def sync():
    if rt.device_type == "cuda":
        torch.cuda.synchronize()


def timed(fns: dict) -> dict:
    """Seconds per call of each function: warmup untimed rounds, then repeats rounds in which the functions
    take turns (ours, the reference, ours again...)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            times[k].append(time.perf_counter() - t0)
    return times


def stats(values: list) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


rows = []  # one per measured line: {metric, unit, ours: stats, hf: stats or None, ...}


def add(metric: str, unit: str, ours: list, hf=None, lower_is_better: bool = False, note: str = ""):
    row = {"metric": metric, "unit": unit, "ours": stats(ours), "hf": stats(hf) if hf else None, "note": note}
    if hf:  # ratio > 1 always means ours is faster
        a, b = row["ours"]["median"], row["hf"]["median"]
        row["speedup_vs_hf"] = b / a if lower_is_better else a / b
    rows.append(row)
    return row


def hf_model():
    torch.manual_seed(seed)
    hcfg = GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=n_embd, n_layer=n_layer,
                      n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=True,
                      bos_token_id=None, eos_token_id=None)  # random weights: never stop early
    m = GPT2LMHeadModel(hcfg).to(rt.device)
    m.generation_config.pad_token_id = 0
    return m

# ----------------------------------------------------------------------------------------------
# peak: the largest FLOP/s a plain matmul reaches in the working dtype; MFU is measured against it


peak_flops = peak_bandwidth = None
if peak:
    n = peak_size or (2048 if rt.device_type == "cpu" else 8192)
    mm_dtype = rt.ptdtype  # what autocast would run the model's matmuls in
    a = torch.randn(n, n, device=rt.device, dtype=mm_dtype)
    b = torch.randn(n, n, device=rt.device, dtype=mm_dtype)
    t = timed({"ours": lambda: a @ b})["ours"]
    flops = [2 * n ** 3 / s / 1e12 for s in t]
    peak_flops = max(flops) * 1e12  # the best run is the device's capability; the median shows the noise
    add(f"peak matmul {rt.dtype} {n}^3", "TFLOP/s", flops, note="max is the MFU reference")
    del a, b
    # decoding at batch 1 reads every weight once per token: memory bandwidth bounds it, not FLOP/s. Measured
    # with the operation decoding is made of, a matrix-vector product, on a matrix far larger than any cache
    big = torch.ones(8192, 8192, device=rt.device, dtype=mm_dtype)  # 256 MiB in fp32
    vec = torch.randn(8192, device=rt.device, dtype=mm_dtype)
    t = timed({"ours": lambda: big @ vec})["ours"]
    gbs = [big.numel() * big.element_size() / s / 1e9 for s in t]
    peak_bandwidth = max(gbs) * 1e9
    add("memory bandwidth (matrix-vector)", "GB/s", gbs, note="max is the decoding bound")
    del big, vec

# ----------------------------------------------------------------------------------------------
# training: forward + backward + AdamW step on a fixed random batch

if train:
    model = GPT(cfg).to(rt.device)
    x = torch.randint(0, min(vocab_size, 50257), (batch_size, seq_len), device=rt.device)
    y = torch.roll(x, -1, dims=1)
    opt = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), rt.device_type)
    step_model = torch.compile(model) if compile else model
    if compile:
        print0("compiling the training step (the warm-up runs take a while)...")

    def ours_step():
        with rt.autocast():
            _, loss = step_model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    fns = {"ours": ours_step}
    if compare_hf:
        hf = hf_model().train()
        # the very same optimizer setup as ours (groups, fused or not), so only the models differ
        hf_opt = GPT.configure_optimizers(hf, 0.1, 6e-4, (0.9, 0.95), rt.device_type)
        hf_step_model = torch.compile(hf) if compile else hf

        def hf_step():
            with rt.autocast():
                loss = hf_step_model(input_ids=x, labels=x).loss  # labels are shifted inside
            loss.backward()
            hf_opt.step()
            hf_opt.zero_grad(set_to_none=True)
        fns["hf"] = hf_step
    t = timed(fns)
    tokens = batch_size * seq_len
    tok_s = {k: [tokens / s for s in v] for k, v in t.items()}
    shape = f"{batch_size}x{seq_len}"
    add(f"train step {shape}", "tok/s", tok_s["ours"], tok_s.get("hf"))
    add(f"train step {shape}", "ms/iter", [1e3 * s for s in t["ours"]], [1e3 * s for s in t["hf"]] if compare_hf
        else None, lower_is_better=True)
    if peak_flops:
        mfu = {k: [100 * model.estimate_mfu(r, peak_flops, T=seq_len) for r in v] for k, v in tok_s.items()}
        add(f"train MFU {shape}", "%", mfu["ours"], mfu.get("hf"), note=f"of {peak_flops / 1e12:.2f} TFLOP/s")
    del opt, fns
    if compare_hf:
        del hf, hf_opt
    del model, step_model

# ----------------------------------------------------------------------------------------------
# decoding, batch 1: prefill, then greedy generation with and without the KV cache, and quantized weights.
# Decoding stays eager: the KV cache grows by one position per token, so torch.compile would see a new shape
# every step, and CUDA graphs need a static-shape cache (not implemented here).

if decode:
    model = GPT(cfg).to(rt.device).eval()
    prompt = torch.randint(0, min(vocab_size, 50257), (1, prompt_len), device=rt.device)
    long_prompt = torch.randint(0, min(vocab_size, 50257), (1, prefill_len), device=rt.device)
    hf = hf_model().eval() if compare_hf else None

    @torch.no_grad()
    def ours_gen(m, use_cache=True):
        with rt.autocast():
            out = m.generate(prompt, new_tokens, temperature=0.0, use_cache=use_cache)
        assert out.size(1) == prompt_len + new_tokens, out.shape

    @torch.no_grad()
    def hf_gen(use_cache=True):
        with rt.autocast():
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                              do_sample=False, use_cache=use_cache)
        assert out.size(1) == prompt_len + new_tokens, out.shape

    @torch.no_grad()
    def ours_prefill():
        with rt.autocast():
            model(long_prompt, cache=KVCache(cfg, 1), last_only=True)

    @torch.no_grad()
    def hf_prefill():
        with rt.autocast():
            hf(long_prompt, use_cache=True, logits_to_keep=1)  # the last position's logits, as generate asks

    t = timed({"ours": ours_prefill, **({"hf": hf_prefill} if compare_hf else {})})
    add(f"prefill {prefill_len} tokens", "tok/s", [prefill_len / s for s in t["ours"]],
        [prefill_len / s for s in t["hf"]] if compare_hf else None)
    # quantized copies of the same weights, as quantize.py would write and load them
    qmodels = {}
    for m, q in quantizers.items():
        ckpt = {"model_args": asdict(cfg), "model": q.quantize(model.cpu()),
                "quantization": {"mode": m, "group_size": group_size, "quantize_head": True}}
        qmodels[m] = quantized_model_from_checkpoint(ckpt).to(rt.device).eval()
    model.to(rt.device)
    fns = {"ours": lambda: ours_gen(model)}
    if compare_hf:
        fns["hf"] = hf_gen
    for m, qm in qmodels.items():
        fns[m] = lambda qm=qm: ours_gen(qm)
    gen = f"decode {prompt_len}+{new_tokens}"
    t = timed(fns)
    rate = {k: [new_tokens / s for s in v] for k, v in t.items()}
    from quantize import memory_bytes

    def roofline(r, m) -> str:
        """Weight bytes read per token x tokens/s, as a fraction of the bandwidth: at batch 1 the weights
        dominate the traffic (of the position table one row is read, so it is left out)."""
        if not peak_bandwidth:
            return ""
        wpe = m.transformer.wpe.weight
        streamed = memory_bytes(m) - wpe.numel() * wpe.element_size()
        return f"; {100 * streamed * r['ours']['median'] / peak_bandwidth:.0f}% of the bandwidth bound"
    base = add(f"{gen} KV cache", "tok/s", rate["ours"], rate.get("hf"))
    add(f"{gen} KV cache", "ms/token", [1e3 * s / new_tokens for s in t["ours"]],
        [1e3 * s / new_tokens for s in t["hf"]] if compare_hf else None, lower_is_better=True)
    for m in qmodels:
        r = add(f"{gen} KV cache {m}" + (f" g{group_size}" if m == "int4" else ""), "tok/s", rate[m], rate.get("hf"))
        r["note"] = f"{r['ours']['median'] / base['ours']['median']:.2f}x fp32 weights" + roofline(r, qmodels[m])
    t = timed({"ours": lambda: ours_gen(model, use_cache=False),
               **({"hf": lambda: hf_gen(use_cache=False)} if compare_hf else {})})
    nc = add(f"{gen} no cache", "tok/s", [new_tokens / s for s in t["ours"]],
             [new_tokens / s for s in t["hf"]] if compare_hf else None)
    base["note"] = f"{base['ours']['median'] / nc['ours']['median']:.2f}x no cache" + (
        f" (HF: {base['hf']['median'] / nc['hf']['median']:.2f}x)" if compare_hf else "") + roofline(base, model)

# ----------------------------------------------------------------------------------------------
# the table (and JSON)


def cell(s):
    if s is None:
        return ""
    fmt = "{:.3g}" if s["median"] < 100 else "{:.0f}"
    return f"{fmt.format(s['median'])} [{fmt.format(s['min'])}-{fmt.format(s['max'])}]"


end_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
print0(f"\n{cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} dims, vocab {cfg.vocab_size}, "
       f"{rt.device} {rt.dtype}, compile={compile}; median [min-max] of {repeats}; "
       f"load average {load:.2f} -> {end_load:.2f}")
header = f"{'metric':<34} {'unit':<9} {'ours':>24}"
if compare_hf:
    header += f" {'HF GPT2LMHeadModel':>24} {'ours/HF':>8}"
print0(header + "  note")
for r in rows:
    line = f"{r['metric']:<34} {r['unit']:<9} {cell(r['ours']):>24}"
    if compare_hf:
        ratio = f"{r['speedup_vs_hf']:.2f}x" if r.get("speedup_vs_hf") else ""
        line += f" {cell(r['hf']):>24} {ratio:>8}"
    print0(line + (f"  {r['note']}" if r["note"] else ""))
if compare_hf:
    print0("ours/HF > 1: ours is faster (for ms/iter and ms/token too)")
if json:
    out = {"torch": torch.__version__, "device": rt.device, "dtype": rt.dtype, "threads": torch.get_num_threads(),
           "load_average": [load, end_load], "config": config, "rows": rows}
    with open(json + ".tmp", "w") as f:
        json_lib.dump(out, f, indent=2)
    os.replace(json + ".tmp", json)
    print0(f"wrote {json}")
