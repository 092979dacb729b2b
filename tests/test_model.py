"""model.py: prompts, sampling, log-probs, checkpoints. Tiny models built in-process, CPU, offline."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import common
import model as M

TEXTS = ["Is there a pleural effusion? <think>The image shows fluid at the left base.</think><answer>yes</answer>",
         "Which side is the pneumothorax on? <think>A dark rim without lung markings.</think><answer>left</answer>",
         "How many nodules are there? nodule cardiomegaly heart lung upper middle lower right"] * 30


@pytest.fixture(scope="module")
def vlm():
    return M.load("tiny", texts=TEXTS)


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((112, 112)) * 255).astype("uint8")) for _ in range(n)]


QUESTIONS = ["Is there a pleural effusion?", "Which side?", "How many nodules are there in the left lung?"]


def full_forward_logps(vlm, batch, tokens, G):
    """The plain reference: transformers' own forward, full-vocabulary log_softmax, gather."""
    ids = torch.cat([batch["input_ids"].repeat_interleave(G, 0), tokens], 1)
    attn = torch.cat([batch["attention_mask"].repeat_interleave(G, 0), torch.ones_like(tokens)], 1)
    P = batch["input_ids"].size(0)
    pv = batch["pixel_values"].view(P, -1, batch["pixel_values"].size(-1)).repeat_interleave(G, 0).flatten(0, 1)
    grid = batch["image_grid_thw"].repeat_interleave(G, 0)
    out = vlm.model(input_ids=ids, attention_mask=attn, pixel_values=pv, image_grid_thw=grid,
                    mm_token_type_ids=(ids == vlm.image_token_id).int())
    L = batch["input_ids"].size(1)
    return torch.log_softmax(out.logits[:, L - 1:-1].float(), -1).gather(-1, tokens[..., None]).squeeze(-1)


def clean(vlm, tokens):
    # a random model may emit <|image_pad|>; the HF reference forward would treat it as an image slot
    tokens = tokens.clone()
    tokens[tokens == vlm.image_token_id] = vlm.eos_id
    return tokens


def test_image_token_count_matches_vision_tower(vlm):
    batch = vlm.encode(images(2), QUESTIONS[:2])
    n_placeholders = (batch["input_ids"] == vlm.image_token_id).sum().item()
    feats = M.image_features(vlm.model, batch["pixel_values"], batch["image_grid_thw"])
    assert feats.shape[0] == n_placeholders == 2 * 16  # 112x112 -> 8x8 patches -> 2x2 merge -> 16 tokens


def test_left_padding_and_prompt_format(vlm):
    batch = vlm.encode(images(3), QUESTIONS)
    ids, attn = batch["input_ids"], batch["attention_mask"]
    assert (attn[:, -1] == 1).all() and (attn[0] == 0).any()  # ends aligned, the short prompts padded left
    text = vlm.tokenizer.decode(ids[2][attn[2].bool()])
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert "<think> </think>" in text and QUESTIONS[2] in text


def test_sampling_is_deterministic_per_seed(vlm):
    batch = vlm.encode(images(3), QUESTIONS)
    seeds = M.rollout_seeds(0, 0, [0, 1, 2], 4)
    a = M.sample(vlm, batch, 4, 12, 1.0, seeds)
    b = M.sample(vlm, batch, 4, 12, 1.0, seeds)
    c = M.sample(vlm, batch, 4, 12, 1.0, seeds + 1)
    assert torch.equal(a["tokens"], b["tokens"])
    assert not torch.equal(a["tokens"], c["tokens"])
    assert a["tokens"].shape[0] == 12  # P * G


def test_a_completion_depends_only_on_its_own_seed(vlm):
    """Rank/batch invariance: prompt 2 sampled alone equals prompt 2 sampled in a batch of 3."""
    ims = images(3)
    seeds = M.rollout_seeds(7, 3, [0, 1, 2], 2)
    full = M.sample(vlm, vlm.encode(ims, QUESTIONS), 2, 12, 1.0, seeds)
    alone = M.sample(vlm, vlm.encode(ims[2:], QUESTIONS[2:]), 2, 12, 1.0, seeds[4:])
    T = alone["tokens"].size(1)
    assert torch.equal(full["tokens"][4:, :T], alone["tokens"])


def test_gumbel_sampling_matches_the_softmax():
    """Gumbel-max with the hash noise draws from softmax(logits / T)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    T, n = 0.7, 20000
    seeds = torch.arange(n)
    draws = (logits / T + M.gumbel_noise(seeds, 0, 4, "cpu")).argmax(-1)
    freq = torch.bincount(draws, minlength=4).float() / n
    assert torch.allclose(freq, torch.softmax(logits[0] / T, -1), atol=0.01)


def test_eos_mask_keeps_tokens_through_first_eos():
    eos = 9
    tokens = torch.tensor([[5, 6, 9, 0, 0], [5, 9, 9, 9, 9], [1, 2, 3, 4, 5], [9, 1, 2, 9, 0]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert torch.equal(M.completion_mask(tokens, eos), expected)
    # pad == eos: the padding after the first EOS is masked, the EOS itself kept
    assert torch.equal(M.completion_mask(torch.tensor([[3, 9, 9, 9]]), 9), torch.tensor([[1, 1, 0, 0]]))


def test_sample_stops_at_eos_and_pads_after(vlm):
    batch = vlm.encode(images(2), QUESTIONS[:2])
    # force EOS to be likely by biasing the lm_head row of <|im_end|>
    with torch.no_grad():
        saved = vlm.model.lm_head.weight[vlm.eos_id].clone()
        vlm.model.lm_head.weight[vlm.eos_id] += 0.5 * vlm.model.lm_head.weight.std() * 20
    try:
        out = M.sample(vlm, batch, 3, 30, 1.0, M.rollout_seeds(0, 0, [0, 1], 3))
    finally:
        with torch.no_grad():
            vlm.model.lm_head.weight[vlm.eos_id] = saved
    tok, mask = out["tokens"], out["mask"]
    for row, m in zip(tok, mask):
        n = int(m.sum())
        if n < tok.size(1):
            assert row[n - 1] == vlm.eos_id and (row[n:] == vlm.pad_id).all()


def test_efficient_logps_equal_full_vocab_log_softmax(vlm):
    batch = vlm.encode(images(3), QUESTIONS)
    out = M.sample(vlm, batch, 2, 15, 1.0, M.rollout_seeds(1, 0, [0, 1, 2], 2))
    tokens = clean(vlm, out["tokens"])
    ours = M.completion_logps(vlm, batch, tokens, 2)
    ref = full_forward_logps(vlm, batch, tokens, 2)
    assert torch.allclose(ours, ref, atol=1e-4)
    # at a temperature: log_softmax(logits / T)
    ours_t = M.completion_logps(vlm, batch, tokens, 2, temperature=0.5)
    assert not torch.allclose(ours_t, ours)
    # chunking does not change the result
    hs = torch.randn(2, 7, vlm.model.config.text_config.hidden_size)
    t = torch.randint(0, 50, (2, 7))
    assert torch.allclose(M.token_logps(vlm.model, hs, t, chunk=3), M.token_logps(vlm.model, hs, t, chunk=1000),
                          atol=1e-5)


def test_selected_prompts_score_as_in_the_full_batch(vlm):
    # grpo.py trains only some groups: their prompts, picked out of the batch (images included),
    # must give the completions the same log-probs as the full batch does
    batch = vlm.encode(images(3), QUESTIONS)
    out = M.sample(vlm, batch, 2, 12, 1.0, M.rollout_seeds(2, 0, [0, 1, 2], 2))
    tokens = clean(vlm, out["tokens"])
    full = M.completion_logps(vlm, batch, tokens, 2)
    picked = M.select_prompts(batch, [2, 0])
    assert picked["pixel_values"].shape[0] == 2 * batch["pixel_values"].shape[0] // 3
    part = M.completion_logps(vlm, picked, tokens[[4, 5, 0, 1]], 2)
    assert torch.allclose(part, full[[4, 5, 0, 1]], atol=1e-5)


def test_cached_decoding_follows_the_full_forward(vlm):
    """Greedy tokens from the KV-cache loop are the argmax of a full (teacher-forced) forward."""
    batch = vlm.encode(images(3), QUESTIONS)
    out = M.sample(vlm, batch, 1, 10, 0.0)
    tokens = clean(vlm, out["tokens"])
    if not torch.equal(tokens, out["tokens"]):
        pytest.skip("random model emitted an image token")
    ids = torch.cat([batch["input_ids"], tokens], 1)
    attn = torch.cat([batch["attention_mask"], torch.ones_like(tokens)], 1)
    logits = vlm.model(input_ids=ids, attention_mask=attn, pixel_values=batch["pixel_values"],
                       image_grid_thw=batch["image_grid_thw"],
                       mm_token_type_ids=(ids == vlm.image_token_id).int()).logits
    L = batch["input_ids"].size(1)
    greedy = logits[:, L - 1:-1].argmax(-1)
    m = out["mask"].bool()
    assert torch.equal(greedy[m], tokens[m])


def test_logps_carry_gradient_and_a_step_changes_the_model(vlm):
    import copy
    v = copy.copy(vlm)
    v.model = copy.deepcopy(vlm.model)
    batch = v.encode(images(2), QUESTIONS[:2])
    target = v.tokenizer(["<think>fluid</think><answer>yes</answer><|im_end|>"] * 2,
                         add_special_tokens=False, return_tensors="pt").input_ids
    opt = torch.optim.AdamW(v.model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = -M.completion_logps(v, batch, target).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    vis = v.model.model.visual.patch_embed.proj.weight
    assert not torch.equal(vis, vlm.model.model.visual.patch_embed.proj.weight)  # gradient reached the vision tower


def test_grad_clip_zero_means_no_clipping():
    # sft.py and grpo.py clip with common.clip_grad_norm(params, --grad_clip): 0 must leave the gradients
    # alone (torch's clip_grad_norm_(params, 0) multiplies them by 0) and still report their norm
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((3, 4), (5,), (2,))]
    grads = [torch.randn_like(p) for p in params[:2]]  # the last one has no gradient
    for p, g in zip(params, grads):
        p.grad = g.clone()
    norm = torch.cat([g.reshape(-1) for g in grads]).norm()
    assert torch.allclose(common.clip_grad_norm(params, 0.0), norm)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    # a positive max_norm still clips, and returns the norm before clipping
    assert torch.allclose(common.clip_grad_norm(params, 0.5 * norm.item()), norm)
    assert all(torch.allclose(p.grad, g * 0.5, rtol=1e-5) for p, g in zip(params, grads))


def test_save_load_round_trip(vlm, tmp_path):
    path = str(tmp_path / "ckpt")
    checkpoint.save_checkpoint(path, vlm, state={"step": 3})
    assert os.path.exists(os.path.join(path, "model.safetensors")) and checkpoint.load_state(path)["step"] == 3
    assert not os.path.exists(path + ".tmp")
    again = M.load(path)
    batch = vlm.encode(images(2), QUESTIONS[:2])
    batch2 = again.encode(images(2), QUESTIONS[:2])
    assert torch.equal(batch["input_ids"], batch2["input_ids"])
    seeds = M.rollout_seeds(0, 0, [0, 1], 2)
    a, b = M.sample(vlm, batch, 2, 10, 1.0, seeds), M.sample(again, batch2, 2, 10, 1.0, seeds)
    assert torch.equal(a["tokens"], b["tokens"])
    # transformers loads the folder by itself
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    assert torch.equal(hf.lm_head.weight, vlm.model.lm_head.weight)
    assert AutoTokenizer.from_pretrained(path)("<think>")["input_ids"] == vlm.tokenizer("<think>")["input_ids"]


def test_checkpoint_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        M.load(str(tmp_path))


def test_a_model_built_from_scratch_is_told_its_tokenizer_texts():
    """The core knows no dataset: a tiny or random model without texts is a one-line error, and texts may be
    a function, called only when a model is built (the stages pass data.tokenizer_texts)."""
    for name in ("tiny", "random:qwen2-vl-2b"):
        with pytest.raises(common.SetupError, match="needs texts="):
            M.load(name, device="meta")
    calls = []
    lazy = M.load("tiny", texts=lambda: calls.append(1) or TEXTS)
    assert calls == [1] and lazy.tokenizer.get_vocab() == M.load("tiny", texts=TEXTS).tokenizer.get_vocab()


def test_overlong_prompt_raises_instead_of_truncating(vlm):
    with pytest.raises(ValueError, match="never truncated"):
        vlm.encode(images(1), ["a long question " * 20], max_prompt_len=40, names=["row 7"])


def test_published_3b_architecture_on_meta_device():
    vlm = M.load("random:qwen2.5-vl-3b", device="meta", texts=TEXTS)
    n = M.count_params(vlm.model)
    assert abs(n - 3.755e9) < 0.01e9, n  # Qwen2.5-VL-3B-Instruct: 3.75 B
    assert vlm.model.config.text_config.num_hidden_layers == 36
    vlm2 = M.load("random:qwen2-vl-2b", device="meta", texts=TEXTS)
    assert abs(M.count_params(vlm2.model) - 2.209e9) < 0.01e9, M.count_params(vlm2.model)


def test_fitted_images_encode_to_the_same_pixels(tmp_path):
    """VLM.fit_image resizes as the image processor does, so encoding the fitted image gives the same pixel
    values and grid as encoding the original (what lets data.ImageCache keep fitted images), for the tiny
    model's processor and a 3B-sized one; and the cache decodes each image once, within its byte budget."""
    import data
    from PIL import Image
    rng = np.random.default_rng(0)
    ims = [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in ((512, 512), (300, 700), (60, 90))]
    for max_pixels in (None, 448 * 448):
        vlm = M.load("tiny", texts=["a b c"] * 10, max_pixels=max_pixels)
        if max_pixels:
            vlm.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": max_pixels}
        fitted = [vlm.fit_image(im) for im in ims]
        assert any(f.size != im.size for f, im in zip(fitted, ims))  # not vacuous: most were resized
        a, b = vlm.encode(ims, ["q"] * 3), vlm.encode(fitted, ["q"] * 3)
        assert torch.equal(a["image_grid_thw"], b["image_grid_thw"])
        assert torch.equal(a["pixel_values"], b["pixel_values"])
    paths = []
    for i, im in enumerate(ims):
        paths.append(str(tmp_path / f"{i}.png"))
        im.save(paths[-1])
    calls = []
    cache = data.ImageCache(lambda im: calls.append(im.size) or vlm.fit_image(im), max_bytes=10 ** 9)
    rows = [{"id": str(i), "image": p} for i, p in enumerate(paths * 3)]
    out = [cache(r) for r in rows]
    assert len(calls) == 3 and out[0] is out[3] is out[6]   # three images, each fitted once
    small = data.ImageCache(vlm.fit_image, max_bytes=1)       # over budget: only the latest one kept
    [small(r) for r in rows[:3]]
    assert len(small.items) == 1
