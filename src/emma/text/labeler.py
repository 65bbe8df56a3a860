"""Rule-based radiology report → findings labeler (CheXpert-style, plus emergency-critical findings).

``label_report(text)`` gives ``{finding: value}`` with CheXpert's values: ``1`` positive, ``0`` negative,
``-1`` uncertain; a finding that the report does not mention is absent from the dict. ``explain(text)``
lists every :class:`Mention` with the words and the trigger that decided its value.

Findings (:data:`FINDINGS`): CheXpert's 14 observations (:data:`CHEXPERT_FINDINGS`) and four
emergency-critical ones (:data:`CRITICAL_FINDINGS`): intracranial hemorrhage, pneumoperitoneum (free
air), aortic dissection (a widened mediastinum is a *sign*: it makes dissection uncertain, never positive)
and midline shift.

How a report is read (each rule is a plain, documented choice; the vocabulary is EMMA's own):

1. **Sections.** Text under ``INDICATION``, ``HISTORY``, ``COMPARISON``, ``TECHNIQUE``, ``EXAM``,
   ``REASON FOR EXAM`` headers is dropped (a reason for the study is not a finding); everything else
   (``FINDINGS``, ``IMPRESSION``, unlabelled text) is read.
2. **Sentences and clauses.** Sentences end at ``.``/``!`` followed by a space (not in ``5.5 cm``) and at
   blank lines. A clause ends at a sentence end, ``;`` or a scope breaker: *but, however, although,
   though, whereas, while, which, except, aside from, apart from, other than, with the exception of,
   yet, otherwise, and there/the/a/an*. Negation and uncertainty never cross a clause boundary, so
   "no pneumothorax but small effusion" gives pneumothorax 0 and effusion 1.
3. **Mentions.** Each finding has synonym patterns (with exclusions, e.g. a *pericardial* effusion is
   not a pleural effusion, *vasogenic* edema is not pulmonary edema, *mass effect* is not a lung
   lesion). Two special kinds: *normal statements* ("heart size is normal", "normal mediastinal
   contours") give 0 directly; *signs* ("widened mediastinum" for aortic dissection, "blunted
   costophrenic angle" for effusion) give at most -1 and nothing when negated.
4. **Value of a mention.** Triggers are found first (longest match wins; pseudo-negations such as "no
   change", "not changed", "no increase" are masked so they negate nothing):

   - an uncertainty trigger after the mention ("cannot be excluded", "is not excluded", "is possible",
     "versus", "?") → -1;
   - else the nearest trigger before the mention in its clause (at most 12 words away, or inside the
     mention as in "heart is not enlarged"): negation ("no", "not", "without", "negative for",
     "free of", "clear of", "absence of", "no evidence of", "resolved", "resolution of", "removal of",
     "rather than", "nor") → 0; uncertainty ("may", "might", "could", "possible", "probable",
     "likely", "unlikely", "questionable", "suspected", "suspicious for", "suggestive of",
     "concerning for", "worrisome for", "consider", "differential", "versus", "rule out",
     "borderline", "equivocal", "indeterminate", "presumed", "evaluate for") → -1;
   - "to suggest" / "to indicate" pass the verdict of an earlier trigger on ("no opacity to suggest
     pneumonia" → 0) and are uncertain alone; after "sensitivity to detect", "mistaken for",
     "limits the evaluation of" the mention is not about the patient and is dropped;
   - else a negation after the mention within 6 words, with no comma or verb in between ("is not
     seen", "has resolved", "was removed", "is absent", "is negative", "is within normal limits") → 0;
   - else → 1.

   *Decision:* "likely", "probably" and "unlikely" are uncertain (-1): the report commits to neither
   presence nor absence (CheXpert's uncertain label covers hedged findings the same way).
   "Consistent with" and "compatible with" are positive.
5. **Aggregation (CheXpert).** Per finding: any positive mention → 1, else any uncertain → -1, else any
   negative → 0. **No Finding** = 1 when no finding other than Support Devices is 1 or -1 (absent
   otherwise); an empty report gives ``{}``. As in CheXpert, text that mentions no finding at all
   ("the lungs are clear", but also unrelated text) reads as No Finding.

Limitations: no dependency parse (a long comma list after "no" is read as negated up to 12 words);
vocabulary aimed at chest radiographs and emergency CT; English only.

Why one file (~700 lines): most of it is the finding lexicon (data) next to the negation and
uncertainty rules that read it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

POSITIVE = 1
NEGATIVE = 0
UNCERTAIN = -1

NO_FINDING = "No Finding"
SUPPORT_DEVICES = "Support Devices"

CHEXPERT_FINDINGS: tuple[str, ...] = (
    NO_FINDING,
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    SUPPORT_DEVICES,
)
CRITICAL_FINDINGS: tuple[str, ...] = (
    "Intracranial Hemorrhage",
    "Pneumoperitoneum",
    "Aortic Dissection",
    "Midline Shift",
)
FINDINGS: tuple[str, ...] = CHEXPERT_FINDINGS + CRITICAL_FINDINGS

RuleKind = Literal["mention", "normal", "sign"]
TriggerKind = Literal["pseudo", "hypothetical", "connector", "uncertain", "negation"]

_PRE_WINDOW_WORDS = 12
_POST_WINDOW_WORDS = 6


@dataclass(frozen=True)
class Mention:
    """One finding mention, the value it got and why (for debugging and audits)."""

    finding: str
    value: int
    text: str  # the matched words
    sentence: str  # the normalised clause-bearing sentence the mention is in
    start: int  # offsets of ``text`` in ``sentence``
    end: int
    kind: RuleKind
    reason: str  # "positive", "negated", "uncertain", "normal statement", "sign (uncertain)"
    trigger: str | None = None


@dataclass(frozen=True)
class _Rule:
    finding: str
    kind: RuleKind
    pattern: re.Pattern[str]


@dataclass(frozen=True)
class _Trigger:
    start: int
    end: int
    kind: TriggerKind
    pre: bool
    post: bool
    text: str


def _rx(*alternatives: str) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{a})" for a in alternatives))


# Up to n words (letters, digits, '-', '/') between two parts of a phrase; never crosses punctuation.
def _gap(n: int) -> str:
    return rf"(?:\s+[\w/-]+){{0,{n}}}?\s+"


_HEART = r"(?:heart|cardiac)(?: size| silhouette| shadow| contours?)?"
_MEDIA = r"(?:cardio)?mediastin(?:um|al)(?: silhouette| contours?| shadow| width| size)?"
_NORMAL_WORDS = (
    r"(?:normal|within normal limits|unremarkable|not enlarged|not widened|top[- ]normal"
    r"|upper limits? of normal|upper normal)\b"
)
_WIDE_MEDIASTINUM = (
    r"\bwiden(?:ed|ing) (?:of (?:the )?)?(?:superior )?mediastin\w*",
    r"\bmediastinal widening\b",
    r"\bwide(?:ned)? (?:superior )?mediastinum\b",
    rf"\bmediastinum{_gap(3)}(?:widened|wide)\b",
)

# finding → (mention patterns, normal-statement patterns, sign patterns, exclusion patterns)
_VOCAB: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "Enlarged Cardiomediastinum": (
        (
            r"\benlarged cardiomediastin\w*",
            rf"\bcardiomediastinal (?:silhouette|contours?|shadow){_gap(3)}"
            r"(?:enlarged|widened|wide|prominent|increased)\b",
            rf"\bmediastin(?:um|al (?:silhouette|contours?)){_gap(3)}(?:enlarged|prominent)\b",
            r"\bmediastinal (?:mass|enlargement)\b",
            *_WIDE_MEDIASTINUM,
        ),
        (
            rf"\b(?:{_MEDIA}|{_HEART} and {_MEDIA}|{_MEDIA} and {_HEART}){_gap(3)}{_NORMAL_WORDS}",
            r"\bnormal (?:cardio)?mediastin\w*",
        ),
        (),
        (),
    ),
    "Cardiomegaly": (
        (
            r"\bcardiomegaly\b",
            r"\bcardiac (?:and mediastinal )?enlargement\b",
            r"\benlarge(?:d|ment of)(?: the)? (?:heart|cardiac (?:silhouette|shadow|contour|size))\b",
            r"\b(?:large|enlarged) heart\b",
            rf"\b{_HEART}{_gap(4)}(?:enlarged|increased|large|prominent|borderline)\b",
        ),
        (
            rf"\b(?:{_HEART}|{_HEART} and {_MEDIA}|{_MEDIA} and {_HEART}|cardiomediastinal (?:silhouette|contours?))"
            rf"{_gap(3)}{_NORMAL_WORDS}",
            r"\bnormal (?:cardiac|heart) (?:size|silhouette|contours?|shadow)\b",
            r"\bnormal[- ]sized? heart\b",
        ),
        (),
        (),
    ),
    "Lung Opacity": (
        (
            r"\bopaci(?:ty|ties|fication|fications|fied)\b",
            r"\binfiltrat(?:e|es|ion|ions|ive)\b",
            r"\bair[- ]?space (?:disease|opacit\w+|process|consolidation)\b",
            r"\bdensit(?:y|ies)\b",
            r"\bground[- ]glass\b",
            r"\bhaz(?:y|iness)\b",
            r"\binterstitial (?:opacit\w+|markings?|prominence|pattern|thickening|abnormalit\w+|changes?|disease)\b",
            r"\b(?:increased|prominent|coarse(?:ned)?) (?:interstitial |lung |pulmonary |bronchovascular )?markings\b",
            r"\breticul(?:ar|onodular) (?:opacit\w+|pattern|changes?|markings)\b",
        ),
        (),
        (),
        (r"\b(?:bone|bony|breast|soft[- ]tissue|metallic|calcified|calcific|nipple) (?:densit|opacit)\w*",),
    ),
    "Lung Lesion": (
        (
            r"\bnodul(?:e|es|ar (?:opacit\w+|densit\w+))\b",
            r"\bmass(?:es)?\b",
            r"\blesions?\b",
            r"\btumou?rs?\b",
            r"\bneoplas(?:m|ms|tic)\b",
            r"\bcarcinoma\b",
            r"\bmalignan(?:cy|cies|t)\b",
            r"\bmetasta(?:sis|ses|tic)\b",
        ),
        (),
        (),
        (
            r"\bmass effect\b",
            r"\b(?:bone|bony|lytic|blastic|sclerotic|osseous|skin|cutaneous|soft[- ]tissue|breast|liver|"
            r"hepatic|renal|adrenal|thyroid|mediastinal|pleural[- ]based) (?:lesion|mass|nodule)(?:es|s)?\b",
        ),
    ),
    "Edema": (
        (
            r"\b(?:o)?edema(?:tous)?\b",
            r"\b(?:pulmonary|vascular|venous|interstitial) (?:vascular )?congestion\b",
            r"\bcongestive (?:heart )?failure\b",
            r"\bchf\b",
            r"\bheart failure\b",
            r"\bvascular (?:engorgement|redistribution|prominence|indistinctness|cephalization)\b",
            r"\bcephalization\b",
            r"\bkerley\b",
            r"\bfluid overload\b",
        ),
        (),
        (),
        (
            r"\b(?:soft[- ]tissue|subcutaneous|scalp|vasogenic|cytotoxic|cerebral|brain|peripheral|pedal|leg|"
            r"extremity|facial|periorbital|laryngeal|airway|mucosal|marrow|bowel wall|perilesional|"
            r"white matter|bone marrow) (?:o)?edema\b",
        ),
    ),
    "Consolidation": (
        (r"\bconsolidat(?:ion|ions|ive|ed)\b",),
        (),
        (),
        (r"\b(?:fracture|callus|bony|bone) consolidat\w*",),
    ),
    "Pneumonia": (
        (
            r"\b(?:broncho)?pneumoni(?:a|as|tis)\b",
            r"\bpneumonic\b",
            r"\binfect(?:ion|ions|ious|ive)(?: process)?\b",
            r"\baspiration\b",
        ),
        (),
        (),
        (),
    ),
    "Atelectasis": (
        (
            r"\batelecta\w+",
            r"\b(?:lobar|segmental|subsegmental|lung|lobe) collapse\b",
            r"\bcollapse(?:d)? (?:of )?(?:the )?(?:[\w-]+ ){0,2}(?:lung|lobe|segment)\b",
        ),
        (),
        (),
        (),
    ),
    "Pneumothorax": (
        (r"\b(?:hydro|hemo|haemo)?pneumothora(?:x|ces|xes)\b", r"\bptx\b"),
        (),
        (),
        (),
    ),
    "Pleural Effusion": (
        (
            r"\beffusions?\b",
            r"\bhydro(?:pneumo)?thorax\b",
            r"\bha?emo(?:pneumo)?thorax\b",
            r"\bpleural fluid\b",
            r"\bfluid (?:in|within) the (?:pleural space|fissures?)\b",
        ),
        (),
        (
            r"\bblunt(?:ed|ing)(?: of)?(?: the)?(?: (?:left|right|bilateral|both))?(?: posterior| lateral)?"
            r" (?:costophrenic|cp) (?:angles?|sulc\w+)\b",
            rf"\b(?:costophrenic|cp) (?:angles?|sulc\w+){_gap(3)}blunt(?:ed|ing)\b",
        ),
        (
            r"\b(?:pericardial|joint|knee|elbow|ankle|hip|shoulder|wrist|middle ear|mastoid|subdural|"
            r"synovial|peritoneal) effusions?\b",
        ),
    ),
    "Pleural Other": (
        (
            r"\bpleural (?:thickening|plaques?|scar(?:ring|s)?|calcifications?|reaction|fibrosis|abnormalit\w+)\b",
            r"\bfibrothorax\b",
            r"\b(?:apical )?pleural cap(?:ping|s)?\b",
            r"\bpleuro-?parenchymal (?:scar(?:ring|s)?|thickening|opacit\w+|changes?)\b",
        ),
        (),
        (),
        (),
    ),
    "Fracture": (
        (r"\bfractur(?:e|es|ed)\b", r"\bfx\b"),
        (),
        (),
        (),
    ),
    SUPPORT_DEVICES: (
        (
            r"\b(?:endotracheal|et|nasogastric|ng|orogastric|og|enteric|feeding|chest|tracheostomy|dobhoff|"
            r"gastric|nasoenteric|thoracostomy|drainage|pleural|pigtail)(?:[- ]type)?[- ]tubes?\b",
            r"\bett\b",
            r"\btrach(?:eostomy)?\b",
            r"\b(?:picc|cvc|cvl|swan[- ]ganz|lvad|iabp|ecmo)\b",
            r"\b(?:central (?:venous )?|venous |jugular |subclavian |arterial |dialysis |hemodialysis |femoral )"
            r"(?:line|catheter)s?\b",
            r"\bcatheters?\b",
            r"\bport[- ]?a[- ]?cath\b",
            r"\b(?:media)?port\b",
            r"\bpacemaker\b",
            r"\bpacer\b",
            r"\b(?:aicd|icd|defibrillator)\b",
            r"\b(?:pacing|pacer|pacemaker|monitor(?:ing)?|ecg|ekg|telemetry) (?:leads?|wires?|generator)\b",
            r"\b(?:generator|stimulator)\b",
            r"\b(?:vp |ventriculoperitoneal )?shunt(?: tubing| catheter)?\b",
            r"\binternal fixation\b",
            r"\b(?:sternal|sternotomy|cerclage) wires?\b",
            r"\b(?:prosthetic|mechanical|bioprosthetic|replaced|replacement) (?:aortic |mitral |tricuspid )?valves?\b",
            r"\bvalve (?:replacement|prosthesis)\b",
            r"\bstents?\b",
            r"\bdrains?\b",
            r"\bhardware\b",
            r"\bdevices?\b",
            r"\bballoon pump\b",
        ),
        (),
        (),
        (r"\beustachian tubes?\b",),
    ),
    "Intracranial Hemorrhage": (
        (
            r"\bintra-?(?:cranial|parenchymal|ventricular|axial|cerebral) "
            r"(?:ha?emorrhages?|ha?ematomas?|bleed(?:ing|s)?|blood)\b",
            r"\b(?:subdural|epidural|extradural|subarachnoid) "
            r"(?:ha?emorrhages?|ha?ematomas?|bleed(?:ing|s)?|blood|collections?)\b",
            r"\bha?emorrhagic (?:contusions?|transformation|stroke)\b",
            r"\b(?:ich|sah|sdh|edh)\b",
        ),
        (),
        (),
        (),
    ),
    "Pneumoperitoneum": (
        (
            r"\bpneumoperitoneum\b",
            r"\bfree (?:intra-?peritoneal |intra-?abdominal |sub-?diaphragmatic |abdominal )?(?:air|gas)\b",
            r"\b(?:air|gas) (?:under|beneath|below) (?:the )?(?:right |left |both )?(?:hemi-?)?diaphragms?\b",
            r"\bsub-?diaphragmatic (?:free )?(?:air|gas|lucency)\b",
        ),
        (),
        (),
        (),
    ),
    "Aortic Dissection": (
        (
            r"\baortic dissection\b",
            r"\bdissection of the (?:thoracic |abdominal |ascending |descending )?aorta\b",
            r"\b(?:intimal|dissection) flap\b",
            r"\b(?:stanford )?type [ab] (?:aortic )?dissection\b",
            r"\bdissecting aneurysm\b",
        ),
        (),
        _WIDE_MEDIASTINUM,
        (),
    ),
    "Midline Shift": (
        (
            r"\bmidline shift\b",
            r"\bshift of (?:the )?midline(?: structures)?\b",
            r"\bsubfalcine herniation\b",
            r"\bmidline (?:structures? )?(?:is |are )?shifted\b",
        ),
        (),
        (),
        (),
    ),
}

_RULES: tuple[_Rule, ...] = tuple(
    _Rule(finding, kind, re.compile(p))
    for finding, (mentions, normals, signs, _) in _VOCAB.items()
    for kind, patterns in (("mention", mentions), ("normal", normals), ("sign", signs))
    for p in patterns
)
_EXCLUSIONS: dict[str, re.Pattern[str]] = {
    finding: _rx(*excl) for finding, (_, _, _, excl) in _VOCAB.items() if excl
}

# Triggers, in priority order (an earlier group masks overlapping later ones); (pattern, pre, post).
_PSEUDO = (
    r"\bno (?:significant |substantial |appreciable |definite |interval |further |real |major )*"
    r"(?:change|changes|increase|decrease|worsening|improvement|progression)\b",
    r"\bnot (?:significantly |substantially |appreciably )?(?:changed|increased|decreased|worsened|improved)\b",
    r"\bwithout (?:significant |interval |substantial )?change\b",
    r"\bnot only\b",
    r"\bgram[- ]negative\b",
)
# A mention after these is not a statement about the patient ("the sensitivity to detect pneumothorax
# is diminished", "should not be mistaken for pneumothorax"): it is dropped.
_HYPOTHETICAL = (
    r"\bsensitivity (?:to detect|for|of)\b",
    r"\bmistaken (?:for|as)\b",
    r"\b(?:limits?|limited|limiting|obscur(?:es?|ing)|preclud(?:es?|ing)|hinders?|hindering) (?:the )?"
    r"(?:evaluation|assessment|detection|visualization|exclusion|sensitivity) (?:of|for)\b",
)
_UNCERTAIN_POST = (
    r"\b(?:cannot|can ?not|could not|can't)(?: be)? (?:entirely |completely |definitely )?(?:excluded|ruled out)\b",
    r"\b(?:is|are|was|were)? ?not (?:entirely |completely |definitely )?(?:excluded|ruled out)\b",
    r"\b(?:is|are) (?:also )?(?:possible|probable|questionable|suspected|likely|unlikely|questioned|"
    r"a consideration|considered)\b",
    r"\bmay (?:also )?be (?:present|seen)\b",
)
_UNCERTAIN_BOTH = (r"\bversus\b", r"\bvs\b\.?", r"\?")
# "No opacity to suggest pneumonia": these carry the verdict of an earlier trigger in the clause
# (negation here); alone they are uncertain ("findings to suggest pneumonia").
_CONNECTORS = (r"\bto (?:suggest|indicate|represent)\b",)
_UNCERTAIN_PRE = (
    r"\b(?:cannot|can ?not|could not|can't) (?:entirely |completely |definitely )?(?:exclude|rule out)\b",
    r"\bmay\b",
    r"\bmight\b",
    r"\bcould\b",
    r"\bpossib(?:le|ly|ility of)\b",
    r"\bprobabl[ey]\b",
    r"\b(?:un)?likely\b",
    r"\bquestionabl[ey]\b",
    r"\bquestion of\b",
    r"\bsuspect(?:ed)?\b",
    r"\bsuspicio(?:us|n) (?:for|of)\b",
    r"\bsuggest(?:s|ed|ing|ive of)?\b",
    r"\bconcern(?:ing)? (?:for|of)\b",
    r"\bworrisome (?:for|of)\b",
    r"\bconsider(?:ed|ation of)?\b",
    r"\bdifferential\b",
    r"\brule out\b",
    r"\br/o\b",
    r"\bborderline\b",
    r"\bequivocal\b",
    r"\bindeterminate\b",
    r"\buncertain\b",
    r"\bpresum(?:ed|ably|ptive)\b",
    r"\bpotential(?:ly)?\b",
    r"\bperhaps\b",
    r"\b(?:evaluat(?:e|ed|ion)|assess(?:ed|ment)?) for\b",
)
_NEGATION_POST = (
    r"\b(?:is|are|was|were)? ?(?:again |still |now )?(?:no longer|not) (?:be |been )?(?:definitely |clearly |well )?"
    r"(?:seen|identified|visualized|visible|present|demonstrated|evident|appreciated|detected|noted|apparent)\b",
    r"\b(?:has|have|had)? ?(?:since |now |interval(?:ly)? )?(?:resolved|cleared|disappeared)\b",
    r"\b(?:has|have|had)? ?(?:since |now )?been (?:removed|withdrawn|resolved)\b",
    r"\bremoved\b",
    r"\b(?:is|are|was|were) (?:now )?(?:absent|negative|gone)\b",
    r"\b(?:has|have) been ruled out\b",
    r"\b(?:is|are|appears?|remains?|seems?)? ?(?:within (?:the )?(?:normal limits|limits of normal)|normal)\b",
)
_NEGATION_PRE = (
    r"\bno\b",
    r"\bnot\b",
    r"\bwithout\b",
    r"\bnegative for\b",
    r"\bfree of\b",
    r"\bclear(?:ed)? of\b",
    r"\babsen(?:ce|t)(?: of)?\b",
    r"\bresolved\b",
    r"\bresolution of\b",
    r"\bremoval of\b",
    r"\brather than\b",
    r"\bnor\b",
    r"\bneither\b",
    r"\bnever\b",
    r"\bruled out\b",
)

_TRIGGER_GROUPS: tuple[tuple[TriggerKind, bool, bool, re.Pattern[str]], ...] = (
    ("pseudo", True, True, _rx(*_PSEUDO)),
    ("hypothetical", True, False, _rx(*_HYPOTHETICAL)),
    ("uncertain", False, True, _rx(*_UNCERTAIN_POST)),
    ("uncertain", True, True, _rx(*_UNCERTAIN_BOTH)),
    ("connector", True, False, _rx(*_CONNECTORS)),
    ("uncertain", True, False, _rx(*_UNCERTAIN_PRE)),
    ("negation", False, True, _rx(*_NEGATION_POST)),
    ("negation", True, False, _rx(*_NEGATION_PRE)),
)

_BREAKERS = re.compile(
    r";|\b(?:but|however|although|though|whereas|while|which|except|aside from|apart from|other than|"
    r"with the exception of|yet|otherwise|and (?:there|the|a|an))\b"
)
_POST_BLOCKERS = re.compile(r",|\b(?:is|are|was|were|be|been|has|have|had)\b")
_SENTENCE_END = re.compile(r"[.!](?=\s|$)|\n\s*\n")

_DROP_SECTIONS = (
    r"indications?",
    r"clinical (?:history|indications?|information|data|details)",
    r"(?:patient )?history",
    r"reasons? for (?:the )?(?:exam(?:ination)?|study|request)",
    r"comparisons?",
    r"techniques?",
    r"examinations?",
    r"exam",
    r"procedures?",
    r"type of (?:exam(?:ination)?|study)",
)
_KEEP_SECTIONS = (
    r"findings?",
    r"impressions?",
    r"conclusions?",
    r"opinion",
    r"summary",
    r"results?",
    r"interpretation",
)
_SECTION_HEADER = re.compile(
    r"(?im)(?:^|(?<=[.\n]))[ \t]*(?P<name>" + "|".join(_DROP_SECTIONS + _KEEP_SECTIONS) + r")[ \t]*:"
)
_DROPPED_SECTION_END = re.compile(r"\n[ \t]*\n|[.?!][ \t]*\n")
_DROP_NAME = re.compile("(?i)^(?:" + "|".join(_DROP_SECTIONS) + ")$")


def reportable_text(text: str) -> str:
    """The report without its indication / history / comparison / technique sections."""
    headers = list(_SECTION_HEADER.finditer(text))
    if not headers:
        return text
    parts = [text[: headers[0].start()]]
    for i, h in enumerate(headers):
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        if not _DROP_NAME.match(h.group("name").strip()):
            parts.append(text[h.end() : end])
            continue
        # A dropped section (indication, history, ...) also ends at a blank line or a line-final period:
        # free text after it without a header is report text.
        stop = _DROPPED_SECTION_END.search(text, h.end(), end)
        if stop is not None:
            parts.append(text[stop.end() : end])
    return "\n\n".join(p for p in parts if p.strip())


def _sentences(text: str) -> list[str]:
    out = []
    for chunk in _SENTENCE_END.split(text):
        sentence = " ".join(chunk.lower().split())
        if sentence:
            out.append(sentence)
    return out


def _triggers(sentence: str) -> list[_Trigger]:
    """Non-overlapping triggers; earlier groups and longer matches win."""
    taken: list[_Trigger] = []
    for kind, pre, post, pattern in _TRIGGER_GROUPS:
        for m in pattern.finditer(sentence):
            start, end = m.start(), m.end()
            while start < end and sentence[start] == " ":
                start += 1
            if start >= end or any(start < t.end and t.start < end for t in taken):
                continue
            taken.append(_Trigger(start, end, kind, pre, post, sentence[start:end]))
    return sorted(taken, key=lambda t: t.start)


def _clause_bounds(sentence: str) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for m in _BREAKERS.finditer(sentence):
        bounds.append((start, m.start()))
        start = m.end()
    bounds.append((start, len(sentence)))
    return bounds


def _clause_of(bounds: list[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    for lo, hi in bounds:
        if lo <= start < hi or (lo <= start and end <= hi):
            return lo, max(hi, end)
    return start, end


def _n_words(text: str) -> int:
    return len(re.findall(r"[\w/-]+", text))


def _post_trigger(sentence: str, end: int, hi: int, triggers: list[_Trigger]) -> _Trigger | None:
    """The first trigger after a mention ending at ``end`` within its clause (up to ``hi``), when no
    blocker and at most ``_POST_WINDOW_WORDS`` words stand between them; pseudo-triggers never count."""
    post = [t for t in triggers if t.post and t.start >= end and t.end <= hi and t.kind != "pseudo"]
    if not post:
        return None
    between = sentence[end : post[0].start]
    if _n_words(between) > _POST_WINDOW_WORDS or _POST_BLOCKERS.search(between):
        return None
    return post[0]


def _decide(
    sentence: str, start: int, end: int, clause: tuple[int, int], triggers: list[_Trigger]
) -> tuple[int | None, str, str | None]:
    lo, hi = clause
    after = _post_trigger(sentence, end, hi, triggers)
    if after is not None and after.kind == "uncertain":
        return UNCERTAIN, "uncertain", after.text
    pre = [
        t
        for t in triggers
        if t.pre and t.start >= lo and t.end <= end and _n_words(sentence[t.end : start]) <= _PRE_WINDOW_WORDS
    ]
    pre.sort(key=lambda t: t.start, reverse=True)
    while len(pre) > 1 and pre[0].kind == "connector":
        pre.pop(0)  # "no opacity to suggest pneumonia": the earlier trigger decides
    if pre:
        nearest = pre[0]
        if nearest.kind == "connector":
            return UNCERTAIN, "uncertain", nearest.text
        if nearest.kind == "negation":
            return NEGATIVE, "negated", nearest.text
        if nearest.kind == "uncertain":
            return UNCERTAIN, "uncertain", nearest.text
        if nearest.kind == "hypothetical":
            return None, "hypothetical", nearest.text
        return POSITIVE, "positive", None  # a pseudo-negation ("no change in ...") asserts presence
    if after is not None and after.kind == "negation":
        return NEGATIVE, "negated", after.text
    return POSITIVE, "positive", None


def _sentence_mentions(sentence: str) -> list[Mention]:
    triggers = _triggers(sentence)
    bounds = _clause_bounds(sentence)
    excluded: dict[str, list[tuple[int, int]]] = {
        f: [(m.start(), m.end()) for m in p.finditer(sentence)] for f, p in _EXCLUSIONS.items()
    }
    found: list[tuple[_Rule, int, int]] = []
    for rule in _RULES:
        for m in rule.pattern.finditer(sentence):
            s, e = m.start(), m.end()
            if any(s < xe and xs < e for xs, xe in excluded.get(rule.finding, ())):
                continue
            found.append((rule, s, e))
    # One mention per finding and span: the longest of overlapping matches (normal statements first).
    mentions: list[Mention] = []
    kept: dict[str, list[tuple[int, int, RuleKind]]] = {}
    for rule, s, e in sorted(found, key=lambda x: (x[0].kind != "normal", -(x[2] - x[1]), x[1])):
        spans = kept.setdefault(rule.finding, [])
        if any(s < ke and ks < e for ks, ke, _ in spans):
            continue
        spans.append((s, e, rule.kind))
        text = sentence[s:e]
        if rule.kind == "normal":
            mentions.append(
                Mention(rule.finding, NEGATIVE, text, sentence, s, e, "normal", "normal statement")
            )
            continue
        value, reason, trigger = _decide(sentence, s, e, _clause_of(bounds, s, e), triggers)
        if value is None:
            continue  # not a statement about the patient
        if rule.kind == "sign":
            if value == NEGATIVE:
                continue  # a negated sign says nothing about the finding
            value, reason = UNCERTAIN, "sign (uncertain)"
        mentions.append(Mention(rule.finding, value, text, sentence, s, e, rule.kind, reason, trigger))
    return sorted(mentions, key=lambda m: m.start)


def explain(text: str) -> list[Mention]:
    """Every finding mention in the report, in reading order, with its value and the deciding trigger."""
    return [m for sentence in _sentences(reportable_text(text)) for m in _sentence_mentions(sentence)]


def aggregate(mentions: list[Mention]) -> dict[str, int]:
    """CheXpert aggregation of mentions (positive > uncertain > negative) plus the No Finding rule."""
    values: dict[str, set[int]] = {}
    for m in mentions:
        values.setdefault(m.finding, set()).add(m.value)
    labels: dict[str, int] = {}
    for finding in FINDINGS:
        seen = values.get(finding)
        if not seen:
            continue
        labels[finding] = POSITIVE if POSITIVE in seen else UNCERTAIN if UNCERTAIN in seen else NEGATIVE
    pathology = any(v in (POSITIVE, UNCERTAIN) for f, v in labels.items() if f != SUPPORT_DEVICES)
    if not pathology:
        labels[NO_FINDING] = POSITIVE
    return {f: labels[f] for f in FINDINGS if f in labels}


def label_report(text: str) -> dict[str, int]:
    """``{finding: 1 | 0 | -1}`` for the findings the report mentions, plus No Finding by CheXpert's rule.

    An empty report (or one with only indication/history/comparison text) gives ``{}``.
    """
    body = reportable_text(text)
    if not _sentences(body):
        return {}
    return aggregate(explain(text))
