"""
bench/lora_memory.py: peak memory of one whole GRPO step (rollout, reference log-probs, training pass, AdamW
step) for a published size with random weights, full fine-tuning against --lora, each in a fresh process.

- CPU, fp32: the host's peak resident memory, VmHWM from /proc/self/status, read twice: over the step alone (the
  mark reset through /proc/self/clear_refs once the model, reference and optimizer are built) and over the
  process's life.
- CUDA, bf16 (--bf16: weights and AdamW state, optim.py): torch.cuda.max_memory_allocated over the step.
Beside each, the requirement computed from the parameter counts: full fine-tuning holds weights + gradients +
AdamW's two moments + the reference copy (fp32: 4 + 4 + 8 + 4 = 20 bytes a parameter; bf16: 10); LoRA the
weights plus the adapters' weights, gradients and moments (16 bytes an adapter parameter; the reference is the
base with its adapters off, no copy); on the CPU both plus the process before the model (imports, data). The
computed figure leaves out activations. It is checked against the memory held right after AdamW's step (an
optimizer step hook: gradients still there, both moments made, the backward's activations freed), which holds
exactly what it counts (state_measured_over_computed); the step's peak has the activations on top, at the stated
small shape (measured_over_computed, activations_mb).

    python bench/lora_memory.py --model random:smolvlm2-256m --out bench/results/lora_memory_smolvlm2_256m.json
    nice -n 10 python bench/lora_memory.py --model random:qwen2.5-vl-3b --configs lora \\
        --out bench/results/lora_memory_qwen2.5_vl_3b.json   # full fine-tuning computed only: 75 GB
    python bench/lora_memory.py --model random:qwen2.5-vl-3b --device cuda --out runs/lora_memory_gpu.json

The shape: --prompts prompts x --group_size completions of --max_new_tokens forced tokens (--ignore_eos), every
group trained (--train_zero_std), a small image (Qwen: --max_pixels 12544, 112 x 112; SmolVLM: one 512 px tile),
--grad_ckpt (as the paper's command runs the 3B), so activations stay small beside the weights and the arithmetic
can be checked.
"""

import argparse
import copy
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
parser.add_argument("--model", default="random:smolvlm2-256m", help="a published size with random weights")
parser.add_argument("--configs", nargs="+", default=["full", "lora"], choices=["full", "lora"],
                    help="what to measure (full: every weight trains; lora: --lora R)")
parser.add_argument("--lora", type=int, default=16, help="LoRA rank R (alpha 2 R, the language model's projections)")
parser.add_argument("--prompts", type=int, default=2, help="prompts in the step")
parser.add_argument("--group_size", type=int, default=2, help="completions per prompt")
parser.add_argument("--max_new_tokens", type=int, default=32, help="forced completion length")
parser.add_argument("--device", default="cpu", help="cpu (fp32, host RSS) or cuda (bf16, max_memory_allocated)")
parser.add_argument("--out", required=True, help="results JSON")
parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one configuration, in this process


def status_mb(field="VmHWM"):
    """A memory field of /proc/self/status in MB: VmHWM, the peak resident memory since the process started or
    since the last reset_peak(); VmRSS, the resident memory now."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set size to the current one
        f.write("5")


def child(args):
    """One GRPO step of one configuration, with grpo.py's own functions; its figures as one JSON line."""
    import torch
    sys.path.insert(0, ROOT)
    import data
    import grpo
    import lora
    import model as M
    cuda = args.device.startswith("cuda")
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    argv = ["--ckpt", args.model, "--prompts_per_step", args.prompts, "--group_size", args.group_size,
            "--max_new_tokens", args.max_new_tokens, "--ignore_eos", "--train_zero_std", "--micro_batch",
            args.prompts * args.group_size, "--device", args.device, "--engine", "auto", "--grad_ckpt"]
    argv += ["--bf16"] if cuda else []
    argv += ["--lora", args.lora] if args.child == "lora" else []
    gargs = grpo.parser.parse_args([str(a) for a in argv])
    rows = data.load("demo", "train", limit=args.prompts)
    device = torch.device(args.device)
    before_mb = status_mb()  # the process without the model: imports, rows
    t0 = time.time()
    qwen = "qwen" in args.model
    vlm = M.load(args.model, device=device, dtype=torch.bfloat16 if cuda else torch.float32,
                 texts=data.tokenizer_texts, max_pixels=112 * 112 if qwen else None)
    if not qwen and hasattr(vlm.image_processor, "do_image_splitting"):  # SmolVLM: one 512 px tile, 64 tokens
        vlm.image_processor.do_image_splitting = False
        vlm.image_processor.size = {"longest_edge": 512}
    lora.apply(vlm, gargs, None)  # --lora: adapters on the language model's projections; else nothing
    grpo.disable_dropout(vlm.model)
    vlm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # --grad_ckpt
    # the reference, as grpo.load_models makes it: a frozen copy, or under LoRA the policy with its adapters off
    ref = vlm.model if gargs.lora else copy.deepcopy(vlm.model).eval().requires_grad_(False)
    params = [p for p in vlm.model.parameters() if p.requires_grad]
    optimizer = grpo.make_optimizer(params, gargs, device)
    built_s = time.time() - t0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        state_mb = torch.cuda.memory_allocated() / 2 ** 20
    else:
        build_mb = status_mb()  # the peak while the model was built
        reset_peak()
        state_mb = status_mb()
    # the training state measured where it is whole: right after AdamW's step, gradients not yet freed and both
    # moments allocated (AdamW makes them at its first step), the activations of the backward already freed
    after_step = []
    optimizer.register_step_post_hook(lambda *_: after_step.append(
        torch.cuda.memory_allocated() / 2 ** 20 if cuda else status_mb("VmRSS")))
    # the step, as grpo.main runs it: rollout, score, advantages, reference, train (forward, backward, AdamW)
    t1 = time.time()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    sample = grpo.engine.sample if cuda else M.sample
    rollouts = grpo.rollout(vlm, rows, list(range(args.prompts)), 0, gargs, autocast, sample)
    grpo.score_rollouts(rollouts, {"accuracy": 1, "format": 1, "fact": 1, "consistency": 1}, None, gargs)
    # random weights earn no reward: advantages of +-1 instead of 0, so the update is a real one (same memory)
    advantages = torch.tensor([1.0, -1.0] * (len(rollouts["total"]) // 2), device=device)
    picked = grpo.groups_to_train(rollouts, advantages, gargs, 1, device)
    ref_logps = grpo.frozen_logps(vlm, picked, gargs, autocast, model=ref).float()
    _, grad_norm, _ = grpo.train(vlm, params, optimizer, rollouts, picked, None, ref_logps, 0, gargs, 1, autocast)
    if cuda:
        torch.cuda.synchronize()
        step_mb = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        step_mb = status_mb()
    n_lora = sum(p.numel() for n, p in vlm.model.named_parameters() if ".lora_" in n)
    n_params = sum(p.numel() for p in vlm.model.parameters()) - n_lora  # the model's own
    print(json.dumps({"config": args.child, "device": args.device, "dtype": "bf16" if cuda else "fp32",
                      "params": n_params, "trainable": sum(p.numel() for p in params), "lora_params": n_lora,
                      "before_model_mb": round(before_mb, 1), "state_mb": round(state_mb, 1),
                      "peak_step_mb": round(step_mb, 1), "after_adamw_mb": round(max(after_step), 1), "peak_process_mb": None if cuda else round(max(build_mb, step_mb), 1),
                      "tokens": int(rollouts["mask"].sum()),
                      "grad_norm": float(grad_norm), "build_s": round(built_s, 1),
                      "step_s": round(time.time() - t1, 1)}), flush=True)


def computed(run, cuda):
    """The requirement from the parameter counts (MB): the training state, plus on the CPU the process before
    the model. Full: weights, gradients, two AdamW moments, the reference copy; LoRA: weights + the adapters'."""
    b = 2 if cuda else 4  # bytes a weight (bf16 on CUDA with --bf16, fp32 on the CPU)
    P, T = run["params"], run["lora_params"]
    state = 5 * b * P if run["config"] == "full" else b * P + 4 * 4 * T  # adapters: fp32 w, grad, m, v
    return state / 2 ** 20 + (0 if cuda else run["before_model_mb"])


def main(args):
    if args.child:
        return child(args)
    cuda = args.device.startswith("cuda")
    # a fixed mmap threshold: glibc returns every large freed block at once, so the resident peak is what the
    # tensors held (with its default, growing threshold the same run read 2.46 or 3.05 GB, run to run)
    env = {"MALLOC_MMAP_THRESHOLD_": "131072", **os.environ, "TOKENIZERS_PARALLELISM": "false"}
    runs = []
    for config in args.configs:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", config] + \
              [str(a) for k in ("model", "lora", "prompts", "group_size", "max_new_tokens", "device", "out")
               for a in (f"--{k}", getattr(args, k))]
        t = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"error: {config} failed (exit status {proc.returncode}; -9: killed, e.g. out of memory)"
                             f":\n{proc.stderr[-3000:]}")
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        run.update(computed_mb=round(computed(run, cuda), 1), seconds=round(time.time() - t, 1))
        measured = run["peak_step_mb"]
        run["measured_over_computed"] = round(measured / run["computed_mb"], 3)
        # the arithmetic's own check: the state it counts, measured when all of it is held (after AdamW's step)
        run["state_measured_over_computed"] = round(run["after_adamw_mb"] / run["computed_mb"], 3)
        run["activations_mb"] = round(measured - run["after_adamw_mb"], 1)  # the step's peak above that state
        runs.append(run)
        print(f"{config}: after AdamW's step {run['after_adamw_mb'] / 1024:.2f} GiB against "
              f"{run['computed_mb'] / 1024:.2f} GiB computed (x{run['state_measured_over_computed']}); peak "
              f"{measured / 1024:.2f} GiB over the step (x{run['measured_over_computed']}: activations "
              f"{run['activations_mb']:.0f} MB), {run['trainable'] / 1e6:.2f} M trainable, step {run['step_s']} s",
              flush=True)
    P = runs[0]["params"]
    b = 2 if cuda else 4
    result = {"command": " ".join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + sys.argv[1:]),
              "model": args.model, "device": args.device, "dtype": "bf16" if cuda else "fp32",
              "shape": f"{args.prompts} prompts x G {args.group_size} x {args.max_new_tokens} new tokens",
              "params": P, "lora_rank": args.lora,
              "full_finetuning_computed_gb": round((5 * b * P) / 1e9 + (0 if cuda else runs[0]["before_model_mb"] / 1e3), 1),
              "runs": runs}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"full fine-tuning computed: {result['full_finetuning_computed_gb']} GB; wrote {args.out}")


if __name__ == "__main__":
    main(parser.parse_args())
