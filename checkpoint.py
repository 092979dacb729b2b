"""
checkpoint.py: checkpoints and the run folder. A checkpoint is a plain Hugging Face folder (config.json,
model.safetensors, the processor) that stock transformers runs, plus state.json (step, data position,
seeds, the step guard) and, for resume, optimizer.pt (tensors only); under LoRA the folder holds the merged
model and adapter/, the adapter in peft's format (lora.py).

- save_checkpoint writes to a temporary folder and renames it (_commit): a kill never leaves half a model;
- save_step_checkpoint keeps the last `keep` of out/checkpoints/step_N; resume_from finds the newest;
- resume_or_start: the step a stage starts from, its optimizer state and step guard, and args.json;
- StepGuard flags non-finite and spiking steps and stops a run after too many in a row, naming the last
  good checkpoint (last_good_checkpoint);
- check_checkpoint refuses a folder transformers would misread (no config, no safetensors, pickle shards)
  in one line, before anything loads.
"""

import copy
import json
import math
import os
import shutil
import statistics

import torch
import torch.distributed as dist

from common import CheckpointNotFound, SetupError, is_main, print0
from families import CHAT_TEMPLATE, build_processor
from fsdp import is_sharded
import lite0
import lora


def hf_processor(vlm):
    """A stock transformers processor for vlm's tokenizer and image processor, without torchvision.

    processor(text=..., images=..., return_tensors="pt", padding=True) gives input_ids (one <|image_pad|> per
    merged patch, left-padded), attention_mask, mm_token_type_ids (1 on image tokens: generate's 3D positions
    need them), pixel_values and image_grid_thw, as Qwen2.5-VL's generate expects; its chat template rebuilds
    chat_prompt. The class is transformers' PaddleOCRVLProcessor: for images it does what Qwen2_5_VLProcessor
    does (the same token expansion and type ids), without the video processor that needs torchvision.
    save_checkpoint saves it, so AutoProcessor.from_pretrained(ckpt) loads it back.
    """
    if vlm.generic:  # every other family: its stock processor (FAMILIES), built as encode() uses it
        return build_processor(vlm.model.config, vlm.tokenizer, vlm.image_processor)
    from transformers import PaddleOCRVLProcessor
    tokenizer = copy.deepcopy(vlm.tokenizer)  # the in-memory tokenizer stays as training uses it
    # left padding: every prompt ends where generation starts (right padding makes batched generate wrong)
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"
    # named special tokens, saved in tokenizer_config.json: the processor finds the image token by its name
    names = {"image_token": vlm.image_token_id, "video_token": vlm.model.config.video_token_id}
    tokenizer._set_model_specific_special_tokens({k: tokenizer.convert_ids_to_tokens(i) for k, i in names.items()})
    tokenizer.chat_template = CHAT_TEMPLATE
    return PaddleOCRVLProcessor(vlm.image_processor, tokenizer, chat_template=CHAT_TEMPLATE)


def save_checkpoint(path, vlm, state=None, optimizer=None, model=None, attach=None):
    """Write `path` atomically: config, model.safetensors, the processor (hf_processor: tokenizer, image
    processor, chat template), state.json, and optimizer.pt (tensors only; loaded back with weights_only=True).
    `attach` {name: folder}: folders that go into the checkpoint as path/name, in the same commit (hard
    links where the file system allows, so a snapshot of a model costs no disk).

    Every rank calls it; rank 0 writes. Under FSDP the full weights and optimizer state are first
    gathered (a collective), so optimizer.pt is keyed by parameter name, not by position.
    """
    model = model or vlm.model
    weights, optim = None, optimizer.state_dict() if optimizer is not None else None
    adapted = getattr(vlm, "lora", None) is not None and model is vlm.model
    gathered = None  # under FSDP: the whole state dict, on rank 0's CPU
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0's CPU
        weights = gathered = get_model_state_dict(model, options=full)
        if model.lm_head.weight is model.get_input_embeddings().weight:  # tied: saved once, as unsharded models are
            weights.pop("lm_head.weight", None)
        optim = get_optimizer_state_dict(model, optimizer, options=full) if optimizer is not None else None
    if not is_main():
        return
    if adapted:  # LoRA (lora.py): the merged plain model, and its adapter beside it in peft's format
        weights = lora.merged_state_dict(model, gathered)
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(model, lite0.Lite0VLForConditionalGeneration):  # stock transformers runs it as remote code
        model.config.auto_map = {"AutoConfig": "modeling_medfact.Lite0VLConfig",
                                 "AutoModelForImageTextToText": "modeling_medfact.Lite0VLForConditionalGeneration"}
    model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
    if adapted:
        lora.save_adapter(vlm, os.path.join(tmp, lora.ADAPTER), gathered)
    if isinstance(model, lite0.Lite0VLForConditionalGeneration):  # the tower's own file, as it is
        shutil.copyfile(lite0.__file__, os.path.join(tmp, "modeling_medfact.py"))
    hf_processor(vlm).save_pretrained(tmp)  # tokenizer (left padding, CHAT_TEMPLATE), processor_config.json
    vlm.image_processor.save_pretrained(tmp)  # preprocessor_config.json, which load() reads
    if optim is not None:
        torch.save(optim, os.path.join(tmp, "optimizer.pt"))
    for name, folder in (attach or {}).items():
        copy_folder(folder, os.path.join(tmp, name))
    if state is not None:
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(state, f, indent=1)
    _commit(tmp, path)


def copy_folder(src, dst):
    """`src` as `dst`: hard links (no disk; every save replaces files, never writes into one), else copies."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:  # another file system, or none that links
            shutil.copy2(a, b)
    shutil.copytree(src, dst, copy_function=link)


def _is_weights(name):
    return name.endswith(".safetensors") or name.endswith(".safetensors.index.json")


def _commit(tmp, path):
    """Move a finished save from `tmp` to `path`. A new folder: one rename, the commit point. A folder that
    holds other things (a run's --out: metrics, checkpoints/): the old model is first made unloadable (its
    state.json, then its weights, then its LoRA adapter removed), then the new files move in, the weights after the rest (shards
    before their index) and state.json last. A kill at any point leaves the old model, the new one, or a
    folder load() refuses in one line ("no *.safetensors weights"): never a mix of two runs' files."""
    if not os.path.exists(path):
        os.replace(tmp, path)
        return
    old = sorted((n for n in os.listdir(path) if n == "state.json" or _is_weights(n)),
                 key=lambda n: n != "state.json")  # state.json first: the old model is no longer complete
    for name in old:
        os.remove(os.path.join(path, name))
    shutil.rmtree(os.path.join(path, lora.ADAPTER), ignore_errors=True)  # the old model's LoRA adapter, if any
    new = sorted(os.listdir(tmp), key=lambda n: (n == "state.json", _is_weights(n), n.endswith(".index.json")))
    for name in new:
        os.replace(os.path.join(tmp, name), os.path.join(path, name))
    os.rmdir(tmp)


def checkpoints(out):
    """The complete `out/checkpoints/step_N` folders, newest first (ignores *.tmp and *.bad)."""
    root = os.path.join(out, "checkpoints")
    steps = [d for d in os.listdir(root) if d.startswith("step_") and d[5:].isdigit()] if os.path.isdir(root) else []
    steps = [d for d in steps if os.path.exists(os.path.join(root, d, "state.json"))]
    return [os.path.join(root, d) for d in sorted(steps, key=lambda d: -int(d[5:]))]


def latest_checkpoint(out):
    """The newest complete `out/checkpoints/step_N`, or None."""
    return (checkpoints(out) or [None])[0]


def resume_from(out):
    """--resume: the checkpoint to continue from. Nothing to resume is a one-line SetupError, raised before
    anything in `out` is touched (a run that went on from step 0 would overwrite a finished run's model)."""
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise CheckpointNotFound(f"--resume: nothing to resume in {out} (no complete checkpoints/step_N; "
                                 f"--save_every writes them); run without --resume to start afresh")
    return ckpt


def remove_checkpoints(out):
    """A fresh run (no --resume) in a folder that holds another run's step checkpoints removes them: a later
    --resume must never continue the other run. Rank 0, just before step 1."""
    root = os.path.join(out, "checkpoints")
    if os.path.isdir(root) and os.listdir(root):
        print0(f"fresh run: removing the step checkpoints of an earlier run in {root}")
        shutil.rmtree(root)


def save_step_checkpoint(out, step, vlm, state, optimizer, model=None, keep=2, attach=None):
    """out/checkpoints/step_N, atomically; older ones beyond `keep` are deleted after it exists."""
    root = os.path.join(out, "checkpoints")
    os.makedirs(root, exist_ok=True)
    save_checkpoint(os.path.join(root, f"step_{step:07d}"), vlm, state, optimizer, model, attach)
    if not is_main():
        return
    done = sorted(d for d in os.listdir(root) if d.startswith("step_") and d[5:].isdigit())
    for d in done[:-keep]:  # renamed first, so a kill mid-delete never leaves a step_N that looks complete
        shutil.rmtree(os.path.join(root, d) + ".tmp", ignore_errors=True)
        os.replace(os.path.join(root, d), os.path.join(root, d) + ".tmp")
        shutil.rmtree(os.path.join(root, d) + ".tmp", ignore_errors=True)


class TrainingStopped(RuntimeError):
    """The run stopped itself (StepGuard): the message is one line, naming the last good checkpoint."""


class StepGuard:
    """The training loop's guard against numerical trouble; sft.py and grpo.py ask it about every step.

    check(step, loss, grad_norm) flags a step "non-finite" (a NaN or inf loss or gradient norm: the caller
    skips the update) or "spike" (the loss or the gradient norm over SPIKE times the median of the last
    WINDOW unflagged steps, once there are MIN_STEPS of them, and over FLOOR: a loss under 0.1 nats a token
    or a gradient norm under 1 is no blow-up, whatever its ratio to a median near zero, as a memorising
    SFT's is; the update stands, its gradient was clipped), or returns None. `clean` is False while
    flagged steps run on: no checkpoint is saved then. After max_bad flagged steps in a row, stop() raises, naming the last good checkpoint (last_good_checkpoint);
    the ones saved after the trouble began become step_N.bad, so --resume starts from the good one.
    state() goes into each checkpoint's state.json, so a resumed run flags the same steps.
    """
    SPIKE, WINDOW, MIN_STEPS = 10.0, 20, 5
    FLOOR = {"loss": 0.1, "grad_norm": 1.0}

    def __init__(self, max_bad, state=None):
        self.max_bad = max_bad
        self.recent = {"loss": [], "grad_norm": [], **(state or {})}  # values of the last unflagged steps
        self.streak = []  # the flagged steps in a row, up to now

    def state(self):
        return {k: list(v) for k, v in self.recent.items()}

    @property
    def clean(self):
        return not self.streak

    def check(self, step, loss=None, grad_norm=None):
        values = {k: v for k, v in (("loss", loss), ("grad_norm", grad_norm)) if v is not None}
        flag = None
        if not all(math.isfinite(v) for v in values.values()):
            flag = "non-finite"
        elif any(len(self.recent[k]) >= self.MIN_STEPS and v > max(self.SPIKE * statistics.median(self.recent[k]),
                                                                 self.FLOOR[k]) for k, v in values.items()):
            flag = "spike"
        if flag:
            self.streak.append(step)
        else:
            self.streak = []
            for k, v in values.items():
                if v > 0:  # GRPO's gradient is 0 when no group has reward spread: no signal about its scale
                    self.recent[k] = (self.recent[k] + [v])[-self.WINDOW:]
        return flag

    def stop(self, out):
        """Raise TrainingStopped after max_bad flagged steps in a row; else nothing."""
        if len(self.streak) < self.max_bad:
            return
        good, aside = last_good_checkpoint(out, self.streak[0])
        raise TrainingStopped(
            f"{len(self.streak)} bad steps in a row (non-finite or spike, steps {self.streak[0]}-{self.streak[-1]}); "
            f"stopping. Last good checkpoint: {good}"
            + (f" (set aside as *.bad, the step after each flagged or its weights not finite: "
               f"{', '.join(os.path.basename(a) for a in aside)})" if aside else "") + ". Lower --lr and --resume.")


def _finite_weights(folder):
    """Whether every tensor of a checkpoint's safetensors is finite (read one tensor at a time)."""
    from safetensors import safe_open
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                if not all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys()):
                    return False
    return True


def last_good_checkpoint(out, trouble):
    """(the last good checkpoint or None, the ones set aside) when trouble began at step `trouble` (its
    first flagged step). A checkpoint of step N holds the weights after update N, first used at step N + 1:
    it is good if step N + 1 came before the trouble (N <= trouble - 2) and its weights are all finite. The
    newer ones are renamed step_N.bad on rank 0. A flagged step saves none, so only the checkpoint of step
    trouble - 1 can be set aside for its step (and any with non-finite weights): keep=2 still holds one
    from before it. Under torchrun rank 0 alone reads the weights and renames; the others get its answer."""
    good, aside = None, []
    if is_main():
        for ckpt in checkpoints(out):
            if good is None and int(os.path.basename(ckpt)[5:]) <= trouble - 2 and _finite_weights(ckpt):
                good = ckpt
            elif good is None:
                aside.append(ckpt)
        for ckpt in aside:
            shutil.rmtree(ckpt + ".bad", ignore_errors=True)
            os.replace(ckpt, ckpt + ".bad")
    if dist.is_initialized() and dist.get_world_size() > 1:
        answer = [(good, aside)]
        dist.broadcast_object_list(answer, src=0)
        good, aside = answer[0]
    return good, aside


def load_state(path):
    try:
        with open(os.path.join(path, "state.json")) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise SetupError(f"{path}/state.json: cannot read ({type(e).__name__}: {e})") from None


def _read_optimizer(path):
    """optimizer.pt, tensors only: weights_only=True never unpickles code; anything else is one line."""
    try:
        return torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code (UnpicklingError), a torn file (RuntimeError), ...
        raise SetupError(f"{path}/optimizer.pt: cannot load it as tensors ({type(e).__name__}: "
                         f"{str(e).strip()[:200]}); delete that checkpoint to resume from an older one") from e


def load_optimizer(path, optimizer, model=None):
    """Restore optimizer.pt (_read_optimizer). Collective under FSDP."""
    if model is not None and is_sharded(model):  # rank 0 reads the full state, FSDP scatters each rank's shard
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        sd = _read_optimizer(path) if is_main() else {}
        # strict=False: AdamW makes a parameter's state at its first gradient, so one the forward never uses
        # (SigLIP's unused pooling head in some families) has none, as the unsharded load_state_dict allows
        set_optimizer_state_dict(model, optimizer, sd, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True, strict=False))
        return
    optimizer.load_state_dict(_read_optimizer(path))


def resume_or_start(args, ckpt, optimizer, model):
    """The step to start from and the step guard: the checkpoint's with --resume (the optimizer restored
    too), else 0. A fresh run owns args.out (the step checkpoints an earlier run left are removed);
    args.json is written. The stage cuts its own logs to the steps before `start` (data.truncate_jsonl)."""
    start, guard = 0, StepGuard(args.max_bad_steps)
    if ckpt:
        load_optimizer(ckpt, optimizer, model)
        state = load_state(ckpt)
        start, guard = state["step"], StepGuard(args.max_bad_steps, state.get("guard"))
        print0(f"resumed from {ckpt} at step {start}")
    if is_main():
        if not ckpt:
            remove_checkpoints(args.out)
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
    return start, guard


def check_checkpoint(name):
    """A checkpoint folder's problems as one line, before transformers reads it: not a folder, no config.json,
    no safetensors weights, or a *.safetensors.index.json naming anything but a .safetensors file beside it
    (transformers would load a pytorch_model.bin it names with torch.load). A hub name: its index, when it
    has one and the hub answers; a model without one has a single model.safetensors."""
    indexes = []
    if os.path.isdir(name):
        files = os.listdir(name)
        if "config.json" not in files:
            raise CheckpointNotFound(f"{name}: not a model folder (no config.json)")
        if not any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in files):
            raise CheckpointNotFound(f"{name}: no *.safetensors weights in the checkpoint folder "
                                     f"(only safetensors are loaded, never pickle)")
        indexes = [os.path.join(name, f) for f in files if f.endswith(".safetensors.index.json")]
    elif os.path.exists(name):
        raise CheckpointNotFound(f"{name}: is a file, not a checkpoint folder")
    elif name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointNotFound(f"{name}: no such checkpoint folder")
    else:
        try:
            from huggingface_hub import hf_hub_download
            indexes = [hf_hub_download(name, "model.safetensors.index.json")]
        except Exception:  # no index (one model.safetensors), or no hub: from_pretrained says which
            pass
    for index in indexes:
        try:
            with open(index) as f:
                shards = set(json.load(f)["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise SetupError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        bad = sorted(repr(f) for f in shards if not isinstance(f, str) or not f.endswith(".safetensors")
                     or os.path.basename(f) != f)
        if bad:
            raise SetupError(f"{index}: names {bad[0]}, not a .safetensors file beside it; only safetensors "
                             f"weights are loaded, never pickle")
