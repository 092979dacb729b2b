"""
optim.py: AdamW for bf16 weights and bf16 optimizer state whose small updates are not lost.

Why: the paper's GRPO runs at lr 1e-6. A bf16 weight near 0.02 sits on a grid with steps of
2^-13 ~ 1.2e-4, so an AdamW update of ~1e-6 rounds back to the same weight: plain bf16 AdamW (what
TRL runs with a bf16 model) leaves most weights exactly where they started. grpo.py's default
keeps fp32 weights under bf16 autocast instead, which costs twice the memory (below).

How: each step computes AdamW in fp32 (chunk by chunk, so the temporaries stay small) and writes
the weight and both moments back to bf16 with stochastic rounding: up or down to a neighbouring
bf16 value, up with probability equal to the fraction of the gap. The expected result is the
exact fp32 value, so an update of 1% of a grid step moves the weight one step in ~1% of steps: on
average the weights follow the fp32 trajectory (tests/test_optim.py: within 10% where plain bf16
moves ~nothing). The moments are rounded stochastically too: with beta2 0.999 the decay of v
(0.1% per step) is below bf16's half-step (0.2%), and round-to-nearest would freeze v.
The noise is seeded by (seed, step), so every rank rounds alike (weights stay identical across
data-parallel ranks) and a resumed run rounds as an uninterrupted one.

Why not a Kahan compensation buffer: it keeps the lost low bits in one more bf16 tensor per
weight and is more exact per step, but costs 2 bytes per parameter (7.5 GB for the 3B), which
would put the 3B well above TRL's 37.8 GiB; stochastic rounding costs no memory, only noise (each
weight random-walks around the fp32 path by about one grid step, which averages out over a
layer's many weights). Zamirai et al. 2020 ("Revisiting BFloat16 Training") found both match
fp32 training.

Memory for the 3B (3.75 B parameters, bf16, one GPU, grpo.py --bf16):
    weights 7.5 GB + gradients 7.5 + AdamW m and v 2 x 7.5 + frozen bf16 reference 7.5 = 37.5 GB
    (34.9 GiB) before activations; the fp32 default: 15 + 15 + 30 + 7.5 = 67.5 GB.
Gradients exist only from the backward pass to optimizer.zero_grad(set_to_none=True), so rollouts
and the reference pass run at ~28 GiB; the peak is the backward pass: 34.9 GiB plus the
checkpointed activations of one micro-batch (grad ckpt: ~1-2 GiB at 18 x ~600 tokens) plus this
step's chunk temporaries (~0.4 GB), so ~36-37 GiB: about TRL's measured 37.8 GiB, not clearly
below it (measured by bench/gpu_check.sh). What would cut it further: --freeze_vision (the 0.67 B
vision parameters then have no gradients or moments: -3.7 GiB); kl_coef 0 (no reference: -7 GiB);
8-bit or factored second moments (-3.5 / -7 GiB); or the update fused into the backward pass (each
gradient freed as soon as it is applied: -7 GiB, but global-norm gradient clipping then needs a
second backward or per-tensor clipping).

Parameters in fp32 get plain AdamW (the same numbers as torch.optim.AdamW, tested), so the class
is safe to use for any model. It is ~10 kernels per 16M-element chunk, not fused: ~0.1-0.2 s per
step for the 3B on a GPU, small beside a GRPO step; torch's fused AdamW is the model for a faster one.
"""

import torch

CHUNK = 1 << 24  # elements per fp32 pass: 4 copies of 64 MB at most beside the weights


def stochastic_round_(dst, x, generator):
    """dst (bf16) <- x (fp32), rounded to one of its two bf16 neighbours at random: E[dst] = x.

    A bf16 is the top 16 bits of an fp32 (same sign and exponent). Adding uniform noise in
    [0, 2^16) to the low 16 bits and clearing them rounds the magnitude up with probability equal
    to the dropped fraction, down otherwise (carries into the exponent are the right answer too).
    """
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    dst.copy_(((x.view(torch.int32) + noise) & -65536).view(torch.float32))  # exact: the low bits are 0


class AdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias correction), computed in fp32 and
    written back to bf16 weights and moments with stochastic rounding; fp32 tensors are updated
    in place as torch's AdamW does. `seed` seeds the rounding noise with the step number."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, seed=0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed = seed
        self.generators = {}

    def _generator(self, device, step):
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device)
        return self.generators[device].manual_seed(self.seed * 1_000_003 + step)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        generators = {}  # one stream of rounding noise per device and step: the same on every rank
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)     # m, in the weight's dtype
                    state["exp_avg_sq"] = torch.zeros_like(p)  # v
                state["step"] += 1
                t = state["step"]
                if p.device not in generators:
                    generators[p.device] = self._generator(p.device, t)
                gen = generators[p.device]
                bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
                tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
                for a in range(0, p.numel(), CHUNK):
                    w, g, m, v = (x.view(-1)[a:a + CHUNK] for x in tensors)
                    w32, g32, m32, v32 = (x.float() for x in (w, g, m, v))  # fp32 tensors: the same storage
                    m32.lerp_(g32, 1 - beta1)                               # m = b1 m + (1 - b1) g
                    v32.mul_(beta2).addcmul_(g32, g32, value=1 - beta2)     # v = b2 v + (1 - b2) g^2
                    w32.mul_(1 - lr * wd)                                   # decoupled weight decay
                    denom = (v32.sqrt() / bc2 ** 0.5).add_(eps)
                    w32.addcdiv_(m32, denom, value=-lr / bc1)
                    for dst, src in ((w, w32), (m, m32), (v, v32)):
                        if dst.dtype == torch.bfloat16:
                            stochastic_round_(dst, src, gen)
                        elif dst.data_ptr() != src.data_ptr():
                            dst.copy_(src)
        return loss
