"""The CUDA paths: bf16 sampling and log-probs agree with a float32 forward; engine.py's CUDA graph
samples what model.sample samples; bf16 AdamW with stochastic rounding on CUDA; grpo.py end to end
on CUDA (bf16 and fp32 weights). Skipped without CUDA; bench/gpu_check.sh runs them on one GPU."""
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


# -----------------------------------------------------------------------------
# engine.py on CUDA: the captured graph samples what model.sample samples


def test_engine_graph_matches_sample_in_float32(recwarn):
    import engine
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 on both sides
    vlm = M.load("tiny", device="cuda", dtype=torch.float32, texts=TEXTS)
    rng = np.random.default_rng(1)
    ims = [Image.fromarray((rng.random((112, 112)) * 255).astype("uint8")) for _ in range(3)]
    batch = vlm.encode(ims, ["Is there a pleural effusion?", "Which side?", "How many nodules are in the left lung?"])
    for G, temperature in [(6, 1.0), (1, 0.0)]:
        seeds = M.rollout_seeds(0, 2, [0, 1, 2], G)
        stats = {}
        fast = engine.sample(vlm, batch, G, 40, temperature, seeds, stats=stats)
        plain = M.sample(vlm, batch, G, 40, temperature, seeds)
        assert stats["graph"], "the decode step was not captured as a CUDA graph"
        assert torch.equal(fast["tokens"], plain["tokens"]) and torch.equal(fast["mask"], plain["mask"])
        with torch.no_grad():
            ref = M.completion_logps(vlm, batch, plain["tokens"], G, temperature or 1.0)
        m = plain["mask"].bool()
        assert ((fast["logps"] - ref)[m].abs() / ref[m].abs().clamp(min=1)).max() < 1e-4
    assert not [w for w in recwarn if "CUDA graph" in str(w.message)]


@pytest.mark.parametrize("bf16_weights", [True, False])
def test_engine_in_bf16_agrees_with_the_float32_forward(bf16_weights):
    # bf16 weights (grpo.py --bf16: used in place) or fp32 weights under bf16 autocast (cast once per call)
    import engine
    vlm = M.load("tiny", device="cuda", dtype=torch.float32, texts=TEXTS)
    rng = np.random.default_rng(2)
    ims = [Image.fromarray((rng.random((112, 112)) * 255).astype("uint8")) for _ in range(3)]
    batch = vlm.encode(ims, ["Is there a pleural effusion?"] * 3)
    seeds = M.rollout_seeds(0, 0, [0, 1, 2], 6)
    if bf16_weights:
        vlm.model.to(torch.bfloat16)
    stats = {}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = engine.sample(vlm, {**batch, "pixel_values": batch["pixel_values"].to(vlm.model.dtype)}, 6, 32, 1.0,
                            seeds, stats=stats)
    assert stats["graph"]
    vlm.model.float()
    with torch.no_grad():
        ref = M.completion_logps(vlm, batch, out["tokens"], 6)
    err = (out["logps"] - ref)[out["mask"].bool()].abs()
    assert err.mean() < 0.05 and err.max() < 0.5  # bf16 rounding, not another distribution


# -----------------------------------------------------------------------------
# optim.py on CUDA, and the CUDA paths of grpo.py end to end


def test_bf16_adamw_with_stochastic_rounding_on_cuda():
    import optim
    torch.manual_seed(0)
    n, steps = 256 * 256, 100
    w0 = (torch.randn(n, device="cuda") * 0.02).bfloat16().float()
    direction = torch.randn(n, device="cuda")
    grads = [direction + 0.5 * torch.randn(n, device="cuda") for _ in range(steps)]

    def run(cls, dtype, **kw):
        w = torch.nn.Parameter(w0.to(dtype).clone())
        opt = cls([w], lr=1e-6, betas=(0.9, 0.99), weight_decay=0.0, **kw)
        for g in grads:
            w.grad = g.to(dtype)
            opt.step()
        return w.detach().float() - w0

    fp32, sr, plain = run(torch.optim.AdamW, torch.float32), run(optim.AdamW, torch.bfloat16), \
        run(torch.optim.AdamW, torch.bfloat16)
    assert abs((sr @ fp32 / (fp32 @ fp32)).item() - 1) < 0.1   # as far along fp32's update as fp32 went
    assert (plain == 0).float().mean() > 0.5                   # plain bf16 AdamW: most weights never moved
    assert torch.equal(sr, run(optim.AdamW, torch.bfloat16))   # the rounding noise is seeded


@pytest.mark.parametrize("flags", [["--bf16"], []])
def test_grpo_runs_on_cuda_with_the_engine(tmp_path, flags):
    import json
    import grpo
    out = tmp_path / "grpo"
    grpo.main(grpo.parser.parse_args([str(a) for a in [
        "--ckpt", "tiny", "--data", "demo", "--out", out, "--prompts_per_step", 4, "--group_size", 4,
        "--max_new_tokens", 24, "--micro_batch", 16, "--max_steps", 2, "--eval_every", 0, "--grad_ckpt", *flags]]))
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(recs) == 2 and all(r["peak_mem_gib"] > 0 and not r["skipped"] for r in recs)
