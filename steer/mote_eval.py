"""MoTE's evaluation: behaviour rate of greedy answers and neutral-text perplexity, under a switch.

Search and evaluation live here; what runs at inference (`ExpertSwitch`) is steer.mote.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from steer.hooks import unwrap_model
from steer.interventions import Intervention
from steer.mote import ExpertSwitch
from steer.progress import Progress
from steer.prompts import generate_responses, get_labeller
from steer.stats import wilson_ci


@dataclass
class Evaluation:
    """One condition of the MoTE table."""

    name: str
    behaviour_rate: float
    behaviour_ci: tuple[float, float]
    n_prompts: int
    perplexity: float
    perplexity_ci: tuple[float, float]
    n_ppl_tokens: int
    touched: int = 0
    touched_fraction: float = 0.0
    labels: list[str] = field(default_factory=list, repr=False)
    responses: list[str] = field(default_factory=list, repr=False)

    def row(self) -> dict:
        d = asdict(self)
        d.pop("labels")
        d.pop("responses")
        return d


def _apply_ctx(model, switch: Intervention | None):
    if switch is None:
        return contextlib.nullcontext()
    return switch.apply(model)


def behaviour_labels(model, tokenizer, prompts: Sequence[str], labeller, *, switch: Intervention | None = None,
                     max_new_tokens: int = 48, batch_size: int = 8, chat_template: bool | None = None,
                     progress: Progress | None = None) -> tuple[list[str], list[str]]:
    """Greedy answers under `switch` and their labels."""
    lab = get_labeller(labeller)
    with _apply_ctx(model, switch):
        responses = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, chat_template=chat_template, progress=progress)
    return responses, [lab(r) for r in responses]


def perplexity(model, tokenizer, texts: Sequence[str], *, switch: Intervention | None = None, max_length: int = 128,
               batch_size: int = 8, n_bootstrap: int = 1000, level: float = 0.95, seed: int = 0
               ) -> tuple[float, tuple[float, float], int]:
    """Token-level perplexity over `texts` (each cut to max_length) with a text-level bootstrap CI."""
    hf = unwrap_model(model)
    device = next(hf.parameters()).device
    nll, ntok = [], []
    with _apply_ctx(model, switch), torch.no_grad():
        for s in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[s:s + batch_size]), return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length).to(device)
            logits = hf(**enc).logits[:, :-1].float()
            target = enc["input_ids"][:, 1:]
            m = enc["attention_mask"][:, 1:].bool() & enc["attention_mask"][:, :-1].bool()
            lp = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            nll += (lp * m).sum(1).tolist()
            ntok += m.sum(1).tolist()
    nll_t, n_t = torch.tensor(nll, dtype=torch.float64), torch.tensor(ntok, dtype=torch.float64)
    ppl = math.exp(float(nll_t.sum() / n_t.sum()))
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(nll), (n_bootstrap, len(nll)), generator=gen)
    boot = torch.exp(nll_t[idx].sum(1) / n_t[idx].sum(1))
    a = (1 - level) / 2
    lo, hi = torch.quantile(boot, torch.tensor([a, 1 - a], dtype=boot.dtype)).tolist()
    return ppl, (lo, hi), int(n_t.sum())


def evaluate(model, tokenizer, prompts: Sequence[str], labeller, behaviour: str, neutral_texts: Sequence[str], *,
             switch: Intervention | None = None, name: str = "baseline", max_new_tokens: int = 48,
             batch_size: int = 8, chat_template: bool | None = None, ppl_max_length: int = 128,
             progress: Progress | None = None) -> Evaluation:
    """Behaviour rate (fraction of answers labelled `behaviour`, Wilson CI) and neutral perplexity."""
    responses, labels = behaviour_labels(model, tokenizer, prompts, labeller, switch=switch,
                                         max_new_tokens=max_new_tokens, batch_size=batch_size,
                                         chat_template=chat_template, progress=progress)
    touched = switch.total_touched if switch is not None else 0
    frac = switch.touched_fraction() if isinstance(switch, ExpertSwitch) else 0.0
    ppl, ppl_ci, n_tok = perplexity(model, tokenizer, neutral_texts, switch=switch, max_length=ppl_max_length,
                                    batch_size=batch_size)
    k = sum(lab == behaviour for lab in labels)
    return Evaluation(name, k / len(labels), wilson_ci(k, len(labels)), len(labels), ppl, ppl_ci, n_tok, touched,
                      frac, labels, responses)

