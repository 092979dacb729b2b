"""
model.py: what a reader of a stage needs about the model: the VLM wrapper and its prompt encoder, load(),
the forward pieces, seeded batched sampling with a KV cache, and per-token log-probabilities.

- load: Qwen2-VL / Qwen2.5-VL checkpoints and every other family in families.FAMILIES (a local folder or a
  hub name), or a model built from scratch (scratch.py: `tiny`, `tiny-lite0`, `random:qwen2.5-vl-3b`, ...)
- prompts: (image, question) -> chat-formatted token ids, the image placeholder expanded to the number of
  tokens the vision tower produces (built from the image processor and the tokenizer directly, so
  torchvision, which the transformers video processor needs, is not required)
- sample / generate: G completions per prompt; completion_logps: their per-token log-probs

Everything here works on CPU; on CUDA the same code runs in bf16. Checkpoints are checkpoint.py's, the
family table families.py's, process setup common.py's, FSDP fsdp.py's.

Sampling noise is a counter-based hash of (row seed, position, token id), not a stateful RNG:
a completion depends only on its own seed, never on which rank or batch it was sampled in, so
a resumed run, or the same run on 2 processes, samples exactly the same completions.

Usage from Python:
    vlm = load("tiny", texts=corpus)                  # or a checkpoint folder / hub name
    batch = vlm.encode(images, questions)             # left-padded prompts, pixel values
    out = sample(vlm, batch, group_size=6, max_new_tokens=128, temperature=1.0, seeds=seeds)
    logps = completion_logps(vlm, batch, out["tokens"], group_size=6)   # (N, T)
"""

import os

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint as recompute

import lora
import scratch
from checkpoint import check_checkpoint
from common import SetupError, default_dtype
from families import (FAMILIES, INSTRUCTION, build_processor, chat_prompt, family, model_class,
                      qwen2_path)
from fsdp import fsdp_forward, is_sharded
from lite0 import Lite0VLForConditionalGeneration

# -----------------------------------------------------------------------------
# the model wrapper


class VLM:
    """A Qwen-VL model with its tokenizer and image processor, and the prompt encoder."""

    def __init__(self, model, tokenizer, image_processor, name):
        self.model, self.tokenizer, self.image_processor, self.name = model, tokenizer, image_processor, name
        self.lora = None  # lora.py: the PeftModel around `model` when it trains LoRA adapters (--lora)
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


def load(name, device="cpu", dtype=None, texts=None, max_pixels=None, trust_remote_code=False, seed=0):
    """Load a model by name: 'tiny', 'tiny-lite0', a tiny random model of another family
    (scratch.TINY_FAMILIES: 'tiny-qwen3-vl', 'tiny-smolvlm', ...), a published architecture with random weights
    ('random:qwen2.5-vl-3b', 'random:qwen3-vl-2b', 'random:smolvlm2-256m', ...), a folder or a hub name of any
    family in families.FAMILIES, or a LoRA adapter folder (peft's format: its base with the adapter merged in).

    `texts` trains the tokenizer of a model built from scratch (scratch.build), and only there: a list of
    strings, or a function that returns one (called only when such a model is built; the stages pass
    data.tokenizer_texts, the demo's). `seed` draws a from-scratch model's initial weights.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    dtype = dtype or default_dtype(device)
    if max_pixels is not None and max_pixels < 0:
        raise SetupError(f"--max_pixels {max_pixels}: must be positive")
    if lora.is_adapter(name):  # the base it names, then the adapter merged into its weights
        return lora.merge_into(load(lora.base_of(name), device, dtype, texts, max_pixels, trust_remote_code, seed), name)
    if scratch.from_scratch(name):
        model, tokenizer, image_processor = scratch.build(name, texts, device, dtype, seed)
    else:
        check_checkpoint(name)  # one line, before transformers reads anything
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
    out = [recompute(_chunk_logps, hc, tc, weight, temperature, use_reentrant=False) if grad
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


def count_params(model):
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    # smoke: python model.py [name]  -> parameter count (meta device for the published sizes)
    # merge: python model.py runs/x/adapter --save runs/x_merged  -> a LoRA adapter and its base as one plain folder
    import argparse
    parser = argparse.ArgumentParser(description="Load or build a model and print its parameter count.")
    parser.add_argument("name", nargs="?", default="tiny",
                        help="tiny | random:qwen2.5-vl-3b | random:qwen2-vl-2b (built on the meta device, "
                             "no weights) | a checkpoint folder | a LoRA adapter folder | a hub name (default: tiny)")
    parser.add_argument("--save", default=None, help="write the loaded model there, a plain Hugging Face folder "
                                                     "(an adapter folder: its base with the adapter merged in)")
    cli = parser.parse_args()
    name = cli.name
    dev = "meta" if name.startswith("random:") and not cli.save else "cpu"
    vlm = load(name, device=dev, texts=[INSTRUCTION])  # a from-scratch tokenizer from the prompt alone: a smoke
    print(f"{name}: {count_params(vlm.model) / 1e6:.2f} M parameters")
    if cli.save:
        from checkpoint import save_checkpoint
        save_checkpoint(cli.save, vlm, {"step": 0, "from": name})
        print(f"saved {cli.save}")
