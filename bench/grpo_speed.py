"""
How fast is one GRPO step of grpo.py, against TRL's GRPOTrainer on the same model and settings?

    python bench/grpo_speed.py --model tiny                     # CPU, a few minutes
    python bench/grpo_speed.py --model random:qwen2.5-vl-3b     # one GPU: the paper's architecture

Both sides load the SAME weights from one checkpoint folder this script writes first, read the
same rows (demo questions padded to ~60 words, one image each: 112x112 for tiny, 448x448 for
the 3B), and run the same setting: G = 6, 1 and 3 prompts per step (--prompts), 256 completion
tokens forced (ours: --ignore_eos; TRL: min_new_tokens), every group trained (ours:
--train_zero_std, as TRL does; a random model's groups mostly score alike), KL coefficient 0.04 with a frozen
reference, temperature 1, one inner iteration, all completions in one micro-batch, no vLLM;
on CUDA gradient checkpointing and, by default (--bf16), bf16 weights on both sides: ours grpo.py
--bf16 (bf16 AdamW state with stochastic rounding, optim.py), TRL its usual bf16 model (plain bf16
AdamW); --no-bf16 gives fp32 weights under bf16 autocast on both (reference in bf16).
- ours: grpo.py itself, as a subprocess (rollouts on engine.py on CUDA: --engine auto); its
  metrics.jsonl gives the step split.
- TRL: this script again as a subprocess (--worker trl): GRPOTrainer with the checkpoint's own
  processor (AutoProcessor; model.hf_processor: no torchvision, the training prompt as its chat
  template) and rewards.score as its reward function; a callback times each step (on_step_begin -> on_step_end), and wrappers time its
  generation, reward and reference passes; training = the rest of the step.
Runs alternate ours / TRL (--repeats times per setting, the first step of each run dropped as
warm-up); reported are the medians and the best of all timed steps and, on CPU, the CPU seconds
per step (read from /proc as each step's log line appears), which a shared machine distorts far
less than wall time. On a shared CPU machine pass --threads 1 (both sides alike).
Peak memory: on CPU the peak RSS of each subprocess (os.wait4's ru_maxrss, so imports
included); on CUDA torch.cuda.max_memory_allocated (TRL here; ours if grpo.py logs peak_mem_gib).
Decode step = generation time / completion tokens per row, against the bandwidth bound
(bytes of the text weights read per token / copy bandwidth measured on the GPU; n/a on CPU).
The decode engine alone (--worker decode, one more subprocess): engine.sample against model.sample
on one batch of --decode_prompts x G (18 rows), forced length: ms per decode step, CUDA graph
capture + warm-up seconds, completion tokens/s, peak memory, and how many tokens the two agree on
(all of them in float32; bf16 rounding makes them part ways somewhere).
Needs trl installed (see bench/README.md). Prints a table last; writes the JSON only to --out
(bench/gpu_check.sh passes bench/results/grpo_speed_<device>.json).
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
# model and data
parser.add_argument("--model", default="tiny", help="a Qwen2.5-VL or Qwen3-VL (the same chat format): tiny | "
                    "random:qwen2.5-vl-3b | random:qwen3-vl-2b | local folder")
parser.add_argument("--image_size", type=int, default=None, help="square images (default 112 tiny, 448 otherwise)")
parser.add_argument("--words", type=int, default=60, help="words per prompt (question + instruction)")
# the GRPO setting, the same on both sides
parser.add_argument("--prompts", type=int, nargs="+", default=[1, 3], help="prompts per step, one setting each")
parser.add_argument("--group_size", type=int, default=6)
parser.add_argument("--max_new_tokens", type=int, default=256, help="forced completion length")
parser.add_argument("--kl_coef", type=float, default=0.04)
parser.add_argument("--temperature", type=float, default=1.0)
parser.add_argument("--grad_ckpt", action=argparse.BooleanOptionalAction, default=None,
                    help="gradient checkpointing on both sides (default: on with CUDA, off on CPU)")
parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 weights on both sides (ours: grpo.py --bf16; default: on with CUDA, off on CPU)")
parser.add_argument("--engine", choices=["auto", "static", "hf"], default="auto", help="grpo.py --engine")
parser.add_argument("--decode_prompts", type=int, default=3, help="prompts in the decode benchmark (x G rows)")
# measurement
parser.add_argument("--steps", type=int, default=4, help="timed steps per run (one more runs first, as warm-up)")
parser.add_argument("--repeats", type=int, default=3, help="runs per side and setting, alternating ours / TRL")
parser.add_argument("--threads", type=int, default=None,
                    help="CPU threads per run (OMP_NUM_THREADS), the same for both sides (default: torch's)")
parser.add_argument("--workdir", default=None, help="checkpoint, rows and run folders (default: a temporary one)")
parser.add_argument("--out", default=None, help="the results JSON (none is written without it)")
parser.add_argument("--worker", choices=["build", "trl", "decode"], default=None, help=argparse.SUPPRESS)
parser.add_argument("--run_dir", default=None, help=argparse.SUPPRESS)
parser.add_argument("--P", type=int, default=None, help=argparse.SUPPRESS)

FILLER = ("Clinical history: an adult patient presents to the emergency department with shortness of breath, "
          "cough and chest pain for three days, with a history of smoking and no recent surgery or trauma. "
          "A frontal chest radiograph was obtained on admission, and the team asks for a careful reading. ")

# -----------------------------------------------------------------------------
# the build worker: the checkpoint both sides load, the rows both sides read, device facts


def build(args, work):
    import torch
    from PIL import Image
    import data
    import model as M
    from checkpoint import save_checkpoint
    from families import INSTRUCTION, chat_prompt
    from scratch import TINY_IMAGE_SIZE
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    vlm = M.load(args.model, device=device, texts=data.tokenizer_texts)  # bf16 on CUDA, fp32 on CPU; both sides upcast the policy to fp32
    ckpt = work / "ckpt"
    save_checkpoint(str(ckpt), vlm, {"step": 0})
    # rows: demo questions, each padded with a fixed clinical history to ~--words words with the instruction
    size = args.image_size or (TINY_IMAGE_SIZE if args.model == "tiny" else 448)
    (work / "images").mkdir(exist_ok=True)
    rows, n = [], 48
    for i, r in enumerate(data.load("demo", "train")[:n * 7:7]):  # every 7th: several images and question kinds
        left = args.words - len(INSTRUCTION.split()) - len(r["question"].split())
        question = " ".join((FILLER.split() * 4)[:max(0, left)] + [r["question"]])
        path = work / "images" / f"{i:03d}.png"
        r["image"].convert("RGB").resize((size, size), Image.BILINEAR).save(path)
        rows.append({"id": f"bench-{i:03d}", "image": str(path), "question": question, "answer": r["answer"],
                     "answer_type": r["answer_type"], "keywords": r["keywords"]})
    with open(work / "rows.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    batch = vlm.encode([Image.open(r["image"]) for r in rows[:4]], [r["question"] for r in rows[:4]])
    text = vlm.model.model.language_model
    info = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "device_kind": device,
        "params": M.count_params(vlm.model),
        # what one decode step must read: the text weights (a tied lm_head reads the embedding matrix whole)
        "decode_params": sum(p.numel() for p in text.parameters())
        + (0 if vlm.model.config.tie_word_embeddings else vlm.model.lm_head.weight.numel()),
        "image_size": size,
        "image_tokens": int((batch["input_ids"][0] == vlm.image_token_id).sum()),
        "prompt_tokens_mean": batch["attention_mask"].sum(1).float().mean().item(),
        "prompt_words_mean": statistics.mean(len(f"{r['question']} {INSTRUCTION}".split()) for r in rows),
        "rows": len(rows),
    }
    if cuda:  # copy bandwidth: reads + writes of a 1 GiB buffer, the best of 12 copies
        x = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
        y, best = torch.empty_like(x), float("inf")
        for _ in range(12):
            torch.cuda.synchronize()
            t = time.perf_counter()
            y.copy_(x)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        info["bandwidth_gb_s"] = 2 * x.numel() / best / 1e9
        info["total_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    with open(work / "info.json", "w") as f:
        json.dump(info, f, indent=1)


# -----------------------------------------------------------------------------
# the TRL worker: GRPOTrainer on the same checkpoint and rows, timed from inside


def trl_worker(args, work, run_dir, P, grad_ckpt, bf16):
    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    import model as M
    import rewards
    from checkpoint import save_checkpoint
    from families import INSTRUCTION, chat_prompt
    from scratch import TINY_IMAGE_SIZE

    cuda = torch.cuda.is_available()
    ckpt = str(work / "ckpt")
    processor = AutoProcessor.from_pretrained(ckpt, backend="pil")  # the checkpoint's (model.hf_processor)
    tokenizer = processor.tokenizer
    model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.bfloat16 if bf16 else torch.float32,
                                                        attn_implementation="sdpa")
    rows = [json.loads(line) for line in open(work / "rows.jsonl")]
    # the checkpoint's chat template adds the system turn and model.INSTRUCTION
    prompt = lambda r: [{"role": "user", "content": r["question"]}]  # noqa: E731
    dataset = Dataset.from_list([{"prompt": prompt(r), "image": Image.open(r["image"]).convert("RGB"),
                                  "answer": r["answer"], "answer_type": r["answer_type"], "keywords": r["keywords"]}
                                 for r in rows])
    # the prompt TRL builds must be the one grpo.py builds, token for token
    trl_ids = processor.apply_chat_template(
        [[{"role": "user", "content": [{"type": "image", "image": dataset[0]["image"]},
                                       {"type": "text", "text": rows[0]["question"]}]}]],
        add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"][0]
    n_img = sum(1 for t in trl_ids if t == processor.image_token_id)
    ours_ids = tokenizer(chat_prompt(rows[0]["question"], n_img), add_special_tokens=False).input_ids
    if list(trl_ids) != ours_ids:
        raise SystemExit(f"TRL's prompt differs from grpo.py's:\n{list(trl_ids)}\n{ours_ids}")

    def medfact_reward(prompts, completions, answer, answer_type, keywords, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [rewards.score(t, {"answer": a, "answer_type": k, "keywords": kw})["total"]
                for t, a, k, kw in zip(texts, answer, answer_type, keywords)]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    steps = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync()
            steps.append({"t_generate": 0.0, "t_score": 0.0, "t_reference": 0.0, "tokens": 0,
                          "t0": time.perf_counter()})

        def on_step_end(self, *a, **k):
            sync()
            s = steps[-1]
            s["t_step"] = time.perf_counter() - s.pop("t0")
            with open(run_dir / "steps.jsonl", "a") as f:  # one line per step, as grpo.py's metrics.jsonl
                f.write(json.dumps(s) + "\n")

    def timed(fn, key, when=None):
        def wrapper(*a, **k):
            if when is not None and not when(*a, **k):
                return fn(*a, **k)
            sync()
            t = time.perf_counter()
            out = fn(*a, **k)
            sync()
            steps[-1][key] += time.perf_counter() - t
            if key == "t_generate":
                steps[-1]["tokens"] += sum(len(c) for c in out[1])  # completion ids of every row
            return out
        return wrapper

    config = GRPOConfig(
        output_dir=str(run_dir), max_steps=args.steps + 1, seed=0, report_to=[], save_strategy="no",
        logging_steps=1, disable_tqdm=True, use_cpu=not cuda, bf16=cuda, dataloader_num_workers=0,
        # one generation batch of P prompts x G, one micro-batch, one optimizer step, one inner iteration
        per_device_train_batch_size=P * args.group_size, gradient_accumulation_steps=1, steps_per_generation=1,
        num_generations=args.group_size, num_iterations=1, max_completion_length=args.max_new_tokens,
        generation_kwargs={"min_new_tokens": args.max_new_tokens}, temperature=args.temperature,
        beta=args.kl_coef, loss_type="grpo", learning_rate=1e-6, lr_scheduler_type="constant",
        gradient_checkpointing=grad_ckpt, gradient_checkpointing_kwargs={"use_reentrant": False},
        # the reference in bf16 on CUDA, as grpo.py keeps it (the policy: bf16 or fp32, as ours)
        model_init_kwargs={"dtype": "bfloat16"} if cuda else None, use_vllm=False)
    trainer = GRPOTrainer(model=model, reward_funcs=medfact_reward, args=config, train_dataset=dataset,
                          processing_class=processor, callbacks=[StepTimer()])
    trainer._generate = timed(trainer._generate, "t_generate")
    trainer._calculate_rewards = timed(trainer._calculate_rewards, "t_score")
    trainer._get_per_token_logps_and_entropies = timed(trainer._get_per_token_logps_and_entropies, "t_reference",
                                                       when=lambda m, *a, **k: m is trainer.ref_model)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    for s in steps:
        s["t_train"] = s["t_step"] - s["t_generate"] - s["t_score"] - s["t_reference"]
    out = {"steps": steps}
    if cuda:
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    with open(run_dir / "trl_steps.json", "w") as f:
        json.dump(out, f)


# -----------------------------------------------------------------------------
# the decode worker: engine.sample against model.sample on one batch, in one process


def decode_worker(args, work, bf16):
    import torch
    from PIL import Image
    import engine
    import model as M
    from checkpoint import save_checkpoint
    from families import INSTRUCTION, chat_prompt
    from scratch import TINY_IMAGE_SIZE
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    # as grpo.py holds the policy: bf16 weights (--bf16), else fp32 weights under bf16 autocast on CUDA
    vlm = M.load(str(work / "ckpt"), device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    rows = [json.loads(line) for line in open(work / "rows.jsonl")][:args.decode_prompts]
    batch = vlm.encode([Image.open(r["image"]) for r in rows], [r["question"] for r in rows])
    G, T = args.group_size, args.max_new_tokens
    seeds = M.rollout_seeds(0, 0, list(range(len(rows))), G)
    N = len(rows) * G

    def timed(fn, **kw):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        with torch.no_grad(), autocast:
            out = fn(vlm, batch, G, T, args.temperature, seeds, ignore_eos=True, **kw)
        if cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - t, torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None

    result = {"rows": N, "prompt_tokens": batch["input_ids"].size(1), "max_new_tokens": T,
              "weights": "bfloat16" if bf16 else "float32" + (" under bf16 autocast" if cuda else "")}
    for run in ("first", "second"):  # the first call also pays the process's CUDA / cuBLAS set-up
        stats = {}
        fast, wall, peak = timed(engine.sample, stats=stats)
        result[f"engine_{run}"] = {
            "wall_s": wall, "prefill_s": stats["prefill_s"], "capture_s": stats["capture_s"],
            "decode_ms_per_step": 1000 * stats["decode_s"] / max(1, stats["steps"]), "graph": stats["graph"],
            "tokens_per_s": N * T / wall, "peak_gib": peak}
    plain, wall, peak = timed(M.sample)
    result["model_sample"] = {"wall_s": wall, "ms_per_token": 1000 * wall / T, "tokens_per_s": N * T / wall,
                              "peak_gib": peak}
    same = (fast["tokens"] == plain["tokens"]).cumprod(1).sum(1).float()  # tokens agreed before the first difference
    result["agree"] = {"rows_identical": int((same == T).sum()), "mean_tokens_before_first_difference": same.mean().item()}
    with open(work / "decode.json", "w") as f:
        json.dump(result, f, indent=1)


# -----------------------------------------------------------------------------
# the parent: spawn, measure, summarise

FIELDS = ["t_generate", "t_score", "t_reference", "t_train", "t_step"]


def _cpu_seconds(pid):
    """utime + stime of a live process (all its threads), from /proc; None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def spawn(cmd, log, env, progress=None):
    """Run cmd to completion. Returns wall s, CPU s, peak RSS GiB (of that process alone) and, when
    `progress` is a JSONL file the process appends one line to per step, the process's CPU seconds
    at each new line: CPU time per step, which a busy machine stretches far less than wall time."""
    t, marks = time.time(), []
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if progress is not None and os.path.exists(progress):
                with open(progress) as g:
                    n = sum(1 for line in g if line.strip())
                if n > len(marks):
                    marks += [_cpu_seconds(p.pid)] * (n - len(marks))
            time.sleep(0.02)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.stderr.write(Path(log).read_text()[-4000:])
        raise SystemExit(f"failed ({p.returncode}): {' '.join(map(str, cmd))}; log: {log}")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return time.time() - t, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * scale / 2 ** 30, marks


def step_cpu(steps, marks):
    """Add cpu_s to each step but the first: the CPU seconds between its line and the one before."""
    ok = len(marks) == len(steps) and None not in marks
    for k, s in enumerate(steps):
        s["cpu_s"] = marks[k] - marks[k - 1] if ok and k > 0 else None


def run_ours(args, work, run_dir, P, grad_ckpt, bf16, env):
    cmd = [sys.executable, str(ROOT / "grpo.py"), "--ckpt", str(work / "ckpt"), "--data", str(work / "rows.jsonl"),
           "--max_steps", str(args.steps + 1), "--prompts_per_step", str(P), "--group_size", str(args.group_size),
           "--max_new_tokens", str(args.max_new_tokens), "--ignore_eos", "--train_zero_std", "--kl_coef", str(args.kl_coef),
           "--temperature", str(args.temperature), "--lr", "1e-6", "--inner_epochs", "1",
           "--micro_batch", str(P * args.group_size), "--eval_every", "0", "--out", str(run_dir),
           "--engine", args.engine] + (["--bf16"] if bf16 else [])
    wall, cpu, rss, marks = spawn(cmd + (["--grad_ckpt"] if grad_ckpt else []), run_dir.with_suffix(".log"), env,
                                  progress=run_dir / "metrics.jsonl")
    metrics = run_dir.with_suffix(".metrics.jsonl")
    os.replace(run_dir / "metrics.jsonl", metrics)
    shutil.rmtree(run_dir)  # grpo.py saves the trained model at the end: 15 GB per run for the 3B
    recs = [json.loads(line) for line in open(metrics)]
    steps = [{**{k: r[k] for k in FIELDS}, "tokens": r["len_mean"] * P * args.group_size} for r in recs]
    step_cpu(steps, marks)
    peak = [r["peak_mem_gib"] for r in recs if "peak_mem_gib" in r]
    return {"steps": steps[1:], "wall_s": wall, "cpu_s": cpu, "peak_rss_gib": rss,
            "peak_mem_gib": max(peak) if peak else None}


def run_trl(args, work, run_dir, P, grad_ckpt, bf16, env):
    cmd = [sys.executable, __file__, "--worker", "trl", "--workdir", str(work), "--run_dir", str(run_dir),
           "--P", str(P), "--model", args.model, "--group_size", str(args.group_size),
           "--max_new_tokens", str(args.max_new_tokens), "--kl_coef", str(args.kl_coef),
           "--temperature", str(args.temperature), "--steps", str(args.steps),
           "--grad_ckpt" if grad_ckpt else "--no-grad_ckpt", "--bf16" if bf16 else "--no-bf16"]
    run_dir.mkdir(parents=True, exist_ok=True)
    wall, cpu, rss, marks = spawn(cmd, run_dir.with_suffix(".log"), env, progress=run_dir / "steps.jsonl")
    out = json.loads((run_dir / "trl_steps.json").read_text())
    step_cpu(out["steps"], marks)
    return {"steps": out["steps"][1:], "wall_s": wall, "cpu_s": cpu, "peak_rss_gib": rss,
            "peak_mem_gib": out.get("peak_mem_gib")}


def summarise(runs, args, P):
    steps = [s for r in runs for s in r["steps"]]
    med = {k: statistics.median(s[k] for s in steps) for k in FIELDS}
    tokens = statistics.median(s["tokens"] for s in steps)
    expected = P * args.group_size * args.max_new_tokens
    if any(s["tokens"] != expected for s in steps):
        raise SystemExit(f"completion tokens per step {sorted({s['tokens'] for s in steps})}, expected {expected}: "
                         f"the forced length did not hold")
    peaks = [r["peak_mem_gib"] for r in runs if r["peak_mem_gib"] is not None]
    cpu = [s["cpu_s"] for s in steps if s["cpu_s"] is not None]
    return {"timed_steps": len(steps), "completion_tokens_per_step": tokens,
            "tokens_per_s": tokens / med["t_generate"], "step_tokens_per_s": tokens / med["t_step"], **med,
            # the fastest step: on a shared machine, the closest to what an idle one would show
            "best_t_step": min(s["t_step"] for s in steps), "best_t_generate": min(s["t_generate"] for s in steps),
            "cpu_s_per_step": statistics.median(cpu) if len(cpu) == len(steps) else None,
            "decode_ms": 1000 * med["t_generate"] / args.max_new_tokens,
            "peak_rss_gib": max(r["peak_rss_gib"] for r in runs), "peak_mem_gib": max(peaks) if peaks else None,
            "run_medians_t_step": [statistics.median(s["t_step"] for s in r["steps"]) for r in runs],
            "run_wall_s": [r["wall_s"] for r in runs], "run_cpu_s": [r["cpu_s"] for r in runs],
            "run_load_before": [r["load_before"] for r in runs]}


def versions():
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "accelerate", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def git_state():
    """The commit measured, and which of the files that run changed since it (uncommitted edits)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "grpo.py", "model.py", "common.py", "families.py",
                                "fsdp.py", "checkpoint.py", "scratch.py", "lite0.py", "data.py", "rewards.py",
                                "synthetic_cxr.py", "engine.py", "optim.py"],
                               cwd=ROOT, capture_output=True, text=True).stdout.split("\n")
        return {"commit": commit or None, "uncommitted": [line[3:] for line in dirty if line.strip()]}
    except OSError:
        return None


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(result):
    info, rows = result["model"], result["results"]
    gpu = info["device_kind"] == "cuda"
    mem = "peak_mem_gib" if gpu else "peak_rss_gib"
    cols = [("tok/s", "tokens_per_s", "{:.0f}"), ("step tok/s", "step_tokens_per_s", "{:.0f}"), ("step s", "t_step", "{:.2f}"), ("best step s", "best_t_step", "{:.2f}"),
            ("gen s", "t_generate", "{:.2f}"), ("ref s", "t_reference", "{:.3f}"), ("train s", "t_train", "{:.2f}"),
            ("score s", "t_score", "{:.3f}"), ("peak GiB" if gpu else "peak RSS GiB", mem, "{:.2f}"),
            ("decode ms", "decode_ms", "{:.2f}")]
    if not gpu:  # CPU seconds per step: what a busy machine distorts least
        cols.insert(3, ("CPU s/step", "cpu_s_per_step", "{:.2f}"))
    cell = lambda v, f: "n/a" if v is None else f.format(v)  # noqa: E731
    head, lines = ["P", "side"] + [c[0] for c in cols], []
    for r in rows:
        q = {**r["ratio"], mem: r["ratio"]["peak"]}
        lines += [[str(r["prompts_per_step"]), "ours"] + [cell(r["ours"][k], f) for _, k, f in cols],
                  ["", "TRL"] + [cell(r["trl"][k], f) for _, k, f in cols],
                  ["", "ours/TRL"] + [cell(q.get(k), "{:.2f}") for _, k, _ in cols]]
    width = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = lambda row: "  ".join(x.rjust(w) for x, w in zip(row, width))  # noqa: E731
    s = result["settings"]
    out = [f"GRPO step, {result['model_name']} on {info['device']} ({result['device_note']}): G={s['group_size']}, "
           f"{s['max_new_tokens']} forced tokens, kl {s['kl_coef']}, T={s['temperature']}, grad ckpt "
           f"{'on' if s['grad_ckpt'] else 'off'}, {s['policy_dtype']} weights; medians of {s['steps']} steps x "
           f"{s['repeats']} runs per side",
           fmt(head), *map(fmt, lines),
           "tok/s = completion tokens / generation time, step tok/s = / step time; ours/TRL > 1 is ours faster for "
           "tok/s, < 1 for times and memory"]
    b = result["decode_bound"]
    if b is None:
        ours = ", ".join(f"{r['ours']['decode_ms']:.2f} ms at P={r['prompts_per_step']}" for r in rows)
        out.append(f"decode bound: n/a on CPU (our decode step: {ours})")
    else:
        out.append(f"decode bound ({b['decode_params'] / 1e9:.2f} B text params, {b['bandwidth_gb_s']:.0f} GB/s "
                   f"measured): {b['fp32_ms']:.2f} ms from fp32 weights, {b['bf16_ms']:.2f} ms from bf16; ours "
                   + ", ".join(f"{r['ours']['decode_ms']:.2f} ms ({r['ours']['decode_ms'] / b['bf16_ms']:.1f}x bf16 "
                               f"bound) at P={r['prompts_per_step']}" for r in rows))
    d = result.get("decode")
    if d:  # the engine alone: the second call (the first also pays the process's CUDA set-up)
        e, first, hf = d["engine_second"], d["engine_first"], d["model_sample"]
        mem = f"; peak {e['peak_gib']:.1f} GiB (model.sample {hf['peak_gib']:.1f})" if e["peak_gib"] else ""
        vs = f" ({e['decode_ms_per_step'] / b['bf16_ms']:.1f}x the bf16 bound)" if b else ""
        out.append(f"decode alone, {d['rows']} rows x {d['max_new_tokens']} forced tokens, {d['weights']} weights: "
                   f"engine {e['decode_ms_per_step']:.2f} ms/step{vs} ({'CUDA graph' if e['graph'] else 'eager'}; "
                   f"capture + warm-up {first['capture_s']:.2f} s in the first call, {e['capture_s']:.2f} s after), "
                   f"{e['tokens_per_s']:.0f} tok/s with prefill; model.sample {hf['ms_per_token']:.2f} ms/token, "
                   f"{hf['tokens_per_s']:.0f} tok/s: engine {e['tokens_per_s'] / hf['tokens_per_s']:.1f}x{mem}; "
                   f"{d['agree']['rows_identical']}/{d['rows']} rows token-identical "
                   f"(mean {d['agree']['mean_tokens_before_first_difference']:.0f} tokens before a difference)")
    return "\n".join(out)


def main(args):
    work = Path(args.workdir or tempfile.mkdtemp(prefix="grpo_speed_"))
    work.mkdir(parents=True, exist_ok=True)
    # the repo first, then any PYTHONPATH given (bench/gpu_check.sh puts the carried wheels' folder there)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    load_start = os.getloadavg()[0]
    t_start = time.time()
    print(f"building {args.model} checkpoint and rows in {work}", flush=True)
    spawn([sys.executable, __file__, "--worker", "build", "--workdir", str(work), "--model", args.model,
           "--words", str(args.words)] + (["--image_size", str(args.image_size)] if args.image_size else []),
          work / "build.log", env)
    info = json.loads((work / "info.json").read_text())
    gpu = info["device_kind"] == "cuda"
    grad_ckpt = gpu if args.grad_ckpt is None else args.grad_ckpt
    bf16 = gpu if args.bf16 is None else args.bf16
    print(f"decode: engine.sample vs model.sample, {args.decode_prompts} x {args.group_size} rows", flush=True)
    spawn([sys.executable, __file__, "--worker", "decode", "--workdir", str(work), "--group_size",
           str(args.group_size), "--max_new_tokens", str(args.max_new_tokens), "--temperature", str(args.temperature),
           "--decode_prompts", str(args.decode_prompts), "--bf16" if bf16 else "--no-bf16"], work / "decode.log", env)
    decode = json.loads((work / "decode.json").read_text())
    bound = None
    if gpu:
        n, bw = info["decode_params"], info["bandwidth_gb_s"] * 1e9
        bound = {"decode_params": n, "bandwidth_gb_s": info["bandwidth_gb_s"],
                 "fp32_ms": 1000 * 4 * n / bw, "bf16_ms": 1000 * 2 * n / bw}
    results = []
    result = {
        "command": "python bench/grpo_speed.py " + " ".join(sys.argv[1:]),
        "model_name": args.model,
        "device_note": (f"{cpu_name()}, {os.cpu_count()} CPUs visible, {args.threads or 'default'} threads, "
                        f"shared with other jobs (load {load_start:.1f} at start)" if not gpu else "one GPU"),
        "model": info,
        "versions": versions(),
        "git": git_state(),
        "settings": {"prompts": args.prompts, "group_size": args.group_size, "max_new_tokens": args.max_new_tokens,
                     "kl_coef": args.kl_coef, "temperature": args.temperature, "inner_iterations": 1,
                     "grad_ckpt": grad_ckpt, "policy_dtype": "bfloat16" if bf16 else "float32",
                     "optimizer": {"ours": "optim.AdamW, bf16 state, stochastic rounding" if bf16 else "torch AdamW",
                                   "trl": "its default AdamW, state in the policy's dtype"},
                     "engine": args.engine, "autocast": "bf16" if gpu else None,
                     "reference_dtype": "bfloat16" if gpu or bf16 else "float32",
                     "steps": args.steps, "warmup_steps_dropped": 1, "repeats": args.repeats},
        "peak_memory_how": ("torch.cuda.max_memory_allocated in the process (ours: grpo.py's peak_mem_gib)" if gpu
                            else "peak RSS of the process (os.wait4 ru_maxrss): model, optimizer, activations and "
                                 "the imported libraries"),
        "results": results,  # filled setting by setting, the file rewritten after each
        "decode": decode,
        "decode_bound": bound,
        "complete": False,
    }

    def save():  # only where asked (--out): a --help or a trial run leaves the committed results alone
        if args.out:
            result["bench_wall_s"] = time.time() - t_start
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1) + "\n")

    save()  # a run cut off by a time limit still leaves what it measured
    for P in args.prompts:
        runs = {"ours": [], "trl": []}
        for i in range(args.repeats):
            # alternate which side goes first, so a slow spell on a shared machine hits both
            order = ("ours", "trl") if i % 2 == 0 else ("trl", "ours")
            for side in order:
                run_dir = work / f"{side}_P{P}_{i}"
                fn = run_ours if side == "ours" else run_trl
                load = os.getloadavg()[0]
                r = {**fn(args, work, run_dir, P, grad_ckpt, bf16, env), "load_before": load}
                runs[side].append(r)
                print(f"P={P} run {i + 1}/{args.repeats} {side}: median step "
                      f"{statistics.median(s['t_step'] for s in r['steps']):.2f}s (wall {r['wall_s']:.0f}s, "
                      f"load {load:.1f} before)", flush=True)
        ours, trl = summarise(runs["ours"], args, P), summarise(runs["trl"], args, P)
        ratio = {k: ours[k] / trl[k] if trl[k] else None
                 for k in FIELDS + ["tokens_per_s", "step_tokens_per_s", "decode_ms", "best_t_step", "best_t_generate",
                                    "cpu_s_per_step"]
                 if ours[k] is not None and trl[k] is not None}
        key = "peak_mem_gib" if gpu else "peak_rss_gib"
        ratio["peak"] = ours[key] / trl[key] if ours[key] and trl[key] else None
        results.append({"prompts_per_step": P, "ours": ours, "trl": trl, "ratio": ratio})
        save()
    result["complete"] = True
    save()
    if args.out:
        print(f"wrote {args.out}\n")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)  # the checkpoint alone is 7.5 GB for the 3B
    print(table(result))


if __name__ == "__main__":
    args = parser.parse_args()
    if args.worker == "build":
        build(args, Path(args.workdir))
    elif args.worker == "trl":
        trl_worker(args, Path(args.workdir), Path(args.run_dir), args.P, bool(args.grad_ckpt), bool(args.bf16))
    elif args.worker == "decode":
        decode_worker(args, Path(args.workdir), bool(args.bf16))
    else:
        main(args)
