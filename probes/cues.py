"""Step 1 of LYNX: find cue events in the decoded text while it is being generated.

A cue is a regular expression over decoded text. Word cues ("hmm", "wait", "alternatively") are
word-boundary aware on both sides: "await" and "waiting" are not cues. Small instruct models never
say "wait", so structural cues mark the end of a reasoning step instead (a blank line, a line
break, the end of a sentence).

A match is attributed to the token holding its last character (the *cue token*, whose hidden state
is the probe's input) and is only reported once one more token has been decoded, so a right word
boundary can be seen ("wait" then "ing" is no cue). The generation loop gets that look-ahead for
free: when token t+1 has just been sampled, token t's hidden states have just been computed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Structural cues by name; values are regular expressions over decoded text.
STRUCTURAL_CUES: dict[str, str] = {
    "blank_line": r"\n[ \t]*\n",
    "newline": r"(?<!\n)\n(?![ \t]*\n)",  # a single line break (a blank line is its own cue)
    "sentence_end": r"[.!?](?=[ \t])",  # end of a sentence (a decimal point is followed by a digit, not a space)
}

DEFAULT_CUE_WORDS: tuple[str, ...] = ("hmm", "wait", "alternatively")


def word_cue(word: str) -> str:
    """Regex for a cue word with word boundaries on both sides (case-insensitive)."""
    return rf"(?i)(?<!\w){re.escape(word)}(?!\w)"


@dataclass
class CueSet:
    """Which cues end a reasoning step. `words` are literal cue words; `structural` names
    entries of STRUCTURAL_CUES; `patterns` adds raw regexes (name -> regex)."""

    words: tuple[str, ...] = DEFAULT_CUE_WORDS
    structural: tuple[str, ...] = ()
    patterns: dict[str, str] = field(default_factory=dict)
    max_chars: int = 64  # longest match looked for; also bounds how far back an exit can cut

    def __post_init__(self):
        unknown = [s for s in self.structural if s not in STRUCTURAL_CUES]
        if unknown:
            raise ValueError(
                f"unknown structural cue(s) {unknown}; known: {sorted(STRUCTURAL_CUES)} "
                f"(or pass a raw regex in patterns={{name: regex}})"
            )
        self.words = tuple(self.words)
        self.structural = tuple(self.structural)
        if self.max_chars < 1:
            raise ValueError(f"max_chars must be >= 1 (the longest cue match in characters), got {self.max_chars}")
        if not (self.words or self.structural or self.patterns):
            raise ValueError("empty cue set: give at least one cue word, structural cue or pattern")
        self._compiled = [(w, re.compile(word_cue(w))) for w in self.words]
        self._compiled += [(s, re.compile(STRUCTURAL_CUES[s])) for s in self.structural]
        self._compiled += [(n, re.compile(p)) for n, p in self.patterns.items()]

    @classmethod
    def parse(cls, spec: str) -> CueSet:
        """From a comma list: names of structural cues are structural, "re:REGEX" is a raw pattern,
        everything else is a word. E.g. "wait,hmm,blank_line"."""
        items = [s.strip() for s in spec.split(",") if s.strip()]
        pats = {i: i[3:] for i in items if i.startswith("re:")}
        return cls(words=tuple(i for i in items if i not in STRUCTURAL_CUES and i not in pats),
                   structural=tuple(i for i in items if i in STRUCTURAL_CUES), patterns=pats)

    def to_json(self) -> dict:
        return {"words": list(self.words), "structural": list(self.structural), "patterns": dict(self.patterns),
                "max_chars": self.max_chars}

    @classmethod
    def from_json(cls, d: dict) -> CueSet:
        return cls(tuple(d.get("words", ())), tuple(d.get("structural", ())), dict(d.get("patterns", {})),
                   int(d.get("max_chars", 64)))

    def matches(self, text: str) -> list[tuple[str, int, int]]:
        """All (cue name, start, end) char spans in `text`, sorted by end then start."""
        found = [(name, m.start(), m.end()) for name, rx in self._compiled for m in rx.finditer(text)]
        return sorted(found, key=lambda x: (x[2], x[1]))


@dataclass(frozen=True)
class CueMatch:
    """One cue event: `cue_token` is the index (in generated tokens) of the token holding the
    cue's last character; `cut` is the index of the first token overlapping the cue, i.e. how many
    generated tokens are kept when exiting before the cue."""

    cue: str
    cue_token: int
    cut: int
    char_start: int
    char_end: int


class CueTracker:
    """Incremental cue detection for one generated sequence.

    Feed every generated token id with `push`; it returns the cue events whose cue token is the
    token *before* the one just pushed (the look-ahead described in the module docstring).
    """

    def __init__(self, cues: CueSet, tokenizer, max_cue_chars: int | None = None):
        self.cues, self.tok = cues, tokenizer
        self.max_cue_chars = cues.max_chars if max_cue_chars is None else max_cue_chars
        self.ids: list[int] = []
        self.offsets: list[int] = [0]  # offsets[i] = len(decode(ids[:i]))
        self.text = ""

    def push(self, token_id: int) -> list[CueMatch]:
        self.ids.append(int(token_id))
        self.text = self.tok.decode(self.ids, skip_special_tokens=False)
        self.offsets.append(len(self.text))
        t = len(self.ids) - 2  # candidate cue token: the previous one
        if t < 0:
            return []
        lo, hi = self.offsets[t], self.offsets[t + 1]
        if hi <= lo:  # token decodes to nothing yet (partial UTF-8): no cue can end in it
            return []
        start = max(0, lo - self.max_cue_chars)
        events = []
        for name, s, e in self.cues.matches(self.text[start:]):
            s, e = s + start, e + start
            if lo < e <= hi:  # the match's last character lies in token t
                cut = self._token_at(s)
                events.append(CueMatch(name, t, cut, s, e))
        return events

    def earliest_cut(self) -> int:
        """A lower bound on the cut of every cue later pushes can report: the next push searches from
        offsets[len(ids) - 1] - max_cue_chars on. A KV cache may drop positions before it (sliding
        layers); decoders whose text shrinks when a byte sequence completes can undercut it by a few
        characters, which the generation loop covers with slack and a recompute fallback."""
        if not self.ids:
            return 0
        return self._token_at(max(0, self.offsets[len(self.ids) - 1] - self.max_cue_chars))

    def _token_at(self, char: int) -> int:
        """Index of the token whose decoded span holds character `char`."""
        for i in range(len(self.ids)):
            if self.offsets[i] <= char < self.offsets[i + 1]:
                return i
        return len(self.ids) - 1


def find_cues(token_ids: list[int], tokenizer, cues: CueSet) -> list[CueMatch]:
    """Cue events of a finished sequence, exactly as the online tracker reports them."""
    tracker = CueTracker(cues, tokenizer)
    events = []
    for tid in token_ids:
        events += tracker.push(tid)
    return events
