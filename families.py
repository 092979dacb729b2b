"""
families.py: the prompt format and the VLM families medfact runs: each family's chat template, stock
processor, vision tower and text model, in one table (FAMILIES).

One generic path: prompts through the family's processor (a stock transformers class that needs no
torchvision); the image features from the model's own get_image_features, handed back to its own model.model
forward (so Qwen3-VL's DeepStack features and Gemma 3's bidirectional image attention stay inside
transformers); then lm_head. What differs per family is the short table below. Qwen2-VL and Qwen2.5-VL keep
the path they had (prompts from chat_prompt, features scattered by model.py), which gives the same numbers.
"""

import copy
import json

import lite0
from common import SetupError
from lite0 import Lite0Tower

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
# families


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


def model_class(config):
    """The family's AutoModelForImageTextToText class (Qwen2_5_VLForConditionalGeneration, Gemma3For..., ...)."""
    from transformers import AutoModelForImageTextToText
    return AutoModelForImageTextToText._model_mapping[type(config)]


def qwen2_path(config):
    """Qwen2-VL, Qwen2.5-VL (and tiny, tiny-lite0): the path they always had, prompts from chat_prompt and the
    image features scattered here; every other family takes the generic path."""
    return config.model_type in ("qwen2_vl", "qwen2_5_vl", "medfact_lite0_vl")


lite0.register()  # tiny-lite0's classes in transformers' Auto classes: medfact's own loads need no remote code
