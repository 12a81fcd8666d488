"""
What trains the weights: AdamW, or Muon for the hidden matrices with AdamW for the rest (make_optimizer), and the
learning-rate schedule every trainer follows (lr_at, check_schedule).
"""

import inspect
import math

import torch

from lib.runtime import native_bf16, print0


def newton_schulz(G: torch.Tensor, coefficients: tuple, steps: int, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """G (n, rows, cols), a stack of n matrices -> each about U V^T of its SVD U S V^T, by `steps` quintic
    Newton-Schulz iterations in `dtype`: torch.optim.Muon's orthogonalization (torch/optim/_muon.py), batched. Its
    coefficients trade accuracy for speed: singular values end between about 0.68 and 1.13, which does not hurt
    training (https://kellerjordan.github.io/posts/muon/)."""
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
    """torch.optim.Muon's step on that optimizer's own groups and momentum buffers, faster with the same result: the
    matrices of one shape are orthogonalized together, in `dtype` (in bfloat16 bit-identical to muon.step())."""
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
    """Muon for the hidden matrices and AdamW for the rest, used like one torch optimizer (what training loops,
    GradScaler and clip_grad_norm_ touch); its state_dict holds both states."""

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


def make_optimizer(model, weight_decay: float, learning_rate: float, betas: tuple, device_type: str,
                   optimizer: str = "adamw", muon_lr: float = 0.02, muon_momentum: float = 0.95,
                   muon_ns_steps: int = 5, muon_ns_dtype: str = "auto", muon_weight_decay: float = 0.1):
    """optimizer='adamw': AdamW; weight decay on matrices and embeddings (>= 2-D), none on biases and LayerNorm
    gains. optimizer='muon': Muon at muon_lr for the 2-D weights inside the blocks, AdamW as above for the rest.
    Muon's decay is its own: torch.optim.Muon shrinks by lr x decay at its own lr, so AdamW's value would decay its
    matrices muon_lr / learning_rate times faster (33x at train.py's defaults). A group's "lr_scale" is its learning
    rate over learning_rate: loops set group["lr"] = lr * group.get("lr_scale", 1.0), one schedule for both."""
    if optimizer not in ("adamw", "muon"):
        raise ValueError(f"optimizer must be 'adamw' or 'muon', got {optimizer!r}; e.g. --optimizer=muon")
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = set()
    if optimizer == "muon":
        hidden = {id(p) for p in model.transformer.h.parameters() if p.requires_grad and p.dim() == 2}
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
                            weight_decay=muon_weight_decay, momentum=muon_momentum, nesterov=True,
                            ns_steps=muon_ns_steps)
    return MuonAdamW(muon, adamw, ns_dtype)


def lr_at(it: int, learning_rate: float, warmup_iters: int, decay_iters: int, min_lr: float,
          decay: bool = True) -> float:
    """Linear warmup over warmup_iters (Goyal et al. 2017, arXiv:1706.02677), then cosine decay to min_lr at
    decay_iters (Loshchilov & Hutter, SGDR, arXiv:1608.03983), as GPT-3 was trained (Brown et al. 2020,
    arXiv:2005.14165, appendix B), and min_lr after it; decay=False holds learning_rate after the warmup."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if not decay:
        return learning_rate
    if it >= decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def check_schedule(learning_rate: float, warmup_iters: int, decay_iters: int, max_iters: int, min_lr: float,
                   decay: bool = True):
    """Refuse a schedule that cannot be computed, and warn about one that cannot do what its numbers say."""
    if decay and decay_iters <= warmup_iters:
        raise ValueError(f"the learning rate would decay (at iteration {decay_iters}) before its warmup ends (at "
                         f"{warmup_iters}); e.g. --warmup_iters={max(0, min(warmup_iters, decay_iters // 10))}")
    if max_iters <= 0:
        return
    reached = max(lr_at(it, learning_rate, warmup_iters, decay_iters, min_lr, decay)
                  for it in range(min(max_iters, warmup_iters + 1)))
    if warmup_iters >= max_iters:
        print0(f"WARNING: warmup_iters={warmup_iters:,} is not shorter than the run (max_iters={max_iters:,}): the "
               f"learning rate never reaches learning_rate={learning_rate:g}, only {reached:.3g}. Use e.g. "
               f"--warmup_iters={max(1, max_iters // 10)} (10% of the run) or more iterations")
    if reached < 1e-7:
        print0(f"WARNING: the learning rate never exceeds {reached:.3g}: the weights will barely move. Raise "
               f"--learning_rate (now {learning_rate:g})")
    if decay and min_lr > learning_rate:
        print0(f"WARNING: min_lr={min_lr:g} is above learning_rate={learning_rate:g}: the 'decay' raises the rate")
