"""
lora.py: LoRA adapters through peft (--lora R on sft.py and grpo.py): which layers get them, the policy with
them and without them (GRPO's reference), their weights merged (for engine.py's rollouts and the plain
checkpoint), and the adapter folder in peft's own format.

- apply(vlm, args, base): peft's get_peft_model on vlm.model, in place. vlm.model stays the same Hugging Face
  model (every forward in model.py runs unchanged), its targeted linear layers become LoRA layers, every other
  weight is frozen; vlm.lora is the PeftModel (disable_adapter, save_pretrained). Fresh adapters: A drawn from
  --seed, B zero, so the model starts exactly as its base; a resumed run loads its checkpoint's adapter.
- targets: by default every linear layer of the language model's decoder layers (q/k/v/o/gate/up/down; Qwen3.5's
  linear-attention projections too), the vision tower left out (--lora_vision: its linear layers too).
- the reference under LoRA is the policy itself with its adapters off (as_reference: peft's disable_adapter),
  so no second copy of the weights, and the KL is to the exact starting model (the base is frozen).
- merged_weight(linear): what a LoRA layer computes with, W + B A * alpha / r (peft's get_delta_weight).
  engine.py reads q_proj.weight, up_proj.weight, ... directly; under peft those are the BASE weights, so it
  merges through this, or its rollouts would silently come from the reference.
- checkpoints (checkpoint.save_checkpoint): a LoRA run's folder is the merged plain model, which stock
  transformers runs without peft, plus ADAPTER/ in peft's format, which stock
  PeftModel.from_pretrained(base, folder/adapter) loads; model.load takes either (an adapter folder: its base,
  named in adapter_config.json, with the adapter merged in). Step checkpoints carry both, and resume reads the
  adapter (exact, as the merged weights are rounded). An adapter folder alone becomes a plain one with
  `python model.py runs/x/adapter --save runs/x_merged`.

With --fsdp the adapters are sharded with their layers (FSDP2 holds frozen and trainable weights in one group);
a save gathers the whole state dict first and merges and writes from it (merged_state_dict(model, state),
save_adapter(vlm, folder, state)). engine.py does not run under --fsdp. peft is optional: `pip install peft`
(requirements-test.txt has it); without --lora nothing here runs.
"""

import contextlib
import json
import os
import warnings

import torch

import scratch
from common import SetupError
from families import text_model, vision_tower

ADAPTER = "adapter"  # the subfolder of a checkpoint that holds its adapter, in peft's format


def add_args(parser):
    """The LoRA flags, one block in a stage's argparse."""
    parser.add_argument("--lora", type=int, default=0, metavar="R",
                        help="train LoRA adapters of rank R (through peft) instead of every weight (0: off)")
    parser.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default 2 R: scale alpha / R = 2)")
    parser.add_argument("--lora_dropout", type=float, default=0.0,
                        help="dropout on the adapters' input (default 0; grpo.py turns dropout off)")
    parser.add_argument("--lora_targets", default=None,
                        help="comma-separated layer names in the language model, e.g. q_proj,v_proj (default: "
                             "all its decoder layers' linear layers: q/k/v/o/gate/up/down)")
    parser.add_argument("--lora_vision", action="store_true", help="adapters on the vision tower's linear layers too")


def _peft():
    try:
        import peft
    except ImportError:
        raise SetupError("--lora needs peft: pip install peft") from None
    return peft


def targets(model, names=None, vision=False):
    """Full names of the layers that get adapters: the linear layers of the language model's decoder layers
    (those whose own name is in `names`, when given), and with `vision` every linear layer of the vision tower."""
    def linears(root):
        return {id(m) for m in root.modules() if isinstance(m, torch.nn.Linear)}
    text, tower = linears(text_model(model).layers), linears(vision_tower(model)) if vision else set()
    found = [n for n, m in model.named_modules() if id(m) in text and (not names or n.rsplit(".", 1)[-1] in names)]
    missing = set(names or ()) - {n.rsplit(".", 1)[-1] for n in found}
    if missing or not found:
        have = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if id(m) in text})
        raise SetupError(f"--lora_targets: no linear layer named {', '.join(sorted(missing)) or names} in the "
                         f"language model (its linear layers: {', '.join(have)})")
    return found + [n for n, m in model.named_modules() if id(m) in tower]


def apply(vlm, args, base, resume=None):
    """--lora R: adapters on vlm.model in place (vlm.lora: the PeftModel). `base`: the checkpoint the run
    starts from, named in the adapter's config (None: a model built in memory, for benchmarks); `resume`: a
    step checkpoint whose adapter is loaded. Without --lora, nothing."""
    if not args.lora:
        return vlm
    if base is not None and scratch.from_scratch(base):
        raise SetupError(f"--lora adapts a trained checkpoint; {base} is built from scratch with random weights: "
                         f"train it fully (drop --lora), or save it and pass its folder")
    if args.lora_vision and args.freeze_vision:
        raise SetupError("--lora_vision puts adapters on the vision tower, --freeze_vision freezes it: pick one")
    if getattr(args, "train_cnn_blocks", 0):
        raise SetupError("--train_cnn_blocks trains CNN weights fully: not with --lora")
    peft = _peft()
    names = args.lora_targets.split(",") if args.lora_targets else None
    config = peft.LoraConfig(r=args.lora, lora_alpha=args.lora_alpha or 2 * args.lora, lora_dropout=args.lora_dropout,
                             target_modules=targets(vlm.model, names, args.lora_vision))
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(args.seed)  # A's initial values: the same on every rank, whatever ran before
        warnings.simplefilter("ignore", FutureWarning)  # peft asks transformers a deprecated question
        vlm.lora = peft.get_peft_model(vlm.model, config)
    # the adapter names its base: a folder by its absolute path (loaded from any working directory), else the name
    vlm.lora.peft_config["default"].base_model_name_or_path = os.path.abspath(base) if os.path.isdir(base or "") else base
    if resume:
        from peft.utils import load_peft_weights
        loaded = peft.set_peft_model_state_dict(vlm.lora, load_peft_weights(os.path.join(resume, ADAPTER)))
        if loaded.unexpected_keys or any("lora_" in k for k in loaded.missing_keys):
            raise SetupError(f"{resume}/{ADAPTER}: not this run's adapter (other layers or --lora_targets)")
    return vlm


def as_reference(vlm, model):
    """The context in which `model` computes GRPO's reference log-probs: under LoRA the reference is the policy
    itself (model is vlm.model) with its adapters off; otherwise `model` is a frozen copy and nothing changes."""
    if getattr(vlm, "lora", None) is not None and model is vlm.model:
        return vlm.lora.disable_adapter()
    return contextlib.nullcontext()


def merged_weight(linear, w=None, delta=None):
    """The weight `linear` computes with: its own parameter, or for a LoRA layer its base weight plus each active
    adapter's B A * alpha / r (peft's get_delta_weight, as peft's merge adds it), a new tensor in the base's
    dtype; the base weight alone while its adapters are off. `w`, `delta(adapter)`: the base weight and the
    deltas from elsewhere (merged_state_dict's gathered tensors)."""
    if not hasattr(linear, "lora_A"):
        return linear.weight
    w, delta = (linear.get_base_layer().weight, linear.get_delta_weight) if w is None else (w, delta)
    if linear.disable_adapters or linear.merged:
        return w
    deltas = [delta(a) for a in linear.active_adapters if a in linear.lora_A]
    return (w + sum(deltas)).to(w.dtype).detach() if deltas else w


def merged_state_dict(model, state=None):
    """The weights of the plain model LoRA makes, under the names it has without peft (...q_proj.weight, not
    ...q_proj.base_layer.weight): each LoRA layer's merged_weight, every other tensor as it is (no copy).
    `state`: the whole state dict of an FSDP-sharded `model`, gathered (its own tensors are shards): each LoRA
    layer is then merged from that, B A in fp32 (as get_delta_weight computes it on the CPU; --fsdp is fp32)."""
    gathered = state is not None
    state = state if gathered else model.state_dict()
    weights = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    for name, m in model.named_modules():
        if hasattr(m, "lora_A"):
            weights[name + ".weight"] = merged_weight(m, state[name + ".base_layer.weight"],
                                                      _delta(state, name, m)) if gathered else merged_weight(m)
    return weights


def _delta(state, name, layer):
    """delta(adapter) of the LoRA layer `name` from a gathered state dict: B A * alpha / r, in fp32."""
    return lambda a: state[f"{name}.lora_B.{a}.weight"].float() @ state[f"{name}.lora_A.{a}.weight"].float() \
        * layer.scaling[a]


def save_adapter(vlm, folder, state=None):
    """The adapter in peft's own format: adapter_config.json (naming its base) and adapter_model.safetensors.
    `state`: the gathered state dict of an FSDP-sharded model (peft reads the adapter's tensors from it)."""
    if state is not None:  # peft's names are the PeftModel's: base_model.model. + the model's own
        state = {"base_model.model." + k: v for k, v in state.items() if ".lora_" in k}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes about the base model's files
        vlm.lora.save_pretrained(folder, save_embedding_layers=False, state_dict=state)


def attached(folder):
    """{ADAPTER: its path} when the checkpoint `folder` holds an adapter, else None (save_checkpoint's attach)."""
    path = os.path.join(folder, ADAPTER)
    return {ADAPTER: path} if os.path.isdir(path) else None


def is_adapter(path):
    return isinstance(path, str) and os.path.isfile(os.path.join(path, "adapter_config.json"))


def base_of(folder):
    """The base an adapter folder names (its adapter_config.json's base_model_name_or_path)."""
    try:
        with open(os.path.join(folder, "adapter_config.json")) as f:
            return json.load(f)["base_model_name_or_path"]
    except (OSError, ValueError, KeyError) as e:
        raise SetupError(f"{folder}/adapter_config.json: cannot read its base ({type(e).__name__}: {e})") from None


def merge_into(vlm, folder):
    """The adapter in `folder` merged into vlm.model's weights (stock peft: PeftModel.from_pretrained, then
    merge_and_unload): vlm then holds the plain model, the same weights as the merged folder saved beside it."""
    peft = _peft()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft asks transformers a deprecated question
        vlm.model = peft.PeftModel.from_pretrained(vlm.model, folder).merge_and_unload()
    return vlm
