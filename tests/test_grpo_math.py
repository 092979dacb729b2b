"""grpo.py's contract: group_advantages and grpo_loss, against hand-worked numbers and direct formulas."""
import math

import pytest
import torch

from grpo import group_advantages, grpo_loss


def test_advantages_hand_worked_2x3_prompt_major():
    # prompt 0: rewards 1, 2, 3 -> mean 2, unbiased std 1
    # prompt 1: rewards 5, 5, 8 -> mean 6, unbiased std sqrt((1 + 1 + 4) / 2) = sqrt(3)
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 8.0])
    a = group_advantages(r, 3, eps=1e-4)
    s3 = math.sqrt(3)
    expected = torch.tensor([-1 / 1.0001, 0.0, 1 / 1.0001, -1 / (s3 + 1e-4), -1 / (s3 + 1e-4), 2 / (s3 + 1e-4)])
    assert torch.allclose(a, expected, atol=1e-6)
    # unscaled: r - mean
    assert torch.allclose(group_advantages(r, 3, scale=False), torch.tensor([-1.0, 0, 1, -1, -1, 2]))


def test_zero_std_group_gets_zero_advantage():
    r = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    a = group_advantages(r, 3)
    assert torch.equal(a[:3], torch.zeros(3))
    assert a[3] > 0 and a[4] < 0


def test_group_of_one_is_refused():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.tensor([1.0, 2.0]), 1)


def direct_loss(logps, old, ref, adv, mask, eps, eps_high, beta, token_level):
    """Plain Python loops over the formula in the issue."""
    per_seq, num, den = [], 0.0, 0.0
    for i in range(len(logps)):
        s, n = 0.0, 0.0
        for t in range(len(logps[0])):
            if mask[i][t] == 0:
                continue
            ratio = math.exp(logps[i][t] - old[i][t])
            clipped = min(max(ratio, 1 - eps), 1 + eps_high)
            pg = -min(ratio * adv[i], clipped * adv[i])
            d = ref[i][t] - logps[i][t]
            kl = math.exp(d) - d - 1
            s += pg + beta * kl
            n += 1
        per_seq.append(s / n)
        num, den = num + s, den + n
    return num / den if token_level else sum(per_seq) / len(per_seq)


def random_case(seed=0, N=4, T=5):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
    old = logps + (torch.rand(N, T, generator=g, dtype=torch.float64) - 0.5) * 0.8  # ratios inside and outside the clip
    ref = logps + (torch.rand(N, T, generator=g, dtype=torch.float64) - 0.5)
    adv = torch.tensor([1.5, -0.7, 0.3, -1.2], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.float64)
    return logps, old, ref, adv, mask


@pytest.mark.parametrize("token_level", [False, True])
@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_loss_matches_direct_formula(token_level, eps_high):
    logps, old, ref, adv, mask = random_case()
    loss, stats = grpo_loss(logps, old, ref, adv, mask, clip_eps=0.2, clip_eps_high=eps_high, kl_coef=0.04,
                            token_level=token_level)
    expected = direct_loss(logps.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), 0.2,
                           0.2 if eps_high is None else eps_high, 0.04, token_level)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert 0 < stats["clip_frac"] < 1 and stats["kl"] > 0


def test_loss_gradient_matches_finite_differences():
    logps, old, ref, adv, mask = random_case(seed=1)
    logps = logps.clone().requires_grad_(True)
    for token_level in (False, True):
        assert torch.autograd.gradcheck(
            lambda lp: grpo_loss(lp, old, ref, adv, mask, 0.2, 0.28, 0.04, token_level)[0], (logps,), eps=1e-6)


def test_on_policy_one_epoch_no_kl_loss_is_minus_mean_advantage():
    logps, _, _, adv, mask = random_case(seed=2)
    loss, stats = grpo_loss(logps, logps.detach(), None, adv, mask, kl_coef=0.0)
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-12)
    assert stats["clip_frac"] == 0 and stats["kl"] == 0
    # and its gradient per token is -A / (tokens in that sequence) / N: the REINFORCE direction
    lp = logps.clone().requires_grad_(True)
    grpo_loss(lp, lp.detach(), None, adv, mask, kl_coef=0.0)[0].backward()
    expected = -adv[:, None] * mask / mask.sum(1, keepdim=True) / len(adv)
    assert torch.allclose(lp.grad, expected)


def test_k3_kl_is_zero_for_identical_policies_and_positive_otherwise():
    logps, _, ref, _, mask = random_case(seed=3)
    zero_adv = torch.zeros(4, dtype=torch.float64)
    _, same = grpo_loss(logps, logps, logps.clone(), zero_adv, mask, kl_coef=1.0)
    _, diff = grpo_loss(logps, logps, ref, zero_adv, mask, kl_coef=1.0)
    assert same["kl"] == 0.0 and diff["kl"] > 0


def test_zero_std_group_gives_zero_policy_gradient():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    adv = group_advantages(rewards, 3).double()
    logps = -torch.rand(6, 4, dtype=torch.float64)
    lp = logps.clone().requires_grad_(True)
    grpo_loss(lp, logps, None, adv, torch.ones(6, 4), kl_coef=0.0)[0].backward()
    assert torch.equal(lp.grad[:3], torch.zeros(3, 4))
    assert lp.grad[3:].abs().sum() > 0


def test_clipping_stops_the_gradient_outside_the_trust_region():
    # ratio = e^0.5 > 1.2 with A > 0: the clipped term is active, so no gradient flows
    logps = torch.tensor([[0.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-0.5]], dtype=torch.float64)
    loss, stats = grpo_loss(logps, old, None, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 1), kl_coef=0)
    loss.backward()
    assert logps.grad.item() == 0 and stats["clip_frac"] == 1.0
    assert loss.item() == pytest.approx(-1.2)
    # with the higher upper clip of 0.28 the bound is 1.28
    loss2, _ = grpo_loss(logps, old, None, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 1),
                         clip_eps_high=0.28, kl_coef=0)
    assert loss2.item() == pytest.approx(-1.28)
