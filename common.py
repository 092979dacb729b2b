"""
common.py: what every file needs at the bottom of the house: process and device setup, rank-0 printing,
the one-line SetupError, and gradients averaged over ranks and clipped.

- init_dist reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), picks cuda -> mps -> cpu, and starts
  the process group (NCCL on CUDA, gloo on CPU); a plain `python stage.py` is rank 0 of 1.
- allreduce_grads averages gradients over ranks in buckets (DDP's way, without wrapping the model), so 2
  processes train the weights 1 would; under FSDP the reduce-scatter does it instead (fsdp.py).
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


def allreduce_grads(params, bucket_mb=64):
    """Average gradients over ranks, as DDP does, in buckets of at most `bucket_mb` MB each: never a flat
    copy of every gradient (7.5 GB at the 3B in bf16). `params` is the same list on every rank; a parameter
    that got a gradient on some ranks but not others is reduced with zeros where it had none (one small
    collective first says which), so ranks never disagree on what a bucket holds."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    params = list(params)
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=_device_of(params))
    dist.all_reduce(has)  # how many ranks have each gradient
    grads = []
    for p, n in zip(params, has.tolist()):
        if n and p.grad is None:
            p.grad = torch.zeros_like(p)
        if n:
            grads.append(p.grad)
    limit = bucket_mb * 2 ** 20
    for dtype in sorted({g.dtype for g in grads}, key=str):  # the same order on every rank
        bucket, size = [], 0
        for g in [g for g in grads if g.dtype == dtype] + [None]:  # None: flush the last bucket
            if bucket and (g is None or size + g.numel() * g.element_size() > limit):
                flat = torch.cat([x.reshape(-1) for x in bucket]) if len(bucket) > 1 else bucket[0].reshape(-1)
                dist.all_reduce(flat)
                flat /= dist.get_world_size()
                offset = 0
                for x in bucket:  # a lone gradient was reduced in place (reshape is a view): copy_ is a no-op
                    x.copy_(flat[offset:offset + x.numel()].view_as(x))
                    offset += x.numel()
                bucket, size = [], 0
            if g is not None:
                bucket.append(g)
                size += g.numel() * g.element_size()


def _device_of(params):
    """Where the collectives run: NCCL reduces CUDA tensors, gloo CPU ones."""
    return params[0].device if params else torch.device("cpu")


def clip_grad_norm(params, max_norm):
    """The gradients' total norm, after clipping them to max_norm; max_norm <= 0: no clipping (nanoGPT's
    grad_clip 0), where torch's clip_grad_norm_(params, 0) would zero every gradient. A plain tensor also
    under FSDP (where the norm is a DTensor)."""
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:  # the norm alone: still logged, and still the non-finite guard's signal
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
