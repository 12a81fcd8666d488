"""
Weight-only quantization of a GPT checkpoint: int8 with one scale per output channel, or int4 in groups of
input columns, two values a byte. The result is an ordinary checkpoint that every script loads by name.

    python quantize.py --out_dir=out-shakespeare-char --mode=int8                  # -> ckpt_int8.pt
    python quantize.py --out_dir=out-shakespeare-char --mode=int4 --group_size=64  # -> ckpt_int4.pt
    python quantize.py --out_dir=out-shakespeare-char --mode=int4 --report=True --dataset=shakespeare_char
    python sample.py --out_dir=out-shakespeare-char --ckpt_name=ckpt_int8.pt      # loads like any checkpoint

Every Linear of the transformer blocks is quantized, and the token embedding that doubles as the LM head
(weight tying) too unless --quantize_head=False. Activations, LayerNorms, biases and position embeddings stay
in floating point. A matmul runs torch's fused int kernel where the device has a fast one (int8 and int4 on CPU,
int4 on CUDA) and dequantizes the weight on the fly elsewhere; on a GPU, decode with --compile=True (the
StaticDecoder below) so that the dequantization fuses into the matmul. --report says which kernel, next to size,
loss and decode speed for every mode.

    python quantize.py --out_dir=out-gpt2 --mode=int8 --report=True --device=cuda --compile=True
"""

import math
import os
import statistics
import sys
import time
from typing import Optional

import torch

from lib.decode import StaticDecoder
from lib.errors import install
from lib.quant import WeightOnlyQuantizer, kernel_name, linear_bytes, memory_bytes, quantized_model_from_checkpoint
from model import GPT

# the report: size, memory, loss and decode speed of the float model and of each quantized checkpoint


def eval_batches(tok, data: str, text_file: str, batch_size: int, block_size: int, n_batches: int, seed: int):
    """The same (x, y) batches for every model: random windows of data/<dataset>/val.bin, or consecutive
    windows of a text file encoded with the checkpoint's tokenizer."""
    if data:
        from lib.tokens import BinLoader
        loader = BinLoader(data, "val", batch_size, block_size, seed=seed)
        return [loader.next_batch() for _ in range(n_batches)]
    with open(text_file, encoding="utf-8") as f:
        ids = torch.tensor(tok.encode(f.read()), dtype=torch.long)
    if ids.numel() < 2:
        raise ValueError(f"{text_file!r} encodes to {ids.numel()} token(s); perplexity needs at least 2")
    T = min(block_size, ids.numel() - 1)
    n = min((ids.numel() - 1) // T, n_batches * batch_size)  # whole windows only
    x, y = ids[:n * T].view(n, T), ids[1:n * T + 1].view(n, T)  # (n, T) each
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)]


@torch.no_grad()
def eval_loss(model, batches, rt) -> float:
    """Mean cross-entropy over the batches (token-weighted)."""
    from tqdm import tqdm
    total, count = 0.0, 0
    for x, y in tqdm(batches, desc="eval", leave=False):
        with rt.autocast():
            _, loss = model(x.to(rt.device), y.to(rt.device))
        total, count = total + loss.item() * y.numel(), count + y.numel()
    return total / count


@torch.no_grad()
def decode_speeds(models: list, prompt: torch.Tensor, new_tokens: int, repeats: int, rt, compile: bool = False) -> list:
    """Greedy decode tokens/s with the KV cache, median of repeats: model.generate, or with compile the compiled
    StaticDecoder. Models take turns in every repeat, so a busy machine slows them alike and the ratios stay fair."""
    gens = [StaticDecoder(m, compile=True).generate if compile else
            (lambda p, n, m=m: m.generate(p, n, temperature=0.0)) for m in models]

    def run(gen):
        if rt.device_type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with rt.autocast():
            gen(prompt, new_tokens)
        if rt.device_type == "cuda":
            torch.cuda.synchronize()
        return new_tokens / (time.perf_counter() - t0)
    for gen in gens:
        with rt.autocast():
            gen(prompt, min(4, new_tokens))  # warm-up: int4 re-packs for the device, compile traces, CUDA graphs record
    speeds = [[] for _ in models]
    for _ in range(repeats):
        for i, gen in enumerate(gens):
            speeds[i].append(run(gen))
    return [statistics.median(s) for s in speeds]


def quantized_checkpoint(model: GPT, ckpt: Optional[dict], tok, quantizer: WeightOnlyQuantizer, source: str) -> dict:
    """The checkpoint to save, kind 'quantized': the quantized weights with ckpt's model_args, config and tokenizer,
    and a 'quantization' entry naming source, the float checkpoint (a path, or a GPT-2 name), which
    load_model(for_training=True) points to; no resume state, as integer weights take no gradients.
    ckpt: the float checkpoint as load_checkpoint returns it, or None for OpenAI's GPT-2."""
    from lib.checkpoint import make_checkpoint
    if ckpt is not None and (ckpt.get("kind") == "quantized" or "quantization" in ckpt):
        q = ckpt.get("quantization") or {}
        raise ValueError(f"{source!r} is already quantized ({q.get('mode')!r}); quantize the float checkpoint "
                         f"instead, e.g. --init_from={q.get('source') or 'out/ckpt.pt'}")
    if ckpt is None:  # OpenAI's GPT-2: the entries a trained run would have
        ckpt = {"model_args": dict(vars(model.config)), "config": {}, "tokenizer": tok.meta()}
    quant = {"mode": quantizer.mode, "group_size": quantizer.group_size if quantizer.mode == "int4" else None,
             "quantize_head": quantizer.quantize_head, "source": source,
             "source_iter": (ckpt.get("resume") or {}).get("iter_num")}
    return make_checkpoint("quantized", quantizer.quantize(model), ckpt["model_args"], ckpt.get("config") or {},
                           ckpt.get("tokenizer"), quantization=quant)


def same_source(a: str, b: str) -> bool:
    """Do two 'source' entries name the same float checkpoint (paths compared as absolute paths)?"""
    return a == b or os.path.abspath(a) == os.path.abspath(b)


if __name__ == "__main__":
    install()  # a user's error is one line 'error: ...', Ctrl-C is 'interrupted' (lib/errors.py)
    import io
    import json

    from configurator import configure
    from lib.checkpoint import load_checkpoint, save_checkpoint
    from lib.models import load_model
    from lib.runtime import print0, setup_runtime

    # I/O
    init_from = "resume"  # 'resume' (out_dir/ckpt_name), a GPT-2 name ('gpt2', ...), or a checkpoint file/folder
    out_dir = "out"  # where ckpt_<mode>.pt and quant_report.json are written
    ckpt_name = "ckpt.pt"  # the float checkpoint to quantize (with init_from='resume')
    # quantization
    mode = "int8"  # 'int8' (per output channel, symmetric) or 'int4' (groups of input columns, affine)
    group_size = 64  # int4: input columns sharing a scale and zero, 32/64/128/256 (smaller: closer, bigger file)
    quantize_head = True  # also the tied token embedding / LM head, in int8 for both modes (31% of GPT-2 124M's
    # weights); False keeps it in fp32: a bigger file and slower decoding, the logits' projection exact
    # report
    report = False  # compare the fp32 model with every quantized checkpoint in out_dir made from it
    dataset = ""  # val loss on data/<dataset>/val.bin (a name under data/, or a folder holding val.bin)
    text_file = ""  # or perplexity on a UTF-8 text file
    eval_iters = 20  # batches of the loss evaluation
    batch_size = 8
    block_size = 0  # context of the loss evaluation; 0 = the model's block_size
    prompt_len = 16  # decode benchmark: prompt tokens (from the eval data when given), then...
    decode_tokens = 128  # ...this many new tokens, greedy, batch 1, with the KV cache
    decode_repeats = 5  # decode speed is the median of this many runs
    device = "auto"  # the report's device: 'auto', 'cpu', 'cuda', 'mps' (quantizing itself runs on the CPU)
    dtype = "auto"  # activations: 'auto', 'float32', 'bfloat16', 'float16'
    compile = False  # decode benchmark through the compiled StaticDecoder (CUDA graphs on CUDA); compiling takes minutes
    seed = 1337
    config = configure(globals(), sys.argv[1:]); globals().update(config)
    # ------------------------------------------------------------------------------------------
    # validate everything before the heavy work
    quantizer = WeightOnlyQuantizer(mode, group_size, quantize_head)
    data_dir = ""
    if report and dataset and text_file:
        raise ValueError(f"give --dataset or --text_file, not both (got {dataset!r} and {text_file!r})")
    if report and dataset:
        here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", dataset)
        data_dir = dataset if os.path.isdir(dataset) else here
        from lib.tokens import token_files
        token_files(data_dir, "val")  # raises with the prepare command when missing
    elif report and text_file and not os.path.isfile(text_file):
        raise FileNotFoundError(f"--text_file={text_file!r} does not exist; pass a UTF-8 text file")
    elif report and not text_file:
        print0("WARNING: --report without --dataset or --text_file measures no loss; add "
               "--dataset=shakespeare_char (data/<name>/val.bin) or --text_file=FILE")
    torch.manual_seed(seed)
    # ------------------------------------------------------------------------------------------
    # load the float model, quantize, save
    model, ckpt, tok = load_model(init_from, out_dir, "cpu", ckpt_name=ckpt_name)
    model.eval()
    source = ckpt["path"] if ckpt is not None else init_from  # the float file (or GPT-2 name) it came from
    t0 = time.time()
    qckpt = quantized_checkpoint(model, ckpt, tok, quantizer, source)
    path = os.path.join(out_dir, f"ckpt_{mode}.pt")
    save_checkpoint(qckpt, path)
    fp32_linear, q_linear = linear_bytes(model.state_dict(), model), linear_bytes(qckpt["model"], model)
    print0(f"quantized {len(quantizer.targets(model))} Linear layers to {mode}"
           + (f" (groups of {group_size})" if mode == "int4" else "")
           + (" and the tied embedding / LM head to int8" if quantize_head else "") + f" in {time.time() - t0:.1f}s")
    print0(f"block Linear weights: {fp32_linear / 1e6:.2f} MB fp32 -> {q_linear / 1e6:.2f} MB {mode} "
           f"({fp32_linear / q_linear:.2f}x smaller)\nwrote {path} ({os.path.getsize(path) / 1e6:.2f} MB)")
    # ------------------------------------------------------------------------------------------
    # report: the fp32 model and every quantized checkpoint of the same source in out_dir
    if report:
        rt = setup_runtime(device, dtype)
        buf = io.BytesIO()  # the fp32 checkpoint as it would be without optimizer state, like the quantized ones
        torch.save({k: v for k, v in qckpt.items() if k != "quantization"} | {"model": model.state_dict()}, buf)
        rows = [{"mode": "fp32", "kernel": "dense matmul", "model": model, "disk_bytes": buf.tell(),
                 "linear_bytes": fp32_linear}]
        for m in WeightOnlyQuantizer.modes:
            p = os.path.join(out_dir, f"ckpt_{m}.pt")
            c = load_checkpoint(p) if os.path.exists(p) else None
            if c is None or not same_source(c["quantization"]["source"], source) or \
                    c["quantization"]["source_iter"] != qckpt["quantization"]["source_iter"]:
                if c is not None:
                    print0(f"WARNING: skipping {p}: made from another checkpoint; re-run quantize.py --mode={m}")
                continue
            qm = quantized_model_from_checkpoint(c).eval()
            label = m + (f" g{c['quantization']['group_size']}" if m == "int4" else "")
            rows.append({"mode": label, "kernel": kernel_name(m, torch.device(rt.device), qm, compile), "model": qm,
                         "disk_bytes": os.path.getsize(p), "linear_bytes": linear_bytes(c["model"], qm)})
        T = min(block_size or model.config.block_size, model.config.block_size)
        batches = eval_batches(tok, data_dir, text_file, batch_size, T, eval_iters, seed) if data_dir or text_file \
            else []
        for r in rows:
            r["model"].to(rt.device)
            r["memory_bytes"] = memory_bytes(r["model"])
            r["loss"] = eval_loss(r["model"], batches, rt) if batches else None
            r["ppl"] = math.exp(r["loss"]) if batches else None
        prompt = batches[0][0][:1, :prompt_len] if batches else torch.randint(0, tok.n_vocab, (1, prompt_len))
        new = min(decode_tokens, model.config.block_size - prompt.size(1))  # stay within one window
        speeds = decode_speeds([r.pop("model") for r in rows], prompt.to(rt.device), new, decode_repeats, rt, compile)
        metric = "val loss" if data_dir else "ppl"
        print0(f"\n{'mode':<9} {'kernel':<30} {'disk MB':>8} {'memory MB':>9} {'Linear MB':>15} "
               f"{metric:>17} {'decode tok/s':>15}")
        base = rows[0]
        for r, speed in zip(rows, speeds):
            r.update(decode_tok_s=speed, decode_speedup=speed / speeds[0],
                     linear_ratio=base["linear_bytes"] / r["linear_bytes"])
            value = r["loss"] if data_dir else r["ppl"]
            if value is not None:
                r["change_pct"] = 100 * (value / (base["loss"] if data_dir else base["ppl"]) - 1)
            cell = f"{value:.4f} ({r['change_pct']:+.2f}%)" if value is not None else "-"
            print0(f"{r['mode']:<9} {r['kernel']:<30} {r['disk_bytes'] / 1e6:>8.2f} {r['memory_bytes'] / 1e6:>9.2f} "
                   f"{r['linear_bytes'] / 1e6:>8.2f} ({r['linear_ratio']:.1f}x) {cell:>17} {speed:>8.1f} "
                   f"({r['decode_speedup']:.2f}x)")
        report_path = os.path.join(out_dir, "quant_report.json")
        with open(report_path + ".tmp", "w") as f:
            json.dump({"device": rt.device, "dtype": rt.dtype, "threads": torch.get_num_threads(), "metric": metric,
                       "eval": {"dataset": dataset, "text_file": text_file, "batches": len(batches), "block_size": T},
                       "decode": {"prompt_len": prompt.size(1), "new_tokens": new, "repeats": decode_repeats,
                                  "compile": compile},
                       "rows": rows}, f, indent=2)
        os.replace(report_path + ".tmp", report_path)
        print0(f"(Linear MB: the blocks' Linear weights with their scales; decode: greedy, batch 1, KV cache, {new} "
               f"new tokens, median of {decode_repeats}{', compiled' if compile else ''})\nwrote {report_path}")
