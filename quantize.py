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
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn as nn
from torch.nn import functional as F

from model import GPT2_VOCAB_SIZE, GPT, GPTConfig, KVCache

# ----------------------------------------------------------------------------------------------
# int8: symmetric, one scale per output channel. w ~= q * s, q in [-127, 127], s = max|w_row| / 127,
# so the rounding error of every weight is at most s / 2 (LLM.int8(), Dettmers et al. 2022, arXiv:2208.07339,
# section 2, "absmax" quantization; we keep it per row and leave activations in float).


def quantize_int8(w: torch.Tensor):
    """w (N, K) float -> q (N, K) int8, scales (N,) fp32."""
    scales = w.float().abs().amax(dim=1).clamp(min=1e-10) / 127
    q = (w.float() / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """y = (x @ q^T) * s + b. Also serves as the tied token embedding (integer input -> rows q[idx] * s[idx]),
    registered as both transformer.wte and lm_head, as the float model shares one tensor between the two."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._unit = None  # bf16 ones for the CPU kernel's scales argument

    def forward(self, x):
        if not x.is_floating_point():  # token ids: embedding lookup, dequantizing only the rows asked for
            return self.weight[x].to(self.scales.dtype) * self.scales[x][..., None]  # (B, T, C)
        if x.device.type == "cpu":
            # fused kernel: reads the int8 weight directly, 4x less memory traffic than fp32. On CPU it is fast
            # with bf16 activations only (768 -> 2304, batch 1: 0.6 ms in bf16, 6.1 ms in fp32, 1.9 ms for the
            # fp32 dense matmul), so it gets x in bf16 and unit scales, and the fp32 scales are applied after.
            if self._unit is None or self._unit.device != x.device:
                self._unit = torch.ones(self.out_features, dtype=torch.bfloat16, device=x.device)
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # (B*T, K), dense rows
            y = torch._weight_int8pack_mm(x2, self.weight, self._unit).float() * self.scales
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        else:
            # CUDA and MPS: dequantize on the fly. Eagerly that writes the whole weight in the matmul dtype at every
            # call, so int8 decodes slower than bf16 weights. Compiled (StaticDecoder), one row is written as a
            # product and a sum, which inductor fuses into one reduction that reads the int8 weight once, 1 byte a
            # weight (gpt-fast's int8 speed-up relies on the same fusion); more rows go to a dequantize + matmul.
            # torch's CUDA _weight_int8pack_mm is not used: one thread per output, uncoalesced loads (pytorch/pytorch
            # PR 190529), 2.3x slower than a Triton GEMV at 1 x 4096 x 4096 on an H20 (flagos-ai/FlagGems PR 5371).
            # Scaling in fp32 keeps inductor's weight-only-int8 pattern (torch/_inductor/fx_passes/quantization.py,
            # bf16 scales only) from swapping that kernel back in.
            dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            if torch.compiler.is_compiling() and x.numel() == self.in_features:
                y = (x.to(dt).float()[..., None, :] * self.weight.float()).sum(-1)  # (..., N): never materialized
            else:
                y = F.linear(x.to(dt), self.weight.to(dt)).float()
            y = (y * self.scales.float()).to(dt)
        return y if self.bias is None else y + self.bias.to(y.dtype)

# ----------------------------------------------------------------------------------------------
# int4: affine in groups of group_size input columns: w ~= (q - 8) * s + z, q in [0, 15], s = (max - min) / 15,
# z = min + 8 * s, the value of the middle code, which is where torch's int4 kernels put the zero point
# (the "tinygemm" layout, also gpt-fast's). Error at most s / 2 per weight. Two codes per byte.


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) integers in [0, 15] -> (N, K/2) uint8, even column in the high nibble (the layout that
    torch._convert_weight_to_int4pack takes on CUDA)."""
    q = q.to(torch.uint8)
    return (q[:, ::2] << 4) | q[:, 1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 codes in [0, 15]."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).view(packed.size(0), -1)  # (N, K/2, 2) -> (N, K)


def quantize_int4(w: torch.Tensor, group_size: int):
    """w (N, K) float -> packed (N, K/2) uint8, scales (N, K/group_size) fp32, zeros (N, K/group_size) fp32."""
    N, K = w.shape
    g = w.float().view(N, K // group_size, group_size)  # (N, groups, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # (N, groups)
    scales = ((hi - lo) / 15).clamp(min=1e-10)
    q = ((g - lo[..., None]) / scales[..., None]).round().clamp(0, 15)
    return pack_int4(q.view(N, K)), scales, lo + 8 * scales


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The float weight (N, K) that the stored codes stand for."""
    N, groups = scales.shape
    q = unpack_int4(packed).view(N, groups, -1).to(scales.dtype)  # (N, groups, group_size)
    return ((q - 8) * scales[..., None] + zeros[..., None]).view(N, -1)


def int4_kernel(device: torch.device, out_features: int, in_features: int) -> str:
    """Which int4 matmul a device runs: 'cpu-int4pack', 'cuda-int4pack' or 'dequantize'."""
    if device.type == "cpu" and out_features % 16 == 0:  # the CPU kernel tiles 16 output channels
        return "cpu-int4pack"
    if (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
            and out_features % 8 == 0 and in_features % 128 == 0):  # tinygemm: sm80+, 8 x (8 x 16) tiles
        return "cuda-int4pack"
    return "dequantize"


class Int4Linear(nn.Module):
    """y = x @ W^T + b with W stored as 4-bit codes, scales and zeros. The fused kernels want the codes in
    their own device-specific order: the first forward re-packs them in place for its device (so memory holds
    one copy), which ties the module to that device; reload the checkpoint to run it on another one."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups))
        self.register_buffer("zeros", torch.zeros(out_features, groups))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.layout = "plain"  # 'plain' (as stored), or the kernel it was re-packed for
        self._scales_and_zeros = None  # (groups, N, 2) in the activation dtype, as the kernels take them

    def _repack(self, kernel: str, dtype: torch.dtype):
        if self.layout == "plain" and kernel == "cpu-int4pack":
            codes = unpack_int4(self.weight).to(torch.int32)  # (N, K)
            self.weight = torch._convert_weight_to_int4pack_for_cpu(codes, 2)  # inner k tiles: 2
        elif self.layout == "plain" and kernel == "cuda-int4pack":
            self.weight = torch._convert_weight_to_int4pack(self.weight, 8)  # inner k tiles: 8
        elif self.layout != kernel:
            raise RuntimeError(f"this int4 layer was packed for the {self.layout!r} kernel by its first forward; "
                               f"load the checkpoint again to run it with {kernel!r}")
        self.layout = kernel
        self._scales_and_zeros = torch.stack([self.scales.t(), self.zeros.t()], dim=-1).contiguous().to(dtype)

    def forward(self, x):
        # once packed, the layout names the kernel (int4_kernel asks the CUDA driver, which torch.compile cannot trace)
        packed = self.layout != "plain" and self.weight.device == x.device
        kernel = self.layout if packed else int4_kernel(x.device, self.out_features, self.in_features)
        if kernel == "dequantize" and self.layout == "plain":
            w = dequantize_int4(self.weight, self.scales, self.zeros).to(x.dtype)
            y = F.linear(x, w)
        else:
            # both kernels want bf16 activations: tinygemm on CUDA takes nothing else, and on CPU the fp32 path
            # is 20x slower than the bf16 one (768 -> 2304, batch 1: 15.6 ms vs 0.55 ms)
            dtype = torch.bfloat16
            if self.layout != kernel or self._scales_and_zeros.dtype != dtype:
                self._repack(kernel, dtype)
            x2 = x.reshape(-1, self.in_features).contiguous().to(dtype)  # (B*T, K)
            if kernel == "cpu-int4pack":
                y = torch._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self._scales_and_zeros)
            else:
                y = torch._weight_int4pack_mm(x2, self.weight, self.group_size, self._scales_and_zeros)
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

# ----------------------------------------------------------------------------------------------
# the two-method contract (like gpt-fast's QuantHandler): quantize() turns a float model's weights into a state
# dict of integer storage + scales; convert() swaps a model's Linears for modules that compute with it.


class WeightOnlyQuantizer:
    modes = ("int8", "int4")
    group_sizes = (32, 64, 128, 256)  # the group sizes torch's int4 kernels accept

    def __init__(self, mode: str, group_size: int = 64, quantize_head: bool = True):
        if mode not in self.modes:
            raise ValueError(f"mode must be one of {self.modes}, got {mode!r}; e.g. python quantize.py --mode=int8")
        if mode == "int4" and group_size not in self.group_sizes:
            raise ValueError(f"group_size must be one of {self.group_sizes} for int4, got {group_size!r}; "
                             f"e.g. --group_size=64")
        self.mode, self.group_size, self.quantize_head = mode, group_size, quantize_head

    def targets(self, model: nn.Module) -> list:
        """(name, Linear) of every Linear quantized in self.mode: all but the LM head, which is the token
        embedding too. When quantize_head, the head is int8 in both modes: an int4 head would need a second
        copy in the kernels' order for the embedding lookup, and every logit depends on it directly."""
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
        if self.mode == "int4":
            for name, m in layers:
                if m.in_features % self.group_size:
                    raise ValueError(f"--group_size={self.group_size} does not divide the width of {name} "
                                     f"(in_features={m.in_features}); pick one of {self.group_sizes} that does")
        return layers

    def quantize(self, model: GPT) -> dict:
        """The float model's state dict with every target Linear's weight replaced by integer storage."""
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for name, m in self.targets(model):
            if self.mode == "int8":
                sd[f"{name}.weight"], sd[f"{name}.scales"] = quantize_int8(m.weight.detach())
            else:
                sd[f"{name}.weight"], sd[f"{name}.scales"], sd[f"{name}.zeros"] = \
                    quantize_int4(m.weight.detach(), self.group_size)
        if self.quantize_head:
            q, s = quantize_int8(model.lm_head.weight.detach())
            for prefix in ("transformer.wte", "lm_head"):  # one tensor under both names, as in the float model
                sd[f"{prefix}.weight"], sd[f"{prefix}.scales"] = q, s
        return sd

    def convert(self, model: GPT) -> GPT:
        """Swap the target Linears (and the tied head) for empty quantized modules, ready for load_state_dict."""
        for name, m in self.targets(model):
            parent, _, child = name.rpartition(".")
            if self.mode == "int8":
                new = Int8Linear(m.in_features, m.out_features, m.bias is not None)
            else:
                new = Int4Linear(m.in_features, m.out_features, m.bias is not None, self.group_size)
            setattr(model.get_submodule(parent), child, new)
        if self.quantize_head:
            head = Int8Linear(model.lm_head.in_features, model.lm_head.out_features, bias=False)
            model.transformer.wte = model.lm_head = head
        return model


def quantized_model_from_checkpoint(ckpt: dict) -> GPT:
    """Build the GPT a quantized checkpoint describes (common.model_from_checkpoint calls this)."""
    quant = ckpt["quantization"]
    if not isinstance(quant, dict) or quant.get("mode") not in WeightOnlyQuantizer.modes:
        raise ValueError(f"the checkpoint's 'quantization' entry should be a dict with mode in "
                         f"{WeightOnlyQuantizer.modes}, got "
                         f"{quant!r}; re-create it with: python quantize.py --mode=int8")
    known = set(GPTConfig.__dataclass_fields__)
    config = GPTConfig(**{k: v for k, v in ckpt["model_args"].items() if k in known})
    quantizer = WeightOnlyQuantizer(quant["mode"], quant.get("group_size", 64), quant.get("quantize_head", True))
    with torch.device("meta"):  # no memory and no random init for weights that are about to be replaced
        model = quantizer.convert(GPT(config))
    model.load_state_dict(ckpt["model"], assign=True)  # assign: take the stored tensors as they are
    if not quantizer.quantize_head:
        model.lm_head.weight = model.transformer.wte.weight  # assign gave the two names separate Parameters
    for p in model.parameters():
        p.requires_grad_(False)  # inference only: integer weights have no gradients
    return model


def kernel_name(mode: str, device: torch.device, model: nn.Module, compiled: bool = False) -> str:
    """How a quantized model's matmuls run on a device, for the report."""
    if mode == "int8":
        if device.type == "cpu":
            return "int8 kernel, bf16 activations"
        return "dequantize, fused by compile" if compiled else "dequantize on the fly"
    names = {"cpu-int4pack": "int4 kernel, bf16 activations", "cuda-int4pack": "int4 tinygemm, bf16",
             "dequantize": "dequantize on the fly"}
    return " + ".join(sorted({names[int4_kernel(device, m.out_features, m.in_features)]
                              for m in model.modules() if isinstance(m, Int4Linear)}))


def memory_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, each storage counted once (tied weights share one)."""
    storages = {}
    for t in list(model.parameters()) + list(model.buffers()):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def linear_bytes(state_dict: dict, model: nn.Module) -> int:
    """Bytes of the transformer blocks' Linear weights (weight + scales + zeros; biases excluded)."""
    names = [n for n, m in model.named_modules() if n.startswith("transformer.h.")
             and isinstance(m, (nn.Linear, Int8Linear, Int4Linear))]
    return sum(state_dict[f"{n}.{p}"].numel() * state_dict[f"{n}.{p}"].element_size()
               for n in names for p in ("weight", "scales", "zeros") if f"{n}.{p}" in state_dict)

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
    pos. The computation of model.forward in eval mode (no dropout); tests/test_quantize.py checks they agree."""
    cfg = model.config
    B, C, nh = idx.size(0), cfg.n_embd, cfg.n_head
    x = model.transformer.wte(idx) + model.transformer.wpe(pos)  # (B, 1, C)
    visible = (torch.arange(cfg.block_size, device=idx.device) <= pos)[None]  # (1, block_size) filled so far
    for i, block in enumerate(model.transformer.h):
        q, k, v = block.attn.c_attn(block.ln_1(x)).split(C, dim=2)
        q = q.view(B, 1, nh, C // nh).transpose(1, 2)  # (B, nh, 1, hs)
        k = k.view(B, 1, nh, C // nh).transpose(1, 2)  # (B, nh, 1, hs)
        v = v.view(B, 1, nh, C // nh).transpose(1, 2)  # (B, nh, 1, hs)
        cache_k[i].index_copy_(2, pos, k.to(cache_k.dtype))  # (B, nh, block_size, hs) with position pos written
        cache_v[i].index_copy_(2, pos, v.to(cache_v.dtype))
        y = F.scaled_dot_product_attention(q, cache_k[i], cache_v[i], attn_mask=visible)  # (B, nh, 1, hs)
        x = x + block.attn.c_proj(y.transpose(1, 2).reshape(B, 1, C))
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(model.transformer.ln_f(x))[:, -1].float()  # (B, vocab)


def prefill(model: GPT, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """The prompt idx (B, T) through model.forward, filling cache -> the last position's logits (B, vocab), fp32."""
    logits, _ = model(idx, cache=cache, last_only=True)
    return logits[:, -1].float()


def prepare_for_device(model: nn.Module, device: torch.device):
    """What the quantized layers' first forward would set up, done now: torch.compile would otherwise trace a
    module that changes itself, and compile again once it has. int4 layers are re-packed for the device's kernel;
    int8 layers get the unit scales of the CPU kernel."""
    for m in model.modules():
        if isinstance(m, Int4Linear) and m.layout == "plain":
            kernel = int4_kernel(device, m.out_features, m.in_features)
            if kernel != "dequantize":
                m._repack(kernel, torch.bfloat16)
        elif isinstance(m, Int8Linear) and device.type == "cpu" and m._unit is None:
            m._unit = torch.ones(m.out_features, dtype=torch.bfloat16, device=device)


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

# ----------------------------------------------------------------------------------------------
# the report: size, memory, loss and decode speed of the float model and of each quantized checkpoint


def eval_batches(tok, data: str, text_file: str, batch_size: int, block_size: int, n_batches: int, seed: int):
    """The same (x, y) batches for every model: random windows of data/<dataset>/val.bin, or consecutive
    windows of a text file encoded with the checkpoint's tokenizer."""
    if data:
        from dataloader import BinLoader
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
    from common import make_checkpoint
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
    import io
    import json

    from common import load_checkpoint, load_model, print0, save_checkpoint, setup_runtime
    from configurator import configure

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
        from dataloader import token_files
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
