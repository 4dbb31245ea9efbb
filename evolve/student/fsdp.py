"""FSDP for students too big to replicate on every worker (TrainConfig.parallel: fsdp).

torch's FSDP2 (`fully_shard`): each rank holds a shard of every weight, its
gradient, its AdamW state and its EMA, and gathers a block's weights only
while the block runs. Ray Train's `prepare_model(parallel_strategy="fsdp")`
is FSDP1 and refuses CPU workers; this works on CPUs (gloo) and GPUs (NCCL).

Checkpoints stay the plain files every student reads (model.safetensors,
ema.safetensors, optimizer.pt): every rank joins in gathering full tensors,
rank 0 writes them. The optimizer file is keyed by parameter name (torch
distributed checkpoint's full state dict), so a DDP run's index-keyed one is
not loaded into an FSDP run or the reverse: that optimizer starts afresh.
"""

from __future__ import annotations

import torch
from torch import nn

from evolve.student.diffusion import EMA


def _blocks(denoiser: nn.Module) -> list[nn.Module]:
    """The units sharded (and gathered) one at a time: PixArt's transformer
    blocks, or a UNet's down, mid and up blocks."""
    if hasattr(denoiser, "transformer_blocks"):
        return list(denoiser.transformer_blocks)
    return [*denoiser.down_blocks, *([denoiser.mid_block] if denoiser.mid_block is not None else []),
            *denoiser.up_blocks]


@torch.no_grad()
def shard_student(student: nn.Module, ema: EMA) -> EMA:
    """Shard `student` in place (every rank, the same full weights loaded) and
    return its EMA sharded alike, holding `ema`'s (full) values."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor

    for block in _blocks(student.denoiser):
        fully_shard(block)
    fully_shard(student)
    sharded = EMA(student, ema.max_decay)
    for k, sh in sharded.shadow.items():
        full = ema.shadow[k].to(sh.device)
        sh.copy_(distribute_tensor(full, sh.device_mesh, sh.placements) if isinstance(sh, DTensor) else full)
    sharded.num_updates = ema.num_updates
    return sharded


def full_states(student: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer) -> dict:
    """{"weights", "ema", "optimizer"}: full state dicts on the CPU. Every rank
    must call it (the gathers are collective); rank 0's are complete."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict)
    from torch.distributed.tensor import DTensor

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"weights": get_model_state_dict(student, options=opts),
            "ema": {k: (v.full_tensor() if isinstance(v, DTensor) else v).cpu() for k, v in ema.shadow.items()},
            "optimizer": get_optimizer_state_dict(student, optimizer, options=opts)}


def load_optimizer(student: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> bool:
    """Load a full, name-keyed optimizer state into the sharded optimizer (every
    rank, the same `state`). False, with the optimizer untouched, if it is not one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {n for n, _ in student.named_parameters()}
    if not isinstance(state.get("state"), dict) or not set(state["state"]) <= names:
        return False  # e.g. a DDP run's optimizer.pt, keyed by parameter index
    set_optimizer_state_dict(student, optimizer, state, options=StateDictOptions(full_state_dict=True))
    return True
