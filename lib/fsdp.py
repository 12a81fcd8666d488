"""
Sharded data parallelism for models that DDP cannot hold: FSDP2 (torch.distributed.fsdp.fully_shard). Each rank
keeps 1/world of the parameters, gradients and optimizer states; a block's full weights exist only while it computes.

Checkpoints stay the one contract: on save the full states are gathered to rank 0, so an FSDP run's checkpoint is
read by every script and resumes under FSDP, DDP or one process, with any number of ranks.
"""

import torch
import torch.nn as nn


def shard(root: nn.Module, blocks: nn.ModuleList, rt, cpu_offload: bool = False):
    """fully_shard every transformer block (its own all-gather unit), then the root (embeddings, tied LM head, ln_f,
    any head). Under bf16/fp16 autocast on GPUs, parameters are gathered in that dtype, gradients reduced in fp32.
    cpu_offload: the states live in CPU memory. Call it before creating the optimizer: it replaces the parameters."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    if not rt.ddp:
        raise ValueError("fsdp=True shards the model over the ranks of a torchrun launch; run it under torchrun "
                         "(e.g. torchrun --standalone --nproc_per_node=8 train.py ... --fsdp=True), or drop --fsdp")
    kw = {}
    if rt.device_type == "cuda" and rt.dtype != "float32":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=rt.ptdtype, reduce_dtype=torch.float32)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    with torch.no_grad():  # every rank starts from rank 0's weights, as DDP does (ranks seed their dropout apart)
        for t in root.state_dict().values():
            torch.distributed.broadcast(t, src=0)
    for block in blocks:
        fully_shard(block, **kw)
    fully_shard(root, **kw)
    return root


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(module, FSDPModule)


def _full():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(root: nn.Module, optimizer) -> tuple:
    """(the root's full state dict, its optimizer's full state, keyed by parameter name): collectives every rank
    calls; rank 0 gets the tensors on the CPU, the other ranks empty dicts."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    return get_model_state_dict(root, options=_full()), get_optimizer_state_dict(root, optimizer, options=_full())


def load_optimizer(root: nn.Module, optimizer, state: dict):
    """An optimizer state from any run into this one's optimizer: keyed by parameter name (an FSDP run's) or by
    position (torch's optimizer.state_dict(), DDP or one process), into a sharded or a plain model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    by_name = any(isinstance(p, str) for g in state.get("param_groups", []) for p in g["params"])
    if not by_name and not is_sharded(root):
        optimizer.load_state_dict(state)
        return
    if not by_name:  # position i is the i-th parameter of the optimizer's groups (the same groups, in the same order)
        names = {id(p): n for n, p in root.named_parameters()}
        flat = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        state = {"state": {flat[i]: s for i, s in state["state"].items()},
                 "param_groups": [{**g, "params": [flat[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(root, optimizer, state, options=StateDictOptions(full_state_dict=True))


def memory_line(model: nn.Module, rt, fsdp: bool) -> str:
    """Bytes this rank holds for the model's training state: parameters, gradients (as many), AdamW's two moments
    (twice as many), against what DDP (or FSDP) would hold."""
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in model.parameters())
    full = sum(p.numel() * p.element_size() for p in model.parameters())  # a DTensor's numel is the full size
    mine, other = (local, full) if fsdp else (full, full / rt.ddp_world_size)
    gib = lambda b: f"{b / 2 ** 30:,.2f} GiB" if b >= 2 ** 30 else f"{b / 2 ** 20:,.2f} MiB"
    return (f"memory per rank for the training state: parameters {gib(mine)} + gradients {gib(mine)} + AdamW states "
            f"{gib(2 * mine)} = {gib(4 * mine)} ({'FSDP' if fsdp else 'DDP'} over {rt.ddp_world_size} rank(s); "
            f"{'DDP' if fsdp else 'FSDP'} would hold {gib(4 * other)}), plus activations")
