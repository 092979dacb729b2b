"""
fsdp.py: FSDP2 (--fsdp), for models that do not fit on one GPU: each text decoder layer and vision block
sharded over the ranks, and medfact's forward functions (model.sample, model.completion_logps) run as
registered forwards of the sharded model.
"""

import functools
import warnings

import torch

from families import text_model, vision_tower


def fsdp_shard(model):
    """Shard `model` over all ranks with FSDP2: each text decoder layer and vision block, then the root.

    Our forward passes call the model's parts (vision tower, embeddings, text model, lm_head), not
    model.forward, so sample() and completion_logps() run as a registered FSDP forward method: the
    root's parameters are gathered around them and their gradients reduce-scattered (averaged over
    ranks, so no allreduce_grads) in backward. Parameters become DTensors; save_checkpoint gathers them.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    vision_blocks = [block for name, mod in vision_tower(model).named_modules()
                     if name.split(".")[-1] in ("blocks", "layers", "layer") and isinstance(mod, torch.nn.ModuleList)
                     for block in mod]  # Qwen's visual.blocks, SigLIP/CLIP's encoder.layers, InternViT's encoder.layer
    for block in [*text_model(model).layers, *vision_blocks]:
        fully_shard(block)
    fully_shard(model)
    model.sharded_forward = lambda fn: fn()
    register_fsdp_forward_method(model, "sharded_forward")
    # our outputs (log-probs, a view of one buffer) are never modified in place, which is what this warns about
    warnings.filterwarnings("ignore", message=".*returned a view tensor")
    return model


def is_sharded(model):
    return hasattr(model, "sharded_forward")


def fsdp_forward(fn):
    """Decorator: run fn(vlm, ...) as a forward of the model it uses, when that model is FSDP-sharded."""
    @functools.wraps(fn)
    def run(vlm, *args, **kwargs):
        model = kwargs.get("model") or vlm.model
        if is_sharded(model):
            return model.sharded_forward(functools.partial(fn, vlm, *args, **kwargs))
        return fn(vlm, *args, **kwargs)
    return run
