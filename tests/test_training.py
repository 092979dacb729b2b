"""Training signals: SFT scores only the target tokens; the GRPO pieces, wired to the sampler, raise a reward."""
import numpy as np
import torch
from PIL import Image

import model as M
import sft
from grpo import group_advantages, grpo_loss

TEXTS = ["Is there a pleural effusion? <think>The image shows fluid.</think><answer>yes</answer>",
         "Which side is the nodule on? nodule left right upper lower cardiomegaly"] * 30


def images(n):
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((112, 112)) * 255).astype("uint8")) for _ in range(n)]


def test_masked_prompt_tokens_carry_no_gradient():
    """The SFT loss depends on the prompt only as context: the final hidden state at every prompt
    position except the last one (which predicts the first target token) gets exactly zero gradient."""
    torch.manual_seed(0)
    vlm = M.load("tiny", texts=TEXTS)
    ims = images(2)
    rows = [{"id": str(i), "image": im, "question": q, "target": t} for i, (im, q, t) in enumerate(zip(
        ims, ["Is there a pleural effusion?", "Which side is the nodule on?"],
        ["<think>fluid</think><answer>yes</answer>", "<think>a round opacity on the left</think><answer>left</answer>"]))]
    captured = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured["h"] = output

    handle = vlm.model.model.language_model.norm.register_forward_hook(keep)
    loss, n = sft.sft_loss(vlm, rows, 1.0, torch.autocast("cpu", enabled=False))
    handle.remove()
    loss.backward()
    L = vlm.encode(ims, [r["question"] for r in rows])["input_ids"].size(1)
    grad = captured["h"].grad                                  # (B, L + T, H)
    assert grad[:, :L - 1].abs().max() == 0                    # prompt and image positions: no loss
    assert grad[:, L - 1:].abs().sum(-1).gt(0).sum() >= n - 2  # the target positions carry it
    # and the loss equals transformers' own loss with the prompt labels masked to -100
    batch = vlm.encode(ims, [r["question"] for r in rows])
    tokens, mask = sft.target_batch(vlm, rows)
    ids = torch.cat([batch["input_ids"], tokens], 1)
    labels = torch.cat([torch.full_like(batch["input_ids"], -100), tokens.masked_fill(mask == 0, -100)], 1)
    out = vlm.model(input_ids=ids, attention_mask=torch.cat([batch["attention_mask"], torch.ones_like(tokens)], 1),
                    pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                    mm_token_type_ids=(ids == vlm.image_token_id).int(), labels=labels)
    assert torch.allclose(loss, out.loss * n, rtol=1e-4)


def test_grpo_pieces_raise_the_mean_reward():
    """A short GRPO run on the tiny model (the sampler, log-probs, advantages and loss of grpo.py)
    raises a reward it can reach: the share of completion tokens equal to one chosen token."""
    torch.manual_seed(0)
    vlm = M.load("tiny", texts=TEXTS)
    target = vlm.tokenizer("yes", add_special_tokens=False).input_ids[0]
    ims, qs = images(4), ["Is there a pleural effusion?"] * 4
    batch = vlm.encode(ims, qs)
    opt = torch.optim.AdamW(vlm.model.parameters(), lr=3e-3)
    G, means = 4, []
    for step in range(12):
        out = M.sample(vlm, batch, G, 8, 1.0, M.rollout_seeds(0, step, range(4), G))
        tokens, mask = out["tokens"], out["mask"]
        reward = ((tokens == target) & mask.bool()).sum(1).float() / mask.sum(1)
        means.append(reward.mean().item())
        adv = group_advantages(reward, G)
        logps = M.completion_logps(vlm, batch, tokens, G)
        loss, _ = grpo_loss(logps, logps.detach(), None, adv, mask, kl_coef=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert np.mean(means[-3:]) > np.mean(means[:3]) + 0.2, means
