"""
sft.py: stage 1 of MEDFACT-R1, supervised fine-tuning on knowledge-grounded pseudo-labels.

retrieve.py writes one pseudo-label per training question: the image, the question and a target
`<think>reasoning grounded in retrieved evidence</think><answer>answer</answer>`. This script
teaches the model that format and those facts (the "cold start" the paper's ablation needs).

Departures from the released MEDFACT-R1 code, on purpose:
- the loss covers the assistant's target tokens only (and the closing <|im_end|>); prompt and
  image tokens are masked. The released code trains on the prompt too, which spends capacity on
  predicting the instruction text and the image placeholders.
- the loss is the mean over all target tokens of the global batch, so 1 process with batch B and
  N processes with B/N each compute the same number, and the same update.

Run it:
    python sft.py --data runs/pseudo.jsonl --model tiny --out runs/sft                     # CPU
    python sft.py --data runs/pseudo.jsonl --model Qwen/Qwen2.5-VL-3B-Instruct --lr 1e-5 \\
        --batch_size 16 --grad_accum 4 --freeze_vision --grad_ckpt --out runs/sft          # 1 GPU
    torchrun --nproc_per_node=8 sft.py --data runs/pseudo.jsonl --model PATH --out runs/sft  # N GPUs
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --master_addr=HOST0 --master_port=29500 \\
        sft.py ...                   # 2 nodes: the same command on each, R = 0 on HOST0, 1 on the other
    ... --fsdp                       # shard weights, gradients, optimizer state (FSDP2): too big for 1 GPU
    ... --lora 16                    # train LoRA adapters on --model instead (lora.py: merged model + adapter/)
    ... --resume                     # continue from the newest runs/sft/checkpoints/step_N
    ... --skip_bad_rows              # skip (and count) bad rows instead of stopping with a one-line error
Resume is exact: a run killed at any point and restarted with --resume (same --out) reaches the
same weights and metrics as one never interrupted; with nothing to resume it stops, touching
nothing. A non-finite loss or gradient skips the update; a spike (model.StepGuard) is flagged;
--max_bad_steps flagged steps in a row stop the run, naming the last good checkpoint
(--debug_nan_steps forces non-finite steps, for tests). With several nodes, --out must be a
folder every node sees (rank 0 writes it, all ranks resume from it).

Outputs in --out: the final model (a Hugging Face folder that grpo.py, evaluate.py and
transformers load), metrics.jsonl (step, loss, lr, grad_norm, val_loss, ...), args.json, and
resumable checkpoints/step_N (model, optimizer, step) every --save_every steps.
"""

import argparse
import json
import math
import os
import random
import time

import torch
from tqdm import tqdm

import data
import lora
import model as M
import optim
from checkpoint import TrainingStopped, resume_from, resume_or_start, save_checkpoint, save_step_checkpoint
from common import SetupError, allreduce_grads, clip_grad_norm, init_dist, print0
from families import freeze_vision, train_lite0_blocks, vision_tower
from fsdp import fsdp_shard
from tracker import Tracker

# -----------------------------------------------------------------------------
# config

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
# data
parser.add_argument("--data", default="runs/pseudo.jsonl", help="pseudo-label JSONL from retrieve.py")
parser.add_argument("--val_frac", type=float, default=0.05, help="share of rows held out for the val loss")
parser.add_argument("--skip_bad_rows", action="store_true", help="skip (and count) bad rows instead of failing")
# model
parser.add_argument("--model", default="tiny", help="tiny | random:qwen2.5-vl-3b | checkpoint folder | hub name")
parser.add_argument("--max_pixels", type=int, default=None, help="cap image resolution (pixels)")
parser.add_argument("--freeze_vision", action="store_true", help="do not train the vision tower")
parser.add_argument("--train_cnn_blocks", type=int, default=0,
                    help="tiny-lite0: also train the CNN's last N blocks and head conv (0: all frozen, cached)")
parser.add_argument("--cnn_lr_scale", type=float, default=0.1, help="tiny-lite0: the trained CNN layers' lr x this")
parser.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing (less memory, ~30%% slower)")
parser.add_argument("--trust_remote_code", action="store_true", help="run a checkpoint's own Python code")
parser.add_argument("--fsdp", action="store_true", help="shard the model over ranks (FSDP2): too big for 1 GPU")
parser.add_argument("--bf16", action="store_true",
                    help="bf16 weights and AdamW state with stochastic rounding (optim.py): half the memory")
lora.add_args(parser)
# optimisation
parser.add_argument("--batch_size", type=int, default=32, help="global batch (sequences per optimizer step)")
parser.add_argument("--grad_accum", type=int, default=1, help="micro-steps per rank per optimizer step")
parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (the 3B: 1e-5; tiny from scratch: 2e-3)")
parser.add_argument("--min_lr_frac", type=float, default=0.1, help="cosine decays to lr * this")
parser.add_argument("--warmup", type=int, default=30, help="linear warmup steps")
parser.add_argument("--weight_decay", type=float, default=0.01, help="AdamW decay of the matrices (not norms, biases)")
parser.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this (0: no clipping)")
parser.add_argument("--epochs", type=float, default=3.0, help="used when --max_steps is 0")
parser.add_argument("--max_steps", type=int, default=0, help="optimizer steps (0: --epochs over the training rows)")
parser.add_argument("--seed", type=int, default=0, help="the held-out slice, the data order and the weights' init")
# logging and checkpoints
parser.add_argument("--out", default="runs/sft", help="the final model, metrics.jsonl, args.json, checkpoints/")
parser.add_argument("--log_every", type=int, default=10, help="print a line every N steps (metrics.jsonl: every step)")
parser.add_argument("--eval_every", type=int, default=100, help="held-out loss every N steps (0: only at the end)")
parser.add_argument("--save_every", type=int, default=0, help="resumable checkpoint every N steps (0: never)")
parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
parser.add_argument("--report_to", choices=["none", "tensorboard", "wandb", "trackio"], default="none",
                    help="also log metrics.jsonl's records there (tracker.py)")
parser.add_argument("--project", default=None, help="wandb/trackio project ($WANDB_PROJECT/$TRACKIO_PROJECT, medfact)")
parser.add_argument("--device", default="auto", help="auto (cuda, mps, cpu) or a torch device")
parser.add_argument("--max_bad_steps", type=int, default=3,
                    help="stop after this many flagged steps (non-finite or spike) in a row")
parser.add_argument("--debug_nan_steps", type=int, nargs="*", default=[],
                    help="testing: make the loss NaN at these steps (1-based) to exercise the non-finite guard")


def target_ids(vlm, r):
    """A row's target tokens + <|im_end|>, tokenised once a step: kept in the step's copy of the row."""
    if "_target_ids" not in r:
        r["_target_ids"] = vlm.tokenizer(r["target"], add_special_tokens=False).input_ids + [vlm.eos_id]
    return r["_target_ids"]


def target_batch(vlm, rows):
    """Tokenised targets (+ <|im_end|>), right-padded: tokens (B, T) and mask (B, T)."""
    ids = [target_ids(vlm, r) for r in rows]
    T = max(len(x) for x in ids)
    tokens = torch.full((len(ids), T), vlm.pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for i, x in enumerate(ids):
        tokens[i, :len(x)], mask[i, :len(x)] = torch.tensor(x), 1
    return tokens.to(vlm.device), mask.to(vlm.device)


def sft_loss(vlm, rows, n_tokens, autocast, images=data.load_image):
    """Sum of target-token NLL / n_tokens (the global batch's target-token count). images: row -> PIL image
    (a data.ImageCache in training)."""
    batch = vlm.encode([images(r) for r in rows], [r["question"] for r in rows],
                       names=[f"{r.get('id')}" for r in rows])
    tokens, mask = target_batch(vlm, rows)
    with autocast:
        logps = M.completion_logps(vlm, batch, tokens)  # (B, T): prompt positions are never scored
    return -(logps * mask).sum() / n_tokens, int(mask.sum())


def n_target_tokens(vlm, rows):
    return sum(len(target_ids(vlm, r)) for r in rows)


TOKENIZER_ROWS = 20_000  # a from-scratch tokenizer's 4k-token vocabulary learns from this many rows at most


def tokenizer_texts(rows, source):
    """What a from-scratch tokenizer learns from: the questions and targets of the first TOKENIZER_ROWS
    training rows, and the first passage each of the first 2,000 cites (retrieve.py's SOURCE.passages.jsonl
    beside a pseudo-label file; older files carry the passages in the rows)."""
    head = data.take(rows, range(min(len(rows), TOKENIZER_ROWS)))
    texts = [t for r in head for t in (r["question"], r["target"])]
    sidecar = os.path.splitext(str(source))[0] + ".passages.jsonl"
    passages = {p["id"]: p for _, p, _ in data.iter_jsonl(sidecar) if isinstance(p, dict) and "id" in p} \
        if os.path.isfile(sidecar) else {}
    for r in data.take(rows, range(min(len(rows), 2000))):
        first = (r.get("evidence") or [passages.get(i) for i in (r.get("evidence_ids") or [])[:1]])[:1]
        texts += [p["text"] for p in first if isinstance(p, dict)]
    return texts


def load_rows(args):
    """The pseudo-label rows (each must carry its target), split into training rows and a fixed held-out slice."""
    rows = data.load(args.data, "train", skip_bad_rows=args.skip_bad_rows)
    has = [bool(t) for t in data.field(rows, "target")]
    if not all(has):
        missing = [i for i, ok in enumerate(has) if not ok]
        msg = f"{args.data}: row {rows[missing[0]]['id']}: no 'target' field (is this retrieve.py's output?)"
        if not args.skip_bad_rows:
            raise data.DataError(msg)
        print0(f"skipped {len(missing)} rows without a target: first: {msg}")
        rows = data.take(rows, [i for i, ok in enumerate(has) if ok])
    # the held-out slice depends on the seed only, so a resumed run holds out the same rows
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed)).tolist()
    n_val = int(len(rows) * args.val_frac)
    return data.take(rows, order[n_val:]), data.take(rows, order[:n_val])


def make_optimizer(params, args, device, pretrained_params=()):
    """AdamW; weight decay on the matrices only (norm gains and biases are not pulled towards 0).
    --bf16: optim.AdamW, whose stochastic rounding keeps updates smaller than a bf16 step."""
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    pretrained = {id(p) for p in pretrained_params}  # tiny-lite0's trained CNN layers: a smaller lr
    if pretrained:
        groups = [{**g, "params": [p for p in g["params"] if id(p) in pretrained], "lr_scale": args.cnn_lr_scale}
                  for g in groups] + [{**g, "params": [p for p in g["params"] if id(p) not in pretrained]}
                                      for g in groups]
    if args.bf16:
        return optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), seed=args.seed)
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def global_batch(rows, step, args):
    """The rows of `step`, the same whatever the world size and after a resume: consecutive batches of a
    permutation drawn afresh, from the seed, every data epoch."""
    data_epoch, i = divmod(step, len(rows) // args.batch_size)
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed + 1 + data_epoch))
    return [rows[j] for j in perm[i * args.batch_size:(i + 1) * args.batch_size].tolist()]


def lr_at(step, args, max_steps):
    """Linear warmup, then cosine decay to min_lr_frac * lr."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, max_steps - args.warmup)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def accumulate_gradients(vlm, mine, n_tokens, micro, args, step, world, device, autocast, images):
    """Forward and backward over this rank's rows of the step, grad_accum micro-batches of `micro` rows;
    returns the global batch's loss (the same number on every rank)."""
    loss_sum = 0.0
    for k in range(args.grad_accum):
        # x world: allreduce_grads averages, and we want the gradient of the global token mean
        loss, _ = sft_loss(vlm, mine[k * micro:(k + 1) * micro], n_tokens / world, autocast, images)
        if step + 1 in args.debug_nan_steps:
            loss = loss * float("nan")
        loss.backward()
        loss_sum += loss.item() / world
    if world > 1:
        t = torch.tensor([loss_sum], device=device)
        torch.distributed.all_reduce(t)
        loss_sum = t.item()
    return loss_sum


@torch.no_grad()
def val_loss(vlm, val_rows, chunk, rank, world, device, autocast, images=data.load_image):
    """Mean target-token NLL over the held-out rows, in chunks of `chunk` rows per rank."""
    vlm.model.eval()
    mine = val_rows[rank::world]
    total = torch.zeros(2, device=device)
    for i in range(math.ceil(math.ceil(len(val_rows) / world) / chunk)):  # as many forwards on every rank (FSDP)
        part = mine[i * chunk:(i + 1) * chunk]
        loss, n = sft_loss(vlm, part or val_rows[:1], 1.0, autocast, images)  # an empty share still runs, unscored
        if part:
            total += torch.tensor([loss.item(), n], device=device)
    if world > 1:
        torch.distributed.all_reduce(total)
    vlm.model.train()
    return (total[0] / total[1].clamp(min=1)).item()


def main(args):
    rank, world, device = init_dist(args.device)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    ckpt = resume_from(args.out) if args.resume else None  # nothing to resume: one line, nothing touched
    data.writable_folder(args.out)

    # -------------------------------------------------------------------------
    # data: pseudo-label rows, a fixed held-out slice, a seeded order per epoch
    train_rows, val_rows = load_rows(args)

    # -------------------------------------------------------------------------
    # model (the newest checkpoint's with --resume), then every row checked against it before step 1
    # a tiny model's tokenizer learns from the text it will see: questions, targets, some evidence
    texts = lambda: tokenizer_texts(train_rows, args.data)  # noqa: E731  (only a model built from scratch asks)
    if args.bf16 and args.fsdp:
        raise SetupError("--bf16 is for unsharded weights: drop --fsdp (or --bf16)")
    vlm = M.load((None if args.lora else ckpt) or args.model, device="cpu" if args.fsdp else device,
                 dtype=torch.bfloat16 if args.bf16 else torch.float32, texts=texts,
                 max_pixels=args.max_pixels, trust_remote_code=args.trust_remote_code, seed=args.seed)
    lora.apply(vlm, args, args.model, resume=ckpt)  # --lora: adapters on --model (resumed: the checkpoint's)
    # its image header reads and its prompt fits, or a one-line error (--skip_bad_rows: skipped and counted)
    train_rows = data.check_rows(vlm, train_rows, args.skip_bad_rows, target=True)
    val_rows = data.check_rows(vlm, val_rows, args.skip_bad_rows, target=True)
    images = data.ImageCache(vlm.fit_image)  # each image decoded and resized once, not at every step
    micro = args.batch_size // (world * args.grad_accum)
    if micro * world * args.grad_accum != args.batch_size:
        raise SetupError(f"--batch_size {args.batch_size} must be divisible by world_size ({world}) x "
                         f"--grad_accum ({args.grad_accum})")
    steps_per_epoch = len(train_rows) // args.batch_size
    if steps_per_epoch == 0:
        raise SetupError(f"{args.data}: {len(train_rows)} training rows, fewer than one batch of {args.batch_size}")
    max_steps = args.max_steps or int(args.epochs * steps_per_epoch)

    # -------------------------------------------------------------------------
    # optimizer; resume restores it and the step (the data position) too
    model = vlm.model
    model.train()
    if args.train_cnn_blocks and not ckpt:  # a resumed run's config already says it
        train_lite0_blocks(model, args.train_cnn_blocks)
    if args.freeze_vision:
        freeze_vision(model)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.fsdp:  # each rank holds 1/world of the weights, gradients and optimizer state (moved to `device`)
        fsdp_shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    cnn = getattr(vision_tower(model), "cnn", None)  # tiny-lite0's pretrained CNN, when part of it trains
    optimizer = make_optimizer(params, args, device, [p for p in cnn.parameters() if p.requires_grad] if cnn else ())
    start, guard = resume_or_start(args, ckpt, optimizer, model)
    if rank == 0:  # the logs keep exactly the steps before `start`
        for log in ("metrics.jsonl",):
            data.truncate_jsonl(os.path.join(args.out, log), start)
    tracker = Tracker(args, start)  # --report_to: the same records, on rank 0 (a missing package: one line)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    print0(f"sft: {len(train_rows)} train / {len(val_rows)} val rows, {M.count_params(model) / 1e6:.1f}M params, "
           f"{max_steps} steps of {args.batch_size} ({world} ranks x {args.grad_accum} x {micro}), device {device}")

    def log(rec):
        if rank == 0:
            data.append_jsonl(os.path.join(args.out, "metrics.jsonl"), [rec])
            tracker.log(rec)

    # -------------------------------------------------------------------------
    # training loop
    bar = tqdm(range(start, max_steps), initial=start, total=max_steps, disable=rank != 0, desc="sft")
    t0 = time.time()
    for step in bar:
        rows_g = global_batch(train_rows, step, args)
        n_tokens = n_target_tokens(vlm, rows_g)  # the loss is a mean over the global batch's target tokens
        mine = rows_g[rank * micro * args.grad_accum:(rank + 1) * micro * args.grad_accum]
        lr = lr_at(step, args, max_steps)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr * param_group.get("lr_scale", 1.0)
        loss = accumulate_gradients(vlm, mine, n_tokens, micro, args, step, world, device, autocast, images)
        if not args.fsdp:  # FSDP has already reduce-scattered the gradients
            allreduce_grads(params)
        grad_norm = clip_grad_norm(params, args.grad_clip)
        flag = guard.check(step + 1, loss, grad_norm.item())  # non-finite: skip the update; spike: flag it
        if flag:
            skip = ", update skipped" if flag == "non-finite" else ""
            print0(f"step {step + 1}: {flag} (loss {loss}, grad norm {grad_norm.item()}){skip} "
                   f"({len(guard.streak)}/{args.max_bad_steps} in a row)")
        if flag == "non-finite":
            optimizer.zero_grad(set_to_none=True)
            log({"step": step + 1, "skipped": True, "loss": None, "lr": lr})
            guard.stop(args.out)  # max_bad in a row: stop, naming the last good checkpoint
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rec = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm.item(),
               "tokens": n_tokens, "time": time.time() - t0, **({"spike": True} if flag else {})}
        if args.eval_every and (step + 1) % args.eval_every == 0 and val_rows:
            rec["val_loss"] = val_loss(vlm, val_rows, micro * args.grad_accum, rank, world, device, autocast, images)
        log(rec)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}")
        if rank == 0 and (step + 1) % args.log_every == 0:
            vl = f" val_loss {rec['val_loss']:.4f}" if "val_loss" in rec else ""
            bar.write(f"step {step + 1}/{max_steps} loss {loss:.4f}{vl} lr {lr:.2e} "
                      f"grad_norm {grad_norm.item():.2f} {(time.time() - t0) / (step + 1 - start):.2f}s/step")
        guard.stop(args.out)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < max_steps and guard.clean:
            save_step_checkpoint(args.out, step + 1, vlm, {"step": step + 1, "args": vars(args),
                                                           "guard": guard.state()}, optimizer)

    # -------------------------------------------------------------------------
    # the final model, a plain Hugging Face folder at --out
    final = {"step": max_steps, "args": vars(args)}
    if val_rows:
        final["val_loss"] = val_loss(vlm, val_rows, micro * args.grad_accum, rank, world, device, autocast, images)
        print0(f"final val_loss {final['val_loss']:.4f}")
    save_checkpoint(args.out, vlm, final)  # every rank: under FSDP the weights are gathered first
    print0(f"saved {args.out} ({time.time() - t0:.0f}s)")
    tracker.close()
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main(parser.parse_args())
    except (data.DataError, SetupError, TrainingStopped) as e:  # bad input, setup, a stop: one line, no traceback
        raise SystemExit(f"error: {e}")
