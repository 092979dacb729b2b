"""
common.py: what every file needs at the bottom of the house: process and device setup, rank-0 printing,
the one-line SetupError, and gradients averaged over ranks and clipped.

- init_dist reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), picks cuda -> mps -> cpu, and starts
  the process group (NCCL on CUDA, gloo on CPU); a plain `python stage.py` is rank 0 of 1.
- allreduce_grads averages gradients over ranks, so 2 processes train the weights 1 would; under FSDP the
  reduce-scatter does it instead (fsdp.py).
"""

import os

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# process and device

_DIST = {"rank": 0, "world_size": 1, "local_rank": 0}


def init_dist(device=None):
    """Read torchrun's environment; start the process group. Returns (rank, world_size, device)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None or device == "auto":
        if torch.cuda.is_available():
            device = f"cuda:{local_rank}"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _DIST.update(rank=rank, world_size=world, local_rank=local_rank)
    return rank, world, device


def print0(*args, **kwargs):
    if _DIST["rank"] == 0:
        print(*args, **kwargs, flush=True)


def is_main():
    return _DIST["rank"] == 0


def default_dtype(device):
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


# -----------------------------------------------------------------------------
# errors


class SetupError(ValueError):
    """A bad model folder, --out or setting. The message is one line (any line break becomes a space): the
    stages print it without a traceback."""

    def __init__(self, message):
        super().__init__(" ".join(str(message).splitlines()))


class CheckpointNotFound(SetupError, FileNotFoundError):
    """No checkpoint where one was named: no folder, no config.json, no safetensors weights."""


# -----------------------------------------------------------------------------
# gradients across ranks


def allreduce_grads(params):
    """Average gradients over ranks. One flat buffer per dtype: a handful of collectives per step."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    for dtype in {g.dtype for g in grads}:
        group = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in group:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def clip_grad_norm(params, max_norm):
    """The gradients' total norm, after clipping them to max_norm; max_norm <= 0: no clipping (nanoGPT's
    grad_clip 0), where torch's clip_grad_norm_(params, 0) would zero every gradient. A plain tensor also
    under FSDP (where the norm is a DTensor)."""
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:  # the norm alone: still logged, and still the non-finite guard's signal
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
