"""
Where a run executes: the device and dtype (each chosen with its reason printed), the DDP process group under
torchrun or SLURM, print0 for rank 0, and the peak FLOP/s that MFU is measured against.
"""

import os
import re
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from lib.logs import print0


@dataclass
class Runtime:
    device: str  # e.g. 'cuda:0', 'cpu', 'mps'
    device_type: str  # 'cuda', 'cpu' or 'mps'
    dtype: str  # 'float32', 'bfloat16' or 'float16' (autocast dtype; parameters stay fp32)
    ddp: bool = False
    ddp_rank: int = 0
    ddp_local_rank: int = 0
    ddp_world_size: int = 1
    master_process: bool = True

    @property
    def ptdtype(self) -> torch.dtype:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]

    def autocast(self):
        """Mixed precision context for forward passes (a no-op in float32)."""
        if self.dtype == "float32":
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.ptdtype)


def local_rank() -> int:
    """This process's index on its node: torchrun's LOCAL_RANK, else what srun or mpirun set."""
    for key in ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"):
        if key in os.environ:
            return int(os.environ[key])
    if int(os.environ["WORLD_SIZE"]) == 1:
        return 0
    raise ValueError("RANK and WORLD_SIZE are set but not LOCAL_RANK (nor SLURM_LOCALID or OMPI_COMM_WORLD_LOCAL_RANK):"
                     " launch with torchrun (torchrun --nproc_per_node=8 train.py ...), or export LOCAL_RANK, the "
                     "process's GPU index on its node, along with MASTER_ADDR and MASTER_PORT")


def native_bf16(device_type: str) -> str:
    """'' when bfloat16 matmuls run in hardware on `device_type`, else why not. CUDA: tensor cores (Ampere and newer;
    torch's is_bf16_supported() also counts emulation). CPUs: AVX512-BF16 or AMX; elsewhere slower than float32."""
    if device_type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        return "" if ok else "this GPU emulates bfloat16"
    if device_type == "cpu":
        ok = (getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
              or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
        return "" if ok else "the CPU has no AVX512-BF16 or AMX: bfloat16 matmuls are emulated, slower than float32"
    return f"bfloat16 matmuls are emulated on {device_type}"


def setup_runtime(device: str = "auto", dtype: str = "auto", training: bool = False) -> Runtime:
    """Pick the device and dtype (saying which and why) and join the DDP group when run under torchrun.
    training=True (the trainers): dtype='auto' autocasts to bfloat16 on CPUs with native bfloat16 matmuls too; the
    scripts that measure or generate keep float32 on every CPU, so that their figures are exact."""
    # Linux: transparent huge pages for torch's CPU tensors of 2 MB and more (read at the first large allocation);
    # without them every step maps its largest tensors afresh in 4 KB pages, twice as slow. =0 turns it off.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    valid_dtypes = ("auto", "float32", "bfloat16", "float16")
    if dtype not in valid_dtypes:
        raise ValueError(f"dtype must be one of {valid_dtypes}, got {dtype!r}")
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # set by torchrun
    rank, local, world_size = 0, 0, 1
    if ddp:
        rank, local, world_size = int(os.environ["RANK"]), local_rank(), int(os.environ["WORLD_SIZE"])
    if device == "auto":
        if torch.cuda.is_available():
            device, why = "cuda", "CUDA is available"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device, why = "mps", "Apple MPS is available"
        else:
            device, why = "cpu", "no CUDA or MPS device found"
    else:
        why = "requested"
    device_type = device.split(":")[0]
    if device_type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available; use --device=cpu or auto")
    if device_type == "cuda" and ":" in device and not device.split(":")[1].isdigit() or \
            device_type == "cuda" and ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise ValueError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered "
                         f"from 0; e.g. --device=cuda:0")
    mps = getattr(torch.backends, "mps", None)
    if device_type == "mps" and not (mps is not None and mps.is_available()):
        raise ValueError(f"device={device!r} was requested but this torch has no usable Apple MPS backend (it needs an "
                         f"Apple-silicon Mac and a torch built with MPS); use --device=cpu or auto")
    if ddp and device_type == "cuda":
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if ddp and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    # dtype: bf16 autocast where bf16 matmuls are native (GPUs; CPUs for training); fp16 with a GradScaler on older
    # GPUs; fp32 on other CPUs, where bf16 is emulated and slower than fp32
    why_not = native_bf16(device_type) if device_type in ("cuda", "cpu") else "no bfloat16 autocast on this device"
    if dtype != "auto":
        why_dtype = "requested"
    elif device_type == "cuda":
        dtype, why_dtype = ("float16", why_not) if why_not else ("bfloat16", "native bfloat16 matmuls")
    elif why_not or not training:
        dtype, why_dtype = "float32", why_not or ("float32 for exact figures on a CPU; --dtype=bfloat16 is faster "
                                                  "here (native bfloat16 matmuls)")
    else:
        dtype, why_dtype = "bfloat16", "native bfloat16 matmuls"
    if dtype == "bfloat16" and device_type == "cuda" and why_not:
        print0("WARNING: this GPU has no native bfloat16 (it would be emulated, slowly); using float16 with loss "
               "scaling instead (--dtype=float16)")
        dtype, why_dtype = "float16", "this GPU emulates bfloat16"
    elif dtype == "bfloat16" and device_type == "cpu" and why_not:
        print0(f"WARNING: --dtype=bfloat16 on this CPU is slower than float32 ({why_not})")
    elif dtype == "float16" and device_type == "cpu":
        print0("WARNING: float16 autocast is not supported on CPU; using float32 (--dtype=float32)")
        dtype, why_dtype = "float32", "no float16 autocast on CPU"
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for the fp32 matmuls that remain
        torch.backends.cudnn.allow_tf32 = True
    rt = Runtime(device, device_type, dtype, ddp, rank, local, world_size, rank == 0)
    print0(f"device: {device} ({why}), dtype: {dtype} ({why_dtype})" + (f", DDP world size {world_size}" if ddp else ""))
    return rt


# dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, per GPU; fp32 runs count against them too
GPU_PEAKS = {"H200": 989e12, "H100": 989e12, "H100 PCIe": 756e12, "H800": 989e12, "GH200": 989e12, "A100": 312e12,
             "A800": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10": 125e12, "A6000": 155e12,
             "V100": 125e12, "T4": 65e12, "4090": 165e12, "3090": 71e12}


def peak_flops(device: str) -> tuple:
    """A device's peak FLOP/s for MFU -> (flops or 0.0, where the number comes from). GPUs are matched on
    whole words of their name ('NVIDIA L40S' is not an L4, 'A10G' not an A10)."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        words = re.split(r"[\s\-_]+", name.replace("NVIDIA", "").strip())
        hits = [k for k in GPU_PEAKS if all(w in words for w in k.split())]
        if not hits:
            return 0.0, f"{name} is not in lib.runtime.GPU_PEAKS; set --peak_flops"
        key = max(hits, key=len)  # 'H100 PCIe' over 'H100'
        return GPU_PEAKS[key], f"{name}, dense bf16 datasheet peak"
    if device == "cpu":
        # a rough guess: threads x fp32 FLOP per cycle (two FMA units of AVX-512 or AVX2) x 2.5 GHz
        flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
        per_cycle = 64 if " avx512f" in flags else 32 if " avx2" in flags else 8
        n = torch.get_num_threads()
        return n * per_cycle * 2.5e9, f"{n} threads x {per_cycle} FLOP/cycle x 2.5 GHz, a rough guess; set --peak_flops"
    return 0.0, f"no peak known for {device}; set --peak_flops"


def cache_root(cache_dir: str = "") -> str:
    """The download cache: cache_dir, else $LLM_E2E_CACHE, else ~/.cache/llm-e2e."""
    return cache_dir or os.environ.get("LLM_E2E_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llm-e2e")
