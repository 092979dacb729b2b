"""optim.py: bf16 AdamW with stochastic rounding keeps the small updates that plain bf16 AdamW loses."""
import pytest
import torch

import optim


def test_stochastic_rounding_picks_a_neighbour_and_is_unbiased():
    values = [0.02, -0.02, 1.0 + 2 ** -8, 3e-5]  # the third lies halfway between 1 and 1 + 2^-7
    x = torch.tensor(values).repeat(20000, 1)  # (20000, 4)
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    optim.stochastic_round_(out, x, torch.Generator().manual_seed(0))
    for j, v in enumerate(values):
        r = torch.tensor(v).bfloat16()
        grid = [torch.nextafter(r, torch.tensor(s).bfloat16()).item() for s in (-1e9, 1e9)] + [r.item()]
        lo, hi = max(g for g in grid if g <= v), min(g for g in grid if g >= v)  # v's two bf16 neighbours
        col = out[:, j].float()
        assert set(col.unique().tolist()) <= {lo, hi}, (v, col.unique(), lo, hi)
        assert abs(col.mean().item() - v) < 0.02 * (hi - lo)  # E[rounded] = x
    assert (out[:, 2].float() == 1.0).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_fp32_parameters_get_torch_adamw_exactly():
    torch.manual_seed(0)
    a = torch.randn(300, 7, requires_grad=True)
    a0 = a.detach().clone()
    b = a.detach().clone().requires_grad_(True)
    ours = optim.AdamW([a], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, foreach=False)
    for _ in range(5):
        g = torch.randn(300, 7)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert (a - a0).abs().mean() > 1e-2  # the weights moved (by ~lr per step)...
    assert torch.allclose(a, b, rtol=0, atol=1e-7)  # ...exactly as torch's AdamW moved it


def run(opt_cls, w0, grads, dtype, **kw):
    w = torch.nn.Parameter(w0.to(dtype).clone())
    opt = opt_cls([w], lr=1e-6, betas=(0.9, 0.99), weight_decay=0.0, **kw)
    for g in grads:
        w.grad = g.to(dtype)
        opt.step()
    return w.detach().float()


def test_lr_1e6_moves_bf16_weights_as_fp32_does_where_plain_bf16_does_not():
    """The issue's target: N AdamW steps at lr 1e-6 on weights of Qwen's scale (std 0.02). Gradients
    with a steady direction and noise, the same sequence for every optimizer, all from the same bf16
    starting weights. Update = final - initial weights."""
    torch.manual_seed(0)
    n, steps = 128 * 128, 200
    w0 = (torch.randn(n) * 0.02).bfloat16().float()          # one start, exactly representable in bf16
    direction = torch.randn(n)
    grads = [direction + 0.5 * torch.randn(n) for _ in range(steps)]
    fp32 = run(torch.optim.AdamW, w0, grads, torch.float32) - w0
    sr = run(optim.AdamW, w0, grads, torch.bfloat16, seed=1) - w0
    plain = run(torch.optim.AdamW, w0, grads, torch.bfloat16) - w0
    along = lambda d: (d @ fp32 / (fp32 @ fp32)).item()       # how far d goes along fp32's update (1 = as far)
    print(f"update along fp32's: stochastic rounding {along(sr):.3f}, plain bf16 {along(plain):.3f}; "
          f"norm ratio {(sr.norm() / fp32.norm()).item():.3f}; unchanged: stochastic rounding "
          f"{(sr == 0).float().mean().item():.3f}, plain bf16 {(plain == 0).float().mean().item():.3f}")
    assert abs(fp32).mean() > 1e-4                             # fp32 moved ~lr x steps per weight
    assert abs(along(sr) - 1) < 0.1                            # bf16 + stochastic rounding: as far as fp32
    # the rest is zero-mean rounding noise (about one grid step per weight), not a different direction
    assert torch.nn.functional.cosine_similarity(sr, fp32, 0) > 0.7
    assert (plain == 0).float().mean() > 0.5                   # plain bf16: most weights never moved
    assert along(plain) < 0.5


def test_rounding_noise_is_seeded_by_step_so_a_resumed_run_is_exact():
    torch.manual_seed(0)
    w0, grads = torch.randn(1000) * 0.02, [torch.randn(1000) for _ in range(6)]
    whole = run(optim.AdamW, w0, grads, torch.bfloat16, seed=3)
    w = torch.nn.Parameter(w0.bfloat16())
    opt = optim.AdamW([w], lr=1e-6, betas=(0.9, 0.99), weight_decay=0.0, seed=3)
    for g in grads[:3]:
        w.grad = g.bfloat16()
        opt.step()
    state = opt.state_dict()
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = optim.AdamW([w2], lr=1e-6, betas=(0.9, 0.99), weight_decay=0.0, seed=3)
    opt2.load_state_dict(state)
    for g in grads[3:]:
        w2.grad = g.bfloat16()
        opt2.step()
    assert torch.equal(w2.detach().float(), whole)
    assert not torch.equal(run(optim.AdamW, w0, grads, torch.bfloat16, seed=4), whole)  # the seed matters
