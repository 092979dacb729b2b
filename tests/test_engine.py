"""engine.py: the static-cache decode samples exactly what model.sample samples. Tiny model, float32, CPU."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image

import engine
import model as M

TEXTS = ["Is there a pleural effusion? <think>The image shows fluid at the left base.</think><answer>yes</answer>",
         "Which side is the pneumothorax on? <think>A dark rim without lung markings.</think><answer>left</answer>",
         "How many nodules are there? nodule cardiomegaly heart lung upper middle lower right"] * 30
# three prompt lengths: the batch is left-padded
QUESTIONS = ["Is there a pleural effusion?", "Which side?", "How many nodules are there in the left lung?"]


@pytest.fixture(scope="module")
def vlm():
    return M.load("tiny", texts=TEXTS)


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((112, 112)) * 255).astype("uint8")) for _ in range(n)]


def check_same(vlm, batch, G, max_new_tokens, temperature, seeds, **kw):
    """Engine vs model.sample: identical tokens and mask; the engine's log-probs = completion_logps."""
    plain = M.sample(vlm, batch, G, max_new_tokens, temperature, seeds, **kw)
    fast = engine.sample(vlm, batch, G, max_new_tokens, temperature, seeds, **kw)
    assert fast["tokens"].shape == plain["tokens"].shape
    assert torch.equal(fast["tokens"], plain["tokens"])
    assert torch.equal(fast["mask"], plain["mask"])
    with torch.no_grad():
        ref = M.completion_logps(vlm, batch, plain["tokens"], G, temperature or 1.0)
    m = plain["mask"].bool()
    # 1e-5, relative for log-probs below -1: float32 resolution. With EOS's logit raised, sampled tokens
    # sit near logp -17, and there model.sample's own logits differ from completion_logps by 2.3e-5
    err = (fast["logps"] - ref)[m].abs() / ref[m].abs().clamp(min=1)
    print(f"max |logp - completion_logps| {(fast['logps'] - ref)[m].abs().max():.2e}, relative {err.max():.2e}")
    assert err.max() < 1e-5
    assert (fast["logps"][~m] == 0).all()  # nothing after a row's EOS
    return plain


@pytest.mark.parametrize("P", [1, 3])
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_engine_samples_what_sample_samples(vlm, P, G, temperature):
    batch = vlm.encode(images(P), QUESTIONS[:P])
    if P == 3:
        assert (batch["attention_mask"] == 0).any()  # prompts of different lengths, padded on the left
    check_same(vlm, batch, G, 20, temperature, M.rollout_seeds(3, 1, list(range(P)), G))


@pytest.fixture
def eos_likely(vlm):
    """Raise <|im_end|>'s logit (the lm_head is tied: its embedding moves too, on both sides alike)."""
    w = vlm.model.lm_head.weight
    saved = w[vlm.eos_id].clone()

    def bias(k):
        with torch.no_grad():
            w[vlm.eos_id] = saved + k * 0.5 * w.std()
    yield bias
    with torch.no_grad():
        w[vlm.eos_id] = saved


@pytest.mark.parametrize("k, all_end", [(12, False), (24, True)])
def test_rows_that_end_early_are_padded_as_sample_pads_them(vlm, eos_likely, k, all_end):
    # k 12: some rows end within a few tokens, others run to max_new_tokens; k 24: every row ends, the
    # last at token 34, between two stop checks (every 8 tokens): the engine trims where sample stops
    eos_likely(k)
    batch = vlm.encode(images(3), QUESTIONS)
    out = check_same(vlm, batch, 4, 48, 1.0, M.rollout_seeds(0, 0, [0, 1, 2], 4))
    lengths = out["mask"].sum(1)
    assert lengths.min() < 8 and len(set(lengths.tolist())) > 3  # EOS in the middle, at different steps
    T = out["tokens"].size(1)
    assert (T < 48) == all_end and (not all_end or T % 8 != 0), (T, lengths.tolist())
    for row, n in zip(out["tokens"], lengths.tolist()):
        if n < T:
            assert row[n - 1] == vlm.eos_id and (row[n:] == vlm.pad_id).all()


def test_forced_length_matches_sample(vlm, eos_likely):
    eos_likely(24)  # every row would end early; ignore_eos forces max_new_tokens, on both sides
    batch = vlm.encode(images(2), QUESTIONS[:2])
    out = check_same(vlm, batch, 3, 24, 1.0, M.rollout_seeds(0, 5, [0, 1], 3), ignore_eos=True)
    assert out["tokens"].shape == (6, 24) and (out["tokens"] != vlm.eos_id).all()


def test_a_failed_graph_capture_warns_and_decodes_eagerly(vlm):
    # on CPU there is no CUDA graph to capture: the fallback path, with the same tokens
    batch = vlm.encode(images(2), QUESTIONS[:2])
    seeds = M.rollout_seeds(0, 0, [0, 1], 2)
    stats = {}
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        fast = engine.sample(vlm, batch, 2, 12, 1.0, seeds, graph=True, stats=stats)
    assert torch.equal(fast["tokens"], M.sample(vlm, batch, 2, 12, 1.0, seeds)["tokens"])
    assert stats["graph"] is False and stats["steps"] == 12


def test_bf16_and_autocast_decode_stay_close_and_leave_the_weights_alone(vlm):
    """The two ways the engine meets bf16: bf16 weights (used as they are, no copy) and fp32 weights under
    bf16 autocast (cast once per call, the model untouched). Both decode in bf16; their log-probs agree
    with the float32 forward to bf16 tolerance."""
    batch = vlm.encode(images(2), QUESTIONS[:2])
    seeds = M.rollout_seeds(0, 0, [0, 1], 3)
    before = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = engine.sample(vlm, batch, 3, 16, 1.0, seeds)
    assert all(torch.equal(v, before[k]) and v.dtype == torch.float32 for k, v in vlm.model.state_dict().items())
    b16 = M.VLM(copy.deepcopy(vlm.model).to(torch.bfloat16), vlm.tokenizer, vlm.image_processor, "tiny")
    up = b16.model.model.language_model.layers[0].mlp.up_proj.weight
    assert engine.Decoder(b16.model, 1, 64, torch.bfloat16).layers[0]["up"].data_ptr() == up.data_ptr()
    native = engine.sample(b16, b16.encode(images(2), QUESTIONS[:2]), 3, 16, 1.0, seeds)
    for out in (cast, native):
        with torch.no_grad():
            ref = M.completion_logps(vlm, batch, out["tokens"], 3)
        err = (out["logps"] - ref)[out["mask"].bool()].abs()
        assert 0 < err.max() < 0.5 and err.mean() < 0.05, (err.mean(), err.max())  # bf16 rounding, nothing worse
