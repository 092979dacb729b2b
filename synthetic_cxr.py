"""
synthetic_cxr.py: the synthetic chest-radiograph world behind the `demo` dataset.

A stand-in for MIMIC-CXR-VQA that a tiny model can learn on a laptop CPU in minutes: 112x112
frontal chest radiographs drawn with numpy, four findings (pleural effusion, pneumothorax, lung
nodule, cardiomegaly), six question categories (presence, abnormality, laterality, location,
size, count), a short radiology report per image, and a glossary (the knowledge corpus retrieval
searches, with distractors it must pass over). Sides are the PATIENT's: radiographs are viewed
facing the patient, so the patient's left lung is on the image's right.

Questions are drawn so that every question string has balanced answers: a model that ignores the
image scores 0.45 on test (evaluate.baselines' question-only prior), one that reads it can reach
1.0 (a 3-layer CNN gets 0.98-1.0 per finding). Splits: train 1,100 images, val 75, test 640, four
questions each; no image is shared between splits.

This is the ground floor: it imports nothing of ours. The stages never import it: they read
`data.load("demo", split)` (copies of rows(split)), retrieve.py's `--corpus cxr-glossary`
(glossary()) and data.tokenizer_texts() (tokenizer_texts(), what a tiny model built without texts
of its own trains its tokenizer on). The paper has no such dataset: all of this is ours.

    python synthetic_cxr.py                         # statistics of the splits
    python synthetic_cxr.py --sheet demo_sheet.png  # also save a contact sheet of test images
    # the question-only baseline on test: `make demo` prints it beside the model (evaluate.baselines)
"""

import functools
from collections import Counter, defaultdict

import numpy as np
from PIL import Image, ImageFilter

# -----------------------------------------------------------------------------
# the knowledge corpus (the findings and their signs, plus distractors retrieval must pass over)

GLOSSARY = [
    ("Pleural effusion", "Fluid collecting in the pleural space between the lung and the chest wall. On an upright "
     "frontal chest radiograph it is a dense, uniform opacity at the lung base that blunts the costophrenic angle, "
     "with a concave upper border, the meniscus, that climbs toward the lateral chest wall. A small effusion fills "
     "only the lowest quarter of the lung field; a large one fills half of it or more."),
    ("Meniscus sign", "The curved upper edge of a pleural effusion, higher at the lateral chest wall than medially, "
     "because fluid rises along the pleura. It separates the dense fluid below from the dark aerated lung above."),
    ("Costophrenic angle", "The sharp lateral corner where the diaphragm meets the chest wall at the base of each "
     "lung. A sharp angle is normal; a blunted, filled-in angle is often the first sign of a pleural effusion."),
    ("Pneumothorax", "Air in the pleural space that lets the lung collapse away from the chest wall. On a frontal "
     "radiograph it is a very dark band without lung markings along the apex and lateral edge of the lung, "
     "separated from the collapsed lung by a thin white pleural line."),
    ("Visceral pleural line", "The thin bright line at the edge of a partly collapsed lung. Lung markings stop at "
     "this pleural line and only dark air lies beyond it; seeing it is the key sign that confirms a pneumothorax."),
    ("Lung markings", "The fine branching lines of the pulmonary vessels, radiating from the hilum and fading toward "
     "the chest wall. Normal lung markings reach almost to the edge of the lung; their absence at the periphery "
     "suggests a pneumothorax."),
    ("Pulmonary nodule", "A round opacity within the lung up to 3 cm across, seen as a bright, well-defined spot "
     "against the dark lung. A nodule is described by its side, its lung zone, its size (small or large) and how "
     "many there are; a solitary nodule is one, multiple nodules are two or more."),
    ("Lung zones", "Each lung field on a frontal radiograph is divided into thirds from apex to base: the upper zone, "
     "the middle zone and the lower zone. A focal finding such as a nodule is located by the zone that holds it."),
    ("Cardiomegaly", "Enlargement of the heart. On a frontal chest radiograph the cardiac silhouette is wider than "
     "half the width of the thorax, that is, a cardiothoracic ratio above 0.5."),
    ("Cardiothoracic ratio", "The widest diameter of the cardiac silhouette divided by the widest inner diameter of "
     "the thorax. Below 0.5 is normal on a frontal view; above 0.5 suggests cardiomegaly."),
    ("Cardiac silhouette", "The bright shadow of the heart in the lower middle chest. It sits on the diaphragm and "
     "reaches further to the patient's left than to the right; its width gives the heart size."),
    ("Laterality on a frontal radiograph", "Radiographs are viewed as if facing the patient, so the patient's right "
     "is on the left side of the image and the patient's left is on the right side of the image. A finding is "
     "always named by the patient's side."),
    ("Normal chest radiograph", "A normal chest radiograph shows two evenly dark lungs with lung markings reaching "
     "the periphery, sharp costophrenic angles, no nodule, no pneumothorax, and a heart narrower than half the "
     "chest."),
    ("Diaphragm", "The muscular domes beneath the lungs. On a frontal radiograph each hemidiaphragm is a smooth "
     "curved border between the dark lung above and the bright abdomen below."),
    ("Hilum", "The region on the medial side of each lung where the bronchi and pulmonary vessels enter; the lung "
     "markings radiate from it."),
    ("Ribs", "Curved bony bands crossing the lung fields, running from the spine down toward the chest wall. They "
     "are normal anatomy, not an abnormality."),
    ("Mediastinum", "The central compartment between the lungs, holding the heart, great vessels, trachea and "
     "oesophagus; the spine projects through it on a frontal view."),
    ("Trachea", "The air-filled windpipe, a dark vertical band in the midline above the heart. It shifts away from "
     "a tension pneumothorax and toward a collapsed lung."),
    ("Consolidation", "Air spaces of the lung filled with fluid, pus or cells, giving a patchy or dense opacity, "
     "often with air bronchograms; typical of pneumonia. Unlike an effusion it has no meniscus."),
    ("Atelectasis", "Collapse of part of a lung with loss of volume, seen as a linear or wedge-shaped opacity that "
     "pulls fissures, the hilum or the diaphragm toward it."),
    ("Pulmonary edema", "Fluid in the lung interstitium and air spaces: hazy opacities around both hila, Kerley B "
     "lines, and often an enlarged heart and bilateral effusions."),
    ("Kerley B lines", "Short horizontal lines at the lung periphery near the bases, from thickened interlobular "
     "septa; a sign of interstitial edema."),
    ("Lung mass", "A lung lesion larger than 3 cm across. A mass raises more concern for cancer than a nodule does."),
    ("Calcified granuloma", "A small, very dense, sharply marginated spot in the lung, the healed remnant of an old "
     "infection; usually benign and stable."),
    ("Emphysema", "Destruction of alveolar walls: both lungs are hyperinflated and overly dark, the diaphragms are "
     "flattened and vessels are sparse throughout, not just at one edge."),
    ("Tension pneumothorax", "A pneumothorax under pressure that pushes the mediastinum to the opposite side and "
     "depresses the diaphragm; a clinical emergency diagnosed clinically before imaging."),
    ("Hydropneumothorax", "Air and fluid together in the pleural space; the fluid has a straight horizontal "
     "air-fluid level instead of a curved upper border."),
    ("Pneumoperitoneum", "Free air in the abdomen, seen on an upright radiograph as a dark crescent under a "
     "hemidiaphragm."),
    ("Pericardial effusion", "Fluid around the heart that makes the cardiac shadow large and globular, like a water "
     "bottle; it can mimic an enlarged heart."),
    ("Rib fracture", "A break in a rib, seen as a lucent line or a step in the cortex; look for an associated "
     "pneumothorax."),
    ("Hilar enlargement", "Bulky, lobulated hila from enlarged lymph nodes or pulmonary arteries, as in sarcoidosis "
     "or lymphoma."),
    ("Pleural thickening", "A band of soft tissue along the chest wall from old inflammation or asbestos exposure; "
     "unlike fluid it does not form a meniscus or shift with position."),
]


def glossary():
    """The knowledge corpus (retrieve.py's `--corpus cxr-glossary`): passages {"id", "title", "text"},
    in a fixed order."""
    return [{"id": title.lower().replace(" ", "-"), "title": title, "text": text} for title, text in GLOSSARY]


# -----------------------------------------------------------------------------
# what each image shows

IMAGE_SIZE = 112
IMAGES = {"train": 1100, "val": 75, "test": 640}  # x 4: 4,400 / 300 / 2,560 rows; test's first 160: the pre-#34 test
QUESTIONS_PER_IMAGE = 4
SIDES, ZONES, SIZES = ("left", "right"), ("upper", "middle", "lower"), ("small", "large")
FINDINGS = ("effusion", "pneumothorax", "nodule", "cardiomegaly")
NAME = {"effusion": "pleural effusion", "pneumothorax": "pneumothorax", "nodule": "nodule",
        "cardiomegaly": "cardiomegaly"}


def _sample_case(rng):
    """The findings of one image: 0-2 of the four. Findings never share a lung, so none can hide another."""
    pick = lambda options: options[int(rng.integers(len(options)))]
    k = int(rng.choice(3, p=[0.15, 0.4, 0.45]))
    present = {FINDINGS[i] for i in rng.choice(len(FINDINGS), size=k, replace=False)}
    free = [SIDES[i] for i in rng.permutation(2)]  # lungs still without a finding
    case = {"effusion": None, "pneumothorax": None, "nodules": [], "cardiomegaly": "cardiomegaly" in present}
    if "effusion" in present:
        case["effusion"] = {"side": free.pop(), "size": pick(SIZES)}
    if "pneumothorax" in present:
        case["pneumothorax"] = {"side": free.pop()}
    if "nodule" in present:
        side, zones = free.pop(), [ZONES[i] for i in rng.permutation(3)]
        case["nodules"].append({"side": side, "zone": zones[0], "size": pick(SIZES)})
        if rng.random() < 0.5:  # a second nodule: in the other lung if that is free, else in another zone
            if free and rng.random() < 0.5:
                case["nodules"].append({"side": free.pop(), "zone": pick(ZONES), "size": pick(SIZES)})
            else:
                case["nodules"].append({"side": side, "zone": zones[1], "size": pick(SIZES)})
    return case


# -----------------------------------------------------------------------------
# drawing a frontal chest radiograph
# Intensities add up like X-ray attenuation: body tissue bright, air in the lungs dark, bone and fluid
# brighter. Every finding is large and high-contrast at 112x112 (the tiny model sees 8x8 patches of 14 px).

_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
NODULE_RADIUS = {"small": 4.5, "large": 8.0}
NODULE_DENSITY = 120
ZONE_CENTRE = {"upper": 0.22, "middle": 0.5, "lower": 0.78}  # fraction of lung height from the apex: 14+ px apart
EFFUSION_FILL = {"small": 0.25, "large": 0.5}  # fluid fills the lower quarter or the lower half of the lung


def _cover(d, width=1.5):
    """Signed distance in px (positive inside) -> coverage in [0, 1] with a soft edge `width` px wide."""
    return np.clip(d / width + 0.5, 0.0, 1.0)


def _ellipse(cx, cy, a, b, p=2.0, X=_XX, Y=_YY):
    """Approximate signed distance (px, positive inside) to a superellipse: p=2 an ellipse, p>2 a rounded box."""
    q = (np.abs((X - cx) / a) ** p + np.abs((Y - cy) / b) ** p) ** (1 / p)
    return (1 - q) * min(a, b)


def _dome(L, X):
    """The hemidiaphragm under lung L: highest under the lung's centre, dipping into the costophrenic angles."""
    return L["base"] - L["dome"] * (1 - ((X - L["cx"]) / (1.2 * L["a"])) ** 2)


def _lung(L, X=_XX, Y=_YY):
    """Signed distance inside lung L: an ellipse narrowing toward the apex, cut off below by the diaphragm."""
    a = L["a"] * (0.78 + 0.22 * np.clip((Y - L["cy"]) / L["b"], -1, 1))
    q = np.sqrt(((X - L["cx"]) / a) ** 2 + ((Y - L["cy"]) / L["b"]) ** 2)
    return np.minimum((1 - q) * L["a"], _dome(L, X) - Y)


def _anatomy(rng, cardiomegaly):
    """Random but plausible geometry: midline, two lungs (keyed by the patient's side), the heart."""
    mid, cy = 56 + rng.uniform(-2, 2), 50 + rng.uniform(-2, 2)
    a, b, gap = 16.5 + rng.uniform(-1, 1.5), 36 + rng.uniform(-2, 2), 21 + rng.uniform(-1, 1.5)
    lungs = {}
    for side, sign in (("right", -1), ("left", 1)):  # the patient's right lung is on the image's left
        L = {"cx": mid + sign * gap, "cy": cy + rng.uniform(-1, 1), "a": a + rng.uniform(-0.5, 0.5), "b": b,
             "sign": sign, "dome": 7 + rng.uniform(-1, 2)}
        L["base"] = L["cy"] + 0.92 * b
        L["top"], L["bottom"] = L["cy"] - b, L["base"] - L["dome"]  # the lung's extent on its central column
        L["hilum"] = (L["cx"] - sign * 0.55 * L["a"], L["cy"] + 4)
        lungs[side] = L
    thorax = (lungs["left"]["cx"] + lungs["left"]["a"]) - (lungs["right"]["cx"] - lungs["right"]["a"])
    # cardiothoracic ratio: well clear of 0.5 on either side, so the answer never hangs on a pixel
    width = thorax * (rng.uniform(0.57, 0.64) if cardiomegaly else rng.uniform(0.38, 0.45))
    hb = 18 + rng.uniform(-1.5, 1.5)
    heart = {"cx": mid + 0.1 * width, "cy": max(L["bottom"] for L in lungs.values()) - 0.3 * hb,
             "a": width / 2, "b": hb}  # reaches further to the patient's left (the image's right)
    return mid, lungs, heart


def _place_nodule(rng, L, heart, zone, r):
    """A centre in the zone's band with the whole nodule inside lung L and, when there is room, clear of the heart."""
    ring = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    y0 = L["top"] + ZONE_CENTRE[zone] * (L["bottom"] - L["top"])
    for attempt in range(40):
        y = y0 + rng.uniform(-2, 2)
        t = (y - L["cy"]) / L["b"]  # the lung's half-width on this row (see _lung), less the nodule
        room = max(L["a"] * (0.78 + 0.22 * t) * np.sqrt(max(1 - t * t, 0)) - r - 1.5, 0)
        x = L["cx"] + rng.uniform(-room, room)
        X, Y = x + (r + 1.5) * np.cos(ring), y + (r + 1.5) * np.sin(ring)
        in_lung = (_lung(L, X, Y) > 0).all()
        # behind the heart is still visible (intensities add), but keep clear when possible
        clear = (_ellipse(heart["cx"], heart["cy"], heart["a"], heart["b"], X=X, Y=Y) < 0).all() or attempt >= 25
        if in_lung and clear:
            return x, y
    return L["cx"], y0


def _draw(rng, case):
    """A 112x112 grayscale ("L") frontal chest radiograph showing `case`."""
    mid, lungs, heart = _anatomy(rng, case["cardiomegaly"])
    body_level, air_level = 100 + rng.uniform(-8, 8), 62 + rng.uniform(-6, 6)
    img = np.full((IMAGE_SIZE, IMAGE_SIZE), 10.0 + rng.uniform(-4, 4), np.float32)
    body = _cover(_ellipse(mid, 64, 51 + rng.uniform(-2, 2), 64, p=3.0), 2.0)
    img += body * body_level
    # the abdomen below the diaphragm: the domes of both lungs, joined flat under the heart
    right, left = lungs["right"], lungs["left"]
    diaphragm = np.minimum(np.where(_XX < mid, _dome(right, _XX), _dome(left, _XX)), max(right["base"], left["base"]))
    abdomen = _cover(_YY - diaphragm, 2.0) * body
    img += abdomen * 22
    # ribs (falling laterally from the spine) and clavicles, inside the rib cage above the diaphragm
    dx = np.abs(_XX - mid)
    rib = (_YY - right["top"] - 4 - 0.15 * dx - 0.007 * (dx - 6) ** 2) / 8.5  # 8 ribs, 8.5 px apart: periodic
    bones = _cover(1.3 - 8.5 * np.abs(rib - np.round(rib)), 1.0) * (dx > 6) * (rib > -0.5) * (rib < 7.5)
    for sign in (-1, 1):
        u = (_XX - mid) * sign
        clavicle = _cover(1.6 - np.abs(_YY - (right["top"] + 2 - 0.18 * u + 0.006 * u ** 2)), 1.0)
        bones = bones + 1.6 * clavicle * (u > 5) * (u < 40)
    cage = _cover(_ellipse(mid, right["cy"] + 4, abs(left["cx"] - mid) + left["a"] + 4, right["b"] + 10), 3.0)
    cage = cage * (1 - abdomen)
    img += bones * 14 * cage
    img += 16 * _cover(4.5 - dx, 1.5) * body  # spine
    img -= 22 * _cover(2.0 - dx, 1.0) * _cover(right["cy"] - 8 - _YY, 2.0) * body  # trachea: air in the midline
    heart_m = _cover(_ellipse(heart["cx"], heart["cy"], heart["a"], heart["b"]))
    for side, L in lungs.items():
        # work inside the lung's bounding box only: a quarter of the pixels, and this loop is most of the time
        box = (slice(max(int(L["top"]) - 2, 0), min(int(L["base"]) + 3, IMAGE_SIZE)),
               slice(max(int(L["cx"] - L["a"]) - 3, 0), min(int(L["cx"] + L["a"]) + 4, IMAGE_SIZE)))
        X, Y, patch, heart_p = _XX[box], _YY[box], img[box], heart_m[box]  # patch is a view: edits go to img
        lung = _cover(_lung(L, X, Y))
        air = lung * (1 - heart_p)  # the heart displaces the lung in front of it
        marked = air  # where lung markings show
        # lung markings: vessels radiating from the hilum, fading toward the chest wall
        hx, hy = L["hilum"]
        angle, r = np.arctan2(Y - hy, (X - hx) * L["sign"]), np.hypot(X - hx, Y - hy)
        ray = (angle + 1.3 + rng.uniform(-0.1, 0.1)) / 0.42  # 7 rays fanning out laterally, 0.42 rad apart
        off = np.abs(ray - np.round(ray)) * 0.42 * r  # px from the nearest ray
        vessels = np.exp(-(off / 0.8) ** 2) * np.clip(1 - r / (1.6 * L["a"]), 0, 1)
        vessels = vessels * (ray > -0.5) * (ray < 6.5)
        effusion = case["effusion"]
        if effusion and effusion["side"] == side:
            # fluid fills the base up to a meniscus that climbs toward the lateral chest wall
            level = L["bottom"] - EFFUSION_FILL[effusion["size"]] * (L["bottom"] - L["top"])
            lateral = np.clip((X - L["cx"]) * L["sign"] / L["a"], -1, 1)
            fluid = _cover(Y - (level - 6 * np.clip(lateral, 0, 1) ** 2 - 2 * lateral), 2.0) * lung
            air, marked = air * (1 - fluid), marked * (1 - fluid)
            patch += 15 * fluid * (1 - heart_p)
        pneumothorax = case["pneumothorax"]
        if pneumothorax and pneumothorax["side"] == side:
            # the lung collapses toward its hilum; the rim left behind is pure air, with no markings
            k = 0.65
            collapsed = _lung(L, hx + (X - hx) / k, hy + (Y - hy) / k) * k
            patch -= 40 * lung * (1 - _cover(collapsed, 1.2)) * (1 - heart_p)
            patch += 35 * _cover(1.0 - np.abs(collapsed), 1.0) * lung * (1 - heart_p)  # the visceral pleural line
            marked = marked * _cover(collapsed, 1.2)
        patch -= air * air_level
        patch += 16 * vessels * marked
    img += 40 * heart_m * (1 - abdomen)
    for nodule in case["nodules"]:
        r = NODULE_RADIUS[nodule["size"]] + rng.uniform(-0.3, 0.3)
        x, y = _place_nodule(rng, lungs[nodule["side"]], heart, nodule["zone"], r)
        img += NODULE_DENSITY * _cover(_ellipse(x, y, r, r), 1.2)
    img = img * rng.uniform(0.92, 1.08)  # exposure
    # the heel effect: film density drifts across the field. It also tells a model whose vision
    # tower has no absolute position embeddings (Qwen's ViT uses only relative RoPE) where a patch lies
    img += 18 * (_XX / IMAGE_SIZE - 0.5) + 12 * (_YY / IMAGE_SIZE - 0.5)
    img = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))
    img = np.asarray(img, np.float32)
    img += 3 * rng.standard_normal(img.shape, dtype=np.float32)  # quantum noise
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L")


# -----------------------------------------------------------------------------
# reports, questions, and answers balanced per question

def _report(case):
    """A short report with one sentence per fact a question can ask about, so a reasoning trace can cite it."""
    s = ["Frontal chest radiograph."]
    e = case["effusion"]
    s.append(f"There is a {e['size']} {e['side']} pleural effusion: a dense opacity with a meniscus fills the "
             f"{'lower quarter' if e['size'] == 'small' else 'lower half'} of the {e['side']} lung and blunts the "
             f"costophrenic angle." if e else "No pleural effusion; the costophrenic angles are sharp.")
    p = case["pneumothorax"]
    s.append(f"There is a {p['side']} pneumothorax: a dark rim without lung markings lies outside a thin pleural "
             f"line along the apex and lateral edge of the {p['side']} lung." if p else
             "No pneumothorax; lung markings reach the chest wall.")
    where = [f"in the {n['zone']} zone of the {n['side']} lung" for n in case["nodules"]]
    if len(where) == 1:
        s.append(f"There is one {case['nodules'][0]['size']} nodule {where[0]}.")
    elif where:
        a, b = case["nodules"]
        s.append(f"There are two nodules: a {a['size']} one {where[0]} and a {b['size']} one {where[1]}.")
    else:
        s.append("No lung nodule.")
    s += [f"The {side} lung is clear." for side in SIDES if not _in_lung(case, side)]
    s.append("The heart is enlarged (cardiomegaly): the cardiac silhouette is wider than half the chest."
             if case["cardiomegaly"] else
             "Heart size is normal: the cardiac silhouette is narrower than half the chest.")
    s.append(f"Impression: {_impression(case)}.")
    return " ".join(s)


def _impression(case):
    """Every finding with the attributes questions ask about, in a few words: the line a reasoning
    trace cites to describe the image (one description serves all of the image's questions)."""
    parts = []
    if case["effusion"]:
        parts.append(f"{case['effusion']['size']} {case['effusion']['side']} pleural effusion")
    if case["pneumothorax"]:
        parts.append(f"{case['pneumothorax']['side']} pneumothorax")
    nodules = [f"{n['size']} {n['side']} {n['zone']} zone" for n in case["nodules"]]
    if len(nodules) == 1:
        parts.append(f"one {nodules[0]} nodule")
    elif nodules:
        parts.append(f"two nodules ({nodules[0]}; {nodules[1]})")
    if case["cardiomegaly"]:
        parts.append("cardiomegaly")
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else (parts or ["normal chest radiograph"])[0]


def _present(case):
    return [f for f in FINDINGS if (case["nodules"] if f == "nodule" else case[f])]


def _in_lung(case, side):
    """The finding in one lung, or None (findings never share a lung)."""
    for f in ("effusion", "pneumothorax"):
        if case[f] and case[f]["side"] == side:
            return f
    return "nodule" if any(n["side"] == side for n in case["nodules"]) else None


# Question templates, several phrasings each so the model must read the question.
# Laterality and size are asked only about a finding that is there.
PRESENCE = ("Is there {a}?", "Is {a} present?", "Does this radiograph show {a}?")
A_FINDING = {"effusion": "a pleural effusion", "pneumothorax": "a pneumothorax", "nodule": "a lung nodule",
             "cardiomegaly": "cardiomegaly"}
NORMAL = ("Is this chest radiograph normal?", "Is this a normal chest radiograph?")
ABNORMAL = ("Is there any abnormality?", "Does this radiograph show an abnormality?")
MAIN = ("What is the main abnormality?", "What abnormality does this radiograph show?")
IN_LUNG = ("What is the finding in the {side} lung?", "What abnormality is seen in the {side} lung?")
SIDE_OPEN = ("Which side is the {f} on?", "On which side is the {f}?", "Is the {f} on the left or the right?")
SIDE_CLOSED = ("Is the {f} on the {side} side?", "Is the {f} {side}-sided?")
ZONE_OPEN = ("In which zone of the {side} lung is the nodule?", "Which zone of the {side} lung contains the nodule?")
ZONE_ANY = ("In which lung zone is the nodule?",)
ZONE_CLOSED = ("Is there a nodule in the {zone} zone of the {side} lung?",)
SIZE_OPEN = ("How large is the {f}?", "What is the size of the {f}?")
SIZE_CLOSED = ("Is the {f} large?", "Is the {f} small?")
HEART_OPEN = ("What is the heart size?", "How large is the heart?")
HEART_CLOSED = ("Is the heart size normal?", "Is the heart enlarged?")
COUNT_OPEN = ("How many nodules are there?", "How many lung nodules are seen?")
COUNT_CLOSED = ("Is there more than one nodule?", "Is there a single nodule?")

# Keywords: glossary terms a correct reasoning mentions, the finding's name and its sign (also when the answer
# is negative: to say "no effusion" one checks the costophrenic angles).
TERMS = {"effusion": ["pleural effusion", "meniscus", "costophrenic angle"],
         "pneumothorax": ["pneumothorax", "pleural line", "lung markings"],
         "nodule": ["nodule", "round opacity"],
         "cardiomegaly": ["cardiomegaly", "cardiothoracic ratio", "cardiac silhouette"]}
NORMAL_TERMS = ["normal chest radiograph", "costophrenic angle", "cardiothoracic ratio"]
CLEAR_LUNG_TERMS = ["lung markings", "costophrenic angle"]
YES_NO = ("yes", "no")


def _candidates(case):
    """Every question the image answers: dicts with category, question, answer, answer_type, options (the
    answers the question can have), fact (questions with the same fact are not asked twice of one image)
    and keywords."""
    out = []

    def add(category, question, answer, options, fact, keywords):
        answer = ("yes" if answer else "no") if options == YES_NO else answer
        out.append({"category": category, "question": question, "answer": answer, "options": options, "fact": fact,
                    "answer_type": "closed" if options == YES_NO else "open", "keywords": list(keywords)})

    found = _present(case)
    for f in FINDINGS:
        for t in PRESENCE:
            add("presence", t.format(a=A_FINDING[f]), f in found, YES_NO, (f, "presence"), TERMS[f])
    abnormal_terms = ([NAME[f] for f in found] + [TERMS[found[0]][1]])[:3] if found else NORMAL_TERMS
    for t in NORMAL:
        add("abnormality", t, not found, YES_NO, ("abnormality",), abnormal_terms)
    for t in ABNORMAL:
        add("abnormality", t, bool(found), YES_NO, ("abnormality",), abnormal_terms)
    if len(found) == 1:  # "the main abnormality" is well defined only when there is one
        for t in MAIN:
            add("abnormality", t, NAME[found[0]], tuple(NAME.values()), ("abnormality",), TERMS[found[0]])
    for side in SIDES:  # always answerable: each lung holds at most one kind of finding
        f = _in_lung(case, side)
        for t in IN_LUNG:
            add("abnormality", t.format(side=side), NAME[f] if f else "none", ("none",) + tuple(NAME.values())[:3],
                ("lung", side), TERMS[f] if f else CLEAR_LUNG_TERMS)
    nodules = case["nodules"]
    sided = [(f, case[f]["side"]) for f in ("effusion", "pneumothorax") if case[f]]
    sided += [("nodule", nodules[0]["side"])] if len(nodules) == 1 else []
    for f, side in sided:
        keywords = [NAME[f], TERMS[f][1], f"patient's {side}"]
        for t in SIDE_OPEN:
            add("laterality", t.format(f=NAME[f]), side, SIDES, (f, "side"), keywords)
        for s in SIDES:
            for t in SIDE_CLOSED:
                add("laterality", t.format(f=NAME[f], side=s), side == s, YES_NO, (f, "side"), keywords)
    for side in SIDES:
        zones = [n["zone"] for n in nodules if n["side"] == side]
        fact = ("nodule", "zone", side)
        for z in ZONES:  # asked of every lung: "no" is read off an empty lung as well
            keywords = ["nodule", "round opacity", f"{zones[0] if zones else z} zone"]
            for t in ZONE_CLOSED:
                add("location", t.format(zone=z, side=side), z in zones, YES_NO, fact, keywords)
        if len(zones) == 1:
            keywords = ["nodule", "round opacity", f"{zones[0]} zone"]
            for t in ZONE_OPEN:
                add("location", t.format(side=side), zones[0], ZONES, fact, keywords)
            if len(nodules) == 1:
                for t in ZONE_ANY:
                    add("location", t, zones[0], ZONES, fact, keywords)
    sized = [("effusion", case["effusion"]["size"])] if case["effusion"] else []
    sized += [("nodule", nodules[0]["size"])] if len(nodules) == 1 else []
    for f, size in sized:
        for t in SIZE_OPEN:
            add("size", t.format(f=NAME[f]), size, SIZES, (f, "size"), TERMS[f])
        for t, asks in zip(SIZE_CLOSED, SIZES[::-1]):
            add("size", t.format(f=NAME[f]), size == asks, YES_NO, (f, "size"), TERMS[f])
    big = case["cardiomegaly"]
    for t in HEART_OPEN:  # the same fact as the presence of cardiomegaly
        add("size", t, "enlarged" if big else "normal", ("normal", "enlarged"), ("cardiomegaly", "presence"),
            TERMS["cardiomegaly"])
    add("size", HEART_CLOSED[0], not big, YES_NO, ("cardiomegaly", "presence"), TERMS["cardiomegaly"])
    add("size", HEART_CLOSED[1], big, YES_NO, ("cardiomegaly", "presence"), TERMS["cardiomegaly"])
    for t in COUNT_OPEN:  # digits: normalize_answer maps "two" to "2" anyway
        add("count", t, str(len(nodules)), ("0", "1", "2"), ("nodule", "count"), TERMS["nodule"])
    add("count", COUNT_CLOSED[0], len(nodules) > 1, YES_NO, ("nodule", "count"), TERMS["nodule"])
    add("count", COUNT_CLOSED[1], len(nodules) == 1, YES_NO, ("nodule", "count"), TERMS["nodule"])
    return out


def _pick_questions(candidates, counts, types, rng, n):
    """Choose n questions for one image so that every question string keeps balanced answers.

    counts[question][answer] tallies what this split has asked so far. A candidate's score is how far its
    answer lags behind the average over the question's possible answers: asking a candidate with score >= 0
    never lets one answer run ahead by more than one, so the most frequent answer of any question string
    is no better than chance. types[answer_type] tallies closed and open: the one behind is tried first, so
    the split is half closed and half open. Categories not yet asked of this image are preferred, so each
    image gets a mix.
    """
    def score(c):
        tally = counts[c["question"]]
        return sum(tally[o] for o in c["options"]) / len(c["options"]) - tally[c["answer"]]

    chosen, facts, categories = [], set(), set()
    for _ in range(n):
        want = min(("closed", "open"), key=lambda t: (types[t], rng.random()))
        left = [c for c in candidates if c["fact"] not in facts]
        if not left:
            break
        for pool in ([c for c in left if c["answer_type"] == want], [c for c in left if c["answer_type"] != want]):
            best = {}  # the best-scoring candidate of each category, ties broken at random
            for i in sorted(rng.permutation(len(pool)), key=lambda i: -score(pool[i])):
                best.setdefault(pool[i]["category"], pool[i])
            safe = [c for c in best.values() if score(c) >= 0]
            if safe:
                break
        else:  # nothing keeps the balance (rare): the least harmful question
            safe = [max(left, key=score)]
        options = [c for c in safe if c["category"] not in categories] or safe
        c = options[int(rng.integers(len(options)))]
        chosen.append(c)
        facts.add(c["fact"])
        categories.add(c["category"])
        counts[c["question"]][c["answer"]] += 1
        types[c["answer_type"]] += 1
    return chosen


# -----------------------------------------------------------------------------
# the splits

SPLITS = ("train", "val", "test")


def rows(split, seed=0):
    """Rows of one split ("train", "val" or "test"); deterministic in (split, seed), cached.

    The list and its rows are shared by every caller: treat them as read-only (data.load("demo", split)
    returns copies, and is the way the stages read them).
    """
    if split not in SPLITS:
        raise ValueError(f"synthetic_cxr: unknown split {split!r} (use train, val or test)")
    return _rows(split, seed)


@functools.lru_cache(maxsize=None)
def _rows(split, seed):
    # one random stream per (seed, split): splits never share an image
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    counts, types, out = defaultdict(Counter), Counter(), []
    for i in range(IMAGES[split]):
        case = _sample_case(rng)
        image, report = _draw(rng, case), _report(case)
        for j, q in enumerate(_pick_questions(_candidates(case), counts, types, rng, QUESTIONS_PER_IMAGE)):
            # the dataset is called "demo" (data.load("demo", split), ids "demo-..."): a command-line contract
            out.append({"id": f"demo-{split}-{i:04d}-{j}", "image": image, "question": q["question"],
                        "answer": q["answer"], "answer_type": q["answer_type"], "dataset": "demo", "split": split,
                        "lang": "en", "keywords": q["keywords"], "report": report, "category": q["category"]})
    return out


def tokenizer_texts():
    """The demo's text (questions, answers, keywords, reports, glossary): what the stages give model.load
    to train a from-scratch tokenizer on when they have no texts of their own (data.tokenizer_texts)."""
    train = rows("train")
    texts = {r[k] for r in train for k in ("question", "answer", "report")} | {k for r in train for k in r["keywords"]}
    texts |= {f"{p['title']}: {p['text']}" for p in glossary()}
    # the sentence frames of retrieve.py's template traces, weighted as in the pseudo-labels (one per row)
    frames = ["The question asks about", "The image shows", "So, the answer is", "So, there is no", "So, there is a"]
    return sorted(texts) + frames * 64


def _contact_sheet(split_rows, path, n=6):
    """Save the first n distinct images of split_rows side by side (2x), each with its report's impression."""
    from PIL import ImageDraw
    seen = {}
    for r in split_rows:
        seen.setdefault(id(r["image"]), r)
    picked = list(seen.values())[:n]
    cols, cell = 3, 2 * IMAGE_SIZE
    sheet = Image.new("L", (cols * (cell + 8), ((len(picked) + cols - 1) // cols) * (cell + 20)), 255)
    draw = ImageDraw.Draw(sheet)
    for k, r in enumerate(picked):
        x, y = (k % cols) * (cell + 8), (k // cols) * (cell + 20)
        sheet.paste(r["image"].resize((cell, cell), Image.NEAREST), (x, y))
        draw.text((x, y + cell + 4), r["report"].split("Impression: ")[-1][:40], fill=0)
    sheet.save(path)


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Statistics of the synthetic splits (the `demo` dataset).")
    parser.add_argument("--seed", type=int, default=0, help="the world's seed (every stage uses 0)")
    parser.add_argument("--sheet", default=None, help="save a contact sheet of 6 test images to this PNG")
    args = parser.parse_args()
    splits = {s: rows(s, args.seed) for s in SPLITS}
    for s, split_rows in splits.items():
        kinds = Counter((r["category"], r["answer_type"]) for r in split_rows)
        print(f"{s}: {len(split_rows)} questions on {len({id(r['image']) for r in split_rows})} images; "
              + ", ".join(f"{c}/{t} {k}" for (c, t), k in sorted(kinds.items())))
    if args.sheet:
        _contact_sheet(splits["test"], args.sheet)
        print(f"wrote {args.sheet}")
