"""The README's account of `orchestrator chaos` names every invariant the checker holds runs to."""

from __future__ import annotations

import re
from pathlib import Path

from orchestrator.chaos import checker

README = Path(__file__).resolve().parents[2] / "README.md"
WORDS = {11: "eleven", 12: "twelve", 13: "thirteen", 14: "fourteen", 15: "fifteen", 16: "sixteen"}


def test_the_readme_names_each_invariant_of_the_checker_and_counts_them() -> None:
    checked = sorted(set(re.findall(r"^(I\d+)\s", checker.__doc__ or "", re.M)), key=lambda c: int(c[1:]))
    section = README.read_text().split("\n## Reliability\n", 1)[1].split("\n## ", 1)[0]
    paragraph = " ".join(section.split("It runs a mix of synthetic workflows", 1)[1].split("It exits 1", 1)[0].split())
    named = sorted(set(re.findall(r"\bI\d+\b", paragraph)), key=lambda c: int(c[1:]))
    assert named == checked
    assert f"checks {WORDS[len(checked)]} invariants" in paragraph
