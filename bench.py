"""
How fast is the model on this machine? Peak matmul FLOP/s, training throughput and MFU, and decoding speed
(prefill, KV cache, no cache, quantized weights, compiled), optionally side by side with Hugging Face
transformers' GPT2LMHeadModel of the same shape, all in one process so that the ratios hold on a busy machine.

    python bench.py                                    # GPT-2 124M shape, the device's default dtype
    python bench.py --compare_hf=True --json=bench.json
    python bench.py --compare_hf=True --train=False --new_tokens=256   # decoding only, longer generations
    python bench.py --compare_hf=True --threads=1      # one core: steadier figures on a shared machine
    # a GPU (what runs/gpu_check.sh measures): bf16 autocast and torch.compile for training at nanoGPT's batch,
    # bf16 weights for decoding, each model also through the compiled static-cache decoder (CUDA graphs)
    python bench.py --device=cuda --compare_hf=True --compile=True --decode_compile=True --batch_size=16 \\
        --seq_len=1024 --json=bench_cuda.json

Every figure is the median of --repeats runs with min and max; the runs of ours and of the reference (and of
each quantization mode) take turns, so a load spike slows all of them alike. Weights are random (decoding is
greedy and always produces new_tokens tokens), so nothing is downloaded. On CUDA each line also gives the peak
memory of one run: what it allocated beyond what was already allocated, plus what its model keeps (weights,
optimizer state, cache).
"""

import copy
import json as json_lib
import os
import platform
import signal
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch

from configurator import configure
from lib.errors import install
from lib.optim import make_optimizer
from lib.runtime import peak_flops as device_peak_flops  # peak_flops is a config key
from lib.runtime import native_bf16, print0, setup_runtime
from model import GPT, GPTConfig, KVCache

install()  # a user's error is one line 'error: ...', Ctrl-C is 'interrupted' (lib/errors.py)

# ----------------------------------------------------------------------------------------------
# model shape: GPT-2 (124M)
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024  # model context (position table); the training length is seq_len
vocab_size = 50304  # GPT-2's 50257 padded to a multiple of 64
bias = True  # GPT2LMHeadModel always has biases: --compare_hf needs True
# what to measure
peak = True  # peak matmul FLOP/s in the working dtype (the MFU reference on CPUs)
train = True  # training steps: forward, backward, AdamW
decode = True  # prefill and generation, with and without the KV cache
compare_hf = False  # the same measurements on transformers' GPT2LMHeadModel (random init)
quant_modes = "int8,int4"  # also decode with these weight-only quantized copies (quantize.py); '' = none
group_size = 64  # int4 group size
decode_compile = False  # also prefill and decode every model through lib.decode.StaticDecoder, compiled (CUDA graphs)
decode_tune = True  # with decode_compile: coordinate descent tuning of the step (faster matrix-vector, slower compile)
decode_bf16 = "auto"  # on a CPU, also decode with bf16 weights: 'yes', 'no' or 'auto' (where bf16 matmuls are native)
# shapes and repeats
peak_size = 0  # n of the n x n x n peak matmul; 0 = 2048 on CPU, 8192 on GPUs
batch_size = 4  # training sequences per step (nanoGPT's GPT-2 run: 16 per GPU at seq_len 1024)
seq_len = 256  # training sequence length (<= block_size)
prefill_len = 256  # prompt tokens of the prefill measurement
prompt_len = 16  # prompt tokens of the generation measurements
new_tokens = 128  # tokens generated per run, batch 1, greedy
repeats = 5  # timed runs per measurement (median, min, max)
warmup = 1  # untimed runs first (compilation, allocator, caches)
# system
device = "auto"  # 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'
dtype = "auto"  # 'auto' (bf16 on CUDA, fp32 on CPU where bf16 autocast measured ~4x slower), 'float32', 'bfloat16'
compile = False  # torch.compile both models for the training steps
peak_flops = 0.0  # a GPU's dense bf16 FLOP/s for the MFU line; 0: its datasheet peak (lib.runtime.GPU_PEAKS)
threads = 0  # CPU threads for torch (0 = torch's default: one per core; 1 is steadier on a shared machine)
seed = 1337
json = ""  # also write every figure to this JSON file (rewritten after each section)
config = configure(globals(), sys.argv[1:]); globals().update(config)
# ----------------------------------------------------------------------------------------------
# checks before any work

for key in ("batch_size", "seq_len", "prefill_len", "prompt_len", "new_tokens", "repeats"):
    if config[key] < 1:
        raise ValueError(f"{key} must be at least 1, got {config[key]!r}")
if max(seq_len, prefill_len + decode_compile, prompt_len + new_tokens) > block_size:
    raise ValueError(f"seq_len ({seq_len}), prefill_len ({prefill_len}, + 1 with --decode_compile) and prompt_len + "
                     f"new_tokens ({prompt_len + new_tokens}) must fit in block_size ({block_size}); "
                     f"e.g. --new_tokens=128")
if decode_bf16 not in ("yes", "no", "auto"):
    raise ValueError(f"decode_bf16 must be 'yes', 'no' or 'auto', got {decode_bf16!r}")
modes = [m for m in quant_modes.split(",") if m]
from lib.decode import StaticDecoder  # noqa: E402 (after the checks: these import the quantized kernels)
from lib.quant import WeightOnlyQuantizer, memory_bytes, quantized_model_from_checkpoint  # noqa: E402
quantizers = {m: WeightOnlyQuantizer(m, group_size) for m in modes}  # raises on an unknown mode
if compare_hf:
    if not bias:
        raise ValueError("--compare_hf needs --bias=True: GPT2LMHeadModel always has biases")
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as e:
        raise ImportError("--compare_hf needs transformers: pip install transformers") from e

rt = setup_runtime(device, dtype)
cuda = rt.device_type == "cuda"
if threads > 0:
    torch.set_num_threads(threads)
torch.manual_seed(seed)
cfg = GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                dropout=0.0, bias=bias)
load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0  # Unix only
cores = os.cpu_count()
where = (f"{torch.cuda.get_device_name(rt.device)} (sm{''.join(map(str, torch.cuda.get_device_capability(rt.device)))}"
         f", CUDA {torch.version.cuda})" if cuda else f"{platform.processor() or platform.machine()}, "
         f"{torch.get_num_threads()} threads")
print0(f"torch {torch.__version__}, {where}, load average {load:.2f} on {cores} cores")
if rt.device_type == "cpu" and load > 0.5 * cores:
    print0(f"WARNING: the machine is busy (load {load:.1f} on {cores} cores): absolute figures are low and noisy; "
           f"the ratios still compare like with like. Re-run on a quiet machine for absolute numbers")


def sync():
    if cuda:
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


def peak_mib(fn, resident: int):
    """Peak CUDA memory of one call of fn in MiB: the most it allocated beyond what was allocated before the call
    (the other models' weights are left out), plus resident, the bytes its model keeps between calls. Off CUDA:
    None (the process's resident set counts every model at once)."""
    if not cuda:
        return None
    sync()
    base = torch.cuda.memory_allocated(rt.device)
    torch.cuda.reset_peak_memory_stats(rt.device)
    fn()
    sync()
    return (torch.cuda.max_memory_allocated(rt.device) - base + resident) / 2 ** 20


def state_bytes(*objs) -> int:
    """Bytes a model (parameters and buffers) or an optimizer (its state tensors) keeps, each storage once."""
    tensors = []
    for o in objs:
        if isinstance(o, torch.optim.Optimizer):
            tensors += [t for s in o.state.values() for t in s.values() if torch.is_tensor(t)]
        else:
            tensors += list(o.parameters()) + list(o.buffers())
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def stats(values: list) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


rows = []  # one per measured line: {metric, unit, ours: stats, hf: stats or None, mem_mib, ...}


def add(metric: str, unit: str, ours: list, hf=None, lower_is_better: bool = False, note: str = "", mem=None):
    row = {"metric": metric, "unit": unit, "ours": stats(ours), "hf": stats(hf) if hf else None, "note": note}
    if hf:  # ratio > 1 always means ours is faster
        a, b = row["ours"]["median"], row["hf"]["median"]
        row["speedup_vs_hf"] = b / a if lower_is_better else a / b
    if mem:
        row["mem_mib"] = mem  # {"ours": MiB, "hf": MiB or None}
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
# the table and the JSON, also written after each section and when the run is stopped (a timeout's SIGTERM)


def cell(s):
    if s is None:
        return ""
    fmt = "{:.3g}" if s["median"] < 100 else "{:.0f}"
    return f"{fmt.format(s['median'])} [{fmt.format(s['min'])}-{fmt.format(s['max'])}]"


targets = []  # (what, measured, goal, met): against HF everywhere; on GPUs also MFU and quantized decoding


def write_json(partial: bool):
    if not json:
        return
    out = {"torch": torch.__version__, "device": rt.device, "device_name": where, "dtype": rt.dtype,
           "threads": torch.get_num_threads(), "load_average": [load, os.getloadavg()[0] if hasattr(os, "getloadavg")
                                                                else 0.0], "config": config, "rows": rows,
           "targets": [dict(zip(("target", "measured", "goal", "met"), t)) for t in targets], "partial": partial}
    folder = os.path.dirname(os.path.abspath(json))
    os.makedirs(folder, exist_ok=True)
    with open(json + ".tmp", "w") as f:
        json_lib.dump(out, f, indent=2)
    os.replace(json + ".tmp", json)


def print_table(partial: bool = False):
    end_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    print0(f"\n{cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} dims, vocab {cfg.vocab_size}, "
           f"{rt.device} {rt.dtype}" + (" (decoding: bf16 weights)" if cuda and rt.dtype == "bfloat16" else "")
           + f", compile={compile}; median [min-max] of {repeats}; load average {load:.2f} -> {end_load:.2f}"
           + ("\nSTOPPED before the end: the lines measured so far" if partial else ""))
    header = f"{'metric':<38} {'unit':<9} {'ours':>24}"
    if compare_hf:
        header += f" {'HF GPT2LMHeadModel':>24} {'ours/HF':>8}"
    if cuda:
        header += f" {'peak MiB ours/HF':>17}"
    print0(header + "  note")
    for r in rows:
        line = f"{r['metric']:<38} {r['unit']:<9} {cell(r['ours']):>24}"
        if compare_hf:
            ratio = f"{r['speedup_vs_hf']:.2f}x" if r.get("speedup_vs_hf") else ""
            line += f" {cell(r['hf']):>24} {ratio:>8}"
        if cuda:
            mem = r.get("mem_mib") or {}
            text = "/".join(f"{mem[k]:.0f}" for k in ("ours", "hf") if mem.get(k) is not None)
            line += f" {text:>17}"
        print0(line + (f"  {r['note']}" if r["note"] else ""))
    if compare_hf:
        print0("ours/HF > 1: ours is faster (for ms/iter and ms/token too); HF decodes eagerly with its own cache")
    for what, measured, goal, met in targets:
        print0(f"target {what:<52} {measured:<12} goal {goal:<8} {'met' if met else 'MISSED'}")
    write_json(partial)
    if json:
        print0(f"wrote {json}")


def stopped(signum, frame):
    print_table(partial=True)
    sys.exit(128 + signum)


signal.signal(signal.SIGTERM, stopped)  # e.g. runs/gpu_check.sh's timeout: keep what was measured

# ----------------------------------------------------------------------------------------------
# peak: the largest FLOP/s a plain matmul reaches in the working dtype; MFU is measured against it on CPUs, and
# against the datasheet's dense bf16 peak on GPUs (the measured one is shown too)


matmul_peak = peak_bandwidth = None
if peak:
    n = peak_size or (2048 if rt.device_type == "cpu" else 8192)
    mm_dtype = rt.ptdtype  # what autocast would run the model's matmuls in
    a = torch.randn(n, n, device=rt.device, dtype=mm_dtype)
    b = torch.randn(n, n, device=rt.device, dtype=mm_dtype)
    t = timed({"ours": lambda: a @ b})["ours"]
    flops = [2 * n ** 3 / s / 1e12 for s in t]
    matmul_peak = max(flops) * 1e12  # the best run is the device's capability; the median shows the noise
    add(f"peak matmul {rt.dtype} {n}^3", "TFLOP/s", flops, note="max is the MFU reference" if not cuda else
        "max: the measured peak")
    del a, b
    # decoding at batch 1 reads every weight once per token: memory bandwidth bounds it, not FLOP/s. Measured
    # with the operation decoding is made of, a matrix-vector product, on a matrix far larger than any cache
    big = torch.ones(8192, 8192, device=rt.device, dtype=mm_dtype)  # 256 MiB in fp32
    vec = torch.randn(8192, device=rt.device, dtype=mm_dtype)
    reps = 20 if cuda else 1  # on a GPU one product (~30 us) is not much longer than a synchronisation
    t = timed({"ours": lambda: [big @ vec for _ in range(reps)]})["ours"]
    gbs = [reps * big.numel() * big.element_size() / s / 1e9 for s in t]
    peak_bandwidth = max(gbs) * 1e9
    add("memory bandwidth (matrix-vector)", "GB/s", gbs, note="max is the decoding bound")
    del big, vec
mfu_peak, mfu_why = matmul_peak, "the measured matmul peak"
if cuda:
    mfu_peak, mfu_why = (peak_flops, "--peak_flops") if peak_flops else device_peak_flops(rt.device)
    mfu_peak = mfu_peak or matmul_peak  # a GPU missing from the table: the measured peak, said in the note
    mfu_why = mfu_why if mfu_peak != matmul_peak else "the measured matmul peak (no datasheet figure)"
write_json(partial=True)

# ----------------------------------------------------------------------------------------------
# training: forward + backward + AdamW step on a fixed random batch

if train:
    model = GPT(cfg).to(rt.device)
    x = torch.randint(0, min(vocab_size, 50257), (batch_size, seq_len), device=rt.device)
    y = torch.roll(x, -1, dims=1)
    opt = make_optimizer(model, 0.1, 6e-4, (0.9, 0.95), rt.device_type)
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
        hf_opt = make_optimizer(hf, 0.1, 6e-4, (0.9, 0.95), rt.device_type)
        hf_step_model = torch.compile(hf) if compile else hf

        def hf_step():
            with rt.autocast():
                loss = hf_step_model(input_ids=x, labels=x).loss  # labels are shifted inside
            loss.backward()
            hf_opt.step()
            hf_opt.zero_grad(set_to_none=True)
        fns["hf"] = hf_step
    t = timed(fns)
    mem = {"ours": peak_mib(ours_step, state_bytes(model, opt)),
           "hf": peak_mib(hf_step, state_bytes(hf, hf_opt)) if compare_hf else None} if cuda else None
    tokens = batch_size * seq_len
    tok_s = {k: [tokens / s for s in v] for k, v in t.items()}
    shape = f"{batch_size}x{seq_len}"
    train_row = add(f"train step {shape}", "tok/s", tok_s["ours"], tok_s.get("hf"), mem=mem)
    add(f"train step {shape}", "ms/iter", [1e3 * s for s in t["ours"]], [1e3 * s for s in t["hf"]] if compare_hf
        else None, lower_is_better=True)
    if mfu_peak:
        mfu = {k: [100 * model.estimate_mfu(r, mfu_peak, T=seq_len) for r in v] for k, v in tok_s.items()}
        note = f"of {mfu_peak / 1e12:.2f} TFLOP/s" + (f" ({mfu_why}; the matmul above reached "
                                                       f"{100 * matmul_peak / mfu_peak:.0f}% of it)" if cuda and matmul_peak
                                                       else "")
        mfu_row = add(f"train MFU {shape}", "%", mfu["ours"], mfu.get("hf"), note=note)
        if cuda:
            targets.append(("training MFU, bf16 + compile (dense bf16 peak)", f"{mfu_row['ours']['median']:.1f}%",
                            ">= 50%", mfu_row["ours"]["median"] >= 50))
    if compare_hf:
        targets.append(("training tok/s, ours / HF", f"{train_row['speedup_vs_hf']:.2f}x", ">= 1.1x",
                        train_row["speedup_vs_hf"] >= 1.1))
    del opt, fns
    if compare_hf:
        del hf, hf_opt, hf_step_model
    del model, step_model
    if cuda:
        torch.cuda.empty_cache()
    write_json(partial=True)

# ----------------------------------------------------------------------------------------------
# decoding, batch 1: prefill, then greedy generation with and without the KV cache, and quantized weights. The
# eager lines run model.generate, whose cache grows by a position per token. With --decode_compile every model
# also runs through lib.decode.StaticDecoder: prefill compiled once for any length, the one-token step compiled once
# over a whole-window cache and, on CUDA, replayed as a CUDA graph (gpt-fast's recipe). On CUDA the models decode
# with bf16 weights (like HF's), not fp32 weights under autocast, which would re-cast every weight at every token.

if decode:
    wdtype = rt.ptdtype if cuda else torch.float32
    dctx = nullcontext if cuda else rt.autocast  # bf16 weights need no autocast
    model = GPT(cfg).eval()
    prompt = torch.randint(0, min(vocab_size, 50257), (1, prompt_len), device=rt.device)
    long_prompt = torch.randint(0, min(vocab_size, 50257), (1, prefill_len), device=rt.device)
    hf = hf_model().to(wdtype).eval() if compare_hf else None
    # quantized copies of the same (fp32) weights, as quantize.py would write and load them
    models = {"": model}
    for m, q in quantizers.items():
        ckpt = {"model_args": asdict(cfg), "model": q.quantize(model),
                "quantization": {"mode": m, "group_size": group_size, "quantize_head": True}}
        models[m] = quantized_model_from_checkpoint(ckpt).eval()
    models = {m: qm.to(rt.device).to(wdtype) for m, qm in models.items()}  # .to(dtype) leaves int weights alone
    model = models[""]
    label = {m: f" {m}" + (f" g{group_size}" if m == "int4" else "") if m else "" for m in models}

    @torch.no_grad()
    def ours_gen(m, use_cache=True):
        with dctx():
            out = m.generate(prompt, new_tokens, temperature=0.0, use_cache=use_cache)
        assert out.size(1) == prompt_len + new_tokens, out.shape

    @torch.no_grad()
    def hf_gen(use_cache=True):
        with dctx():
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                              do_sample=False, use_cache=use_cache)
        assert out.size(1) == prompt_len + new_tokens, out.shape

    @torch.no_grad()
    def ours_prefill(m):
        with dctx():
            m(long_prompt, cache=KVCache(cfg, 1), last_only=True)

    @torch.no_grad()
    def hf_prefill():
        with dctx():
            hf(long_prompt, use_cache=True, logits_to_keep=1)  # the last position's logits, as generate asks

    def hf_bytes():
        return state_bytes(hf)

    def mems(fns: dict, resident: dict) -> dict:
        """Peak MiB of one call of each function (CUDA only), keyed like fns."""
        return {k: peak_mib(f, resident[k]()) for k, f in fns.items()} if cuda else {}

    # prefill: ours (and every quantized copy with --decode_compile) against HF
    fns = {"ours": lambda: ours_prefill(model), **({"hf": hf_prefill} if compare_hf else {})}
    if decode_compile:
        fns.update({m: lambda qm=qm: ours_prefill(qm) for m, qm in models.items() if m})
    t = timed(fns)
    resident = {m or "ours": (lambda qm=qm: memory_bytes(qm)) for m, qm in models.items()} | {"hf": hf_bytes}
    mem = mems(fns, resident)
    rate = {k: [prefill_len / s for s in v] for k, v in t.items()}
    hf_rate = {"prefill": rate.get("hf")}  # the reference of the compiled lines too
    mem_hf = {"prefill": mem.get("hf")}
    for k in [k for k in fns if k != "hf"]:
        m = "" if k == "ours" else k
        add(f"prefill {prefill_len} tokens{label[m]}", "tok/s", rate[k], rate.get("hf"),
            mem={"ours": mem.get(k), "hf": mem.get("hf")} if cuda else None)
    # generation with the KV cache: ours, HF and every quantized copy
    fns = {"ours": lambda: ours_gen(model), **({"hf": hf_gen} if compare_hf else {})}
    fns.update({m: lambda qm=qm: ours_gen(qm) for m, qm in models.items() if m})
    gen = f"decode {prompt_len}+{new_tokens}"
    t = timed(fns)
    mem = mems(fns, resident)
    rate = {k: [new_tokens / s for s in v] for k, v in t.items()}
    hf_rate["decode"], mem_hf["decode"] = rate.get("hf"), mem.get("hf")

    def roofline(r, m) -> str:
        """Weight bytes read per token x tokens/s, as a fraction of the bandwidth: at batch 1 the weights
        dominate the traffic (of the position table one row is read, so it is left out)."""
        if not peak_bandwidth:
            return ""
        wpe = m.transformer.wpe.weight
        streamed = memory_bytes(m) - wpe.numel() * wpe.element_size()
        return f"; {100 * streamed * r['ours']['median'] / peak_bandwidth:.0f}% of the bandwidth bound"
    base = add(f"{gen} KV cache", "tok/s", rate["ours"], rate.get("hf"),
               mem={"ours": mem.get("ours"), "hf": mem.get("hf")} if cuda else None)
    add(f"{gen} KV cache", "ms/token", [1e3 * s / new_tokens for s in t["ours"]],
        [1e3 * s / new_tokens for s in t["hf"]] if compare_hf else None, lower_is_better=True)
    eager = {"": base}
    for m in [m for m in models if m]:
        r = eager[m] = add(f"{gen} KV cache{label[m]}", "tok/s", rate[m], rate.get("hf"),
                           mem={"ours": mem.get(m), "hf": mem.get("hf")} if cuda else None)
        r["note"] = f"{r['ours']['median'] / base['ours']['median']:.2f}x {'bf16' if cuda else 'fp32'} weights" + \
            roofline(r, models[m])
    t = timed({"ours": lambda: ours_gen(model, use_cache=False),
               **({"hf": lambda: hf_gen(use_cache=False)} if compare_hf else {})})
    nc = add(f"{gen} no cache", "tok/s", [new_tokens / s for s in t["ours"]],
             [new_tokens / s for s in t["hf"]] if compare_hf else None)
    base["note"] = f"{base['ours']['median'] / nc['ours']['median']:.2f}x no cache" + (
        f" (HF: {base['hf']['median'] / nc['hf']['median']:.2f}x)" if compare_hf else "") + roofline(base, model)
    # a CPU's bf16 decoding path (sample.py --dtype=bfloat16): bf16 weights, no autocast, so no weight is re-cast
    if not cuda and (decode_bf16 == "yes" or (decode_bf16 == "auto" and not native_bf16("cpu"))):
        m16 = copy.deepcopy(model).to(torch.bfloat16)
        with torch.no_grad():
            ref = model(long_prompt)[0].float()
            err = (m16(long_prompt)[0].float() - ref).abs().max().item()
        t = timed({"ours": lambda: ours_gen(m16)})
        r = add(f"{gen} KV cache bf16", "tok/s", [new_tokens / s for s in t["ours"]], rate.get("hf"))
        r["note"] = (f"{r['ours']['median'] / base['ours']['median']:.2f}x fp32 weights; logits max |error| {err:.3f}"
                     f" (their std {ref.std().item():.2f}), {prefill_len}-token prompt") + (
                         f"; {native_bf16('cpu')}" if native_bf16("cpu") else "")
        del m16
    write_json(partial=True)
    # ------------------------------------------------------------------------------------------
    # the compiled decoder: one compile per model for prefill (any length) and one for the step
    compiled = {}
    if decode_compile:
        print0("compiling prefill and the decode step of every model (the warm-up runs take a while)...")
        decoders = {m: StaticDecoder(qm, compile=True, tune=decode_tune) for m, qm in models.items()}

        def run_decoder(d, p, n):
            with dctx():
                out = d.generate(p, n)
            assert out.size(1) == p.size(1) + n, out.shape
        for what, p, n, size in (("prefill", long_prompt, 1, prefill_len), ("decode", prompt, new_tokens, new_tokens)):
            fns = {m or "ours": (lambda d=d, p=p, n=n: run_decoder(d, p, n)) for m, d in decoders.items()}
            t = timed(fns)
            resident = {m or "ours": (lambda d=d: memory_bytes(d.model) + 2 * d.cache.k.nbytes)
                        for m, d in decoders.items()}
            mem = mems(fns, resident)
            for m in decoders:
                k = m or "ours"
                # the prefill line times prefill and one argmax; the decode line the whole generation, prefill included
                metric = f"prefill {prefill_len} tokens compiled" if what == "prefill" else f"{gen} compiled"
                r = add(metric + label[m], "tok/s", [size / s for s in t[k]], hf_rate[what],
                        mem={"ours": mem.get(k), "hf": mem_hf.get(what)} if cuda else None)
                if what == "decode":
                    compiled[m] = r
                    r["note"] = f"{r['ours']['median'] / eager[m]['ours']['median']:.2f}x eager"
                    if m:
                        r["note"] += f", {r['ours']['median'] / compiled['']['ours']['median']:.2f}x compiled " + \
                            ("bf16" if cuda else "fp32") + " weights"
            write_json(partial=True)
    lines, how = (compiled, "compiled") if compiled else (eager, "eager")
    if compare_hf:  # decoding targets, on the compiled lines when there are some
        ratio = lines[""]["ours"]["median"] / base["hf"]["median"]
        targets.append((f"decode tok/s, ours {how} / HF generate with its cache", f"{ratio:.2f}x", ">= 1.2x",
                        ratio >= 1.2))
    if cuda:
        for m, goal in (("int8", 1.0), ("int4", 1.3)):
            if m in lines:
                ratio = lines[m]["ours"]["median"] / lines[""]["ours"]["median"]
                targets.append((f"decode tok/s, {m} / bf16 weights ({how})", f"{ratio:.2f}x", f">= {goal}x",
                                ratio >= goal))
    # ------------------------------------------------------------------------------------------
    # one int8 matmul of decoding (the attention's 768 -> 2304 at one row) on CUDA, every way: what Int8Linear
    # does eagerly (dequantize, then a bf16 matmul) and compiled (one fused reduction), torch's own int8 kernel
    # (not used, see quantize.Int8Linear), and the bf16 weight it replaces, eager and compiled. 100 calls per
    # timed run: one call is shorter than a synchronisation.
    if cuda and "int8" in models:
        layer = models["int8"].transformer.h[0].attn.c_attn
        xv = torch.randn(1, n_embd, device=rt.device, dtype=wdtype)
        w16 = (layer.weight.to(torch.float32) * layer.scales.float()[:, None]).to(wdtype)
        ways = {"int8 dequantize (Int8Linear, eager)": lambda: layer(xv),
                "int8 torch._weight_int8pack_mm": lambda: torch._weight_int8pack_mm(xv, layer.weight, layer.scales),
                f"{rt.dtype} weight": lambda: torch.nn.functional.linear(xv, w16)}
        if decode_compile:
            options = {"coordinate_descent_tuning": decode_tune}
            fused = torch.compile(layer, fullgraph=True, options=options)
            dense = torch.compile(lambda v: torch.nn.functional.linear(v, w16), fullgraph=True, options=options)
            ways["int8 fused (Int8Linear, compiled)"] = lambda: fused(xv)
            ways[f"{rt.dtype} weight, compiled"] = lambda: dense(xv)
        with torch.no_grad():
            try:
                ways["int8 torch._weight_int8pack_mm"]()
            except RuntimeError as e:  # a build without the kernel: the other two lines still say something
                print0(f"WARNING: torch._weight_int8pack_mm failed on {rt.device} ({e}); its line is left out")
                del ways["int8 torch._weight_int8pack_mm"]
            t = timed({k: (lambda f=f: [f() for _ in range(100)]) for k, f in ways.items()})
        for k in ways:
            add(f"matmul 1x{n_embd}x{3 * n_embd} {k}", "us", [1e6 * s / 100 for s in t[k]])
        write_json(partial=True)

print_table()
