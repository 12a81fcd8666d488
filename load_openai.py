"""
OpenAI's GPT-2 weights in our GPT (all four sizes, from OpenAI's TensorFlow release or Hugging Face's
safetensors, no TensorFlow needed), and our GPT in Hugging Face's format.

    python load_openai.py --model=gpt2 --out_dir=out-gpt2               # download, convert, write out-gpt2/ckpt.pt
    python load_openai.py --model=gpt2-xl --source=hf --out_dir=out-xl  # Hugging Face's model.safetensors instead
    python load_openai.py --from_dir=path/to/124M --out_dir=out-gpt2    # files copied by hand (offline)
    python load_openai.py --model=gpt2 --check                          # greedy completion of a fixed prompt
    python load_openai.py --init_from=out-shakespeare-char --export_hf=hf-char  # any checkpoint -> transformers
    python load_openai.py --init_from=gpt2 --export_hf=hf-gpt2          # (bias=False models too: zero biases)
    python load_openai.py --init_from=out-sft --export_gguf=sft.gguf --gguf_type=q8_0  # llama.cpp (f32|f16|q8_0)
    python sample.py --init_from=gpt2                                    # the same download, through lib/models.py

Downloads are kept in $LLM_E2E_CACHE (default ~/.cache/llm-e2e), under openai/124M/ or hf/gpt2/. A file
appears there only once it is complete and verified; an interrupted download resumes where it stopped.

The map is one-to-one because model.py uses OpenAI's names. Hugging Face's GPT2LMHeadModel stores the four
projection matrices (c_attn, c_proj, c_fc, mlp.c_proj) as Conv1D weights of shape (in, out): they are
transposed to nn.Linear's (out, in). Everything else is copied as is; lm_head is tied to wte. OpenAI's
checkpoint has the same Conv1D layout with a leading 1 ([1, in, out], a 1x1 convolution).
"""

import os
import sys
import time

import torch

from lib.runtime import cache_root
from lib.errors import install
from lib.gpt2_weights import HF_URL, OPENAI_URL, PRETRAINED, export_hf, load_dir, load_pretrained, pretrained_urls

# ----------------------------------------------------------------------------------------------
# command line

if __name__ == "__main__":
    install()  # a user's error is one line 'error: ...', Ctrl-C is 'interrupted' (lib/errors.py)
    from dataclasses import asdict

    from configurator import configure
    from lib.checkpoint import make_checkpoint, save_checkpoint
    from lib.models import load_model
    from lib.runtime import print0, setup_runtime

    write_hf = export_hf  # the function: the --export_hf flag below takes its name in this namespace
    model = "gpt2"  # 'gpt2' (124M) | 'gpt2-medium' (355M) | 'gpt2-large' (774M) | 'gpt2-xl' (1558M)
    source = "openai"  # 'openai': OpenAI's TensorFlow release | 'hf': Hugging Face's model.safetensors
    from_dir = ""  # convert a folder already on disk (either layout, any shape) instead of downloading
    init_from = ""  # for --export_hf: a checkpoint of any script (file, or folder with ckpt.pt) or a GPT-2 name
    out_dir = ""  # write OUT_DIR/ckpt.pt (an 'imported' checkpoint every script reads); '' = only fill the cache
    overwrite = False  # True: replace an OUT_DIR/ckpt.pt that is there already (else load_openai.py stops, naming it)
    export_hf = ""  # write DIR/config.json + model.safetensors for transformers' GPT2LMHeadModel; '' = none
    export_gguf = ""  # write FILE for llama.cpp (its gpt2 architecture; GPT-2-token models only); '' = none
    gguf_type = "f16"  # --export_gguf's weights: 'f32' | 'f16' | 'q8_0'
    check = False  # after loading, print the greedy completion of a fixed prompt
    cache_dir = ""  # '' = $LLM_E2E_CACHE, else ~/.cache/llm-e2e
    openai_url = OPENAI_URL  # base URL of OpenAI's release (a mirror works)
    hf_url = HF_URL  # base URL of the Hugging Face Hub (a mirror works)
    device = "auto"  # for --check: 'auto' | 'cpu' | 'cuda' | 'mps'
    # module constants (UPPER_CASE) are not options
    argv = [a + "=True" if a == "--check" else a for a in sys.argv[1:]]  # a bare --check means --check=True
    config = configure({k: v for k, v in globals().items() if k.islower()}, argv); globals().update(config)

    if out_dir and os.path.exists(os.path.join(out_dir, "ckpt.pt")) and not overwrite:
        raise ValueError(f"--out_dir={out_dir} already holds ckpt.pt, which this import would overwrite; use it as it "
                         f"is (--init_from={out_dir}), choose another --out_dir, or replace it: --overwrite=True")
    if not (out_dir or check or export_hf or export_gguf) and (from_dir or init_from):
        raise ValueError(f"--{'from_dir' if from_dir else 'init_from'}={from_dir or init_from!r} needs --out_dir=DIR "
                         f"(write DIR/ckpt.pt), --export_hf=DIR, --export_gguf=FILE and/or --check")
    if from_dir and init_from:
        raise ValueError(f"pass one of --from_dir={from_dir!r} (a folder of downloaded files) and "
                         f"--init_from={init_from!r} (a checkpoint or GPT-2 name)")
    ckpt, tokenizer, tok_name, tok = None, {"tokenizer": "gpt2"}, "gpt2", None
    t0 = time.time()
    if init_from in PRETRAINED:
        model = init_from
    if from_dir:
        gpt = load_dir(from_dir)
        origin = {"from_dir": os.path.abspath(from_dir)}
    elif init_from and init_from not in PRETRAINED:
        if out_dir:
            raise ValueError(f"--init_from={init_from!r} is already a checkpoint: use it as it is, or --export_hf=DIR "
                             f"to write it for transformers")
        gpt, ckpt, tok = load_model(init_from, device="cpu")
        if ckpt["kind"] == "quantized":
            src = (ckpt.get("quantization") or {}).get("source") or "the float checkpoint it was made from"
            raise ValueError(f"{ckpt['path']!r} is quantized; export the float checkpoint it was made from, "
                             f"--init_from={src}" + (" (--gguf_type=q8_0 quantizes it)" if export_gguf else ""))
        tokenizer, tok_name = ckpt.get("tokenizer") or tok.meta(), tok.name
    else:
        pretrained_urls(model, source)  # validates both before any download
        gpt = load_pretrained(model, source=source, cache_dir=cache_dir, openai_url=openai_url, hf_url=hf_url)
        origin = {"pretrained": model, "source": source}
    print0(f"loaded {from_dir or init_from or model} in {time.time() - t0:.1f} s: "
           f"{gpt.num_params(non_embedding=False):,} parameters, {gpt.config}")
    if not (from_dir or ckpt):
        print0(f"cached in {cache_root(cache_dir)} (set LLM_E2E_CACHE to move it)")
    gpt2_vocab = tok_name == "gpt2" and gpt.config.vocab_size >= 50257
    if not gpt2_vocab and ckpt is None:
        print0(f"WARNING: vocab_size {gpt.config.vocab_size} is smaller than GPT-2's 50257, so the model does not "
               f"use GPT-2's tokenizer; the files name no other, and the checkpoint records GPT-2's: replace its "
               f"'tokenizer' entry (tokenizer.meta()) before sampling")
    if out_dir:
        # an import, not a run: no resume section, so --init_from=OUT_DIR starts a new run in every script
        ckpt = make_checkpoint("imported", gpt.state_dict(), asdict(gpt.config), config, tokenizer, resume=None,
                               origin=origin)
        path = os.path.join(out_dir, "ckpt.pt")
        save_checkpoint(ckpt, path)
        print0(f"wrote {path}: python sample.py --init_from={out_dir}")
    if export_hf:
        write_hf(gpt, export_hf)
        print0(f"wrote {os.path.join(export_hf, 'config.json')} and model.safetensors: GPT2LMHeadModel."
               f"from_pretrained({export_hf!r})" + ("" if gpt.config.bias else " (bias=False: exported as zero biases)"))
        if ckpt is not None and ckpt["kind"] == "classify":
            print0(f"WARNING: the classification head ({len(ckpt.get('labels') or [])} classes) is not exported: "
                   f"GPT2LMHeadModel has the language-model head only; classify with finetune.py --predict=TEXT")
        if not gpt2_vocab:
            print0(f"WARNING: the model's tokenizer is {tok_name!r} ({gpt.config.vocab_size} ids), "
                   f"not GPT-2's: transformers' GPT2Tokenizer does not fit it; encode text with this project's "
                   f"lib/tokenizer.py and pass the ids")
    if export_gguf:  # a character-level model is refused there, saying why
        from lib.gguf_export import export_gguf as write_gguf
        from lib.tokenizer import get_tokenizer
        write_gguf(gpt, export_gguf, tok or get_tokenizer("gpt2"), gguf_type)
        print0(f"wrote {export_gguf} ({gguf_type}, {os.path.getsize(export_gguf) / 1e6:.1f} MB) for llama.cpp: "
               f"llama-cli -m {export_gguf} -p TEXT --temp 0, or llama_cpp.Llama({export_gguf!r})")
    if check:
        from lib.tokenizer import get_tokenizer
        tok = get_tokenizer("gpt2")
        if not gpt2_vocab:
            print0("WARNING: --check skipped: it needs GPT-2's tokenizer")
        else:
            rt = setup_runtime(device, "float32")
            prompt = "The meaning of life is"
            idx = torch.tensor([tok.encode(prompt)], device=rt.device)
            out = gpt.to(rt.device).eval().generate(idx, 24, temperature=0.0, vocab_limit=tok.n_vocab)
            ids = out[0, idx.size(1):].tolist()
            print0(f"greedy completion: {prompt!r} -> {tok.decode(ids)!r}\nfirst ids: {ids[:8]}")
