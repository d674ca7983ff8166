"""Read an intervention config the way a person compares two: a summary and a field-by-field diff.

    summary(config)   -> JSON-able dict: model identity, each section in brief (experts per layer ...)
    diff(a, b)        -> ["mote.experts: + 3:7; - 2:5", "difr.k: 8 -> 16", ...]  ([] when equal)

`steer config show` / `steer config diff` print these; the explorer and notebooks can call them too.
Expert and head lists are compared as sets of (layer, index) pairs, tensors (LYNX probe weights) by value.
"""

from __future__ import annotations

from typing import Any

import torch

from steer.config import InterventionConfig, section_names


def summary(config: InterventionConfig) -> dict:
    """The config in brief: identity, which sections it has, and what each does."""
    m = config.model
    out: dict[str, Any] = {
        "version": config.version,
        "model": {k: v for k, v in m.to_json().items() if k not in ("config_hash", "params_hash")},
        "sections": list(config.sections),
    }
    if config.description:
        out["description"] = config.description
    for name, section in config.sections.items():  # each section says what it does (steer.sections.Section.summary)
        out[name] = section.summary()
    return out


def diff(a: InterventionConfig, b: InterventionConfig) -> list[str]:
    """Differences from `a` to `b`, one line each starting with the field path; [] when they are equal."""
    ja, jb = a.to_json(), b.to_json()
    lines = _diff("description", ja.get("description", ""), jb.get("description", ""))
    lines += _diff("model", ja["model"], jb["model"])
    for name in section_names():
        if name in ja and name not in jb:
            lines.append(f"{name}: only in the first config")
        elif name in jb and name not in ja:
            lines.append(f"{name}: only in the second config")
        elif name in ja:
            lines += _diff(
                name,
                {k: v for k, v in ja[name].items() if k != "tensors"},
                {k: v for k, v in jb[name].items() if k != "tensors"},
            )
    ta, tb = a.tensors(), b.tensors()
    for key in sorted(set(ta) | set(tb)):
        if key not in ta or key not in tb:
            lines.append(f"tensors.{key}: only in the {'first' if key in ta else 'second'} config")
        elif ta[key].shape != tb[key].shape or ta[key].dtype != tb[key].dtype:
            lines.append(
                f"tensors.{key}: {list(ta[key].shape)} {ta[key].dtype} -> {list(tb[key].shape)} {tb[key].dtype}"
            )
        elif not torch.equal(ta[key], tb[key]):
            delta = (ta[key].double() - tb[key].double()).abs().max().item()
            lines.append(f"tensors.{key}: values differ (max |difference| {delta:.3g})")
    return lines


def _pairs(items: list) -> set[str] | None:
    """A list of {layer, expert|head} objects as a set of 'L:I' strings (None if it is not one)."""
    if not all(isinstance(x, dict) and set(x) in ({"layer", "expert"}, {"layer", "head"}) for x in items):
        return None
    return {f"{x['layer']}:{x.get('expert', x.get('head'))}" for x in items}


def _sorted_pairs(pairs: set[str]) -> str:
    return ", ".join(sorted(pairs, key=lambda p: tuple(int(n) for n in p.split(":"))))


def _diff(path: str, a: Any, b: Any) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in list(a) + [k for k in b if k not in a]:
            sub = f"{path}.{key}"
            if key not in b:
                out.append(f"{sub}: only in the first config ({a[key]!r})")
            elif key not in a:
                out.append(f"{sub}: only in the second config ({b[key]!r})")
            else:
                out += _diff(sub, a[key], b[key])
        return out
    if isinstance(a, list) and isinstance(b, list):
        pa, pb = _pairs(a), _pairs(b)
        if pa is not None and pb is not None:
            if pa == pb:
                return []
            parts = ([f"+ {_sorted_pairs(pb - pa)}"] if pb - pa else []) + (
                [f"- {_sorted_pairs(pa - pb)}"] if pa - pb else []
            )
            return [f"{path}: {'; '.join(parts)}"]
    return [] if a == b else [f"{path}: {a!r} -> {b!r}"]
