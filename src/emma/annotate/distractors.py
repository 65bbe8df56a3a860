"""Medical vocabularies, a synonym table, and multiple-choice distractors.

Shared by the synthetic-data steps: :mod:`emma.annotate.synth` builds options with
:func:`make_options`, :mod:`emma.annotate.refine` looks answers and their synonyms up in the question
and its context (:func:`searchable_forms`).

**Vocabularies** (:data:`VOCABULARIES`): a category (``finding``, ``modality``, ``organ``,
``body_part``) → canonical terms. Findings are the labeler's (:mod:`emma.text.labeler`) plus
common emergency diagnoses.

**Synonyms** (:data:`SYNONYMS`): a concept (its canonical term) → surface forms, all compared after
:func:`emma.text.normalize.normalize_answer` (lowercase, punctuation → space, articles dropped), so
``"X-ray"``, ``"x ray"`` and ``"the X-Ray"`` are one form. :data:`ABBREVIATIONS` are forms that only
count when they are the *whole* term (``"us"`` is ultrasound as an answer or option, but the word
*us* in a sentence is not), so they are never searched for inside text. A form may belong to several
concepts (``"mass"``: lung lesion and tumour); two terms are the same concept when they share one.

**Options** (:func:`make_options`): the answer plus ``n_options - 1`` distractors. Candidates are the
teacher's suggestions first (in its order), then the category's vocabulary (in an order seeded from the
sample id). A candidate is kept when it is non-empty, at most :data:`MAX_OPTION_CHARS` long, not the
answer or a synonym of it, does not contain the answer (or contain in it) as whole words (such an option
would be ambiguous to :func:`emma.eval.extract.extract_choice`), is distinct from every option kept so
far (normalised, and not a synonym of one), and, for a teacher suggestion, is not a known term of
another category (a modality offered as a finding is not plausible). The correct option's position is
drawn from a generator seeded with the sample id (:func:`emma.annotate.steps.seeded_rng`), so a rerun gives the same options in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from emma.annotate.steps import seeded_rng
from emma.text.labeler import CHEXPERT_FINDINGS as _CHEXPERT
from emma.text.labeler import CRITICAL_FINDINGS, NO_FINDING, SUPPORT_DEVICES
from emma.text.normalize import contains_phrase, normalize_answer, tokens

MAX_OPTION_CHARS = 120
DEFAULT_OPTIONS = 4

CATEGORIES: tuple[str, ...] = ("finding", "modality", "organ", "body_part")

_FINDINGS = tuple(
    f.lower() for f in _CHEXPERT + CRITICAL_FINDINGS if f not in (NO_FINDING, SUPPORT_DEVICES)
) + (
    "pulmonary embolism",
    "kidney stone",
    "appendicitis",
    "bowel obstruction",
    "ischemic stroke",
    "hydrocephalus",
    "cholecystitis",
    "abdominal aortic aneurysm",
    "dislocation",
    "foreign body",
)

VOCABULARIES: dict[str, tuple[str, ...]] = {
    "finding": _FINDINGS,
    "modality": (
        "x-ray",
        "ct",
        "mri",
        "ultrasound",
        "pet",
        "mammography",
        "pathology",
        "fundus photography",
        "optical coherence tomography",
        "endoscopy",
        "dermoscopy",
        "angiography",
    ),
    "organ": (
        "lung",
        "heart",
        "liver",
        "kidney",
        "brain",
        "spleen",
        "pancreas",
        "gallbladder",
        "bladder",
        "stomach",
        "bowel",
        "aorta",
        "uterus",
        "prostate",
        "thyroid",
    ),
    "body_part": (
        "chest",
        "head",
        "abdomen",
        "pelvis",
        "spine",
        "neck",
        "shoulder",
        "knee",
        "hand",
        "foot",
        "hip",
        "breast",
    ),
}

SYNONYMS: dict[str, tuple[str, ...]] = {
    # findings (labeler names, lowercase)
    "pneumothorax": ("pneumothorax", "collapsed lung", "air in the pleural space"),
    "pleural effusion": (
        "pleural effusion",
        "effusion",
        "pleural fluid",
        "hydrothorax",
        "fluid in the pleural space",
    ),
    "cardiomegaly": ("cardiomegaly", "enlarged heart", "cardiac enlargement", "enlarged cardiac silhouette"),
    "enlarged cardiomediastinum": (
        "enlarged cardiomediastinum",
        "widened mediastinum",
        "mediastinal widening",
    ),
    "lung opacity": ("lung opacity", "opacity", "opacification", "infiltrate", "airspace disease"),
    "lung lesion": ("lung lesion", "lung nodule", "pulmonary nodule", "nodule", "lung mass", "mass"),
    "edema": ("edema", "oedema", "pulmonary edema", "pulmonary oedema", "fluid overload"),
    "consolidation": ("consolidation", "airspace consolidation"),
    "pneumonia": ("pneumonia", "bronchopneumonia", "chest infection", "lung infection"),
    "atelectasis": ("atelectasis", "lung collapse", "lobar collapse"),
    "pleural other": ("pleural other", "pleural thickening", "pleural plaque", "pleural plaques"),
    "fracture": ("fracture", "fractures", "broken bone", "fractured"),
    "intracranial hemorrhage": (
        "intracranial hemorrhage",
        "intracranial haemorrhage",
        "intracranial bleed",
        "brain bleed",
        "cerebral hemorrhage",
        "cerebral haemorrhage",
        "brain hemorrhage",
    ),
    "pneumoperitoneum": (
        "pneumoperitoneum",
        "free air",
        "free intraperitoneal air",
        "free gas",
        "air under the diaphragm",
    ),
    "aortic dissection": (
        "aortic dissection",
        "dissection of the aorta",
        "intimal flap",
        "dissecting aneurysm",
    ),
    "midline shift": ("midline shift", "shift of the midline", "subfalcine herniation"),
    "no finding": ("no finding", "normal", "no abnormality", "unremarkable", "no acute abnormality"),
    "pulmonary embolism": ("pulmonary embolism", "pulmonary embolus", "pulmonary emboli"),
    "kidney stone": ("kidney stone", "renal stone", "renal calculus", "nephrolithiasis"),
    "bowel obstruction": ("bowel obstruction", "intestinal obstruction", "small bowel obstruction"),
    "ischemic stroke": ("ischemic stroke", "ischaemic stroke", "cerebral infarction", "infarct", "stroke"),
    "hemorrhage": ("hemorrhage", "haemorrhage", "bleeding", "bleed"),
    "tumor": ("tumor", "tumour", "neoplasm", "mass", "malignancy"),
    "abdominal aortic aneurysm": ("abdominal aortic aneurysm", "aaa"),
    # modalities
    "x-ray": ("x-ray", "xray", "radiograph", "radiography", "plain film", "chest radiograph", "chest x-ray"),
    "ct": ("ct", "computed tomography", "ct scan", "cat scan"),
    "mri": ("mri", "magnetic resonance", "magnetic resonance imaging", "mr imaging"),
    "ultrasound": ("ultrasound", "sonography", "sonogram", "ultrasonography"),
    "pet": ("pet", "positron emission tomography"),
    "mammography": ("mammography", "mammogram"),
    "pathology": ("pathology", "histopathology", "histology"),
    "fundus photography": ("fundus photography", "fundus photograph", "fundus image", "retinal photograph"),
    "optical coherence tomography": ("optical coherence tomography",),
    "endoscopy": ("endoscopy", "endoscopic image"),
    "dermoscopy": ("dermoscopy", "dermatoscopy"),
    "angiography": ("angiography", "angiogram"),
    # organs and body parts
    "lung": ("lung", "lungs", "pulmonary"),
    "heart": ("heart", "cardiac"),
    "liver": ("liver", "hepatic"),
    "kidney": ("kidney", "kidneys", "renal"),
    "brain": ("brain", "cerebral"),
    "spleen": ("spleen", "splenic"),
    "pancreas": ("pancreas", "pancreatic"),
    "gallbladder": ("gallbladder", "gall bladder"),
    "bladder": ("bladder", "urinary bladder"),
    "stomach": ("stomach", "gastric"),
    "bowel": ("bowel", "intestine", "intestines"),
    "aorta": ("aorta", "aortic"),
    "chest": ("chest", "thorax", "thoracic"),
    "head": ("head", "skull", "cranium"),
    "abdomen": ("abdomen", "abdominal"),
    "pelvis": ("pelvis", "pelvic"),
    "spine": ("spine", "spinal", "vertebral column"),
    "breast": ("breast", "breasts"),
}

# Whole-term equivalents only (never searched inside text: too short or common words).
ABBREVIATIONS: dict[str, tuple[str, ...]] = {
    "pneumothorax": ("ptx",),
    "fracture": ("fx",),
    "intracranial hemorrhage": ("ich",),
    "pulmonary embolism": ("pe",),
    "x-ray": ("cxr", "xr", "plain x-ray"),
    "ultrasound": ("us",),
    "mri": ("mr",),
    "optical coherence tomography": ("oct",),
    "pathology": ("microscopy",),
}

YES_NO_SYNONYMS: dict[str, tuple[str, ...]] = {
    "yes": ("yes", "present", "positive", "affirmative", "seen", "visible", "there is", "there are"),
    "no": ("no", "absent", "negative", "not seen", "not visible", "without", "none"),
}


def _build_index() -> dict[str, frozenset[str]]:
    index: dict[str, set[str]] = {}
    for table in (SYNONYMS, ABBREVIATIONS):
        for concept, forms in table.items():
            for form in (concept, *forms):
                index.setdefault(normalize_answer(form), set()).add(concept)
    return {form: frozenset(c) for form, c in index.items()}


def _build_categories(index: dict[str, frozenset[str]]) -> dict[str, str]:
    categories: dict[str, str] = {}
    for category, terms in VOCABULARIES.items():
        for term in terms:
            for concept in index.get(normalize_answer(term), frozenset({term})):
                categories.setdefault(concept, category)
    return categories


_CONCEPTS_BY_FORM = _build_index()
_CATEGORY_OF_CONCEPT = _build_categories(_CONCEPTS_BY_FORM)


def concepts_of(term: str) -> frozenset[str]:
    """The concepts whose canonical term, synonym or abbreviation is ``term`` (normalised); may be empty."""
    return _CONCEPTS_BY_FORM.get(normalize_answer(term), frozenset())


def same_concept(a: str, b: str) -> bool:
    """Whether two terms are equal after normalisation or synonyms of one concept."""
    na, nb = normalize_answer(a), normalize_answer(b)
    if na == nb:
        return True
    return bool(concepts_of(a) & concepts_of(b))


def searchable_forms(term: str) -> list[str]:
    """``term`` and the searchable synonyms of every concept it names, normalised, longest first.

    Abbreviations (:data:`ABBREVIATIONS`) are left out: they are equivalent as whole terms only.
    """
    forms = {normalize_answer(term)}
    for concept in concepts_of(term):
        forms.update(normalize_answer(f) for f in (concept, *SYNONYMS.get(concept, ())))
    return sorted((f for f in forms if f), key=lambda f: (-len(f), f))


def category_of(term: str) -> str | None:
    """The vocabulary category a known term belongs to (``None`` for an unknown term)."""
    for concept in sorted(concepts_of(term)):
        if concept in _CATEGORY_OF_CONCEPT:
            return _CATEGORY_OF_CONCEPT[concept]
    return _CATEGORY_OF_CONCEPT.get(normalize_answer(term))


@dataclass(frozen=True)
class Options:
    """Multiple-choice options in display order and the index of the correct one."""

    options: list[str]
    answer_index: int
    from_teacher: int  # distractors taken from the teacher's suggestions
    from_vocabulary: int  # distractors taken from the category's vocabulary


def _clean(term: object) -> str | None:
    if not isinstance(term, str):
        return None
    text = " ".join(term.split()).strip(" .;,:")
    if not text or len(text) > MAX_OPTION_CHARS or not tokens(text):
        return None
    return text


def _overlaps(a: str, b: str) -> bool:
    """Same concept, or one contains the other as whole words (ambiguous as options)."""
    if same_concept(a, b):
        return True
    ta, tb = tokens(a), tokens(b)
    return contains_phrase(ta, tb) or contains_phrase(tb, ta)


def make_options(
    answer: str,
    category: str,
    sample_id: str,
    suggestions: Iterable[object] = (),
    *,
    n_options: int = DEFAULT_OPTIONS,
    vocabulary: Sequence[str] | None = None,
) -> Options | None:
    """The answer and ``n_options - 1`` plausible, distinct distractors; ``None`` when too few are found.

    ``category``: a key of :data:`VOCABULARIES` (``vocabulary`` overrides its terms). ``suggestions``:
    the teacher's distractors, tried first. See the module docstring for the rules.
    """
    if n_options < 2:
        raise ValueError(f"n_options must be at least 2, got {n_options}")
    if category not in VOCABULARIES and vocabulary is None:
        raise ValueError(f"unknown category {category!r} (one of {', '.join(CATEGORIES)})")
    correct = _clean(answer)
    if correct is None:
        return None
    pool = list(vocabulary if vocabulary is not None else VOCABULARIES[category])
    seeded_rng(sample_id, "distractor-order").shuffle(pool)
    kept: list[str] = []
    n_teacher = 0
    candidates = [(s, True) for s in suggestions] + [(v, False) for v in pool]
    for raw, from_teacher in candidates:
        if len(kept) == n_options - 1:
            break
        term = _clean(raw)
        if term is None:
            continue
        if from_teacher:
            other = category_of(term)
            if other is not None and other != category:
                continue
        if any(_overlaps(term, k) for k in (correct, *kept)):
            continue
        kept.append(term)
        n_teacher += from_teacher
    if len(kept) < n_options - 1:
        return None
    position = seeded_rng(sample_id, "answer-position").randrange(n_options)
    options = kept[:position] + [correct] + kept[position:]
    return Options(options, position, n_teacher, len(kept) - n_teacher)
