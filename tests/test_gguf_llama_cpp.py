"""GGUF export checked in llama.cpp itself, through llama-cpp-python (which builds llama.cpp from source: 10 CPU
minutes), so this file is skipped unless it is installed: pip install llama-cpp-python gguf; make test-llama-cpp.

A small model that has learnt a few sentences by heart is exported as f32, f16 and q8_0: llama.cpp tokenizes the
prompt as GPT-2 does, its logits match ours (f32 within 5e-3: ggml takes GELU from an f16 table; f16 and q8_0
within their rounding) and its greedy continuation, by llama.cpp's own sampler, equals ours token for token.

    LLAMA_CPP_CKPT=out-journey/sft pytest -m llama_cpp -s tests/test_gguf_llama_cpp.py   # a real checkpoint too
"""

import os

import numpy as np
import pytest
import torch

from lib.tokenizer import get_tokenizer
from model import GPT, GPTConfig

pytestmark = pytest.mark.llama_cpp
llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")
from lib.gguf_export import export_gguf  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
        "To be, or not to be, that is the question.")
PROMPT = "A journey of a thousand"
TRICKY = "Hello world,  it's 2024!\n\n\tNaïve café — “quotes” 日本語 🙂 don't   x1234567 <|endoftext|>"
TOLERANCE = {"f32": 5e-3, "f16": 0.05, "q8_0": 0.25}  # max |logit difference|, ours against llama.cpp's


@pytest.fixture(scope="module")
def memorised():
    """2 layers trained until they recite TEXT (confident greedy steps: no near-ties for f16 to flip)."""
    torch.manual_seed(0)
    tok = get_tokenizer("gpt2")
    ids = torch.tensor([tok.encode(TEXT)])
    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=64, bias=False))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(100):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok


def compare(model, tok, path, prompt, n_new):
    """Ours against llama.cpp on one file -> (our ids, llama.cpp's ids, max |logit diff| over prompt + ours)."""
    llm = llama_cpp.Llama(model_path=path, n_ctx=model.config.block_size, logits_all=True, n_threads=2,
                          verbose=False)
    ids = tok.encode(prompt)
    for text in (prompt, TRICKY):  # GPT-2's BPE and pre-tokenizer, in llama.cpp
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode_ordinary(text), text
    ours = model.generate(torch.tensor([ids]), n_new, temperature=0.0)[0, len(ids):].tolist()
    theirs = []
    for t in llm.generate(ids, top_k=1, temp=0.0, reset=True):  # llama.cpp's own greedy sampler
        theirs.append(t)
        if len(theirs) == n_new:
            break
    llm.reset()
    seq = ids + ours
    llm.eval(seq)
    got = np.asarray(llm.scores[:len(seq)], dtype=np.float32)
    with torch.no_grad():
        want = model(torch.tensor([seq]))[0][0, :, :got.shape[1]].float().numpy()
    llm.close()
    return ours, theirs, float(np.abs(got - want).max())


@pytest.mark.parametrize("out_type", ["f32", "f16", "q8_0"])
def test_llama_cpp_matches(memorised, tmp_path, out_type):
    model, tok = memorised
    path = str(tmp_path / f"m-{out_type}.gguf")
    export_gguf(model, path, tok, out_type=out_type)
    ours, theirs, diff = compare(model, tok, path, PROMPT, 8)
    print(f"\n{out_type}: ours {tok.decode(ours)!r}, llama.cpp {tok.decode(theirs)!r}, max |logit diff| {diff:.2e}")
    assert tok.decode(ours).startswith(" miles begins with a single step.")
    assert theirs == ours
    assert diff < TOLERANCE[out_type], diff


@pytest.mark.skipif(not os.environ.get("LLAMA_CPP_CKPT"), reason="LLAMA_CPP_CKPT=checkpoint not set")
@pytest.mark.parametrize("out_type", ["f32", "f16", "q8_0"])
def test_llama_cpp_on_a_checkpoint(tmp_path, out_type):
    from lib.models import load_model
    model, _, tok = load_model(os.environ["LLAMA_CPP_CKPT"])
    model.eval()
    path = str(tmp_path / f"c-{out_type}.gguf")
    export_gguf(model, path, tok, out_type=out_type)
    prompt = os.environ.get("LLAMA_CPP_PROMPT", "ROMEO:\nO, ")
    ours, theirs, diff = compare(model, tok, path, prompt, 32)
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
    print(f"\n{out_type}: {same} of {len(ours)} greedy tokens equal, max |logit diff| {diff:.2e} over "
          f"{len(tok.encode(prompt)) + len(ours)} positions; ours {tok.decode(ours)!r}, "
          f"llama.cpp {tok.decode(theirs)!r}")
    if out_type != "q8_0":
        assert theirs == ours
    assert diff < TOLERANCE[out_type] * 4, diff
