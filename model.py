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

import inspect
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
    """Keys and values of the tokens seen so far, preallocated for the whole window of every layer."""

    def __init__(self, config: GPTConfig, batch_size: int):
        hs = config.n_embd // config.n_head
        self.shape = (config.n_layer, batch_size, config.n_head, config.block_size, hs)
        self.k = self.v = None  # allocated at the first update, in the dtype the layers produce (autocast)
        self.pos = 0  # number of positions filled

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, nh, T, hs) at the next T positions; return all keys and values so far."""
        if self.k is None:
            self.k = torch.zeros(self.shape, device=k.device, dtype=k.dtype)
            self.v = torch.zeros(self.shape, device=v.device, dtype=v.dtype)
        T = k.size(2)
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]


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

    def forward(self, x, layer: int = 0, cache: Optional[KVCache] = None, return_attn: bool = False):
        B, T, C = x.size()  # batch size, sequence length, embedding dim (n_embd)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        past = 0
        if cache is not None:
            past = cache.pos
            k, v = cache.update(layer, k, v)  # (B, nh, past + T, hs)
        att = None
        if return_attn:
            # explicit math, for looking inside: softmax(QK^T / sqrt(hs) + causal mask) V (Vaswani et al., eq. 1)
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, past + T)
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            att = F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)
            y = self.attn_dropout(att) @ v  # (B, nh, T, hs)
        elif past == 0:
            # training and prefill: fused kernels (flash / memory-efficient where available)
            dtype = q.dtype
            if q.device.type == "cpu" and dtype == torch.bfloat16:
                # torch's CPU flash attention is ~5x slower in bfloat16 than in float32 (its backward, 12 x 4 x 64
                # x 32 on a 2-core CPU with AVX512-BF16): the matmuls around it keep bfloat16, attention does not
                q, k, v = q.float(), k.float(), v.float()
            with torch.autocast("cpu", enabled=False) if dtype != q.dtype else nullcontext():
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                                   is_causal=True).to(dtype)
        elif T == 1:
            # one new token after the cache sees every cached position: no mask needed
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            # several new tokens after a cached prefix: causal mask shifted by the prefix length
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
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

    def forward(self, x, layer: int = 0, cache: Optional[KVCache] = None, return_attn: bool = False):
        a, att = self.attn(self.ln_1(x), layer, cache, return_attn)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, att


def newton_schulz(G: torch.Tensor, coefficients: tuple, steps: int, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """G (n, rows, cols), a stack of n matrices -> each about U V^T of its SVD U S V^T, by `steps` quintic
    Newton-Schulz iterations in `dtype`: torch.optim.Muon's orthogonalization (torch/optim/_muon.py, after Keller
    Jordan's muon.py), which takes one matrix at a time and always works in bfloat16. Its coefficients trade
    accuracy for speed: singular values end between about 0.68 and 1.13, not at 1, which does not hurt training
    (https://kellerjordan.github.io/posts/muon/, github.com/KellerJordan/modded-nanogpt README)."""
    a, b, c = coefficients
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT  # (n, cols, rows): iterate on the short side, where X X^T is the smaller Gram matrix
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm = 1
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X = a X + b (X X^T) X + c (X X^T)^2 X
    return X.mT if tall else X


@torch.no_grad()
def muon_step(muon: torch.optim.Optimizer, dtype: torch.dtype):
    """torch.optim.Muon's step (_single_tensor_muon, default learning-rate adjustment) on that optimizer's own
    groups and momentum buffers, with two changes of speed, not of result: the matrices of one shape are
    orthogonalized together, in one batched Newton-Schulz (on a 2-core CPU, 8.9 ms instead of 14.8 for the demo's
    16 matrices), and in `dtype`. In bfloat16 it is bit-identical to muon.step() (tests/test_muon.py)."""
    for group in muon.param_groups:
        lr, momentum = group["lr"], group["momentum"]
        by_shape = {}  # shape -> [(parameter, its update before orthogonalization)]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = muon.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - momentum)  # B = mu B + (1 - mu) g
            update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf  # Nesterov: (1 - mu) g + mu B
            by_shape.setdefault(tuple(p.shape), []).append((p, update))
        for (rows, cols), items in by_shape.items():
            ortho = newton_schulz(torch.stack([u for _, u in items]), group["ns_coefficients"], group["ns_steps"],
                                  group["eps"], dtype)  # (n, rows, cols)
            for (p, _), o in zip(items, ortho):
                p.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay
                p.add_(o, alpha=-lr * math.sqrt(max(1, rows / cols)))  # same update RMS for tall matrices


class MuonAdamW:
    """Muon for the hidden matrices and AdamW for the rest, used like one torch optimizer: what training loops,
    torch.amp.GradScaler (param_groups, step) and clip_grad_norm_ touch. Its state_dict holds both states.
    torch.optim.Muon holds the matrices, their settings and momentum buffers; muon_step updates them (faster than
    its own step, same result) with Newton-Schulz in ns_dtype."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer, ns_dtype: torch.dtype):
        self.muon, self.adamw, self.ns_dtype = muon, adamw, ns_dtype

    @property
    def param_groups(self) -> list:
        return self.muon.param_groups + self.adamw.param_groups  # anew each time: load_state_dict replaces groups

    def add_param_group(self, group: dict):
        self.adamw.add_param_group(group)  # e.g. a classification head (finetune.py): AdamW, like the LM head

    def step(self, closure=None):
        muon_step(self.muon, self.ns_dtype)
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True):
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict):
        if set(state) != {"muon", "adamw"}:
            raise ValueError(f"this optimizer state has the keys {sorted(state)}, not Muon + AdamW's ['adamw', "
                             f"'muon']: the run was started with another optimizer; resume it with that one "
                             f"(e.g. --optimizer=adamw)")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def native_bf16(device_type: str) -> str:
    """'' when bfloat16 matmuls run in hardware on `device_type`, else why not. CUDA: tensor cores (Ampere and
    newer; torch's is_bf16_supported() also counts the emulated kind of V100 and T4). x86 CPUs: AVX512-BF16 or AMX,
    where a bfloat16 matmul runs 2.3x faster than float32 (2-core AVX512-BF16 machine: 378 against 165 GFLOP/s);
    elsewhere it is emulated, 2.5x (AVX-512) to 12x (AVX2) slower than float32."""
    if device_type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        return "" if ok else "this GPU emulates bfloat16"
    if device_type == "cpu":
        ok = (getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
              or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
        return "" if ok else "the CPU has no AVX512-BF16 or AMX: bfloat16 matmuls are emulated, slower than float32"
    return f"bfloat16 matmuls are emulated on {device_type}"


def pick_ns_dtype(requested: str, device_type: str) -> tuple:
    """-> (torch dtype, why) for Muon's Newton-Schulz iterations. 'auto': bfloat16 where matmuls have it natively
    (native_bf16), float32 elsewhere."""
    choices = {"bfloat16": torch.bfloat16, "float32": torch.float32}
    if requested != "auto":
        if requested not in choices:
            raise ValueError(f"muon_ns_dtype must be 'auto', 'bfloat16' or 'float32', got {requested!r}; e.g. "
                             f"--muon_ns_dtype=auto")
        return choices[requested], "requested"
    if device_type == "cuda":
        return torch.bfloat16, "tensor cores"
    why = native_bf16(device_type)
    if not why:
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return torch.bfloat16, "the CPU has " + ("AMX" if amx else "AVX512-BF16")
    return torch.float32, why


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

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                return_attn: bool = False, cache: Optional[KVCache] = None, last_only: bool = False,
                return_hidden: bool = False):
        """idx (B, T) token ids -> (logits (B, T, vocab), loss or None), plus a list of every layer's
        attention probabilities (B, nh, T, T) when return_attn=True (explicit-math path, slower).
        targets (B, T) ids with -1 for positions to ignore. cache: a KVCache that idx continues.
        last_only: compute logits for the last position only (generation).
        return_hidden: return the final hidden states (B, T, C) after ln_f in place of the logits, for callers
        that need the logits of a few positions only (eval.py applies self.lm_head where a token is scored)."""
        B, T = idx.size()
        past = cache.pos if cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"cannot forward a sequence of length {past + T}: block_size is only "
                             f"{self.config.block_size}")
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        attns = []
        for i, block in enumerate(self.transformer.h):
            x, att = block(x, i, cache, return_attn)
            attns.append(att)
        if cache is not None:
            cache.pos += T
        x = self.transformer.ln_f(x)
        loss = None
        if return_hidden:
            logits = x  # (B, T, C)
        elif targets is not None:
            logits = self.lm_head(x)  # (B, T, vocab)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :] if last_only else x)  # (B, 1 or T, vocab)
        if return_attn:
            return logits, loss, attns
        return logits, loss

    def crop_block_size(self, block_size: int):
        """Shrink the context (e.g. load GPT-2's 1024 and train on 256) by cutting the position table."""
        if not 0 < block_size <= self.config.block_size:
            raise ValueError(f"block_size must be in [1, {self.config.block_size}], got {block_size!r}")
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas: tuple, device_type: str,
                             optimizer: str = "adamw", muon_lr: float = 0.02, muon_momentum: float = 0.95,
                             muon_ns_steps: int = 5, muon_ns_dtype: str = "auto"):
        """optimizer='adamw': AdamW; weight decay on matrices and embeddings (>= 2-D), none on biases and LayerNorm
        gains. optimizer='muon': Muon at muon_lr for the 2-D weights inside the blocks, AdamW as above at
        learning_rate for the rest (the embeddings, which are also the LM head, LayerNorms and biases), both with
        weight decay per group. Every group's "lr_scale" is its learning rate over learning_rate: a training loop
        sets group["lr"] = lr * group.get("lr_scale", 1.0), so one schedule drives both optimizers.
        muon_ns_steps and muon_ns_dtype: Newton-Schulz iterations and their precision (see pick_ns_dtype)."""
        if optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer must be 'adamw' or 'muon', got {optimizer!r}; e.g. --optimizer=muon")
        params = [p for p in self.parameters() if p.requires_grad]
        hidden = set()
        if optimizer == "muon":
            hidden = {id(p) for p in self.transformer.h.parameters() if p.requires_grad and p.dim() == 2}
        decay = [p for p in params if p.dim() >= 2 and id(p) not in hidden]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        # the fused kernel does the whole update in one pass (CUDA, and CPU since torch 2.4: ~3x faster there)
        fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
        extra = dict(fused=True) if fused else dict()
        adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)
        if optimizer == "adamw":
            return adamw
        if not hasattr(torch.optim, "Muon"):
            raise ValueError(f"optimizer='muon' needs torch.optim.Muon (torch >= 2.9), this is torch "
                             f"{torch.__version__}: pip install 'torch>=2.9', or use --optimizer=adamw")
        ns_dtype, _ = pick_ns_dtype(muon_ns_dtype, device_type)
        if learning_rate <= 0 or muon_lr <= 0:
            raise ValueError(f"optimizer='muon' needs learning_rate > 0 and muon_lr > 0 (the schedule scales both), "
                             f"got learning_rate={learning_rate!r}, muon_lr={muon_lr!r}")
        matrices = [p for p in params if id(p) in hidden]
        # Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/): Nesterov momentum, then the update
        # orthogonalized by ns_steps Newton-Schulz iterations, scaled by sqrt(max(1, fan_out / fan_in))
        muon = torch.optim.Muon([{"params": matrices, "lr_scale": muon_lr / learning_rate}], lr=muon_lr,
                                weight_decay=weight_decay, momentum=muon_momentum, nesterov=True,
                                ns_steps=muon_ns_steps)
        return MuonAdamW(muon, adamw, ns_dtype)

    def flops_per_token(self, T: Optional[int] = None) -> int:
        """Training FLOPs (forward + backward) per token at context T: 6N for the weights plus 12*L*C*T for
        the attention scores and mixing (PaLM, Chowdhery et al. 2022, arXiv:2204.02311, Appendix B)."""
        cfg = self.config
        T = T or cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * T

    def estimate_mfu(self, tokens_per_sec: float, peak_flops: float, T: Optional[int] = None) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s as a fraction of peak_flops (FLOP/s)."""
        return self.flops_per_token(T) * tokens_per_sec / peak_flops

    @classmethod
    def from_pretrained(cls, name: str, dropout: float = 0.0) -> "GPT":
        """OpenAI's GPT-2 weights ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl') via load_openai.py."""
        from load_openai import load_pretrained
        return load_pretrained(name, dropout=dropout)

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
