"""
bench/baselines.py: the models that never look at the image, on a benchmark's test split (evaluate.baselines).

    python bench/baselines.py --data ../shared/data/slake/Slake1.0 --name slake
    python bench/baselines.py --data ../shared/data/vqa_rad --name vqa_rad

The majority answer (per answer type), the question-only lookup (the most frequent training answer of the same
question string) and the trained question-only classifier (ridge over the question's words and bigrams, its
regularisation chosen on the val split), each trained on the training split and scored on test as evaluate.py
scores a model. A model that does not beat the strongest of them is not reading the image. Writes
bench/results/baselines_<name>.json (--out FILE), with the lambda chosen and the seconds it took.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import evaluate  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a dataset folder with train, val and test splits")
    parser.add_argument("--name", required=True, help="names the results file")
    parser.add_argument("--lang", default="en", help="SLAKE language: en | zh | all")
    parser.add_argument("--out", default=None, help="default: bench/results/baselines_<name>.json")
    args = parser.parse_args()
    t0 = time.time()
    train, val, test = (data.load(args.data, s, lang=args.lang, skip_bad_rows=True) for s in ("train", "val", "test"))
    res = evaluate.baselines(train, test, val)
    res["strongest_question_only"] = evaluate.strongest_prior(res)
    res["lambda"] = evaluate.question_classifier(train, val).lam
    res.update(n_train=len(train), n_val=len(val), n_test=len(test), seconds=round(time.time() - t0, 1),
               command="python bench/baselines.py " + " ".join(sys.argv[1:]))
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"baselines_{args.name}.json")
    json.dump(res, open(out, "w"), indent=1)
    print(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items() if k != "command"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
