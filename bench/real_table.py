"""
bench/real_table.py: the README's real-benchmark table, from bench/results/real_<name>.json.

    python bench/real_table.py                        # print the table
    python bench/real_table.py --readme README.md     # and rewrite it in the README, between its markers

bench/benchmarks.sh writes the results files (one per dataset); every number here is read from
them: per seed, test accuracy after SFT and after SFT + GRPO, closed and open accuracy and open
recall, the paired comparison (answers fixed / broken by GRPO, exact McNemar p), the baselines
(majority; question-only as a lookup of the same question and as a trained text classifier, the
stronger of which a model must beat: evaluate.strongest_prior) and the minutes; then the mean over seeds,
with the fixed / broken pooled over them. From bench/results/ablation_<name>.json (benchmarks.sh
--ablation) it also writes the ablation table, between its own markers: each variant's test accuracy
against SFT alone on the same questions, beside the full SFT + GRPO run of the same seed. The commands
above each table are the recorded ones as a reader pastes them at the repo root (`relative`).
"""

import argparse
import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import evaluate  # noqa: E402

START, END = "<!-- real-table: start (python bench/real_table.py --readme README.md) -->", "<!-- real-table: end -->"
ABL_START, ABL_END = ("<!-- ablation-table: start (python bench/real_table.py --readme README.md) -->",
                      "<!-- ablation-table: end -->")
VARIANTS = {"no_sft": "GRPO without the SFT cold start", "no_accuracy": "SFT + GRPO without the accuracy reward",
            "no_format": "SFT + GRPO without the format reward", "no_fact": "SFT + GRPO without the fact reward",
            "no_consistency": "SFT + GRPO without the consistency reward"}
NAMES = {"vqa_rad": "VQA-RAD (official test)", "slake": "SLAKE (English test)"}


def fmt(x):
    return "-" if x is None else f"{x:.3f}"


def pval(p):
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def minutes(run, res):
    """A seed's minutes with the retrieval; a seed whose SFT model was reused (--reuse_sft) ran GRPO only."""
    if run.get("sft_reused"):
        return f"{run['seconds'] / 60:.0f} (GRPO only)"
    return f"{(run['seconds'] + res.get('retrieve_seconds', 0)) / 60:.0f}"


def table(paths):
    head = ("| dataset | seed | n | SFT | SFT + GRPO | closed (SFT / +GRPO) | open (SFT / +GRPO) | open recall "
            "(SFT / +GRPO) | GRPO vs SFT: fixed / broken (p) | majority (closed) | question-only: lookup / trained | minutes |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for path in paths:
        res = json.load(open(path))
        name = os.path.basename(path)[len("real_"):-len(".json")]
        runs = res["seeds"]
        for r in runs:
            s, g, p, b = r["sft"], r["grpo"], r["paired"], r["sft"].get("baselines") or {}
            lines.append(f"| {NAMES.get(name, name)} | {r['seed']} | {s['n']} | {fmt(s['accuracy'])} | "
                         f"**{fmt(g['accuracy'])}** | {fmt(s['closed_accuracy'])} / {fmt(g['closed_accuracy'])} | "
                         f"{fmt(s['open_accuracy'])} / {fmt(g['open_accuracy'])} | {fmt(s['open_recall'])} / "
                         f"{fmt(g['open_recall'])} | {p['fixed']} / {p['broken']} ({pval(p['p'])}) | "
                         f"{fmt(b.get('majority'))} ({fmt(b.get('closed_majority'))}) | {fmt(b.get('question_only'))} / "
                         f"{fmt(b.get('question_trained'))} | "
                         f"{minutes(r, res)} |")
        mean = lambda stage, k: sum(r[stage][k] for r in runs) / len(runs)
        lines.append(f"| {NAMES.get(name, name)} | mean | | {fmt(mean('sft', 'accuracy'))} | "
                     f"**{fmt(mean('grpo', 'accuracy'))}** | {fmt(mean('sft', 'closed_accuracy'))} / "
                     f"{fmt(mean('grpo', 'closed_accuracy'))} | {fmt(mean('sft', 'open_accuracy'))} / "
                     f"{fmt(mean('grpo', 'open_accuracy'))} | {fmt(mean('sft', 'open_recall'))} / "
                     f"{fmt(mean('grpo', 'open_recall'))} | {pooled(runs)} | | | |")
    return "\n".join(lines), commands_of(paths)


def pooled(runs):
    """The seeds' fixed / broken added up, and the exact McNemar p of the sums."""
    fixed, broken = (sum(r["paired"][k] for r in runs) for k in ("fixed", "broken"))
    return f"{fixed} / {broken} (pooled, {pval(evaluate.mcnemar(fixed, broken))})"


def relative(command, root=ROOT):
    """A recorded command as a reader pastes it at the repo root: an absolute path in the repo or beside it
    (in its parent folder, as ../shared/data) relative to the root; any other word as recorded."""
    root = os.path.realpath(root)
    near = (root + os.sep, os.path.dirname(root) + os.sep)

    def rel(m):
        path = os.path.normpath(m.group(0))
        return os.path.relpath(path, root) if path == root or path.startswith(near) else m.group(0)
    return re.sub(r"(?<![^\s=])/[^\s]*", rel, command)


def commands_of(paths):
    """The commands that made the results, once each: a seed run by its own process records its own."""
    out = []
    for path in paths:
        res = json.load(open(path))
        for c in [r.get("command", res["command"]) for r in res["seeds"]] or [res["command"]]:
            c = relative(c)
            if c not in out:
                out.append(c)
    return out


def ablation_table(paths):
    """One row per seed and variant of each ablation_<name>.json, after that seed's SFT and SFT + GRPO rows
    (read from real_<name>.json beside it)."""
    head = "| dataset | seed | model | test accuracy | closed | open | against SFT: fixed / broken (p) | minutes |"
    lines, commands = [head, "|" + " --- |" * (head.count("|") - 1)], []
    for path in paths:
        name = os.path.basename(path)[len("ablation_"):-len(".json")]
        abl = json.load(open(path))
        main = os.path.join(os.path.dirname(path), f"real_{name}.json")
        seeds = {f"seed{r['seed']}": r for r in json.load(open(main))["seeds"]} if os.path.exists(main) else {}
        row = lambda seed, label, m, vs, minutes: lines.append(
            f"| {NAMES.get(name, name)} | {seed[4:]} | {label} | {fmt(m['accuracy'])} | {fmt(m['closed_accuracy'])} | "
            f"{fmt(m['open_accuracy'])} | {vs} | {minutes} |")
        for seed, variants in abl["seeds"].items():
            if seed in seeds:
                r = seeds[seed]
                p = r["paired"]
                row(seed, "SFT", r["sft"], "", "")
                row(seed, "SFT + GRPO (all four rewards)", r["grpo"], f"{p['fixed']} / {p['broken']} ({pval(p['p'])})", "")
            for v in [v for v in VARIANTS if v in variants] + sorted(set(variants) - set(VARIANTS)):
                r, p = variants[v], variants[v]["vs_sft"]
                row(seed, VARIANTS.get(v, v), r["test"], f"{p['fixed']} / {p['broken']} ({pval(p['p'])})",
                    f"{r['seconds'] / 60:.0f}")
                c = relative(r.get("command", abl["command"]))
                if c not in commands:
                    commands.append(c)
    return "\n".join(lines), commands


def rewrite(readme, start, end, block):
    if start not in readme or end not in readme:
        raise SystemExit(f"no table markers ({start} ... {end})")
    head, rest = readme.split(start, 1)
    return head + start + "\n" + block + "\n" + end + rest.split(end, 1)[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="bench/results", help="folder of real_<name>.json files")
    parser.add_argument("--readme", default=None, help="rewrite the table between the markers in this file")
    args = parser.parse_args()
    paths = sorted(glob.glob(os.path.join(args.results, "real_*.json")))
    if not paths:
        raise SystemExit(f"no {args.results}/real_*.json: run bash bench/benchmarks.sh first")
    text, commands = table(paths)
    block = "```\n" + "\n".join(commands) + "\n```\n\n" + text
    print(block)
    ablations = sorted(glob.glob(os.path.join(args.results, "ablation_*.json")))
    abl_block = None
    if ablations:
        text, commands = ablation_table(ablations)
        abl_block = "```\n" + "\n".join(commands) + "\n```\n\n" + text
        print("\n" + abl_block)
    if args.readme:
        readme = open(args.readme).read()
        try:
            readme = rewrite(readme, START, END, block)
            if abl_block is not None:
                readme = rewrite(readme, ABL_START, ABL_END, abl_block)
        except SystemExit as e:
            raise SystemExit(f"{args.readme}: {e}")
        open(args.readme, "w").write(readme)
        print(f"rewrote the tables in {args.readme}")

if __name__ == "__main__":
    main()
