"""
demo.py: the whole MEDFACT-R1 pipeline on the embedded demo, offline, on a laptop CPU.

    data -> retrieve.py (pseudo-labels) -> sft.py -> grpo.py -> evaluate.py (base, SFT, SFT + GRPO)

Each stage runs as the same command a user would type (printed before it runs), writes into
--out, and is skipped on a re-run when its output is complete (--fresh starts over). At the end
it prints one table and writes report.json ({"base", "sft", "grpo": evaluate.py's JSON,
"seconds": {stage: s}}), curves.png (SFT loss; GRPO reward parts, KL and held-out accuracy) and
report.html: one self-contained page (pictures inline, no external files or links) with the
results table, the curves and a few test questions answered by the SFT and the SFT + GRPO model,
with their rewards; it opens offline in any browser.

    python demo.py                        # = make demo
    python demo.py --ablation             # = make ablation: the paper's ablation on the demo
    python demo.py --plot runs/demo       # only redraw curves.png and report.html

A cold start (issue #34): only the first --labelled 1,100 of the 4,400 training questions get a
pseudo-label (a label costs a teacher call; a gold answer costs nothing more), SFT learns from those,
and GRPO trains on all 4,400, its accuracy reward reading their gold answers. With a pseudo-label for
every question, more SFT taught what GRPO's reward does, and an equal-compute SFT control beat GRPO.
Here GRPO beats SFT on every seed tried, and the equal-compute control by 1.4 points over six seeds
(p = 3e-9; the first three alone gave +0.6, within chance): docs/EXPERIMENTS.md 1.6, where this
design was chosen on the val split.

The tiny model starts from random weights (the paper's starts from a pretrained Qwen2.5-VL) and
the whole job must fit in ~15 minutes on a 2-core CPU: 600 SFT steps (--sft_steps) took ~6 min and
60 GRPO steps (96 prompts x 6 samples each) ~5.5 min (bench/results/demo_report.json, "seconds").
The README has the measured table; docs/EXPERIMENTS.md (part 1) the time of each stage, the seeds,
the control and the ablation.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from html import escape

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
parser.add_argument("--out", default="runs/demo", help="folder for every stage's output and report.json")
parser.add_argument("--fresh", action="store_true", help="start over instead of reusing finished stages")
parser.add_argument("--ablation", action="store_true", help="run the ablation table instead of the main job")
parser.add_argument("--plot", default=None, help="only draw curves.png and write report.html for this demo folder")
parser.add_argument("--main", default="runs/demo", help="ablation: the main job's folder (reused when finished)")
parser.add_argument("--sft_steps", type=int, default=600, help="SFT steps of 32 pseudo-labels (~4 min on 2 cores)")
parser.add_argument("--grpo_steps", type=int, default=60, help="GRPO steps of 96 prompts x 6 samples (~3.5 min)")
parser.add_argument("--labelled", type=int, default=1100,
                    help="training questions given a pseudo-label (the first N of 4,400); GRPO trains on all")
parser.add_argument("--grpo_lr", type=float, default=3e-4, help="GRPO's learning rate (chosen on val, EXPERIMENTS 1.6)")
parser.add_argument("--temperature", type=float, default=1.0, help="GRPO's sampling temperature (chosen on val)")
parser.add_argument("--coverage", type=float, default=1.0, help="share of pseudo-labels that cite evidence")
parser.add_argument("--seed", type=int, default=0, help="passed to retrieve.py, sft.py and grpo.py")

PY = sys.executable
BASE_QUESTIONS = 640  # the untrained model is scored on the first 640 test questions only (main says why)
BASE = f"base (untrained, first {BASE_QUESTIONS})"  # its row
KEYS = ["accuracy", "closed_accuracy", "open_accuracy", "open_recall", "format", "fact", "consistency"]


# At most two torch threads per stage: on an idle 2-core CPU two threads ran SFT and GRPO steps
# 1.5x faster than one; more buy little for a model this small. On a machine busy with other
# jobs, threads thrash (5-10x slower in our runs): set OMP_NUM_THREADS=1 there.
os.environ.setdefault("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))


def run(cmd, done_file, seconds, name, fresh):
    """Run a stage unless its output exists; time it. A subprocess, as a user would run it: what the demo
    shows is what the command lines do, and each stage starts with a clean process (threads, memory)."""
    if done_file and os.path.exists(done_file) and not fresh:
        print(f"[{name}] reusing {done_file}")
        return
    print(f"\n[{name}] $ {' '.join(cmd)}", flush=True)
    t = time.time()
    subprocess.run(cmd, check=True)
    seconds[name] = round(time.time() - t, 1)


def grpo_flags(args):
    """grpo.py's settings for the demo (the main job and every ablation run): steps, seed, lr, temperature."""
    return ["--max_steps", str(args.grpo_steps), "--seed", str(args.seed), "--lr", str(args.grpo_lr),
            "--temperature", str(args.temperature)]


def evaluate_ckpt(ckpt, out, name, seconds, fresh, extra=()):
    """evaluate.py on the demo's test split (a stage like the others); its metrics JSON."""
    path = os.path.join(out, "metrics.json")
    run([PY, "evaluate.py", "--ckpt", ckpt, "--data", "demo", "--split", "test", "--out", path, "--quiet",
         *extra], path, seconds, name, fresh)
    with open(path) as f:
        return json.load(f)


def table(results, title):
    """One row per model, the metrics of evaluate.py's table."""
    print(f"\n{title}")
    print(f"{'':>26} | " + " | ".join(f"{k:>15}" for k in KEYS))
    for name, res in results.items():
        print(f"{name:>26} | " + " | ".join(f"{res[k]:15.3f}" if res[k] is not None else f"{'-':>15}"
                                            for k in KEYS))


def pval(p):
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def verdict(change, alpha=0.05):
    """What a paired test says, in words, either way: fixed / broken answers and their exact McNemar p."""
    fixed, broken, p = change["fixed"], change["broken"], change["p"]
    counts = f"fixed {fixed}, broke {broken} (McNemar p {pval(p)})"
    if p < alpha and fixed != broken:
        more, fewer = ("fixed", "broke") if fixed > broken else ("broke", "fixed")
        return f"{counts}: it {more} more answers than it {fewer}, more often than chance would (p < {alpha})"
    return f"{counts}: no more than chance would give (p >= {alpha}); this run shows no change either way"


def read_jsonl(path):
    """The records of a JSONL file, through data.py's one reader; a line a killed run left torn is left out."""
    import data
    return [r for _, r, problem in data.read_jsonl(path) if not problem] if os.path.exists(path) else []


def plot(folder):
    """curves.png from sft/ and grpo/metrics.jsonl: SFT loss, GRPO reward parts, KL and held-out accuracy.
    Returns its path, or None when there is nothing to draw or nothing to draw with."""
    sft, grpo = (read_jsonl(os.path.join(folder, stage, "metrics.jsonl")) for stage in ("sft", "grpo"))
    if not sft and not grpo:
        return None
    try:
        import matplotlib
    except ImportError:  # in requirements.txt; a .venv made before it may lack it: the report goes on without
        print(f"curves.png needs matplotlib: {PY} -m pip install -r requirements.txt, then {PY} demo.py --plot {folder}")
        return None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(2, 2, figsize=(12, 7.5))
    ax = ax.ravel()
    if sft:
        ax[0].plot([r["step"] for r in sft], [r["loss"] for r in sft], lw=0.8, label="train")
        val = [(r["step"], r["val_loss"]) for r in sft if "val_loss" in r]
        if val:
            ax[0].plot(*zip(*val), "o-", label="val")
        ax[0].set(yscale="log")
        ax[0].legend()
    ax[0].set(title="SFT loss (pseudo-labels)", xlabel="SFT step")
    steps = [r["step"] for r in grpo]
    for k in ("reward_accuracy", "reward_format", "reward_fact", "reward_consistency"):
        ax[1].plot(steps, [r.get(k) for r in grpo], lw=1, label=k.replace("reward_", ""))
    ax[1].set(title="GRPO rewards (training rollouts, mean per step)", xlabel="GRPO step")
    ax[1].set_ylim(top=1.005)  # rewards are at most 1; the bottom follows the data
    ax[1].legend(loc="best", fontsize=8)
    ax[2].plot(steps, [r.get("kl") for r in grpo], lw=1, color="tab:purple")
    ax[2].set(title="GRPO KL to the SFT model", xlabel="GRPO step")
    val = [(r["step"], r["val_accuracy"]) for r in grpo if "val_accuracy" in r]
    if val:
        ax[3].plot(*zip(*val), "o-", color="tab:green")
    ax[3].set(title="held-out accuracy (greedy, val split)", xlabel="GRPO step")
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(folder, "curves.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# -----------------------------------------------------------------------------
# report.html: one self-contained page


def data_uri(png_bytes):
    import base64
    return "data:image/png;base64," + base64.b64encode(png_bytes).decode()


def pick_rollouts(sft_preds, grpo_preds, n_fixed=3, n_broke=2, n_same=1):
    """Test questions both models answered, as (kind, sft, grpo): some GRPO fixed, some it broke, one unchanged."""
    after = {r["id"]: r for r in grpo_preds}
    kinds = {"fixed by GRPO": [], "broken by GRPO": [], "unchanged": []}
    for r in sft_preds:
        g = after.get(r["id"])
        if g is not None:
            kind = "unchanged" if r["exact"] == g["exact"] else "fixed by GRPO" if g["exact"] else "broken by GRPO"
            kinds[kind].append((kind, r, g))
    return kinds["fixed by GRPO"][:n_fixed] + kinds["broken by GRPO"][:n_broke] + kinds["unchanged"][:n_same]


def question_images(dataset, split, ids):
    """PNG bytes of the demo test images, by row id (the demo is drawn in a second); {} for other datasets."""
    if dataset != "demo":
        return {}
    import io
    import data
    out = {}
    for r in data.load("demo", split):
        if r["id"] in ids:
            buf = io.BytesIO()
            data.load_image(r).save(buf, format="PNG")
            out[r["id"]] = buf.getvalue()
    return out


REPORT_STYLE = (
    "body{font-family:sans-serif;max-width:1150px;margin:1em auto;color:#222}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
    "tr.base{color:#777}.note{color:#666;font-size:90%}img.curves{width:100%}"
    "img.xray{width:168px;height:168px;image-rendering:pixelated;margin-right:14px}"
    ".case{display:flex;border-top:1px solid #ddd;padding:10px 0}.q{font-size:110%}.gold{color:#666}"
    ".ok{color:#1a7f37;font-weight:bold}.bad{color:#c62828;font-weight:bold}.who{margin:6px 0 2px}"
    "pre{white-space:pre-wrap;background:#f6f6f6;padding:6px;margin:0}")


def results_html(report):
    """report.json as a table (one row per model, then the baselines), the paired comparison and the times."""
    models = [(name, report[key]) for name, key in ((BASE, "base"), ("after SFT", "sft"),
                                                     ("after SFT + GRPO", "grpo")) if key in report]
    if not models:
        return ""
    res = models[-1][1]
    cell = lambda v: f"<td>{v:.3f}</td>" if v is not None else "<td>-</td>"  # noqa: E731
    html = [f"<h2>Held-out {escape(str(res.get('dataset')))} {escape(str(res.get('split')))} split "
            f"(n = {res.get('n')})</h2><table><tr><th>model</th>"
            + "".join(f"<th>{k.replace('_', ' ')}</th>" for k in KEYS) + "</tr>"]
    html += [f"<tr><td>{name}</td>{''.join(cell(r.get(k)) for k in KEYS)}</tr>" for name, r in models]
    html += [f"<tr class=base><td>{escape(name.replace('_', '-'))} baseline</td>{cell(v)}"
             f"{'<td></td>' * (len(KEYS) - 1)}</tr>" for name, v in res.get("baselines", {}).items()]
    html.append("</table>")
    if report.get("grpo_vs_sft"):
        c = report["grpo_vs_sft"]
        html.append(f"<p>GRPO against SFT on the same questions: {escape(verdict(c))}.</p>")
    if report.get("seconds"):
        times = ", ".join(f"{escape(k)} {v}" for k, v in report["seconds"].items())
        html.append(f"<p class=note>seconds per stage: {times}; total {report.get('total_seconds')}</p>")
    return "".join(html)


def rollouts_html(folder, report):
    """A few test questions with both models' completions and rewards (the model's text escaped: never markup)."""
    from evaluate import find_predictions  # the file each metrics.json names
    sft, grpo = (read_jsonl(find_predictions(os.path.join(folder, d, "metrics.json")))
                 for d in ("eval_sft", "eval_grpo"))
    picked = pick_rollouts(sft, grpo)
    if not picked:
        return ""
    res = report.get("grpo", {})
    images = question_images(res.get("dataset", "demo"), res.get("split", "test"), {g["id"] for _, _, g in picked})
    html = ["<h2>Before and after GRPO: the same test questions</h2><p class=note>greedy completions of the SFT "
            "model and of the SFT + GRPO model; exact = normalised answer match (evaluate.py), then the format, "
            "fact and consistency rewards (rewards.py)</p>"]
    for kind, before, after in picked:
        img = f"<img class=xray alt='the question image' src='{data_uri(images[after['id']])}'>" \
            if after["id"] in images else ""
        html.append(f"<div class=case>{img}<div><p><b>{kind}</b> &middot; {escape(after['id'])}</p><p class=q>"
                    f"{escape(after['question'])} <span class=gold>gold: {escape(str(after['gold']))}</span></p>")
        for name, r in (("SFT", before), ("SFT + GRPO", after)):
            scores = " ".join(f"{k} {r[k]:.2f}" for k in ("exact", "format", "fact", "consistency")
                              if r.get(k) is not None)
            html.append(f"<p class=who>{name}: <span class={'ok' if r['exact'] else 'bad'}>answer "
                        f"{escape(str(r['pred']))}</span> <span class=note>{scores}</span></p>"
                        f"<pre>{escape(r['completion'])}</pre>")
        html.append("</div></div>")
    return "".join(html)


def write_report(folder):
    """report.html: the results table, curves.png and a few rollouts before and after GRPO, all inline (images
    as data: URIs), so the one file opens offline anywhere. Each part is left out when its inputs are missing."""
    path = os.path.join(folder, "report.json")
    report = json.load(open(path)) if os.path.exists(path) else {}
    curves = os.path.join(folder, "curves.png")
    body = [f"<h1>medfact demo: SFT on pseudo-labels, then GRPO</h1><p class=note>{escape(os.path.abspath(folder))}"
            "</p>", results_html(report)]
    if os.path.exists(curves):
        with open(curves, "rb") as f:
            body.append(f"<h2>Training curves</h2><img class=curves alt='training curves' src='{data_uri(f.read())}'>")
    body.append(rollouts_html(folder, report))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>medfact demo report</title>"
            f"<style>{REPORT_STYLE}</style></head><body>{''.join(body)}</body></html>")
    out = os.path.join(folder, "report.html")
    with open(out, "w", encoding="utf-8") as f:
        f.write(page)
    return out


def main(args):
    out, fresh, seconds = args.out, args.fresh, {}
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, "report.json")):  # a re-run keeps the times of the stages it reuses
        seconds = json.load(open(os.path.join(out, "report.json"))).get("seconds", {})
    t0 = time.time()

    # data: drawn in memory from a seed; print what a model that ignores the image would score
    import data
    from evaluate import baselines, paired  # the same baselines and paired test as the real benchmarks
    train, test = data.load("demo", "train"), data.load("demo", "test")
    print(f"demo data: {len(train)} train / {len(test)} test questions; question-only baseline on test: "
          f"{baselines(train, test)['question_only']:.3f}")

    pseudo = os.path.join(out, "pseudo.jsonl")
    sft_dir, grpo_dir = os.path.join(out, "sft"), os.path.join(out, "grpo")
    sft_done = os.path.join(sft_dir, "state.json")  # retrieve.py resumes by itself; once SFT read them, they are done
    run([PY, "retrieve.py", "--data", "demo", "--split", "train", "--limit", str(args.labelled), "--out", pseudo,
         "--coverage", str(args.coverage), "--seed", str(args.seed)], pseudo if os.path.exists(sft_done) else None,
        seconds, "retrieve", fresh)
    run([PY, "sft.py", "--data", pseudo, "--model", "tiny", "--out", sft_dir, "--max_steps", str(args.sft_steps),
         "--seed", str(args.seed)], sft_done, seconds, "sft", fresh)
    run([PY, "grpo.py", "--ckpt", sft_dir, "--data", "demo", "--out", grpo_dir, *grpo_flags(args)],
        os.path.join(grpo_dir, "state.json"), seconds, "grpo", fresh)
    # the untrained model on the first 640 questions only: it writes 128 tokens of noise for each (0.000 on any
    # number of them), and all 2,560 would cost ~2 of the demo's 15 minutes (640 took 29 s, EXPERIMENTS 1.1)
    results = {"base": evaluate_ckpt("tiny", os.path.join(out, "eval_base"), "eval_base", seconds, fresh,
                                     extra=("--limit", str(BASE_QUESTIONS))),
               "sft": evaluate_ckpt(sft_dir, os.path.join(out, "eval_sft"), "eval_sft", seconds, fresh),
               "grpo": evaluate_ckpt(grpo_dir, os.path.join(out, "eval_grpo"), "eval_grpo", seconds, fresh)}
    change = paired(os.path.join(out, "eval_sft", "metrics.json"), os.path.join(out, "eval_grpo", "metrics.json"))
    selected = json.load(open(os.path.join(grpo_dir, "state.json"))).get("selected")  # held-out model selection
    report = {**results, "grpo_vs_sft": change, "grpo_selected": selected, "seconds": seconds,
              "total_seconds": round(sum(seconds.values()), 1)}
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    curves, page = plot(out), write_report(out)  # seconds
    b = results["grpo"].get("baselines", {})
    table({BASE: results["base"], "after SFT": results["sft"], "after SFT + GRPO": results["grpo"]},
          f"held-out demo test split (n={results['grpo']['n']}); baselines: question-only "
          f"{b.get('question_only', float('nan')):.3f}, majority {b.get('majority', float('nan')):.3f}")
    print(f"GRPO vs SFT on the same {results['grpo']['n']} questions: {verdict(change)}")
    print("seconds per stage: " + ", ".join(f"{k} {v}" for k, v in seconds.items()) +
          f"; total {report['total_seconds']} (stage times; this run took {time.time() - t0:.0f}s)")
    print(f"wrote {' and '.join(p for p in (curves, page) if p)} (open the page in a browser)")


def ablation(args):
    """The paper's ablation on the demo: each row is a full run, evaluated on the same test split."""
    out, seconds = args.out, {}
    os.makedirs(out, exist_ok=True)
    main_out = args.main  # the main job (SFT, SFT + GRPO): reused when `make demo` already ran it
    main(argparse.Namespace(**{**vars(args), "out": main_out, "ablation": False, "fresh": False}))
    sft_dir = os.path.join(main_out, "sft")
    grpo = [PY, "grpo.py", "--data", "demo", *grpo_flags(args)]
    # each variant changes one thing against the main job's GRPO: its start, or one reward's weight (0: off)
    variants = {"GRPO without SFT": ["--ckpt", "tiny"]}
    for r in ("accuracy", "format", "fact", "consistency"):
        variants[f"SFT + GRPO without {r}"] = ["--ckpt", sft_dir, f"--w_{r}", "0"]
    results = {"SFT only": json.load(open(os.path.join(main_out, "eval_sft", "metrics.json"))),
               "SFT + GRPO": json.load(open(os.path.join(main_out, "eval_grpo", "metrics.json")))}
    folder = lambda name: os.path.join(out, name.lower().replace(" + ", "_").replace(" ", "_"))
    for name, flags in variants.items():
        d = folder(name)
        if args.fresh:
            shutil.rmtree(d, ignore_errors=True)
        run(grpo + flags + ["--out", d], os.path.join(d, "state.json"), seconds, name, args.fresh)
        results[name] = evaluate_ckpt(d, os.path.join(d, "eval"), "eval " + name, seconds, args.fresh)
    # each GRPO run against SFT alone on the same questions: answers fixed / broken, McNemar p
    dirs = {"SFT + GRPO": os.path.join(main_out, "eval_grpo")}
    dirs.update({name: os.path.join(folder(name), "eval") for name in variants})
    from evaluate import paired
    vs_sft = {name: paired(os.path.join(main_out, "eval_sft", "metrics.json"), os.path.join(d, "metrics.json"))
              for name, d in dirs.items()}
    with open(os.path.join(out, "ablation.json"), "w") as f:
        json.dump({**results, "vs_sft": vs_sft, "seconds": seconds}, f, indent=1)
    table(results, "ablation on the held-out demo test split")
    for name, c in vs_sft.items():
        print(f"{name:>32} vs SFT only: fixed {c['fixed']:3d}, broke {c['broken']:3d}, McNemar p {pval(c['p'])}")
    print("seconds per run: " + ", ".join(f"{k} {v}" for k, v in seconds.items()))


if __name__ == "__main__":
    a = parser.parse_args()
    if a.plot:
        if not any(os.path.exists(os.path.join(a.plot, stage, "metrics.jsonl")) for stage in ("sft", "grpo")):
            sys.exit(f"{a.plot}: no sft/metrics.jsonl or grpo/metrics.jsonl to draw; run {PY} demo.py --out {a.plot}")
        print(f"wrote {' and '.join(p for p in (plot(a.plot), write_report(a.plot)) if p)}")
    elif a.ablation:
        ablation(a)
    else:
        main(a)
