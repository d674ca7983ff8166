"""Step 3 of LYNX (labels): after a forced exit, is the answer right? Pluggable checkers.

A checker turns text into an answer and compares it with the gold answer. `extract(text, forced)`:
after a forced exit the answer is the *first* thing decoded after the exit string; at the end of a
natural generation it is the model's *last* stated answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_BOXED = re.compile(r"\\boxed\{")
_FINAL_MARKERS = re.compile(r"(?i)(?:answer\s*(?:is|:)|####|=)\s*")


def _to_number(s: str) -> Fraction | None:
    s = s.replace(",", "").strip()
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _boxed_contents(text: str) -> list[str]:
    out = []
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        out.append(text[m.end(): i - 1] if depth == 0 else text[m.end():])
    return out


@dataclass
class NumericChecker:
    """Numbers compared exactly as fractions ("1,200" == "1200.0"; "3/4" == "0.75")."""

    name: str = "numeric"

    def extract(self, text: str, forced: bool) -> str | None:
        if forced:  # the first line; if it is a calculation ("2 * 5 = 10"), its result
            line = text.strip().split("\n", 1)[0] if text.strip() else ""
            if "=" in line:
                m = _NUM.search(line, line.rindex("=") + 1)
                if m:
                    return m.group(0)
            m = _NUM.search(line)
            return m.group(0) if m else None
        marked = None
        for m in _FINAL_MARKERS.finditer(text):
            n = _NUM.match(text, m.end())
            if n:
                marked = n.group(0)
        if marked is not None:
            return marked
        nums = _NUM.findall(text)
        return nums[-1] if nums else None

    def check(self, text: str, gold, forced: bool = True) -> bool:
        got = self.extract(text, forced)
        a, b = (_to_number(got) if got else None), _to_number(str(gold))
        return a is not None and b is not None and a == b


@dataclass
class BoxedChecker:
    """The content of \\boxed{...} (or, after an exit string that already opened \\boxed{, the text
    up to the closing brace), compared as numbers when both parse, else as stripped strings."""

    name: str = "boxed"

    def extract(self, text: str, forced: bool) -> str | None:
        boxed = _boxed_contents(text)
        if boxed:
            return (boxed[0] if forced else boxed[-1]).strip()
        if forced:  # exit string ended in "\boxed{": the answer runs to the first closing brace
            return text.split("}", 1)[0].strip() or None
        return None

    def check(self, text: str, gold, forced: bool = True) -> bool:
        got = self.extract(text, forced)
        if got is None:
            return False
        a, b = _to_number(got), _to_number(str(gold))
        return a == b if a is not None and b is not None else got == str(gold).strip()


@dataclass
class ChoiceChecker:
    """A multiple-choice letter (A-E by default): the first standalone letter after a forced exit,
    else the last "answer is X" / "(X)"."""

    letters: str = "ABCDE"
    name: str = "choice"

    def extract(self, text: str, forced: bool) -> str | None:
        rx = re.compile(rf"(?<![A-Za-z])\(?([{self.letters}])\)?(?![A-Za-z])")
        hits = rx.findall(text)
        if not hits:
            return None
        return hits[0] if forced else hits[-1]

    def check(self, text: str, gold, forced: bool = True) -> bool:
        got = self.extract(text, forced)
        return got is not None and got.upper() == str(gold).strip().upper()


CHECKERS = {"numeric": NumericChecker, "boxed": BoxedChecker, "choice": ChoiceChecker}


def get_checker(name_or_checker):
    """A checker by name ('numeric', 'boxed', 'choice') or any object with extract/check."""
    if hasattr(name_or_checker, "check"):
        return name_or_checker
    if name_or_checker not in CHECKERS:
        raise ValueError(f"unknown answer checker {name_or_checker!r}; known: {sorted(CHECKERS)}")
    return CHECKERS[name_or_checker]()
