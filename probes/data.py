"""Seeded checkable reasoning tasks, labelled cue events on disk, and model loading for LYNX.

No GSM8K or reasoning model is reachable here, so the experiment uses generated multi-step
arithmetic word problems with exact answers. Splits are assigned by a hash of the question text,
so train / calibration / test never share a problem whatever seeds are used.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from steer.identity import model_identity
from steer.io import LYNX_CUES, load_tensors, save_tensors
from steer.probes.answers import get_checker
from steer.probes.cues import CueSet
from steer.probes.features import num_layers
from steer.probes.generate import ExitConfig, GenerationResult, generate_with_exit
from steer.progress import Progress, as_progress

SYSTEM_PROMPT = "Solve the math problem step by step. End with 'The answer is <number>.'"
SPLITS = {"train": 0.5, "calibration": 0.25, "test": 0.25}

_NAMES = ["Tom", "Anna", "Sam", "Mia", "Leo", "Zoe", "Ben", "Ivy", "Max", "Eva", "Noah", "Lily"]
_ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "coins", "cards", "shells", "eggs"]


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int
    steps: int
    split: str


def split_of(question: str, splits: dict[str, float] = SPLITS) -> str:
    """Deterministic split from the question's hash: disjoint by construction."""
    u = int(hashlib.sha256(question.encode()).hexdigest()[:12], 16) / float(16**12)
    acc = 0.0
    for name, frac in splits.items():
        acc += frac
        if u < acc:
            return name
    return list(splits)[-1]


def _problem(rng: random.Random) -> tuple[str, int, int]:
    """Small numbers on purpose: SmolLM2-135M gets roughly a quarter of these right (not 0, not all)."""
    n, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(2, 15), rng.randint(2, 12)
        return f"{n} has {a} {item}. {n} gets {b} more {item}. How many {item} does {n} have now?", a + b, 1
    if kind == 1:
        a, b = rng.randint(8, 20), rng.randint(2, 7)
        return f"{n} has {a} {item} and gives away {b} of them. How many {item} does {n} have left?", a - b, 1
    if kind == 2:
        a, b = rng.randint(2, 6), rng.randint(2, 5)
        return f"A bag holds {a} {item}. How many {item} are in {b} bags?", a * b, 1
    if kind == 3:
        a, b, c = rng.randint(3, 12), rng.randint(2, 9), rng.randint(1, 5)
        return (f"{n} has {a} {item}. {n} buys {b} more {item}, then gives away {c} {item}. "
                f"How many {item} does {n} have now?", a + b - c, 2)
    a, b, c = rng.randint(2, 4), rng.randint(2, 5), rng.randint(1, 6)
    return (f"{n} buys {a} boxes with {b} {item} in each box and already had {c} {item}. "
            f"How many {item} does {n} have in total?", a * b + c, 2)


def arithmetic_problems(n: int, seed: int = 0, split: str | None = None) -> list[Problem]:
    """`n` distinct seeded problems (1-2 steps), optionally only those of one split."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {list(SPLITS)}")
    rng = random.Random(seed)
    seen, out = set(), []
    for _ in range(n * 50):
        q, a, s = _problem(rng)
        if q in seen:
            continue
        seen.add(q)
        sp = split_of(q)
        if split is None or sp == split:
            out.append(Problem(q, a, s, sp))
            if len(out) == n:
                return out
    raise ValueError(f"could not draw {n} distinct problems for split {split!r}")


def chat_prompts(tokenizer, questions: Sequence[str], system: str = SYSTEM_PROMPT) -> list[str]:
    """Questions rendered with the tokenizer's chat template (plain text if it has none)."""
    if not getattr(tokenizer, "chat_template", None):
        return [f"{system}\n\nQuestion: {q}\nAnswer:" for q in questions]
    return [tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": q}],
                                          tokenize=False, add_generation_prompt=True) for q in questions]


# ---- labelled cue events ------------------------------------------------------------------------

@dataclass
class LabelledCues:
    """Features at cue events with forced-exit labels (1 = exiting here gives a correct answer)."""

    features: torch.Tensor  # [E, F]
    labels: torch.Tensor  # [E] int
    trajectory: torch.Tensor  # [E] which problem
    cue_token: torch.Tensor  # [E] generated-token index of the cue token
    meta: dict = field(default_factory=dict)  # model, n_layers, d_model, points, cues, exit_string, split
    identity: dict | None = None  # steer.identity of the model the events were labelled on

    def __len__(self) -> int:
        return int(self.labels.numel())

    def to_safetensors(self, path) -> Path:
        tensors = {"features": self.features.float(), "labels": self.labels.long(),
                   "trajectory": self.trajectory.long(), "cue_token": self.cue_token.long()}
        return save_tensors(path, LYNX_CUES, tensors, self.meta, identity=self.identity)

    @classmethod
    def from_safetensors(cls, path) -> LabelledCues:
        stored = load_tensors(path, LYNX_CUES)  # version 1: the same fields, no identity
        t = stored.tensors
        return cls(t["features"], t["labels"], t["trajectory"], t["cue_token"], stored.meta, stored.identity)

    save = to_safetensors
    load = from_safetensors

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({"trajectory": self.trajectory.tolist(), "cue_token": self.cue_token.tolist(),
                             "label": self.labels.tolist()})


def label_cue_events(model, tokenizer, problems: Sequence[Problem], points: Sequence[str], cues: CueSet,
                     config: ExitConfig, checker="numeric", batch_size: int = 8, model_name: str = "",
                     progress: Progress | None = None) -> tuple[LabelledCues, list[GenerationResult]]:
    """Generate for every problem with a forced-exit trial at every cue event; label each event
    by whether the trial's answer is correct. Returns the labelled events and raw generations.
    progress (steer.progress): called (problems done, problems, note) after every batch."""
    report = as_progress(progress)
    chk = get_checker(checker)
    feats, labels, traj, tok_idx, results = [], [], [], [], []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start: start + batch_size]
        res = generate_with_exit(model, tokenizer, chat_prompts(tokenizer, [p.question for p in chunk]),
                                 cues=cues, config=config, points=points, record_features=True,
                                 record_trials=True)
        results.append(res)
        for j, row in enumerate(res.rows):
            for ev in row.events:
                feats.append(res.features[ev.feature_index])
                labels.append(int(chk.check(ev.trial.answer_text, chunk[j].answer, forced=True)))
                traj.append(start + j)
                tok_idx.append(ev.cue_token)
        report(start + len(chunk), len(problems), f"{len(labels)} cue events")
    cfg = model.config.get_text_config(decoder=True)
    meta = {"model": model_name, "n_layers": num_layers(model), "d_model": int(cfg.hidden_size),
            "points": list(points), "cues": cues.to_json(), "exit_string": config.exit_string,
            "checker": getattr(chk, "name", str(checker)), "n_problems": len(problems)}
    F = feats[0].numel() if feats else 0
    return LabelledCues(torch.stack(feats) if feats else torch.empty(0, F), torch.tensor(labels, dtype=torch.long),
                        torch.tensor(traj, dtype=torch.long), torch.tensor(tok_idx, dtype=torch.long), meta,
                        model_identity(model, any_family=True)), results


# ---- models ---------------------------------------------------------------------------------------

def load_model(spec: str):
    """(model, tokenizer, name): "tiny:<family>" (random tiny model, for tests and demos), else
    whatever steer.models.load accepts (a packaged name like "smollm2", a checkpoint dir, a GGUF)."""
    if spec.startswith("tiny:"):
        from steer.tiny import FAMILIES, tiny_model, tiny_tokenizer

        fam = spec.split(":", 1)[1]
        if fam not in FAMILIES:
            raise ValueError(f"unknown tiny family {fam!r}; known: {', '.join(FAMILIES)}")
        return tiny_model(fam), tiny_tokenizer(), spec
    from steer.models import load

    lm = load(spec)
    return lm.model, lm.tokenizer, lm.name
