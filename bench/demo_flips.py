"""
Where does GRPO's gain on the demo come from: seeing or reasoning?

    python bench/demo_flips.py runs/demo/eval_sft runs/demo/eval_grpo

Takes two evaluate.py output folders on the same questions (predictions.jsonl) and sorts each
answer the second model fixed or broke by whether the image description in its reasoning (the
demo traces' "The image shows ..." sentence) changed too. Same description, other answer: the
model saw the same thing and reasoned differently. Changed description: it saw differently.
Prints the counts; writes them as JSON only with --out.
"""

import argparse
import json
import os
import re
from collections import Counter

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("before", help="evaluate.py output folder of the first model (e.g. runs/demo/eval_sft)")
parser.add_argument("after", help="evaluate.py output folder of the second model, same questions")
parser.add_argument("--out", default=None, help="write the counts as JSON here (default: print only)")


def read(folder):
    with open(os.path.join(folder, "predictions.jsonl")) as f:
        return {r["id"]: r for r in map(json.loads, f)}


def description(text):
    m = re.search(r"The image shows (.*?)\.", text)
    return m.group(1) if m else None


if __name__ == "__main__":
    args = parser.parse_args()
    before, after = read(args.before), read(args.after)
    flips = Counter()
    for k, a in before.items():
        b = after[k]
        if a["exact"] != b["exact"]:
            same = description(a["completion"]) == description(b["completion"])
            flips["fixed" if b["exact"] else "broke", "same description" if same else "description changed"] += 1
    counts = {}
    for change in ("fixed", "broke"):
        n = sum(v for (c, _), v in flips.items() if c == change)
        counts[change] = {"n": n, "same description": flips[change, "same description"],
                          "description changed": flips[change, "description changed"]}
        print(f"{change} {n}: same image description {flips[change, 'same description']}, "
              f"description changed {flips[change, 'description changed']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"before": args.before, "after": args.after, **counts}, f, indent=1)
