"""Training signals: SFT scores only the target tokens; the GRPO pieces, wired to the sampler, raise a reward."""
import argparse
import numpy as np
import torch
from PIL import Image

import checkpoint
import data
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


def _run(stage, argv):
    stage.main(stage.parser.parse_args([str(a) for a in argv]))


def _grpo_args(out, *extra):
    return ["--ckpt", "tiny", "--data", "demo", "--out", out, "--prompts_per_step", 4, "--group_size", 2,
            "--max_new_tokens", 12, "--micro_batch", 4, "--max_steps", 3, "--eval_every", 0, "--upstream_rewards",
            *extra]


def _lines(path):
    import json
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("t_") and k != "tokens_per_s"}
            for line in open(path)]


def test_grpo_with_the_static_engine_runs_what_the_hf_path_runs(tmp_path):
    """grpo.py --engine static (engine.py) and --engine hf (model.sample): the same completions, rewards,
    losses and final weights, bit for bit (float32, CPU)."""
    import grpo
    from safetensors.torch import load_file
    for e in ("hf", "static"):
        _run(grpo, _grpo_args(tmp_path / e, "--engine", e))
    assert _lines(tmp_path / "hf" / "rollouts.jsonl") == _lines(tmp_path / "static" / "rollouts.jsonl")
    assert _lines(tmp_path / "hf" / "metrics.jsonl") == _lines(tmp_path / "static" / "metrics.jsonl")
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "static" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_mode_trains_grpo_and_sft_in_bf16(tmp_path):
    """--bf16: weights, moments and the saved model are bf16, and the weights move (stochastic rounding)."""
    import json
    import data
    import grpo
    from safetensors.torch import load_file
    _run(grpo, _grpo_args(tmp_path / "grpo", "--bf16", "--engine", "static", "--kl_coef", 0.04, "--lr", 1e-4))
    (tmp_path / "images").mkdir()
    with open(tmp_path / "pseudo.jsonl", "w") as f:
        for i, r in enumerate(data.load("demo", "train")[:8]):
            data.load_image(r).save(tmp_path / "images" / f"{i}.png")
            row = {k: r[k] for k in ("id", "question", "answer", "answer_type", "keywords")}
            f.write(json.dumps({**row, "image": f"images/{i}.png",
                                "target": f"<think>It shows.</think><answer>{r['answer']}</answer>"}) + "\n")
    _run(sft, ["--data", tmp_path / "pseudo.jsonl", "--model", "tiny", "--out", tmp_path / "sft", "--batch_size", 4,
               "--max_steps", 3, "--val_frac", 0.0, "--warmup", 1, "--lr", 1e-4, "--bf16", "--save_every", 2])
    # the weights both runs started from
    checkpoint.save_checkpoint(str(tmp_path / "start"), M.load("tiny", texts=data.tokenizer_texts))
    start = load_file(tmp_path / "start" / "model.safetensors")
    for out in (tmp_path / "grpo", tmp_path / "sft"):
        w = load_file(out / "model.safetensors")
        assert all(v.dtype == torch.bfloat16 for v in w.values())
        moved = [not torch.equal(v, start[k].bfloat16()) for k, v in w.items() if k in start]
        assert sum(moved) > len(moved) / 2, out  # most tensors changed after 3 steps at lr 1e-4
    opt = torch.load(tmp_path / "sft" / "checkpoints" / "step_0000002" / "optimizer.pt", weights_only=True)
    assert {v["exp_avg_sq"].dtype for v in opt["state"].values()} == {torch.bfloat16}


def test_grpo_final_model_is_the_evaluated_step_with_the_best_held_out_accuracy(tmp_path, monkeypatch):
    """Held-out model selection: the final model is the evaluated step (the start included) with the best
    held-out accuracy; --keep_last keeps the last step's. Scores are scripted: start 0.1, then 0.5 at step 1,
    0.3, 0.2: step 1 wins, so the final weights equal a 1-step run's; with all equal the start wins.
    --open_floor: step 1 (0.5) lost open recall against the start, so step 2 (0.3, open held) wins."""
    import json
    import grpo
    args = lambda out, *extra: _grpo_args(out, "--val_data", "demo", "--eval_every", 1, "--val_limit", 4,
                                          "--lr", 1e-2, "--upstream_rewards", *extra)

    def scripted(scores):  # (accuracy, open accuracy, open recall) per evaluation, the start's first
        it = iter(scores)
        keys = ("val_accuracy", "val_open_accuracy", "val_open_recall")
        monkeypatch.setattr(grpo, "held_out_scores", lambda *a, **k: dict(zip(keys, next(it))))

    scripted([(0.1, 0.4, 0.4), (0.5, 0.4, 0.4), (0.3, 0.4, 0.4), (0.2, 0.4, 0.4)])
    _run(grpo, args(tmp_path / "best"))
    scripted([(0.0, 0.0, 0.0)])
    _run(grpo, args(tmp_path / "one", "--max_steps", 1, "--keep_last"))
    scripted([(0.0, 0.0, 0.0)] * 4)
    _run(grpo, args(tmp_path / "tie"))
    scripted([(0.0, 0.0, 0.0)] * 3)
    _run(grpo, args(tmp_path / "last", "--keep_last"))
    scripted([(0.1, 0.4, 0.4), (0.5, 0.4, 0.39), (0.3, 0.4, 0.4), (0.2, 0.5, 0.5)])
    _run(grpo, args(tmp_path / "floor", "--open_floor"))
    scripted([(0.0, 0.0, 0.0)] * 2)
    _run(grpo, args(tmp_path / "two", "--max_steps", 2, "--keep_last"))
    names = ("best", "one", "tie", "last", "floor", "two")
    w = {name: M.load(str(tmp_path / name)).model.state_dict() for name in names}
    start = M.load("tiny", texts=data.tokenizer_texts).model.state_dict()
    assert all(torch.equal(w["best"][k], w["one"][k]) for k in w["one"])
    assert all(torch.equal(w["tie"][k], start[k]) for k in w["tie"])
    assert all(torch.equal(w["floor"][k], w["two"][k]) for k in w["two"])
    assert any(not torch.equal(w["last"][k], start[k]) for k in w["last"])   # training did move the weights
    assert any(not torch.equal(w["best"][k], w["last"][k]) for k in w["last"])
    assert any(not torch.equal(w["two"][k], w["one"][k]) for k in w["one"])
    selected = lambda name: json.load(open(tmp_path / name / "state.json"))["selected"]
    assert selected("best") == {"step": 1, "val_accuracy": 0.5, "val_open_accuracy": 0.4, "val_open_recall": 0.4}
    assert selected("tie")["step"] == 0 and selected("floor")["step"] == 2 and selected("floor")["val_accuracy"] == 0.3
    assert selected("last") is None and not (tmp_path / "best" / "best").exists()
    logged = [r for r in map(json.loads, open(tmp_path / "floor" / "metrics.jsonl")) if "val_accuracy" in r]
    assert [r["val_open_recall"] for r in logged] == [0.39, 0.4, 0.5]


def test_held_out_scores_are_evaluates_metrics(monkeypatch):
    """grpo's held-out accuracy, open accuracy and open recall are evaluate.py's on the same predictions."""
    import evaluate
    rows = [{"question": "q", "answer": a, "answer_type": t} for a, t in
            [("yes", "closed"), ("left lung", "open"), ("liver", "open"), ("no", "closed")]]
    texts = ["<answer>yes</answer>", "<answer>lung</answer>", "<answer>liver</answer>", "<answer>yes</answer>"]

    class Fake:
        model = torch.nn.Linear(1, 1)
    monkeypatch.setattr(M, "generate", lambda vlm, images, questions, *a, **k: texts[:len(questions)])
    got = evaluate.held_out_scores(Fake(), rows, 8, 0, 1, torch.device("cpu"), images=lambda r: None)
    want = evaluate.summarize(rows, [evaluate.grade(t, r) for t, r in zip(texts, rows)])
    assert got == {"val_accuracy": want["accuracy"], "val_open_accuracy": want["open_accuracy"],
                   "val_open_recall": want["open_recall"]}
    assert (got["val_accuracy"], got["val_open_accuracy"], got["val_open_recall"]) == (0.5, 0.5, 0.75)


def test_screen_keeps_the_prompts_the_start_model_neither_always_gets_nor_always_misses(monkeypatch):
    """--screen, hand-worked: six yes/no prompts, groups of two scripted completions. Prompts 1 and 4 get one
    right answer of two (kept); 0 and 3 always right, 2 and 5 always wrong (dropped). With 4 prompts a
    step the pool is topped up with the first two dropped prompts in the seeded sample's order."""
    import grpo
    rows = [{"question": f"q{i}", "answer": "yes", "answer_type": "closed"} for i in range(6)]
    right = {0: 2, 1: 1, 2: 0, 3: 2, 4: 1, 5: 0}  # right answers in each group of two

    def fake_rollout(vlm, rows_, idx, step, args, *a, **k):
        assert step == -1
        texts = [f"<answer>{'yes' if g < right[i] else 'no'}</answer>" for i in idx for g in range(2)]
        return {"rows": [rows_[i] for i in idx], "texts": texts}
    monkeypatch.setattr(grpo, "rollout", fake_rollout)
    args = lambda **kw: argparse.Namespace(**{"screen": -1, "seed": 0, "prompts_per_step": 2, "group_size": 2,
                                              "upstream_rewards": False, **kw})
    cpu = torch.autocast("cpu", enabled=False)
    assert grpo.screen(None, rows, args(), 0, 1, cpu) == ([1, 4], 2, 6)
    sampled = torch.randperm(6, generator=torch.Generator().manual_seed(0)).tolist()
    pool, n, _ = grpo.screen(None, rows, args(prompts_per_step=4), 0, 1, cpu)
    assert n == 2 and pool == [1, 4] + [i for i in sampled if i not in (1, 4)][:2]
    pool, n, screened = grpo.screen(None, rows, args(screen=3), 0, 1, cpu)  # only a seeded sample of 3 is screened
    assert pool[:n] == sorted(i for i in sampled[:3] if i in (1, 4)) and len(pool) == 2 and screened == 3
