"""
The GPT-2 language model, in one file.

References:
1) OpenAI's GPT-2 TensorFlow code, src/model.py of github.com/openai/gpt-2 (the names below are its names)
2) "Language Models are Unsupervised Multitask Learners" (Radford et al., 2019), section 2.3
3) "Attention Is All You Need" (Vaswani et al., 2017), arXiv:1706.03762

Parameter names follow OpenAI's checkpoint, so loading published weights is a one-to-one map
(see load_openai.py): transformer.wte, transformer.wpe, transformer.h.{i}.ln_1, .attn.c_attn,
.attn.c_proj, .ln_2, .mlp.c_fc, .mlp.c_proj, transformer.ln_f, lm_head (tied to wte).
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
from torch.nn import functional as F

GPT2_VOCAB_SIZE = 50257  # ids of the real GPT-2 BPE vocabulary; 50304 tables pad it to a multiple of 64


@dataclass
class GPTConfig:
    block_size: int = 1024  # maximum context length (n_ctx in OpenAI's hparams.json)
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for fast matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # 0 for pre-training (GPT-2 used none we know of), 0.1+ for fine-tuning
    bias: bool = True  # biases in Linears and LayerNorms, as in GPT-2; False is a bit faster

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")


class KVCache:
    """Keys and values of the tokens seen so far, preallocated for the whole window of every layer; each forward
    reads the positions filled so far (generate's cache)."""

    def __init__(self, config: GPTConfig, batch_size: int):
        hs = config.n_embd // config.n_head
        self.shape = (config.n_layer, batch_size, config.n_head, config.block_size, hs)
        self.k = self.v = None  # allocated at the first update, in the dtype the layers produce (autocast)
        self.pos = 0  # number of positions filled

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """Store k, v (B, nh, T, hs) at the next T positions -> (all keys, all values so far, mask): mask None
        when each new token sees every cached one and the new ones causally (no prefix, or one new token), else
        (T, pos + T) bool, True where a query may look."""
        if self.k is None:
            # empty, not zeros: only filled positions are ever read, and zeroing 2 x 38 MB (GPT-2 small) costs ~80 ms
            self.k = torch.empty(self.shape, device=k.device, dtype=k.dtype)
            self.v = torch.empty(self.shape, device=v.device, dtype=v.dtype)
        T, past = k.size(2), self.pos
        self.k[layer, :, :, past:past + T] = k
        self.v[layer, :, :, past:past + T] = v
        mask = None
        if past and T > 1:  # several new tokens after a cached prefix: the causal mask shifted by the prefix
            mask = torch.ones(T, past + T, dtype=torch.bool, device=k.device).tril(diagonal=past)
        return self.k[layer, :, :, :past + T], self.v[layer, :, :, :past + T], mask

    def advance(self, T: int):
        self.pos += T


class StaticKVCache:
    """Keys and values of the whole window at fixed addresses, k and v (n_layer, B, nh, block_size, hs): every
    forward writes its positions and reads all block_size of them, masked to those filled so far. One shape for
    every step, so torch.compile traces a decode step once and CUDA graphs replay it (gpt-fast's recipe,
    generate.py). The caller passes the positions (a tensor) to GPT.forward and keeps count of them."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        self.k[layer].index_copy_(2, pos, k.to(self.k.dtype))  # (B, nh, block_size, hs) with positions pos written
        self.v[layer].index_copy_(2, pos, v.to(self.v.dtype))
        mask = torch.arange(self.k.size(3), device=pos.device) <= pos[:, None]  # (T, block_size) filled and causal
        return self.k[layer], self.v[layer], mask

    def advance(self, T: int):
        pass


class CausalSelfAttention(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        # query, key, value projections for all heads in one matmul (OpenAI's "c_attn" conv1d)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x, layer: int = 0, cache=None, pos: Optional[torch.Tensor] = None, return_attn: bool = False):
        B, T, C = x.size()  # batch size, sequence length, embedding dim (n_embd)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        mask = None  # None: causal from position 0 (or a single query, which sees everything before it)
        if cache is not None:
            k, v, mask = cache.update(layer, k, v, pos)  # (B, nh, S, hs) every key so far; S >= T
        att = None
        if return_attn:
            # explicit math, for looking inside: softmax(QK^T / sqrt(hs) + causal mask) V (Vaswani et al., eq. 1)
            S = k.size(2)
            if mask is None:
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, S)
            att = F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)
            y = self.attn_dropout(att) @ v  # (B, nh, T, hs)
        elif mask is None:
            # fused kernels (flash / memory-efficient where available)
            dtype = q.dtype
            if q.device.type == "cpu" and dtype == torch.bfloat16 and T > 1:
                # torch's CPU flash attention is ~5x slower in bfloat16 than in float32 (its backward, 12 x 4 x 64
                # x 32 on a 2-core CPU with AVX512-BF16): the matmuls around it keep bfloat16, attention does not
                q, k, v = q.float(), k.float(), v.float()
            with torch.autocast("cpu", enabled=False) if dtype != q.dtype else nullcontext():
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                                   is_causal=True if T > 1 else False).to(dtype)  # a bool, not SymBool
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y)), att


class MLP(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's gelu is the tanh approximation (model.py:gelu)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    # GPT-2 moved LayerNorm to the input of each sub-block (paper, section 2.3): "pre-LN"

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, layer: int = 0, cache=None, pos: Optional[torch.Tensor] = None, return_attn: bool = False):
        a, att = self.attn(self.ln_1(x), layer, cache, pos, return_attn)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, att


class GPT(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned absolute positions
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),  # the extra final LayerNorm (section 2.3)
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: GPT-2 computes logits with wte itself (model.py: tf.matmul(h_flat, wte, transpose_b=True))
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2 paper, section 2.3: "scale the weights of residual layers at initialization by 1/sqrt(N)",
        # N = number of residual layers = 2 per block
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        # OpenAI's model.py: weights N(0, 0.02), wpe N(0, 0.01), biases 0; LayerNorm g=1, b=0 (torch's default)
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            std = 0.01 if module is self.transformer.wpe else 0.02
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count. The position embeddings are left out by default: they cost no matmul FLOPs.
        The token embeddings stay in, as they are the LM head's weights too."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, *, cache=None,
                pos: Optional[torch.Tensor] = None, return_attn: bool = False, last_only: bool = False,
                return_hidden: bool = False):
        """idx (B, T) token ids -> (logits (B, T, vocab), loss or None), plus a list of every layer's
        attention probabilities (B, nh, T, S) when return_attn=True (explicit-math path, slower).
        targets (B, T) ids with -1 for positions to ignore. cache: a KVCache that idx continues, or a
        StaticKVCache with pos, the positions (T,) of idx. last_only: logits for the last position only
        (generation). return_hidden: the final hidden states (B, T, C) after ln_f in place of the logits, for
        the heads of fine-tuning and evaluation, which apply a head only where a token is scored.
        Every consumer runs this trunk: fine-tuning, alignment, evaluation, attention views and compiled decoding."""
        B, T = idx.size()
        if pos is None:
            past = cache.pos if cache is not None else 0
            if past + T > self.config.block_size:
                raise ValueError(f"cannot forward a sequence of length {past + T}: block_size is only "
                                 f"{self.config.block_size}")
            pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        attns = []
        for i, block in enumerate(self.transformer.h):
            x, att = block(x, i, cache, pos, return_attn)
            attns.append(att)
        if cache is not None:
            cache.advance(T)
        x = self.transformer.ln_f(x)
        loss = None
        if return_hidden:
            logits = x  # (B, T, C)
        elif targets is not None:
            logits = self.lm_head(x)  # (B, T, vocab)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        elif last_only:
            logits = self._next_token_logits(x[:, [-1], :])  # (B, 1, vocab)
        else:
            logits = self.lm_head(x)  # (B, T, vocab)
        if return_attn:
            return logits, loss, attns
        return logits, loss

    def _next_token_logits(self, x: torch.Tensor) -> torch.Tensor:
        """lm_head for one position per row. On a CPU without autograd it multiplies by a contiguous (C, vocab)
        copy of the weight: MKL's vector-matrix product reads that layout ~1.5-2x faster than nn.Linear's
        (vocab, C), and at GPT-2 small the head is a third of a decoded token's time (docs/quantization.md#benchpy).
        The copy (+vocab * C floats) is rebuilt whenever the weight changes (version counter or storage)."""
        head = self.lm_head
        if (x.device.type != "cpu" or torch.is_grad_enabled() or type(head) is not nn.Linear
                or torch.is_autocast_enabled("cpu") or x.dtype != head.weight.dtype
                or torch.compiler.is_compiling()):  # compiled decoding (lib/decode.py) picks its own layout
            return head(x)
        w = head.weight
        key = (w.data_ptr(), w._version, w.dtype, w.shape)
        if getattr(self, "_head_t_key", None) != key:
            # the source is kept alive with the copy, so its address cannot be reused by another tensor
            self._head_t, self._head_t_src, self._head_t_key = None, None, None
            self._head_t, self._head_t_src, self._head_t_key = w.detach().t().contiguous(), w.detach(), key
        return x @ self._head_t

    def _decoding_layout(self, on: bool):
        """The blocks' Linear weights in (in, out) memory order for decoding on a CPU (on=True), or back in
        nn.Linear's (out, in) order: shapes and values stay, only the strides change (w.t() is then contiguous).
        MKL's vector-matrix product reads the (in, out) order faster (transformers' Conv1D stores it): at GPT-2
        small ~8% more decoded tokens per second on an AVX2 CPU (docs/quantization.md#benchpy). No extra memory:
        each weight is moved, not copied. generate_stream sets it in eval mode; model.train() undoes it."""
        if getattr(self, "_decoding", False) == on:
            return
        for block in self.transformer.h:
            for lin in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
                w = lin.weight
                if type(lin) is nn.Linear and type(w.data) is torch.Tensor:  # not LoRA, quantized or sharded
                    w.data = w.data.t().contiguous().t() if on else w.data.contiguous()
        self._decoding = on

    def train(self, mode: bool = True):
        self._head_t, self._head_t_src, self._head_t_key = None, None, None  # the copy is rebuilt when needed
        if mode:
            self._decoding_layout(False)
        return super().train(mode)

    def crop_block_size(self, block_size: int):
        """Shrink the context (e.g. load GPT-2's 1024 and train on 256) by cutting the position table."""
        if not 0 < block_size <= self.config.block_size:
            raise ValueError(f"block_size must be in [1, {self.config.block_size}], got {block_size!r}")
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def flops_per_token(self, T: Optional[int] = None) -> int:
        """Training FLOPs (forward + backward) per token at context T: 6N for the weights plus 12*L*C*T for
        the attention scores and mixing (PaLM, Chowdhery et al. 2022, arXiv:2204.02311, Appendix B)."""
        cfg = self.config
        T = T or cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * T

    def estimate_mfu(self, tokens_per_sec: float, peak_flops: float, T: Optional[int] = None) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s as a fraction of peak_flops (FLOP/s)."""
        return self.flops_per_token(T) * tokens_per_sec / peak_flops

    # ------------------------------------------------------------------------------------------
    # generation

    @torch.no_grad()
    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: Optional[int] = None, top_p: Optional[float] = None,
                        stop_token: Optional[int] = None, generator: Optional[torch.Generator] = None,
                        seed: Optional[int] = None, use_cache: bool = True,
                        vocab_limit: Optional[int] = None) -> Iterator[torch.Tensor]:
        """Yield the next token ids (B,) one step at a time, continuing the prompts idx (B, T).

        temperature 0 is greedy. top_k keeps the k likeliest tokens, top_p the smallest set whose
        probability reaches p (nucleus sampling, Holtzman et al. 2019, arXiv:1904.09751). Rows that have
        produced stop_token keep yielding it; the stream ends when every row has stopped. Ids >= vocab_limit
        are never sampled (default: 50257 for GPT-2's padded 50304 table, else the whole table).

        Window policy, identical with and without the cache: a prompt longer than block_size is cropped
        from the left. When the window is full, the last block_size // 2 tokens are kept and re-read from
        position 0 (learned absolute positions mean cached keys cannot simply slide), so a re-read costs
        one half-window forward every block_size // 2 tokens.
        """
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"idx (the prompt) must be a non-empty (B, T) tensor of token ids, "
                             f"got shape {tuple(idx.shape)}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens!r}")
        V = self.config.vocab_size
        if vocab_limit is None:
            vocab_limit = GPT2_VOCAB_SIZE if V == 50304 else V
        if not 0 < vocab_limit <= V:
            raise ValueError(f"vocab_limit must be in [1, {V}], got {vocab_limit!r}")
        if generator is None and seed is not None:
            generator = torch.Generator(device=idx.device).manual_seed(seed)
        if idx.device.type == "cpu" and not self.training:
            self._decoding_layout(True)
        block = self.config.block_size
        B = idx.size(0)
        window = idx[:, -block:]  # (B, <= block) the tokens the model currently conditions on
        cache = KVCache(self.config, B) if use_cache else None
        fresh = window  # tokens not yet read into the cache
        stopped = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            logits, _ = self(fresh, cache=cache, last_only=True)
            logits = logits[:, -1, :vocab_limit].float()  # (B, vocab_limit)
            nxt = _sample(logits, temperature, top_k, top_p, generator)  # (B,)
            if stop_token is not None:
                nxt = torch.where(stopped, torch.full_like(nxt, stop_token), nxt)
                stopped |= nxt == stop_token
            yield nxt
            if stop_token is not None and bool(stopped.all()):
                return
            window = torch.cat([window, nxt[:, None]], dim=1)
            if window.size(1) > block:  # full: keep the last half window and re-read it from position 0
                window = window[:, -(block // 2):]
                if cache is not None:
                    cache.pos = 0
                fresh = window
            else:
                fresh = nxt[:, None] if cache is not None else window

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, callback: Optional[Callable] = None,
                 **kwargs) -> torch.Tensor:
        """Return idx (B, T) extended by up to max_new_tokens sampled tokens; see generate_stream for the
        options. callback(tokens (B,)) is called with every step's tokens as they are produced."""
        out = [idx]
        for nxt in self.generate_stream(idx, max_new_tokens, **kwargs):
            if callback is not None:
                callback(nxt)
            out.append(nxt[:, None])
        return torch.cat(out, dim=1)


def _sample(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
            generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits (B, V) -> sampled ids (B,)."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, sorted_idx = torch.sort(probs, dim=-1, descending=True)
        # drop a token when the tokens ranked above it already reach top_p; the top token always stays
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, sorted_idx, sorted_probs)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]
