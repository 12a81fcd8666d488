"""
Sample from a trained model or from OpenAI's GPT-2, streaming the text as it is generated.

    python sample.py --init_from=resume --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3 \\
        --max_new_tokens=300 --temperature=0.8 --top_k=200 --top_p=0.95 --seed=1337
    python sample.py --init_from=gpt2-xl --start=FILE:prompt.txt       # the prompt from a file
    python sample.py --init_from=out-sft --instruct="Name three primary colors."  # the response only
    python sample.py --init_from=out-sft --chat=True --temperature=0   # talk: Ctrl-C stops a reply, Ctrl-D ends
    python sample.py --out_dir=out-gpt2 --ckpt_name=ckpt_int8.pt        # a quantized checkpoint
    python sample.py --init_from=nanogpt-out/ckpt.pt --meta=data/shakespeare_char/meta.pkl  # a nanoGPT char model

Any checkpoint that holds a model works (pre-trained, fine-tuned, aligned, imported, quantized). The tokenizer is
the one stored in the checkpoint, else --meta=PATH, else a meta.pkl next to the checkpoint (nanoGPT's layout), else
its dataset's, else GPT-2's; the first line says which. Generation uses the KV cache; with --dtype=bfloat16 (the
default on CUDA) the weights are cast to bf16 for decoding (fast on CPUs with AVX512-BF16 or AMX; bench.py prints
its speed and logit error). The last line gives the decoding speed in tokens/s.
"""

import codecs
import os
import sys
import time
from contextlib import nullcontext

import torch

from configurator import configure
from lib.checkpoint import resume_path
from lib.errors import install
from lib.models import load_model
from lib.runtime import print0, setup_runtime

install()  # a user's error is one line 'error: ...', Ctrl-C is 'interrupted' (lib/errors.py)

# -----------------------------------------------------------------------------
# model
init_from = "resume"  # 'resume' (out_dir/ckpt_name) | 'gpt2' | 'gpt2-medium' | 'gpt2-large' | 'gpt2-xl' | a path
out_dir = "out"  # where init_from='resume' looks for ckpt_name
ckpt_name = "ckpt.pt"  # e.g. 'ckpt_int8.pt' for a quantized checkpoint
meta = ""  # a meta.pkl (character vocabulary) for a checkpoint that stores no tokenizer, e.g. nanoGPT's
# prompt
start = ""  # the prompt; 'FILE:prompt.txt' reads a file; '' = <|endoftext|> (GPT-2) or '\n' (characters)
instruct = ""  # an instruction: wrapped in the fine-tuning prompt (with start as its input); prints the response
chat = False  # a conversation, one message a line, in the checkpoint's prompt template (instruction-tuned models)
# sampling
num_samples = 3  # samples, one after another
max_new_tokens = 500  # tokens generated per sample at most
temperature = 0.8  # 1.0 = the model's distribution, < 1 sharper, 0 = greedy (deterministic)
top_k = 200  # sample among the k likeliest tokens only (0 = off)
top_p = 1.0  # nucleus sampling: the smallest set of tokens with probability >= top_p (1.0 = off)
stop_at_eot = True  # end a sample at <|endoftext|> (tokenizers that have it)
seed = 1337  # same seed, same samples (on the same device and dtype)
# system
device = "auto"  # 'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps'
dtype = "auto"  # 'auto' (bf16 on CUDA, fp32 on CPU) | 'float32' | 'bfloat16' | 'float16'
compile = False  # torch.compile the forward pass (slow start; pays off for long generations on a GPU)
kv_cache = True  # False recomputes the whole window for every token (slow; for comparison)
# -----------------------------------------------------------------------------
config = configure(globals(), sys.argv[1:]); globals().update(config)

# validate before loading anything heavy
if num_samples < 1 or max_new_tokens < 1:
    raise ValueError(f"num_samples and max_new_tokens must be >= 1, got {num_samples!r} and {max_new_tokens!r}")
if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
    raise ValueError(f"need temperature >= 0, top_k >= 0 (0 = off) and 0 < top_p <= 1; got temperature="
                     f"{temperature!r}, top_k={top_k!r}, top_p={top_p!r}")
if start.startswith("FILE:"):
    prompt_path = start[len("FILE:"):]
    if not os.path.isfile(prompt_path):
        raise FileNotFoundError(f"--start={start!r}: no prompt file {prompt_path!r}; write the prompt into it "
                                f"or pass the text itself, e.g. --start=\"ROMEO:\"")
    with open(prompt_path, encoding="utf-8") as f:
        start = f.read()
try:
    where = resume_path(out_dir, ckpt_name) if init_from == "resume" else init_from
except FileNotFoundError:
    found = sorted(f for f in os.listdir(out_dir) if f.endswith(".pt")) if os.path.isdir(out_dir) else None
    raise FileNotFoundError(
        f"no checkpoint {ckpt_name!r} in out_dir {out_dir!r} (searched {os.path.join(out_dir, ckpt_name)!r}"
        + (f"; it holds {found}" if found else "; the folder does not exist" if found is None else "") + "). "
        f"Create one: python train.py config/train_shakespeare_char.py (writes out-shakespeare-char), or "
        f"python load_openai.py --model=gpt2 --out_dir={out_dir}; or sample GPT-2 directly with --init_from=gpt2")

# -----------------------------------------------------------------------------
# model, tokenizer, prompt
torch.manual_seed(seed)
rt = setup_runtime(device, dtype)
model, ckpt, tok = load_model(init_from, out_dir, rt.device, ckpt_name=ckpt_name, meta=meta)
model.eval()
where = ckpt["path"] if ckpt else init_from
state = (ckpt or {}).get("resume") or {}
about = f", {ckpt['kind']}" if ckpt else ""
about += f", iter {state['iter_num']:,}" if state.get("iter_num") else ""
best = state.get("best") or {}
if isinstance(best.get("value"), float) and best["value"] < float("inf"):
    about += f", {best['name'].replace('_', ' ')} {best['value']:.4f}"
quant = (ckpt or {}).get("quantization")
autocast = rt.autocast
if rt.dtype != "float32" and not quant:
    # decode with bf16/fp16 weights: under autocast every fp32 weight would be re-cast at every token
    model.to(rt.ptdtype)
    autocast = nullcontext
size = f"{quant['mode']}-quantized weights" if quant else f"{model.num_params() / 1e6:.2f}M parameters"
print0(f"loaded {where}: {size}, {tok.name} tokenizer ({tok.n_vocab:,} tokens){about}")
V = model.config.vocab_size
if tok.n_vocab > V:
    raise ValueError(f"the tokenizer has {tok.n_vocab:,} tokens but the model's table only {V:,}: "
                     f"{where!r} does not belong to this tokenizer; a character-level model needs its vocabulary: "
                     f"--meta=data/<dataset>/meta.pkl")

if instruct:
    from lib.finetuning import format_prompt

    # the template the model was fine-tuned with (finetune.py's prompt_template), else Alpaca's
    text = format_prompt(instruct, start, ((ckpt or {}).get("config") or {}).get("prompt_template", "alpaca"))
elif start:
    text = start
else:
    text = "" if tok.eot_token is not None else "\n"
ids = tok.encode(text) if text else [tok.eot_token]  # unconditional GPT-2 starts from <|endoftext|>
if len(ids) > model.config.block_size:
    print0(f"WARNING: the prompt has {len(ids):,} tokens, more than the model's block_size "
           f"{model.config.block_size}; only its last {model.config.block_size} are read")
idx = torch.tensor([ids], dtype=torch.long, device=rt.device)  # (1, T)
stop = tok.eot_token if (stop_at_eot or instruct) else None

if compile:
    # the forward, not the module: generate_stream calls self(...), which a compiled wrapper would bypass;
    # dynamic: the cached length grows by one every token
    print0("compiling the forward pass (the first tokens are slow)...")
    model.forward = torch.compile(model.forward, dynamic=True)
generator = torch.Generator(device=rt.device).manual_seed(seed)


# -----------------------------------------------------------------------------
# chat: each line typed is a message, the reply streams in the checkpoint's prompt template; the conversation is
# kept within the window, oldest turns dropped (leaving room for a reply); Ctrl-C stops a reply, Ctrl-D ends
if chat:
    from lib.finetuning import chat_prompt
    template = ((ckpt or {}).get("config") or {}).get("prompt_template", "alpaca")
    room = min(max_new_tokens, model.config.block_size // 2)  # tokens of the window kept for the reply
    turns, dropped = [], False
    print0(f"chat in the {template!r} template: type a message and Enter; Ctrl-C stops a reply, Ctrl-D ends")
    while True:
        try:
            message = input("> ")
        except (EOFError, KeyboardInterrupt):
            print0()
            break
        try:
            ids = tok.encode_ordinary(chat_prompt(turns + [(message, "")], template))
        except ValueError as e:  # a character outside a character-level vocabulary
            print0(f"error: {e}")
            continue
        turns.append((message, ""))
        while len(ids) + room > model.config.block_size and len(turns) > 1:
            turns.pop(0)
            ids = tok.encode_ordinary(chat_prompt(turns, template))
            if not dropped:
                print0(f"(the conversation outgrew the model's {model.config.block_size}-token window: the oldest "
                       f"turns are left out from now on)")
                dropped = True
        utf8, reply = codecs.getincrementaldecoder("utf-8")(errors="replace"), []
        with autocast():
            stream = model.generate_stream(torch.tensor([ids], device=rt.device), max_new_tokens,
                                           temperature=temperature, top_k=top_k or None,
                                           top_p=top_p if top_p < 1 else None, stop_token=tok.eot_token,
                                           generator=generator, use_cache=kv_cache, vocab_limit=min(tok.n_vocab, V))
            try:
                for nxt in stream:
                    t = int(nxt[0])
                    if t == tok.eot_token:
                        break
                    reply.append(t)
                    print0(utf8.decode(tok.token_bytes([t])), end="", flush=True)
            except KeyboardInterrupt:
                print0(" [stopped]", end="")
            stream.close()
        print0(utf8.decode(b"", final=True))
        turns[-1] = (message, tok.decode(reply).strip())
    sys.exit(0)


# -----------------------------------------------------------------------------
# generate, printing each token as it comes
n_tokens, t_first, t_rest = 0, 0.0, 0.0
for _ in range(num_samples):
    if not instruct:
        print0(text, end="", flush=True)
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds a split character until complete
    t0 = time.perf_counter()
    with autocast():
        stream = model.generate_stream(idx, max_new_tokens, temperature=temperature, top_k=top_k or None,
                                       top_p=top_p if top_p < 1 else None, stop_token=stop,
                                       generator=generator, use_cache=kv_cache, vocab_limit=min(tok.n_vocab, V))
        for i, nxt in enumerate(stream):
            t = int(nxt[0])  # syncs with the device, so the timings below are real
            now = time.perf_counter()
            if i == 0:
                t_first += now - t0  # the prompt's forward pass ("prefill") plus one token
            else:
                t_rest += now - t0
            t0 = now
            n_tokens += 1
            if t == stop:
                break
            print0(utf8.decode(tok.token_bytes([t])), end="", flush=True)
        stream.close()  # a stream left open at the stop token would be finalised at interpreter exit
    print0(utf8.decode(b"", final=True))
    print0("---------------")
decode = (n_tokens - num_samples) / t_rest if t_rest > 0 else float("nan")
print0(f"{num_samples} sample{'s' if num_samples > 1 else ''}, {n_tokens:,} tokens in {t_first + t_rest:.2f} s: "
       f"{decode:.1f} tokens/s decoding, first token after {t_first / num_samples * 1000:.0f} ms "
       f"({len(ids)}-token prompt, {'KV cache' if kv_cache else 'no cache'}, {rt.device}, {rt.dtype})")
