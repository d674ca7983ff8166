"""`steer profile` with no arguments: the default path's plumbing end to end, on a tiny MoE.

The real default model (the SmolLM2 MoE) takes minutes; $STEER_PROFILE_MODEL points the same
no-argument path at a tiny Qwen2-MoE checkpoint. Timings on the real model: experiments/mote/RESULTS.md.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from steer.cli import main
from steer.cli.profile import DEFAULT_CLASSES, MODEL_ENV, write_heatmap_png
from steer.ftri import Profile
from steer.prompts import builtin
from steer.tiny import save_tiny


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny_qwen2_moe"), "qwen2_moe")


def test_profile_without_arguments_writes_profile_and_heatmaps(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(MODEL_ENV, str(ckpt))
    monkeypatch.chdir(tmp_path)
    assert main(["profile"]) == 0
    cap = capsys.readouterr()
    (out,) = (tmp_path / "runs").glob("profile-*")
    files = {p.name for p in out.iterdir()}
    assert files >= {"profile.safetensors", "profile.json", "heatmap.png", "heatmap.html", "top.html",
                     "plotly.min.js"}
    # offline HTML: the page loads the plotly bundle written next to it, not a CDN
    html = (out / "heatmap.html").read_text()
    assert 'src="plotly.min.js"' in html and "cdn.plot.ly" not in html
    prof = Profile.load(out)
    n_fr, n_en = len(builtin("questions-fr")), len(builtin("questions-en"))
    assert [c.split("=")[0] for c in DEFAULT_CLASSES] == prof.classes == ["french", "english"]
    assert prof.stats["prompts_per_class"] == {"french": n_fr, "english": n_en}
    assert prof.stats["model_name"] == str(ckpt)  # `steer switch --profile DIR` reloads this model
    assert prof.target == "french" and prof.config.score == "mote" and prof.config.tokens == "prompt"
    L, E = prof.scores.shape
    img = Image.open(out / "heatmap.png")
    assert img.format == "PNG" and img.width > E * 22 and img.height > L * 14
    # the progress bar ran to the end on stderr; the ranking went to stdout
    assert f"{n_fr + n_en}/{n_fr + n_en}" in cap.err and "steer profile" in cap.err
    assert "target 'french', score mote" in cap.out


def test_profile_model_argument_beats_the_environment(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(MODEL_ENV, str(tmp_path / "does-not-exist"))
    rc = main(["profile", "--model", str(ckpt), "--limit", "4", "--bootstrap", "0", "--quiet", "--json",
               "--out", str(tmp_path / "p")])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["stats"]["prompts"] == 8 and str(tmp_path / "p" / "heatmap.png") in summary["files"]
    # and a bad default model is a clear bad-input error, not a traceback
    assert main(["profile", "--quiet"]) == 2
    assert "does-not-exist" in capsys.readouterr().err


def test_heatmap_png_colours_follow_the_scores(ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["profile", "--model", str(ckpt), "--limit", "4", "--bootstrap", "0", "--quiet",
                 "--out", "p"]) == 0
    prof = Profile.load(tmp_path / "p")
    prof.scores = torch.zeros_like(prof.scores)
    prof.scores[0, 0], prof.scores[-1, -1] = 1.0, -1.0
    img = Image.open(write_heatmap_png(prof, tmp_path / "h.png")).convert("RGB")
    left, top, cw, ch = 60, 40, 22, 14  # the layout write_heatmap_png draws
    L, E = prof.scores.shape
    assert img.getpixel((left + cw // 2, top + ch // 2)) == (178, 24, 43)  # +max: red
    assert img.getpixel((left + (E - 1) * cw + cw // 2, top + (L - 1) * ch + ch // 2)) == (33, 102, 172)
    assert img.getpixel((left + cw + cw // 2, top + ch // 2)) == (255, 255, 255)  # 0: white


def test_profile_engine_vllm_needs_vllm(ckpt, capsys):
    """Where vLLM is not installed, --engine vllm is a bad-input error naming the fix (the profile
    through a real engine is tests/test_vllm_profile.py, in the vLLM venv)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: tests/test_vllm_profile.py covers --engine vllm")
    assert main(["profile", "--engine", "vllm", "--model", str(ckpt), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--engine vllm needs vLLM" in err and "--engine hf" in err
