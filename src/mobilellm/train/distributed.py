"""torch.distributed set-up for torchrun launches, and wrapping with DDP or FSDP2. A plain `python -m
mobilellm train` is a world of size 1; under torchrun every process reads RANK / WORLD_SIZE / LOCAL_RANK."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mobilellm.errors import MobileLLMError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, value: float) -> float:
        """Average a Python float over ranks."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world_size

    def all_true(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([0 if flag else 1], dtype=torch.int32, device=self.device)
        dist.all_reduce(t)
        return t.item() == 0


def setup(device_pref: str = "auto") -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_pref == "auto":
        device_pref = "cuda" if torch.cuda.is_available() else "cpu"
    if device_pref == "cuda":
        if not torch.cuda.is_available():
            raise MobileLLMError("run.device=cuda but no CUDA device is available; use run.device=cpu")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    elif device_pref == "cpu":
        device = torch.device("cpu")
    else:
        raise MobileLLMError(f"run.device must be auto, cpu or cuda, got {device_pref!r}")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    return Dist(rank=rank, world_size=world, local_rank=local, device=device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, blocks: nn.ModuleList, strategy: str, env: Dist, shard_blocks: bool,
         shard_size: int | None = None) -> nn.Module:
    """DDP, FSDP2 or HSDP around the loss module. Shared parameters stay single tensors: DDP keeps
    the module as is; FSDP2 shards each physical block (once, however often it runs) and the root.
    HSDP is FSDP2 on a 2-D mesh: parameters sharded over groups of `shard_size` processes (default:
    the processes of one node) and replicated across the groups, so only gradients cross nodes."""
    if not env.enabled:
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    mesh = {"mesh": hsdp_mesh(env, shard_size)} if strategy == "hsdp" else {}
    if shard_blocks:
        for block in blocks:
            fully_shard(block, **mesh)
    fully_shard(module, **mesh)  # the root holds the embedding (shared with the output layer) and the final norm
    return module


def hsdp_mesh(env: Dist, shard_size: int | None):
    """(replicate, shard) device mesh; shard_size None: the processes of one node (torchrun's LOCAL_WORLD_SIZE)."""
    from torch.distributed.device_mesh import init_device_mesh

    shard = shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
    if shard < 1 or env.world_size % shard:
        raise MobileLLMError(f"run.hsdp_shard_size={shard} does not divide the {env.world_size} processes")
    return init_device_mesh(env.device.type, (env.world_size // shard, shard), mesh_dim_names=("replicate", "shard"))


def set_grad_sync(wrapped: nn.Module, enabled: bool):
    """Context for gradient accumulation: skip the all-reduce on all but the last micro-batch."""
    import contextlib

    if hasattr(wrapped, "no_sync"):  # DDP
        return contextlib.nullcontext() if enabled else wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def check_shared_parameters(model: nn.Module) -> None:
    """After wrapping, shared weights must still be single tensors: the output layer reads the
    embedding matrix, and each physical block appears once however often the model runs it."""
    from mobilellm.errors import MobileLLMError

    cfg = model.config
    if cfg.tie_embeddings and (model.lm_head is not None or model.output_weight is not model.embed_tokens.weight):
        raise MobileLLMError("internal error: the output layer no longer shares the embedding matrix after wrapping")
    counted = sum(p.numel() for p in model.parameters())  # DTensor.numel() is the global size
    if counted != cfg.num_params():
        raise MobileLLMError(f"internal error: {counted:,} parameters after wrapping, the config has "
                             f"{cfg.num_params():,}: a shared block or embedding was duplicated")
