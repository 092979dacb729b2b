"""
bench/real_table.py: the README's real-benchmark table, from bench/results/real_<name>.json.

    python bench/real_table.py                        # print the table
    python bench/real_table.py --readme README.md     # and rewrite it in the README, between its markers

bench/benchmarks.sh writes the results files (one per dataset); every number here is read from
them: per seed, test accuracy after SFT and after SFT + GRPO, closed and open accuracy and open
recall, the paired comparison (answers fixed / broken by GRPO, exact McNemar p), the baselines
(majority; question-only as a lookup of the same question and as a trained text classifier, the
stronger of which a model must beat: evaluate.strongest_prior) and the minutes; then the mean over seeds.
"""

import argparse
import glob
import json
import os

START, END = "<!-- real-table: start (python bench/real_table.py --readme README.md) -->", "<!-- real-table: end -->"
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
                     f"{fmt(mean('grpo', 'open_recall'))} | {sum(r['paired']['fixed'] for r in runs)} / "
                     f"{sum(r['paired']['broken'] for r in runs)} (all seeds) | | | |")
    commands = [json.load(open(p))["command"] for p in paths]
    return "\n".join(lines), commands


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
    if args.readme:
        readme = open(args.readme).read()
        if START not in readme or END not in readme:
            raise SystemExit(f"{args.readme}: no table markers ({START} ... {END})")
        head, rest = readme.split(START, 1)
        open(args.readme, "w").write(head + START + "\n" + block + "\n" + END + rest.split(END, 1)[1])
        print(f"rewrote the table in {args.readme}")


if __name__ == "__main__":
    main()
