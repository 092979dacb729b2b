"""The CUDA path: bf16 sampling and log-probs agree with a float32 forward. Skipped without CUDA
(no GPU was available where this was written, so these have not run yet)."""
import numpy as np
import pytest
import torch
from PIL import Image

import model as M

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TEXTS = ["Is there a pleural effusion? <think>The image shows fluid.</think><answer>yes</answer>"] * 30


def test_bf16_logps_match_float32_and_sampling_is_deterministic():
    vlm = M.load("tiny", device="cuda", dtype=torch.bfloat16, texts=TEXTS)
    rng = np.random.default_rng(0)
    ims = [Image.fromarray((rng.random((112, 112)) * 255).astype("uint8")) for _ in range(3)]
    batch = vlm.encode(ims, ["Is there a pleural effusion?"] * 3)
    seeds = M.rollout_seeds(0, 0, [0, 1, 2], 6)
    a = M.sample(vlm, batch, 6, 32, 1.0, seeds)
    b = M.sample(vlm, batch, 6, 32, 1.0, seeds)
    assert torch.equal(a["tokens"], b["tokens"])
    tokens = a["tokens"].clone()
    tokens[tokens == vlm.image_token_id] = vlm.eos_id
    with torch.no_grad():
        fast = M.completion_logps(vlm, batch, tokens, 6).float()
        vlm.model.float()
        batch32 = {k: (v.float() if v.is_floating_point() else v) for k, v in batch.items()}
        ref = M.completion_logps(vlm, batch32, tokens, 6)
    m = a["mask"].bool()
    assert (fast - ref)[m].abs().mean() < 0.05  # bf16 tolerance, averaged over tokens
