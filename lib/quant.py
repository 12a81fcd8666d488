"""
Weight-only quantization: int8 with one scale per output channel, or int4 in groups of input columns, two values
a byte, as Linear layers that compute with the integer weights, and the quantizer that makes them from a float GPT
(quantize.py writes the result; lib/models.py loads it like any checkpoint).
"""

import torch
import torch.nn as nn
from torch.nn import functional as F

from model import GPT, GPTConfig

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
        sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}  # also after decoding
        for name, m in self.targets(model):
            if self.mode == "int8":
                sd[f"{name}.weight"], sd[f"{name}.scales"] = quantize_int8(sd[f"{name}.weight"])
            else:
                sd[f"{name}.weight"], sd[f"{name}.scales"], sd[f"{name}.zeros"] = \
                    quantize_int4(sd[f"{name}.weight"], self.group_size)
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
    """Build the GPT a quantized checkpoint describes (lib.models.model_from_checkpoint calls this)."""
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
