"""
Where does GRPO's gain on the demo come from: seeing or reasoning?

    python bench/demo_flips.py runs/demo/eval_sft runs/demo/eval_grpo

Takes two evaluate.py results on the same questions (each a metrics JSON or its folder; the
predictions file it names) and sorts each answer the second model fixed or broke by whether the
image description in its reasoning (the demo traces' "The image shows ..." sentence) changed too.
Same description, other answer: the model saw the same thing and reasoned differently. Changed
description: it saw differently. Prints the counts; writes them as JSON only with --out.
"""

import argparse
import json
import os
import re
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from evaluate import find_predictions  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("before", help="evaluate.py metrics JSON, or its folder, of the first model (runs/demo/eval_sft)")
parser.add_argument("after", help="the same of the second model, on the same questions")
parser.add_argument("--out", default=None, help="write the counts as JSON here (default: print only)")


def read(path):
    with open(find_predictions(path)) as f:
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
