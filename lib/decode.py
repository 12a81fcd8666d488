"""
Greedy decoding over a static cache, which torch.compile traces once (and CUDA graphs replay): the decode step
is model.py's own forward, with a StaticKVCache of fixed shape.
"""

from contextlib import nullcontext

import torch

from lib.quant import prepare_for_device
from model import GPT, GPT2_VOCAB_SIZE, KVCache, StaticKVCache

# ----------------------------------------------------------------------------------------------
# compiled decoding. model.generate's KVCache hands attention a longer slice at every position: a new shape per
# token, which torch.compile would recompile for (or trace with dynamic shapes) and CUDA graphs cannot replay. Here
# the step always reads the whole window, masked to the positions filled so far: one shape, traced once, replayed
# as a CUDA graph on CUDA. This is gpt-fast's recipe (generate.py: decode_one_token compiled with
# mode="reduce-overhead", fullgraph=True; prefill compiled with dynamic=True), which matters most on a GPU, where a
# small model's decode step is bound by kernel launches rather than by reading the weights.


def decode_step(model: GPT, idx: torch.Tensor, pos: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor):
    """idx (B, 1) token ids at position pos ((1,) long tensor) -> next-token logits (B, vocab) in fp32. cache_k and
    cache_v (n_layer, B, nh, block_size, hs) hold the keys and values of the positions before pos; the step writes
    pos. model.forward itself (in eval mode) over a StaticKVCache."""
    logits, _ = model(idx, cache=StaticKVCache(cache_k, cache_v), pos=pos, last_only=True)
    return logits[:, -1].float()  # (B, vocab)


def prefill(model: GPT, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """The prompt idx (B, T) through model.forward, filling cache -> the last position's logits (B, vocab), fp32."""
    logits, _ = model(idx, cache=cache, last_only=True)
    return logits[:, -1].float()


class StaticDecoder:
    """Greedy decoding of a float or quantized GPT through prefill + decode_step, with one cache for the whole
    window, allocated once and reused, so that compile=True traces prefill once (any prompt length) and the step
    once. The window does not slide: the prompt and the new tokens must fit in block_size."""

    def __init__(self, model: GPT, compile: bool = False, tune: bool = True):
        self.model, self.cache = model, None
        self.prefill, self.step = prefill, decode_step
        if compile:
            device = model.transformer.wpe.weight.device
            prepare_for_device(model, device)
            # tune: inductor's coordinate descent tuning, which gpt-fast turns on: the 1-row matmuls become fused
            # reductions tuned to reach the memory bandwidth (torch/_inductor/decomposition.py, mm), at the price of
            # a longer compile. triton.cudagraphs is what mode="reduce-overhead" sets (a mode or options, not both)
            options = {"coordinate_descent_tuning": tune, "triton.cudagraphs": device.type == "cuda"}
            self.prefill = torch.compile(prefill, dynamic=True)
            self.step = torch.compile(decode_step, fullgraph=True, options=options)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, autocast=nullcontext) -> torch.Tensor:
        """idx (B, T) extended by max_new_tokens greedy tokens (ids below GPT-2's 50257 for a 50304 table, as in
        model.generate). autocast: a context factory for the forward passes (e.g. Runtime.autocast)."""
        cfg = self.model.config
        B, T = idx.shape
        if max_new_tokens < 1 or T + max_new_tokens > cfg.block_size:
            raise ValueError(f"StaticDecoder needs 1 <= max_new_tokens and prompt + new tokens <= block_size "
                             f"({cfg.block_size}), got a prompt of {T} and max_new_tokens={max_new_tokens!r}; "
                             f"model.generate slides the window for longer outputs")
        vocab_limit = GPT2_VOCAB_SIZE if cfg.vocab_size == 50304 else cfg.vocab_size
        with autocast():
            dev = idx.device.type
            dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else \
                self.model.transformer.wpe.weight.dtype  # what the layers produce: the cache's dtype
            c = self.cache
            if c is None or c.shape[1] != B or c.k.dtype != dtype or c.k.device != idx.device:
                c = self.cache = KVCache(cfg, B)
                c.k = torch.zeros(c.shape, dtype=dtype, device=idx.device)
                c.v = torch.zeros(c.shape, dtype=dtype, device=idx.device)
                # same address at every call: CUDA graphs neither copy the cache in nor refuse to write into it
                torch._dynamo.mark_static_address(c.k)
                torch._dynamo.mark_static_address(c.v)
            c.pos = 0  # what an earlier call left beyond the prompt is masked until overwritten
            logits = self.prefill(self.model, idx, c)
            pos = torch.full((1,), T, dtype=torch.long, device=idx.device)
            out = [idx]
            for i in range(max_new_tokens):
                nxt = logits[:, :vocab_limit].argmax(dim=-1)  # (B,) read before the next replay overwrites logits
                out.append(nxt[:, None])
                if i < max_new_tokens - 1:
                    torch.compiler.cudagraph_mark_step_begin()
                    logits = self.step(self.model, nxt[:, None], pos, c.k, c.v)
                    pos += 1
        return torch.cat(out, dim=1)
