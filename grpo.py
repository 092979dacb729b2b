"""
grpo.py: stage 2 of MEDFACT-R1, Group Relative Policy Optimization with four factual rewards.

One step (the loop in main, one function per part):
  1. rollout: take P prompts; sample G completions each at temperature T, prompt-major (rollout)
  2. score: rewards.py's accuracy, format, fact (keywords), consistency; total = weighted sum
     (score_rollouts); advantages per group: (r - mean) / (std + eps)      (group_advantages)
  3. pick the groups to train: those whose rewards differ                 (groups_to_train)
  4. reference: log-probs of the sampled tokens at the SAME temperature under the frozen reference
     model when kl_coef > 0, and under the policy as it sampled when there are several inner
     epochs                                                                 (frozen_logps)
  5. train: per token -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A) + kl_coef * k3(ref,
     policy), masked to the completion up to and including its first EOS (grpo_loss); clip the
     gradient norm, AdamW step                                              (train)
  6. record: metrics.jsonl, a few rollouts to read, one printed line; checkpoint   (record)

Departures from the released code (TRL's GRPOTrainer), with their evidence in docs/EXPERIMENTS.md:
- the full clipped objective (--inner_epochs, --clip_eps_high); rewards that resist hacking (rewards.py).
- groups with no reward spread skip the reference and training passes (their advantage is 0; only
  their KL term is dropped; --train_zero_std keeps them): 3.3x faster a step on the demo (part 3).
- held-out model selection: the final model is the evaluated step, the start included, with the best
  held-out accuracy (--keep_last: the paper's last step; --open_floor: only models whose open
  accuracy and recall hold the start's), so GRPO never hands back a model worse held out (2.2, 2.3).
- --screen N: train only on the prompts the starting model neither always answers right nor always
  wrong, chosen once (--dynamic_sampling K filters every step, at K times the generation) (2.3).
- T 0.5 and lr 5e-5 for the tiny model (the paper: 1.0 and 1e-6 on a pretrained 3B) (1.3, 2.2); rollout
  seeds from (seed, step, prompt, sample): resumed or on any number of ranks, the same samples.
Paper setting: --lr 1e-6 --kl_coef 0.04 --group_size 6 --temperature 1.0 --inner_epochs 1. Run it:
    python grpo.py --ckpt runs/sft --data demo --out runs/grpo                        # CPU, demo
    torchrun --nproc_per_node=2 grpo.py --ckpt runs/sft                               # 2 processes
    torchrun --nproc_per_node=8 grpo.py --ckpt sft_out --data runs/pseudo_slake.jsonl \\
        --lr 1e-6 --prompts_per_step 48 --max_new_tokens 512 --max_pixels 200704 --grad_ckpt
    torchrun --nnodes=2 --node_rank=R --master_addr=HOST0 ... grpo.py ...  # 2 nodes: R = 0 on HOST0, 1 on the other
    ... --bf16          # the 3B on one GPU: bf16 weights and AdamW state (optim.py), rollouts on engine.py
    ... --fsdp          # shard policy and reference (FSDP2) when one GPU cannot hold them
    ... --lora 16       # train LoRA adapters on the SFT model; the reference is it with them off (lora.py)
    ... --resume        # continue exactly from the newest checkpoint in --out (shared by all nodes)

Outputs in --out: the final model (a Hugging Face folder), metrics.jsonl, rollouts.jsonl, checkpoints/.
"""

import argparse
import copy
import json
import os
import shutil
import time

import torch
from tqdm import tqdm

import data
import engine
import lora
import model as M
import optim
import rewards
from checkpoint import (TrainingStopped, copy_folder, load_state, resume_from, resume_or_start, save_checkpoint,
                        save_step_checkpoint)
from common import SetupError, allreduce_grads, clip_grad_norm, default_dtype, init_dist, print0
from evaluate import held_out_scores
from families import freeze_vision
from fsdp import fsdp_shard
from tracker import Tracker

# -----------------------------------------------------------------------------
# config

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
# data
parser.add_argument("--data", default="demo", help="demo | vqa-rad | slake | folder | pseudo-label JSONL")
parser.add_argument("--split", default="train", help="the split whose questions are the prompts")
parser.add_argument("--val_data", default=None,
                    help="where the held-out rows come from (default: --data; a pseudo-label JSONL has no val split)")
parser.add_argument("--val_split", default="val", help="held-out split for the periodic greedy accuracy")
parser.add_argument("--val_limit", type=int, default=200, help="held-out rows scored (the first N)")
parser.add_argument("--skip_bad_rows", action="store_true",
                    help="skip (and count) bad rows, training and held-out, instead of failing")
# model
parser.add_argument("--ckpt", "--model", dest="ckpt", default="runs/sft", help="SFT output folder (or tiny, hub name)")
parser.add_argument("--max_pixels", type=int, default=None, help="cap image resolution (pixels)")
parser.add_argument("--freeze_vision", action="store_true", help="do not train the vision tower")
parser.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing (less memory, ~30%% slower)")
parser.add_argument("--trust_remote_code", action="store_true", help="run a checkpoint's own Python code")
parser.add_argument("--fsdp", action="store_true", help="shard policy and reference over ranks with FSDP2")
parser.add_argument("--bf16", action="store_true",
                    help="bf16 weights, reference and AdamW state, stochastic rounding (optim.py): the 3B on one GPU")
lora.add_args(parser)
# rollouts
parser.add_argument("--prompts_per_step", type=int, default=96, help="global, over all ranks")
parser.add_argument("--group_size", type=int, default=6, help="G completions per prompt (paper: 6)")
parser.add_argument("--temperature", type=float, default=0.5,
                    help="sampling temperature (paper: 1.0; 0.5 trains the tiny demo best: docs/EXPERIMENTS.md)")
parser.add_argument("--max_new_tokens", type=int, default=96, help="completion length cap (tokens)")
parser.add_argument("--ignore_eos", action="store_true", help="always sample max_new_tokens (benchmarks)")
parser.add_argument("--engine", choices=["auto", "static", "hf"], default="auto",
                    help="rollouts: static (engine.py: static KV cache, CUDA graph) or hf (model.sample); "
                         "auto: static on CUDA without --fsdp, else hf")
parser.add_argument("--dynamic_sampling", type=int, default=0,
                    help="K > 1: sample K x prompts, keep groups with reward spread first (needs K x prompts rows)")
parser.add_argument("--screen", type=int, default=0,
                    help="N > 0 (-1: all): before training, sample one group from the starting model for N "
                         "training prompts (a seeded sample) and train only on those it neither always answers "
                         "right nor always wrong (saved to OUT/screened.json; 0: off)")
parser.add_argument("--train_zero_std", action="store_true",
                    help="also run the reference and training passes on groups with no reward spread")
# rewards
parser.add_argument("--w_accuracy", type=float, default=1.0, help="weight of the accuracy reward (0: off)")
parser.add_argument("--w_format", type=float, default=1.0, help="weight of the format reward (0: off)")
parser.add_argument("--w_fact", type=float, default=1.0, help="weight of the fact (keyword) reward (0: off)")
parser.add_argument("--w_consistency", type=float, default=1.0, help="weight of the consistency reward (0: off)")
parser.add_argument("--upstream_rewards", action="store_true", help="the released code's rewards, quirks included")
parser.add_argument("--judge_url", default=None, help="OpenAI-compatible endpoint for the consistency judge")
parser.add_argument("--judge_model", default=None, help="the judge's model name at --judge_url (key: $OPENAI_API_KEY)")
# objective and optimisation
parser.add_argument("--lr", type=float, default=5e-5, help="learning rate (paper: 1e-6)")
parser.add_argument("--warmup", type=int, default=5, help="linear warmup steps, then constant")
parser.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
parser.add_argument("--kl_coef", type=float, default=0.04,
                    help="k3 KL penalty to the frozen reference (paper: 0.04; 0: no reference model)")
parser.add_argument("--clip_eps", type=float, default=0.2, help="clip the ratio to [1 - eps, 1 + eps_high]")
parser.add_argument("--clip_eps_high", type=float, default=None, help="upper clip (default: = clip_eps)")
parser.add_argument("--inner_epochs", type=int, default=1, help="optimisation passes over each batch of rollouts")
parser.add_argument("--micro_batch", type=int, default=48, help="completions per forward/backward")
parser.add_argument("--no_std_scale", action="store_true", help="advantages r - mean (no std division)")
parser.add_argument("--token_level", action="store_true", help="average the loss over all tokens, not sequences")
parser.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this (0: no clipping)")
parser.add_argument("--max_steps", type=int, default=60, help="optimizer steps")
parser.add_argument("--seed", type=int, default=0, help="the prompt order, every rollout's sampling seed (and a from-scratch model's init)")
# logging and checkpoints
parser.add_argument("--out", default="runs/grpo", help="the final model, metrics.jsonl, rollouts.jsonl, checkpoints/")
parser.add_argument("--eval_every", type=int, default=20, help="greedy held-out accuracy every N steps (0: off)")
parser.add_argument("--keep_last", action="store_true",
                    help="the final model is the last step's (default: the evaluated step, the start included, "
                         "with the best held-out accuracy)")
parser.add_argument("--open_floor", action="store_true",
                    help="select only among the evaluated models whose held-out open accuracy and open recall "
                         "are at least the starting model's (GRPO must not trade open answers for accuracy)")
parser.add_argument("--save_every", type=int, default=0, help="resumable checkpoint every N steps (0: never)")
parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
parser.add_argument("--rollouts_per_step", type=int, default=2, help="completions written to rollouts.jsonl")
parser.add_argument("--report_to", choices=["none", "tensorboard", "wandb", "trackio"], default="none",
                    help="also log metrics.jsonl and a table of rollouts.jsonl's completions there (tracker.py)")
parser.add_argument("--log_completions_every", type=int, default=10, help="that table every N steps and at the first")
parser.add_argument("--project", default=None, help="wandb/trackio project ($WANDB_PROJECT/$TRACKIO_PROJECT, medfact)")
parser.add_argument("--device", default="auto", help="auto (cuda, mps, cpu) or a torch device")
parser.add_argument("--max_bad_steps", type=int, default=3,
                    help="stop after this many flagged steps (non-finite or spike) in a row")
parser.add_argument("--debug_nan_steps", type=int, nargs="*", default=[],
                    help="testing: make the loss NaN at these steps (1-based) to exercise the non-finite guard")

# -----------------------------------------------------------------------------
# the math (tests outside this repo call these two)


def group_advantages(rewards, group_size, scale=True, eps=1e-4):
    """rewards (P*G,) prompt-major -> advantages (P*G,): (r - mean) / (std + eps) within each group.

    std is the unbiased one (as in TRL and the released code); scale=False gives r - mean (Dr. GRPO).
    """
    if group_size < 2:
        raise ValueError("group_size must be >= 2: with one completion per prompt the advantage is undefined")
    r = rewards.view(-1, group_size)                      # (P, G)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, clip_eps=0.2, clip_eps_high=None, kl_coef=0.04,
              token_level=False):
    """The clipped GRPO objective with a k3 KL penalty. logps/old_logps/ref_logps/mask (N, T), advantages (N,).

    Aggregation: mean over sequences of each sequence's masked token mean (the paper's), or the
    mean over all masked tokens (token_level=True). Returns (loss, stats).
    """
    mask = mask.to(logps.dtype)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    adv = advantages[:, None]                                              # (N, 1)
    ratio = torch.exp(logps - old_logps)                                   # (N, T), 1 on-policy
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + high) * adv
    pg = -torch.min(unclipped, clipped)                                    # (N, T)
    if ref_logps is not None and kl_coef != 0:
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1                                          # k3 estimator, >= 0
    else:
        kl = torch.zeros_like(logps)
    per_token = pg + kl_coef * kl

    def agg(x):
        if token_level:
            return (x * mask).sum() / mask.sum().clamp(min=1)
        return ((x * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()

    loss = agg(per_token)
    with torch.no_grad():
        is_clipped = (clipped < unclipped).to(logps.dtype)  # the clip bound is the active term
        stats = {"pg_loss": agg(pg).item(), "kl": agg(kl).item(), "clip_frac": agg(is_clipped).item()}
    return loss, stats


# -----------------------------------------------------------------------------
# one step, in the order of the docstring: rollout, score, pick the groups to train, reference,
# train, record. A step's rollouts are a dict: "rows" (P), "batch" (their encoded prompts),
# "tokens" and "mask" (P*G, T), "texts", "scores", "total" (P*G,) and "std" (P,: each group's spread).

def prompts_for(step, n_rows, args, rank, world):
    """Global indices of this rank's prompts at `step` (K x prompts_per_step / world of them with dynamic
    sampling K): consecutive slices of a permutation drawn afresh, from the seed, every data epoch."""
    n = args.prompts_per_step * max(1, args.dynamic_sampling)              # prompts per step, all ranks
    data_epoch, i = divmod(step * n, n_rows - n_rows % n)                  # whole steps only: the tail rests
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(args.seed + 1 + data_epoch)).tolist()
    per_rank = n // world
    return perm[i:i + n][rank * per_rank:(rank + 1) * per_rank]


def rollout(vlm, rows, idx, step, args, autocast, sample=M.sample, images=data.load_image):
    """1. G completions for each prompt rows[i], i in idx, seeded by (seed, step, prompt i, sample).
    `sample` is model.sample or engine.sample: the same seeds give the same completions."""
    batch_rows = [rows[i] for i in idx]
    vlm.model.eval()
    with torch.no_grad(), autocast:
        batch = vlm.encode([images(r) for r in batch_rows], [r["question"] for r in batch_rows],
                           names=[str(r.get("id")) for r in batch_rows])
        out = sample(vlm, batch, args.group_size, args.max_new_tokens, args.temperature,
                     M.rollout_seeds(args.seed, step, idx, args.group_size), ignore_eos=args.ignore_eos)
    tokens, mask = out["tokens"], out["mask"]                              # (P*G, T), prompt-major
    return {"rows": batch_rows, "batch": batch, "tokens": tokens, "mask": mask, "texts": vlm.decode(tokens, mask)}


def score_rollouts(rollouts, weights, judge, args):
    """2. Every completion's rewards; their weighted total (P*G,) and each group's spread, its std (P,)."""
    G = args.group_size
    rollouts["scores"] = [rewards.score(t, r, weights, upstream=args.upstream_rewards, judge=judge)
                          for t, r in zip(rollouts["texts"], (r for r in rollouts["rows"] for _ in range(G)))]
    rollouts["total"] = torch.tensor([s["total"] for s in rollouts["scores"]], dtype=torch.float32)
    rollouts["std"] = rollouts["total"].view(-1, G).std(1)


def completions_of(groups, G):
    """Indices (prompt-major) of the G completions of each group in `groups`, in that order."""
    return torch.tensor([p * G + g for p in groups for g in range(G)], dtype=torch.long)


def keep_groups(rollouts, groups, G):
    """The rollouts of `groups` only (dynamic sampling keeps P of its K x P)."""
    sel = completions_of(groups, G)
    return {"rows": [rollouts["rows"][p] for p in groups], "batch": M.select_prompts(rollouts["batch"], groups),
            "tokens": rollouts["tokens"][sel], "mask": rollouts["mask"][sel],
            "texts": [rollouts["texts"][i] for i in sel.tolist()],
            "scores": [rollouts["scores"][i] for i in sel.tolist()],
            "total": rollouts["total"][sel], "std": rollouts["std"][groups]}


def screen(vlm, rows, args, rank, world, autocast, sample=M.sample, images=data.load_image):
    """--screen: indices of the training prompts worth training on. One group (--group_size completions
    at --temperature, seeded as step -1) for each of N prompts, a seeded sample of them; kept: the prompts
    whose mean accuracy reward over the group is strictly between 0 and 1, the ones the starting model
    neither always answers right nor always wrong, in the data's order. With fewer than --prompts_per_step
    of those, the rest of the sample tops the pool up to one step's prompts. Every rank screens a share;
    all get the whole pool. Returns (pool, how many of it had spread, how many were screened)."""
    n = len(rows) if args.screen < 0 else min(args.screen, len(rows))
    n -= n % world  # as many forwards on every rank (FSDP)
    sampled = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed)).tolist()[:n]
    mine, P, spread = sampled[rank::world], args.prompts_per_step // world, []
    for a in tqdm(range(0, len(mine), P), desc="screen", disable=rank != 0):
        idx = mine[a:a + P]
        r = rollout(vlm, rows, idx, -1, args, autocast, sample, images)
        score_rollouts(r, {"format": 0, "fact": 0, "consistency": 0}, None, args)  # total: the accuracy reward
        spread += [i for i, m in zip(idx, r["total"].view(-1, args.group_size).mean(1).tolist()) if 0 < m < 1]
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, spread)
        spread = [i for part in gathered for i in part]
    pool, kept = sorted(spread), set(spread)  # the pool in the data's order
    rest = [i for i in sampled if i not in kept]
    return pool + rest[:max(0, args.prompts_per_step - len(pool))], len(pool), n


def groups_to_train(rollouts, advantages, args, world, device):
    """3. The completions the reference and training passes see: the groups with reward spread.

    A group whose rewards are all equal has advantage 0: its only gradient would be the KL term. It
    skips both passes (--train_zero_std keeps it), while the loss keeps its normalisation over all N
    completions: the policy-gradient term is unchanged, and at high accuracy, where most groups agree,
    a step costs a fraction. Every rank trains at least one group and as many as the others, topping
    up with zero-spread groups whose mask is zeroed (a forward and a backward, no loss): AdamW steps
    every step, and collectives line up. Returns {"batch", "tokens", "mask", "advantages", "n_live"},
    the first n_live completions being the ones that count."""
    G, std = args.group_size, rollouts["std"]
    live = [p for p in range(len(std)) if args.train_zero_std or std[p] > 0]
    n_live = len(live) * G
    most = torch.tensor(max(1, len(live)), device=device)
    if world > 1:
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    live += [p for p in range(len(std)) if p not in live][:int(most) - len(live)]
    sel = completions_of(live, G).to(device)
    mask = rollouts["mask"][sel].clone()
    mask[n_live:] = 0                                                      # the top-up groups count for nothing
    return {"batch": M.select_prompts(rollouts["batch"], live), "tokens": rollouts["tokens"][sel], "mask": mask,
            "advantages": advantages[sel], "n_live": n_live}


def micro_batches(picked, args):
    """(start, stop) completion ranges of whole groups, about --micro_batch completions each."""
    n, mb = picked["tokens"].size(0), max(args.group_size, args.micro_batch // args.group_size * args.group_size)
    return [(i, min(i + mb, n)) for i in range(0, n, mb)]


def picked_logps(vlm, picked, a, b, args, model=None):
    """Log-probs (b - a, T) of the picked completions a:b at the sampling temperature; `model`: the reference."""
    G = args.group_size
    prompts = M.slice_prompts(picked["batch"], a // G, b // G)            # the prompts of completions a:b
    return M.completion_logps(vlm, prompts, picked["tokens"][a:b], G, args.temperature, model=model)


def frozen_logps(vlm, picked, args, autocast, model=None):
    """4. Log-probs of the picked completions without grad, micro-batch by micro-batch: under the policy
    as it sampled (old_logps, needed when the policy moves between inner epochs) or the reference."""
    with torch.no_grad(), autocast, lora.as_reference(vlm, model):  # LoRA: the policy with its adapters off
        return torch.cat([picked_logps(vlm, picked, a, b, args, model) for a, b in micro_batches(picked, args)])


def train(vlm, params, optimizer, rollouts, picked, old_logps, ref_logps, step, args, world, autocast):
    """5. Inner epochs over micro-batches of the picked completions, each loss weighted by its share of
    all N completions (of all tokens with --token_level); one AdamW step per inner epoch, skipped when
    the gradient is not finite. Returns (share-weighted loss stats, the last grad norm, skipped)."""
    vlm.model.train()
    N = rollouts["tokens"].size(0)
    n_tok = rollouts["mask"].sum().float()
    if world > 1:
        torch.distributed.all_reduce(n_tok)
    stats_sum = {"pg_loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "trained": 0.0}  # share-weighted sums
    n_live, skipped = picked["n_live"], False
    for inner_epoch in range(args.inner_epochs):
        for a, b in micro_batches(picked, args):
            with autocast:
                logps = picked_logps(vlm, picked, a, b, args).float()
            old = old_logps[a:b].float() if old_logps is not None else logps.detach()  # one epoch: ratio 1
            loss, stats = grpo_loss(logps, old, ref_logps[a:b] if ref_logps is not None else None,
                                    picked["advantages"][a:b], picked["mask"][a:b], args.clip_eps,
                                    args.clip_eps_high, args.kl_coef, args.token_level)
            share = (picked["mask"][a:b].sum() * world / n_tok) if args.token_level else torch.tensor((b - a) / N)
            if step + 1 in args.debug_nan_steps:
                loss = loss * float("nan")
            (loss * share).backward()
            # the share of this micro-batch that is live groups, not top-up: stats are rescaled by it
            stats["trained"] = 1.0 if args.token_level else (min(b, n_live) - min(a, n_live)) / (b - a)
            for k, v in stats.items():
                stats_sum[k] += v * share.item() / args.inner_epochs
        if not args.fsdp:  # FSDP has already reduce-scattered the gradients
            allreduce_grads(params)
        grad_norm = clip_grad_norm(params, args.grad_clip)
        if not torch.isfinite(grad_norm):
            skipped = True
            optimizer.zero_grad(set_to_none=True)
            break
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return stats_sum, grad_norm, skipped


def record(vlm, rollouts, advantages, stats_sum, world, device):
    """6. The step's metrics over the global batch (the same numbers on any number of ranks): reward
    and its parts, advantage spread, lengths, and the loss stats over the part that was trained."""
    tokens, mask, scores, N = rollouts["tokens"], rollouts["mask"], rollouts["scores"], rollouts["tokens"].size(0)
    lengths = mask.sum(1).float()
    truncated = ((tokens == vlm.eos_id) & mask.bool()).sum(1) == 0        # no EOS: cut at max_new_tokens
    gathered = torch.stack([advantages.float(), lengths])                 # (2, N): std and max need all ranks
    if world > 1:
        parts = [torch.empty_like(gathered) for _ in range(world)]
        torch.distributed.all_gather(parts, gathered)
        gathered = torch.cat(parts, 1)
    local = {f"reward_{k}": sum(s[k] for s in scores) / N for k in ("accuracy", "format", "fact", "consistency")}
    local.update(reward=rollouts["total"].mean().item(), adv_std=gathered[0].std().item(),
                 zero_std_groups=(rollouts["std"] == 0).float().mean().item(), len_mean=lengths.mean().item(),
                 len_max=gathered[1].max().item(), truncated=truncated.float().mean().item(), **stats_sum)
    keys = sorted(local)
    vec = torch.tensor([local[k] for k in keys], dtype=torch.float64, device=device)
    if world > 1:  # means of per-rank means: every rank holds the same number of completions
        torch.distributed.all_reduce(vec)
        vec /= world
    rec = dict(zip(keys, vec.tolist()))
    trained = rec.pop("trained")  # share of the batch that was trained on: KL, clip_frac, pg_loss over it
    rec.update({k: rec[k] / trained if trained else 0.0 for k in ("pg_loss", "kl", "clip_frac")})
    return {**rec, "trained": trained}


def holds_open(scores, start):
    """--open_floor: open accuracy and open recall held out at least as well as by the starting model."""
    return all(scores[k] is None or start[k] is None or scores[k] >= start[k]
               for k in ("val_open_accuracy", "val_open_recall"))


def keep_if_best(vlm, best, step, scores, args, start=None):
    """Held-out model selection: OUT/best holds the evaluated model (the starting one included) with the
    best held-out accuracy so far, the earlier one on a tie; with --open_floor only among the models whose
    open accuracy and open recall are at least the starting model's (`start`, its scores). Returns the
    best's scores and step: {"step", "val_accuracy", "val_open_accuracy", "val_open_recall"}."""
    if best is not None and (scores["val_accuracy"] <= best["val_accuracy"]
                             or (args.open_floor and start is not None and not holds_open(scores, start))):
        return best
    best = {"step": step, **scores}
    save_checkpoint(os.path.join(args.out, "best"), vlm, {**best, "start": start or scores})  # every rank
    return best


def seconds_per_part(clock):
    """The step's timings (the t_* metrics) from the times at which its parts ended."""
    return {"t_generate": clock["generate"] - clock["start"], "t_score": clock["score"] - clock["generate"],
            "t_reference": clock["reference"] - clock["old"], "t_train": clock["train"] - clock["reference"],
            "t_step": clock["train"] - clock["start"]}


def readable_rollouts(rollouts, step, args):
    """The first completion of the first --rollouts_per_step groups, with its rewards: rollouts.jsonl."""
    G, n = args.group_size, len(rollouts["texts"])
    return [{"step": step + 1, "question": rollouts["rows"][i // G]["question"],
             "answer": rollouts["rows"][i // G]["answer"], "completion": rollouts["texts"][i], **rollouts["scores"][i]}
            for i in range(0, min(n, args.rollouts_per_step * G), G)]


def print_step(bar, rec, step, start, t_start, args):
    """The step's one line on rank 0."""
    eta = (time.time() - t_start) / (step + 1 - start) * (args.max_steps - step - 1)
    va = f" val_acc {rec['val_accuracy']:.3f}" if "val_accuracy" in rec else ""
    if rec.get("val_open_accuracy") is not None:
        va += f" (open {rec['val_open_accuracy']:.3f}, recall {rec['val_open_recall']:.3f})"
    bar.write(f"step {step + 1} reward {rec['reward']:.3f} (acc {rec['reward_accuracy']:.2f} fmt "
              f"{rec['reward_format']:.2f} fact {rec['reward_fact']:.2f} cons "
              f"{rec['reward_consistency']:.2f}){va} kl {rec['kl']:.4f} clip {rec['clip_frac']:.3f} "
              f"len {rec['len_mean']:.0f} zero-std {rec['zero_std_groups']:.2f} "
              f"{rec['t_step']:.1f}s (gen {rec['t_generate']:.1f}) eta {eta:.0f}s")


# -----------------------------------------------------------------------------
# setup: data, policy, frozen reference, optimizer


def load_rows(args):
    """Training prompts, and the held-out rows (none when the split does not exist, or --eval_every 0)."""
    rows = data.load(args.data, args.split, skip_bad_rows=args.skip_bad_rows)
    val_rows = []
    if args.eval_every:
        try:  # a bad held-out row is an error like any other (or skipped and counted); a missing split is not
            val_rows = data.load(args.val_data or args.data, args.val_split, limit=args.val_limit,
                                 skip_bad_rows=args.skip_bad_rows)
        except data.SplitNotFound as e:
            print0(f"no held-out split for periodic eval ({e}); set --val_split or --eval_every 0")
    return rows, val_rows


def load_models(args, device, ckpt):
    """The policy, ready to train (from the newest checkpoint with --resume), and, when kl_coef != 0, the
    frozen reference."""
    load_on = "cpu" if args.fsdp else device  # FSDP moves each rank's shard to `device`
    if args.fsdp and (args.bf16 or args.engine == "static"):
        raise SetupError("--fsdp shards the weights: it takes neither --bf16 nor --engine static")
    dtype = torch.bfloat16 if args.bf16 else torch.float32  # --bf16: the reference is bf16 too
    vlm = M.load((None if args.lora else ckpt) or args.ckpt, device=load_on, dtype=dtype,
                 texts=data.tokenizer_texts, max_pixels=args.max_pixels, trust_remote_code=args.trust_remote_code,
                 seed=args.seed)
    lora.apply(vlm, args, args.ckpt, resume=ckpt)  # --lora: adapters on the starting model (resumed: ckpt's)
    policy, ref = vlm.model, None
    disable_dropout(policy)  # rollouts, old_logps and the reference run in eval mode: train mode must match
    if args.kl_coef != 0 and args.lora:  # the policy itself, its adapters off (lora.as_reference): no copy
        ref = policy
    elif args.kl_coef != 0:  # the reference is the starting model, also after a resume
        ref = M.load(args.ckpt, device=load_on, texts=data.tokenizer_texts, max_pixels=args.max_pixels,
                     trust_remote_code=args.trust_remote_code, seed=args.seed).model if ckpt else copy.deepcopy(policy)
        ref = ref.to(dtype if args.bf16 else default_dtype(device)).eval().requires_grad_(False)
    if args.freeze_vision:
        freeze_vision(policy)
    if args.grad_ckpt:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.fsdp:  # each rank holds 1/world of the weights, gradients and optimizer state
        fsdp_shard(policy)
        if ref is not None and ref is not policy:  # LoRA's reference is the policy: sharded once
            fsdp_shard(ref)
    return vlm, ref


def disable_dropout(model):
    """Dropout off (TRL's disable_dropout): rollouts and old_logps run in eval mode, so the training forward
    must see the same policy (the first inner epoch's ratio 1). Attention layers keep a float, not a module."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def make_optimizer(params, args, device):
    """AdamW; --bf16: optim.py's, bf16 moments with stochastic rounding."""
    if args.bf16:
        return optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay, seed=args.seed)
    return torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay,
                             fused=device.type == "cuda")


def start_selection(vlm, val_rows, ckpt, args, rank, world, device, images):
    """Held-out model selection (not --keep_last): the starting model is a candidate too, so GRPO can
    never hand back a model that does worse on the held-out split than the one it started from.
    Returns (best so far, the starting model's scores), both None without selection. A resumed run takes
    them, and OUT/best, from its checkpoint: never a best from after it, from a trajectory not reproduced."""
    if not (val_rows and args.eval_every and not args.keep_last):
        return None, None
    if ckpt:
        state, best_dir = load_state(ckpt), os.path.join(args.out, "best")
        if "best" not in state:  # written before checkpoints kept the selection: the last step, as --keep_last
            return None, None
        if rank == 0:
            shutil.rmtree(best_dir, ignore_errors=True)
            if state["best"] is not None:
                copy_folder(os.path.join(ckpt, "best"), best_dir)
        return state["best"], state["start_scores"]
    start_scores = held_out_scores(vlm, val_rows, args.max_new_tokens, rank, world, device, images, args.fsdp)
    best = keep_if_best(vlm, None, 0, start_scores, args)
    print0(f"held-out accuracy at the start: {best['val_accuracy']:.3f} ({len(val_rows)} rows)"
           + (f", open {best['val_open_accuracy']:.3f}, recall {best['val_open_recall']:.3f}"
                if best["val_open_accuracy"] is not None else ""))
    return best, start_scores


def screened_rows(vlm, rows, start, args, rank, world, autocast, sample, images):
    """--screen: the prompts to train on, chosen once by the starting model (OUT/screened.json; a resumed
    run reads them back)."""
    path = os.path.join(args.out, "screened.json")
    if start:
        pool = json.load(open(path))["pool"]
    else:
        pool, n_spread, n_screened = screen(vlm, rows, args, rank, world, autocast, sample, images)
        if rank == 0:
            with open(path, "w") as f:
                json.dump({"spread": n_spread, "pool": pool}, f)
        print0(f"screen: {n_spread} of {n_screened} prompts with accuracy spread; training on {len(pool)}")
    rows = data.take(rows, pool)
    if len(rows) < args.prompts_per_step * max(1, args.dynamic_sampling):
        raise SetupError(f"--screen kept {len(rows)} prompts, fewer than --prompts_per_step x --dynamic_sampling")
    return rows


def save_final(vlm, best, start_scores, args, rank, t_start):
    """The final model at --out: the last step's, or the evaluated step that held out best (OUT/best)."""
    state = {"step": args.max_steps, "args": vars(args), **({"start": start_scores} if start_scores else {})}
    if best is None or best["step"] == args.max_steps:
        save_checkpoint(args.out, vlm, {**state, "selected": best})  # every rank (FSDP gathers)
    else:  # an earlier step held out better: it becomes the final model
        print0(f"final model: step {best['step']}, the best held-out accuracy ({best['val_accuracy']:.3f})"
               + (" of those holding open answers" if args.open_floor else ""))
        if rank == 0:
            save_checkpoint(args.out, M.load(os.path.join(args.out, "best"), dtype=vlm.model.dtype,
                                             max_pixels=args.max_pixels), {**state, "selected": best},
                            attach=lora.attached(os.path.join(args.out, "best")))  # LoRA: its adapter too
    if rank == 0 and best is not None:
        shutil.rmtree(os.path.join(args.out, "best"), ignore_errors=True)
    print0(f"saved {args.out} ({time.time() - t_start:.0f}s)")


# -----------------------------------------------------------------------------
# main: setup, then the loop


def main(args):
    rank, world, device = init_dist(args.device)
    torch.manual_seed(args.seed)
    ckpt = resume_from(args.out) if args.resume else None  # nothing to resume: one line, nothing touched
    data.writable_folder(args.out)
    if args.group_size < 2:
        raise SetupError("--group_size must be >= 2: GRPO's advantage compares completions within a group")
    if args.inner_epochs < 1:
        raise SetupError(f"--inner_epochs {args.inner_epochs}: must be >= 1 (optimisation passes over each batch)")
    P, G, K = args.prompts_per_step // world, args.group_size, max(1, args.dynamic_sampling)  # P: this rank's
    if P * world != args.prompts_per_step:
        raise SetupError(f"--prompts_per_step {args.prompts_per_step} must be divisible by world size {world}")
    weights = {"accuracy": args.w_accuracy, "format": args.w_format, "fact": args.w_fact,
               "consistency": args.w_consistency}
    judge = rewards.make_openai_judge(args.judge_url, args.judge_model) if args.judge_url else None

    # -------------------------------------------------------------------------
    # data, policy, frozen reference, optimizer
    rows, val_rows = load_rows(args)
    vlm, ref = load_models(args, device, ckpt)
    policy = vlm.model
    # every image header reads and every prompt fits, or a one-line error (--skip_bad_rows: skipped and counted)
    rows, val_rows = data.check_rows(vlm, rows, args.skip_bad_rows), data.check_rows(vlm, val_rows, args.skip_bad_rows)
    images = data.ImageCache(vlm.fit_image)  # each image decoded and resized once, not at every use
    if len(rows) < args.prompts_per_step * K:  # a step samples K x prompts_per_step distinct rows
        need = f"--prompts_per_step {args.prompts_per_step}" + (f" x --dynamic_sampling {K}" if K > 1 else "")
        raise SetupError(f"{args.data}: {len(rows)} rows, fewer than {need}")
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, args, device)
    static = args.engine == "static" or (args.engine == "auto" and device.type == "cuda" and not args.fsdp)
    sample = engine.sample if static else M.sample  # the same seeds give the same completions
    start, guard = resume_or_start(args, ckpt, optimizer, policy)
    if rank == 0:  # the logs keep exactly the steps before `start`
        for log in ("metrics.jsonl", "rollouts.jsonl"):
            data.truncate_jsonl(os.path.join(args.out, log), start)
    tracker = Tracker(args, start)  # --report_to: the same records, on rank 0 (a missing package: one line)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    print0(f"grpo: {len(rows)} prompts, {args.prompts_per_step} x {G} completions per step, "
           f"{args.max_steps} steps, {world} rank(s), device {device}, kl_coef {args.kl_coef}")
    best, start_scores = start_selection(vlm, val_rows, ckpt, args, rank, world, device, images)
    if args.screen:
        rows = screened_rows(vlm, rows, start, args, rank, world, autocast, sample, images)

    def now():  # CUDA runs asynchronously: wait for queued kernels so the step's timings are honest
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.time()

    # -------------------------------------------------------------------------
    # the loop: one step is the six parts above
    bar = tqdm(range(start, args.max_steps), initial=start, total=args.max_steps, disable=rank != 0, desc="grpo")
    t_start = time.time()
    for step in bar:
        clock = {"start": now()}  # the time at which each part ended
        lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup))  # linear warmup, then constant
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        # 1. rollout: P (x K) prompts, G completions each
        idx = prompts_for(step, len(rows), args, rank, world)
        rollouts = rollout(vlm, rows, idx, step, args, autocast, sample, images)
        clock["generate"] = now()
        # 2. score, and advantages within each group; dynamic sampling keeps P groups, those with spread first
        score_rollouts(rollouts, weights, judge, args)
        if K > 1:
            spread_first = sorted(range(len(rollouts["rows"])), key=lambda p: (bool(rollouts["std"][p] == 0), p))
            rollouts = keep_groups(rollouts, spread_first[:P], G)
        advantages = group_advantages(rollouts["total"], G, scale=not args.no_std_scale).to(device)
        clock["score"] = now()
        # 3. pick the groups to train
        picked = groups_to_train(rollouts, advantages, args, world, device)
        # 4. reference: their log-probs under the policy as it sampled (several inner epochs) and the reference
        old_logps = frozen_logps(vlm, picked, args, autocast) if args.inner_epochs > 1 else None
        clock["old"] = now()
        ref_logps = frozen_logps(vlm, picked, args, autocast, model=ref).float() if ref is not None else None
        clock["reference"] = now()
        # 5. train
        stats_sum, grad_norm, skipped = train(vlm, params, optimizer, rollouts, picked, old_logps, ref_logps,
                                              step, args, world, autocast)
        clock["train"] = now()
        # 6. record: metrics.jsonl, a few rollouts to read, one printed line
        flag = guard.check(step + 1, grad_norm=grad_norm.item())  # non-finite (train skipped it) or spike
        rec = {"step": step + 1, **record(vlm, rollouts, advantages, stats_sum, world, device), "lr": lr,
               "grad_norm": grad_norm.item(), **seconds_per_part(clock),
               "tokens_per_s": rollouts["mask"].sum().item() * world / (clock["generate"] - clock["start"]),
               "skipped": skipped, **({"spike": True} if flag == "spike" else {})}
        if device.type == "cuda":
            rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        if args.eval_every and val_rows and ((step + 1) % args.eval_every == 0 or step + 1 == args.max_steps):
            scores = held_out_scores(vlm, val_rows, args.max_new_tokens, rank, world, device, images, args.fsdp)
            rec.update(scores)
            if best is not None:
                best = keep_if_best(vlm, best, step + 1, scores, args, start_scores)
        bar.set_postfix(reward=f"{rec['reward']:.2f}", acc=f"{rec['reward_accuracy']:.2f}")
        if rank == 0:
            data.append_jsonl(os.path.join(args.out, "metrics.jsonl"), [rec])
            shown = readable_rollouts(rollouts, step, args)
            data.append_jsonl(os.path.join(args.out, "rollouts.jsonl"), shown)
            tracker.log(rec, shown)
            print_step(bar, rec, step, start, t_start, args)
        if flag:
            print0(f"step {step + 1}: {flag} gradient norm {grad_norm.item()}{', update skipped' if skipped else ''} "
                   f"({len(guard.streak)}/{args.max_bad_steps} in a row)")
        guard.stop(args.out)  # max_bad flagged steps in a row: stop, naming the last good checkpoint
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.max_steps and guard.clean:
            selection = {"best": best, "start_scores": start_scores}  # and OUT/best beside it (hard links)
            save_step_checkpoint(args.out, step + 1, vlm, {"step": step + 1, "args": vars(args),
                                                           "guard": guard.state(), **selection}, optimizer,
                                 attach={"best": os.path.join(args.out, "best")} if best else None)

    save_final(vlm, best, start_scores, args, rank, t_start)
    tracker.close()
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main(parser.parse_args())
    except (data.DataError, SetupError, TrainingStopped) as e:  # bad input, setup, a stop: one line, no traceback
        raise SystemExit(f"error: {e}")
