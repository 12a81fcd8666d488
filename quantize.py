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

import copy
import dataclasses
import os
import statistics
import sys
import time
from typing import Optional

import torch

from lib.decode import StaticDecoder
from lib.errors import install
from lib.perplexity import perplexity, text_tokens
from lib.quant import WeightOnlyQuantizer, kernel_name, linear_bytes, memory_bytes, quantized_model_from_checkpoint
from model import GPT

# the report: size, memory, perplexity and decode speed of the float model (fp32 and bf16) and of each quantized
# checkpoint; perplexity by lib/perplexity.py, eval.py's own code (sliding windows, the text after <|endoftext|>)


def heldout_tokens(tok, data_dir: str, text_file: str, task_file: str, n_tokens: int) -> dict:
    """The texts every row is scored on, as eval.py --task=perplexity reads them -> {'text': [(name, ids)], 'task':
    [(name, ids)]}: data_dir/val.bin, or a text file after <|endoftext|>, cut to n_tokens; and the first records of a
    JSONL task file ({"text": ...}, e.g. the journey's held-out questions with their answers), each a text of its
    own, as many as fit in n_tokens (at least one)."""
    out = {}
    if data_dir:
        from lib.tokens import read_tokens, token_files
        out["text"] = [(p, read_tokens(p)) for p in token_files(data_dir, "val")]
    elif text_file:
        with open(text_file, encoding="utf-8") as f:
            out["text"] = [(text_file, text_tokens(tok, f.read()))]
    if "text" in out:
        left, files = n_tokens, []
        for name, ids in out["text"]:
            if left >= 2 and len(ids) >= 2:
                files.append((name, ids[:left]))
                left -= len(files[-1][1])
        if not files:
            raise ValueError(f"{text_file or data_dir!r} holds fewer than 2 tokens; perplexity needs at least 2")
        out["text"] = files
    if task_file:
        import json
        with open(task_file, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f if line.strip()]
        out["task"], left = [], n_tokens
        for i, t in enumerate(texts):
            ids = text_tokens(tok, t)
            if out["task"] and len(ids) > left:
                break
            out["task"].append((f"{task_file}:{i + 1}", ids))
            left -= len(ids)
    return out


@torch.no_grad()
def decode_speeds(models: list, prompt: torch.Tensor, new_tokens: int, repeats: int, rts: list,
                  compile: bool = False) -> list:
    """Greedy decode tokens/s with the KV cache, median of repeats: model.generate, or with compile the compiled
    StaticDecoder; each model under its own runtime's autocast (rts). Models take turns in every repeat, so a busy
    machine slows them alike and the ratios stay fair."""
    gens = [StaticDecoder(m, compile=True).generate if compile else
            (lambda p, n, m=m: m.generate(p, n, temperature=0.0)) for m in models]

    def run(gen, rt):
        if rt.device_type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with rt.autocast():
            gen(prompt, new_tokens)
        if rt.device_type == "cuda":
            torch.cuda.synchronize()
        return new_tokens / (time.perf_counter() - t0)
    for gen, rt in zip(gens, rts):
        with rt.autocast():
            gen(prompt, min(4, new_tokens))  # warm-up: int4 re-packs for the device, compile traces, CUDA graphs record
    speeds = [[] for _ in models]
    for _ in range(repeats):
        for i, (gen, rt) in enumerate(zip(gens, rts)):
            speeds[i].append(run(gen, rt))
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
    overwrite = False  # True: replace an existing out_dir/ckpt_<mode>.pt (else quantize.py stops, naming it)
    ckpt_name = "ckpt.pt"  # the float checkpoint to quantize (with init_from='resume')
    # quantization
    mode = "int8"  # 'int8' (per output channel, symmetric) or 'int4' (groups of input columns, affine)
    group_size = 64  # int4: input columns sharing a scale and zero, 32/64/128/256 (smaller: closer, bigger file)
    quantize_head = True  # also the tied token embedding / LM head, in int8 for both modes (31% of GPT-2 124M's
    # weights); False keeps it in fp32: a bigger file and slower decoding, the logits' projection exact
    # report
    report = False  # compare the model in fp32 and bf16 with every quantized checkpoint in out_dir made from it
    dataset = ""  # perplexity of data/<dataset>/val.bin (a name under data/, or a folder holding val.bin)
    text_file = ""  # or of a UTF-8 text file (after <|endoftext|>, as eval.py --task=perplexity reads it)
    task_file = ""  # and of each record of a JSONL file of {"text": ...} (e.g. held-out questions with answers)
    eval_iters = 20  # how much of the text: eval_iters x batch_size x block_size tokens...
    limit = 0  # ...or this many (eval.py's --limit: the same figure as eval.py's for the same limit); 0 = as above;
    # the task file's first records up to as many tokens
    batch_size = 8  # windows per forward pass
    block_size = 0  # the perplexity's window (it moves by half of it, as eval.py's); 0 = the model's block_size
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
    for key in ("limit", "eval_iters", "block_size"):
        if config[key] < 0:
            raise ValueError(f"--{key} must be 0 or more, got {config[key]!r}; e.g. --{key}=0 (0: the default)")
    if report and dataset and text_file:
        raise ValueError(f"give --dataset or --text_file, not both (got {dataset!r} and {text_file!r})")
    if report and dataset:
        here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", dataset)
        data_dir = dataset if os.path.isdir(dataset) else here
        from lib.tokens import token_files
        token_files(data_dir, "val")  # raises with the prepare command when missing
    elif report and text_file and not os.path.isfile(text_file):
        raise FileNotFoundError(f"--text_file={text_file!r} does not exist; pass a UTF-8 text file")
    if report and task_file and not os.path.isfile(task_file):
        raise FileNotFoundError(f"--task_file={task_file!r} does not exist; pass a JSONL file of {{\"text\": ...}}")
    elif report and not text_file:
        print0("WARNING: --report without --dataset or --text_file measures no loss; add "
               "--dataset=shakespeare_char (data/<name>/val.bin) or --text_file=FILE")
    path = os.path.join(out_dir, f"ckpt_{mode}.pt")
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{path} exists already (an earlier {mode} quantization); --overwrite=True replaces it, or "
                         f"write elsewhere with --out_dir=DIR --init_from=FLOAT_CHECKPOINT")
    torch.manual_seed(seed)
    # ------------------------------------------------------------------------------------------
    # load the float model, quantize, save
    model, ckpt, tok = load_model(init_from, out_dir, "cpu", ckpt_name=ckpt_name)
    model.eval()
    source = ckpt["path"] if ckpt is not None else init_from  # the float file (or GPT-2 name) it came from
    t0 = time.time()
    qckpt = quantized_checkpoint(model, ckpt, tok, quantizer, source)
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
                 "linear_bytes": fp32_linear, "rt": dataclasses.replace(rt, dtype="float32")}]
        # bf16: the same weights rounded to bfloat16 and run under bf16 autocast, the activation precision of the
        # CPU's int8/int4 kernels, so that the quantized rows' deltas against it are the weights' alone
        # (held as float32 numbers that bf16 represents exactly: autocast rounds nothing more, and the float32
        # projections of score_batch still apply)
        half = copy.deepcopy(model)
        for p in half.parameters():
            p.data = p.data.to(torch.bfloat16).float()
        half_sd = {k: v.to(torch.bfloat16) for k, v in half.state_dict().items()}  # what a bf16 file holds
        buf = io.BytesIO()
        torch.save({k: v for k, v in qckpt.items() if k != "quantization"} | {"model": half_sd}, buf)
        rows.append({"mode": "bf16", "kernel": "dense matmul, bf16 autocast", "model": half, "disk_bytes": buf.tell(),
                     "memory_bytes": memory_bytes(model) // 2, "linear_bytes": linear_bytes(half_sd, half),
                     "rt": dataclasses.replace(rt, dtype="bfloat16")})
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
                         "disk_bytes": os.path.getsize(p), "linear_bytes": linear_bytes(c["model"], qm), "rt": rt})
        T = min(block_size or model.config.block_size, model.config.block_size)
        texts = heldout_tokens(tok, data_dir, text_file, task_file, limit or eval_iters * batch_size * T)
        for r in rows:
            r["model"].to(rt.device)
            r.setdefault("memory_bytes", memory_bytes(r["model"]))
            for key, files in (("ppl", texts.get("text")), ("task_ppl", texts.get("task"))):
                r[key] = perplexity(r["model"], tok, files, T, max(T // 2, 1), batch_size, tok.n_vocab, r["rt"],
                                    desc="")[1]["ppl"] if files else None
        first = (texts.get("text") or texts.get("task") or [(None, [])])[0][1]
        prompt = torch.as_tensor(first[:prompt_len], dtype=torch.long)[None] if len(first) >= prompt_len else \
            torch.randint(0, tok.n_vocab, (1, prompt_len))
        new = min(decode_tokens, model.config.block_size - prompt.size(1))  # stay within one window
        speeds = decode_speeds([r.pop("model") for r in rows], prompt.to(rt.device), new, decode_repeats,
                               [r["rt"] for r in rows], compile)
        print0(f"\n{'mode':<9} {'kernel':<30} {'disk MB':>8} {'memory MB':>9} {'Linear MB':>15} "
               f"{'ppl (vs fp32, bf16)':>30} {'task ppl (vs fp32, bf16)':>30} {'decode tok/s':>15}")
        fp32, bf16 = rows[0], rows[1]
        for r, speed in zip(rows, speeds):
            r.pop("rt")
            r.update(decode_tok_s=speed, decode_speedup=speed / speeds[0],
                     linear_ratio=fp32["linear_bytes"] / r["linear_bytes"])
            cells = []
            for key, prefix in (("ppl", ""), ("task_ppl", "task_")):
                if r[key] is None:
                    cells.append("-")
                    continue
                # deltas against fp32 (weights and activations) and against bf16 (the weights' share alone)
                r[f"{prefix}change_pct"] = 100 * (r[key] / fp32[key] - 1)
                r[f"{prefix}change_vs_bf16_pct"] = 100 * (r[key] / bf16[key] - 1)
                cells.append(f"{r[key]:.4f} ({r[prefix + 'change_pct']:+.2f}%, "
                             f"{r[prefix + 'change_vs_bf16_pct']:+.2f}%)")
            print0(f"{r['mode']:<9} {r['kernel']:<30} {r['disk_bytes'] / 1e6:>8.2f} {r['memory_bytes'] / 1e6:>9.2f} "
                   f"{r['linear_bytes'] / 1e6:>8.2f} ({r['linear_ratio']:.1f}x) {cells[0]:>30} {cells[1]:>30} "
                   f"{speed:>8.1f} ({r['decode_speedup']:.2f}x)")
        report_path = os.path.join(out_dir, "quant_report.json")
        with open(report_path + ".tmp", "w") as f:
            json.dump({"device": rt.device, "dtype": rt.dtype, "threads": torch.get_num_threads(), "metric": "ppl",
                       "eval": {"dataset": dataset, "text_file": text_file, "task_file": task_file, "window": T,
                                "stride": max(T // 2, 1), "tokens": sum(len(t) for _, t in texts.get("text", [])),
                                "task_records": len(texts.get("task", [])),
                                "task_tokens": sum(len(t) for _, t in texts.get("task", []))},
                       "decode": {"prompt_len": prompt.size(1), "new_tokens": new, "repeats": decode_repeats,
                                  "compile": compile},
                       "rows": rows}, f, indent=2)
        os.replace(report_path + ".tmp", report_path)
        print0(f"(Linear MB: the blocks' Linear weights with their scales; decode: greedy, batch 1, KV cache, {new} "
               f"new tokens, median of {decode_repeats}{', compiled' if compile else ''})\nwrote {report_path}")
