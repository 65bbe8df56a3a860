"""Report mode: a Findings / Impression draft for an image or a study.

:func:`report_prompt` asks for two sections headed ``FINDINGS:`` and ``IMPRESSION:``;
:func:`parse_report` reads them back, tolerant of the heading styles models actually write
(``FINDINGS:``, ``Findings``, ``## Findings``, ``**Findings:**``, ``Impression -``; ``Conclusion`` is
read as the impression). Other known headings (technique, comparison, indication, history,
recommendations, ...) end a section and are kept in ``other``. Missing, empty or repeated sections
are reported in ``errors``; nothing raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from emma.infer.grounding import FamilyLike
from emma.infer.prompts import NOTICE, ContextLike, format_context, join_blocks, question_text
from emma.model.families import resolve_family

MAX_REPORT_CHARS = 50_000

_SECTION_NAMES = {
    "findings": "findings",
    "finding": "findings",
    "impression": "impression",
    "impressions": "impression",
    "conclusion": "impression",
    "conclusions": "impression",
    "technique": "technique",
    "comparison": "comparison",
    "comparisons": "comparison",
    "indication": "indication",
    "indications": "indication",
    "history": "history",
    "clinical history": "history",
    "clinical information": "history",
    "clinical indication": "indication",
    "exam": "examination",
    "examination": "examination",
    "procedure": "procedure",
    "recommendation": "recommendations",
    "recommendations": "recommendations",
}
_NAMES_RE = "|".join(sorted((re.escape(name) for name in _SECTION_NAMES), key=len, reverse=True))
_HEADING_RE = re.compile(
    rf"^\s*(?P<hashes>#{{1,6}}\s*)?(?P<em1>[*_]{{1,3}})?\s*(?P<name>{_NAMES_RE})(?![A-Za-z])\s*(?P<em2>[*_]{{1,3}})?"
    rf"\s*(?P<sep>[:\-–—])?\s*(?P<em3>[*_]{{1,3}})?[ \t]*(?P<rest>.*)$",
    re.IGNORECASE,
)


@dataclass
class ReportDraft:
    findings: str
    impression: str
    errors: list[str] = field(default_factory=list)
    other: dict[str, str] = field(default_factory=dict)  # other recognised sections, by name

    @property
    def complete(self) -> bool:
        return bool(self.findings and self.impression)

    def to_markdown(self, *, notice: bool = True) -> str:
        """``## Findings`` / ``## Impression`` Markdown; missing sections are shown as such."""
        parts = [
            "## Findings",
            "",
            self.findings or "_(missing)_",
            "",
            "## Impression",
            "",
            self.impression or "_(missing)_",
        ]
        if notice:
            parts += ["", f"_{NOTICE}_"]
        return "\n".join(parts) + "\n"


def report_prompt(
    context: ContextLike = None, family: FamilyLike = None, *, question: str | None = None
) -> str:
    """The user text asking for a FINDINGS / IMPRESSION report draft of the images shown."""
    resolve_family(family)  # validates the name; the prompt is the same for every family
    request = question_text(question, "")
    instructions = (
        "Write a radiology report draft for the image(s) with exactly two sections:\n"
        "FINDINGS: what is visible, organised by anatomy, including pertinent negatives.\n"
        "IMPRESSION: the most important conclusions in order of urgency, with recommendations when needed.\n"
        "Be concise. Describe only what the images show; if something cannot be determined from them, "
        "say so."
    )
    return join_blocks(format_context(context), f"Request: {request}" if request else "", instructions)


def _heading(line: str) -> tuple[str, str] | None:
    """(section, text after the heading) when ``line`` is a section heading."""
    match = _HEADING_RE.match(line)
    if match is None:
        return None
    rest = match.group("rest").strip()
    styled = bool(match.group("hashes") or match.group("em1") or match.group("em2") or match.group("sep"))
    if not styled and rest:
        return None  # prose that merely starts with the word ("Findings are consistent with...")
    if match.group("em1") and not (match.group("em2") or match.group("em3")):
        return None  # "*Findings are...": emphasis opened but never closed around the name
    return _SECTION_NAMES[match.group("name").lower()], rest


def parse_report(text: str) -> ReportDraft:
    """Findings and impression from a report draft; missing sections are reported, never raised."""
    if not isinstance(text, str):
        return ReportDraft("", "", [f"expected text, got {type(text).__name__}"])
    errors: list[str] = []
    if len(text) > MAX_REPORT_CHARS:
        errors.append(f"report longer than {MAX_REPORT_CHARS} characters; only the start was read")
        text = text[:MAX_REPORT_CHARS]
    sections: dict[str, list[str]] = {}
    seen: dict[str, int] = {}
    current: str | None = None
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        heading = _heading(line)
        if heading is not None:
            current, rest = heading
            seen[current] = seen.get(current, 0) + 1
            if seen[current] > 1:
                sections[current].append("")
            else:
                sections[current] = []
            if rest:
                sections[current].append(rest)
        elif current is not None:
            sections[current].append(line.rstrip())
    bodies = {name: "\n".join(lines).strip() for name, lines in sections.items()}
    for name in ("findings", "impression"):
        title = name.capitalize()
        if name not in bodies:
            errors.append(f"missing {title} section")
        elif not bodies[name]:
            errors.append(f"{title} section is empty")
        elif seen[name] > 1:
            errors.append(f"{title} section appears {seen[name]} times; merged")
    other = {name: body for name, body in bodies.items() if name not in ("findings", "impression")}
    return ReportDraft(bodies.get("findings", ""), bodies.get("impression", ""), errors, other)
