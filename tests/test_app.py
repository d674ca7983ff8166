"""AppTest unit tests of every page of the Streamlit explorer (apps/explorer.py), on tiny checkpoints.

Each test drives the real app script (sidebar model picker + st.navigation) with a tiny Qwen2-MoE
(or dense Llama) saved to a temp dir, clicks the page's buttons and checks what the page shows:
charts from the result objects, the outputs' text, and clear errors for bad files.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from steer.cli.app import APP_FILE as APP  # the explorer steer ships (steer.apps)

pytestmark = pytest.mark.requires("streamlit")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from steer.tiny import tiny_model, tiny_tokenizer

    out = {}
    for fam in ("qwen2_moe", "llama"):
        d = tmp_path_factory.mktemp(fam)
        tiny_model(fam).save_pretrained(d)
        tiny_tokenizer().save_pretrained(d)
        out[fam] = d
    return out


@pytest.fixture
def app(ckpts, monkeypatch):
    """A function: app(page, family) -> AppTest on that page with that tiny model loaded."""
    from streamlit.testing.v1 import AppTest

    torch.set_num_threads(1)

    def make(page: str | None = None, family: str = "qwen2_moe"):
        monkeypatch.setenv("STEER_APP_MODEL", str(ckpts[family]))
        at = AppTest.from_file(str(APP), default_timeout=300)
        at.run()
        if page:
            at.switch_page(f"pages/{page}.py")
            at.run()
        _ok(at)
        return at

    return make


def _ok(at):
    assert not at.exception, [e.value for e in at.exception]


def _charts(at) -> int:
    return len(at.get("plotly_chart"))


def _codes(at) -> list[str]:
    return [c.value for c in at.code]


def _click(at, key):
    at.button(key=key).click().run()
    _ok(at)
    return at


def _text_input(at, label_start):
    return next(t for t in at.text_input if t.label.startswith(label_start))


def test_sidebar_loads_the_model_and_a_bad_path_is_an_error(app, ckpts, tmp_path):
    at = app()
    assert any("qwen2_moe" in c.value and "8 experts" in c.value for c in at.sidebar.caption)
    # (AppTest does not rerun the main script's sidebar widgets of a multipage app after the first
    # run, so the bad path is given as the preselected model, the way `steer app --model` does)
    ckpts["missing"] = tmp_path / "nope"
    at = app(family="missing")
    assert any("Could not load" in e.value and "no such file or directory" in e.value for e in at.error)
    assert not at.get("plotly_chart") and not at.button


def test_experts_profile_tokens_and_switch(app):
    at = _click(app(), "run_profile")
    # one heatmap per class, the top-k bar chart
    assert _charts(at) == 3
    assert any("12 prompts" in c.value for c in at.caption)
    assert not at.get("progress")  # the bar is removed once the run is complete
    # tokens routed to the chosen expert: steer.ftri.expert_tokens' table and its token counts
    routed = next(c.value for c in at.caption if "tokens were routed to layer" in c.value)
    n = int(routed.split()[0])
    table = at.dataframe[1].value
    assert len(table) == n and {"prompt", "position", "token", "slot", "weight", "context"} <= set(table.columns)
    assert at.dataframe[2].value.times.sum() == n
    at.number_input(key="sel_expert").set_value(5).run()
    _ok(at)
    assert any("layer 1, expert 5" in c.value for c in at.caption)
    _text_input(at, "Experts (LAYER:EXPERT").set_value("1:0, 1:1, 2:3").run()
    _click(at, "run_switch")
    msg = at.success[0].value
    assert "ExpertSwitch(3 experts" in msg and "routing changed for" in msg
    assert int(msg.split("routing changed for ")[1].split()[0]) > 0
    assert len(_codes(at)) == 4  # baseline and switched for the two default prompts
    # bad input: an expert out of range is refused with the reason, nothing generated
    _text_input(at, "Experts (LAYER:EXPERT").set_value("1:99").run()
    _click(at, "run_switch")
    assert any("99" in e.value for e in at.error)


def test_experts_saved_profile_and_garbage_file(app, ckpts, tmp_path):
    from steer.ftri import ProfileConfig, profile
    from steer.models import load

    lm = load(str(ckpts["qwen2_moe"]), progress=False)
    prof = profile(lm.model, lm.tokenizer, {"a": ["hello there", "good day"], "b": ["123 456", "7 8 9"]},
                   ProfileConfig(n_bootstrap=20), progress=False)
    path, _ = prof.save(tmp_path / "prof")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    at = app()
    at.radio(key="prof_source").set_value("load saved").run()
    at.radio(key="prof_file_how").set_value("path on this machine").run()
    at.text_input(key="prof_file_path").set_value(str(tmp_path / "junk.safetensors")).run()
    _ok(at)
    assert any("is not a valid expert profile" in e.value for e in at.error)
    at.text_input(key="prof_file_path").set_value(str(path)).run()
    _ok(at)
    assert not at.error and _charts(at) == 3
    assert at.tabs[0].label == "a vs rest"


def test_experts_page_on_a_dense_model(app):
    at = app(family="llama")
    assert any("dense llama model" in w.value for w in at.warning)
    assert _charts(at) == 0


def test_sinks_page_maps_and_act(app):
    at = app("sinks", family="llama")
    at.radio(key="sink_inputs").set_value("my text").run()
    at.text_area(key="sink_text").set_value("the cat sat on the mat and then it slept for a while\n"
                                             "a b c d e f g h i j k l m n o p").run()
    _click(at, "run_sinks")
    assert _charts(at) == 3  # layer x head heatmap, one head's map, token strip
    assert [m.label for m in at.metric][0] == "Sink rate"
    # ACT on every head: some rows must be rescaled (tiny random models have sinks at tau 0.1)
    heads = ", ".join(f"{la}:{h}" for la in range(3) for h in range(4))
    _text_input(at, "Heads (LAYER:HEAD").set_value(heads)
    at.slider(key="act_tau").set_value(0.05).run()  # near-uniform random attention: lower the sink threshold
    _click(at, "run_act")
    msg = next(s.value for s in at.success if "rescaled" in s.value)
    assert int(msg.split("rescaled ")[1].split()[0]) > 0, msg
    assert len(_codes(at)) == 2
    # bad head id
    _text_input(at, "Heads (LAYER:HEAD").set_value("0:99").run()
    _click(at, "run_act")
    assert any("99" in e.value for e in at.error)


def test_sinks_saved_result(app, ckpts, tmp_path):
    from steer.models import load
    from steer.sinks import detect_sinks

    lm = load(str(ckpts["llama"]), progress=False)
    detect_sinks(lm.model, lm.tokenizer, ["one two three four five six seven eight nine ten"]).to_safetensors(
        tmp_path / "s.safetensors")
    at = app("sinks", family="llama")
    at.radio(key="sink_source").set_value("load saved").run()
    at.radio(key="sink_file_how").set_value("path on this machine").run()
    at.text_input(key="sink_file_path").set_value(str(tmp_path / "s.safetensors")).run()
    _ok(at)
    assert _charts(at) == 3


@pytest.fixture(scope="module")
def saved_probe(ckpts, tmp_path_factory):
    """A probe trained on the tiny MoE's own cue events (labels from the cue position, since a random
    model never answers right), its calibration events, both saved the way `steer probe` saves them."""
    from steer.models import load
    from steer.probes import lynx
    from steer.probes.cues import CueSet
    from steer.probes.data import arithmetic_problems
    from steer.probes.features import default_points
    from steer.probes.generate import ExitConfig

    lm = load(str(ckpts["qwen2_moe"]), progress=False)
    cues = CueSet(words=(), patterns={"char": r"[!-~]"})
    cfg = ExitConfig(exit_string="=>", max_new_tokens=12, answer_max_tokens=2)
    labs = []
    for split in ("train", "calibration"):
        lab, _ = lynx.label(lm.model, lm.tokenizer, arithmetic_problems(4, split=split), default_points(lm.model),
                            cues, cfg, model_name=lm.name)
        lab.labels = (lab.cue_token >= 4).long()
        labs.append(lab)
    probe = lynx.train(labs[0])
    d = tmp_path_factory.mktemp("probe")
    probe.save(d / "probe")
    labs[1].to_safetensors(d / "cal.safetensors")
    return d


def test_probes_page_confidence_and_exit(app, saved_probe):
    at = app("probes")
    at.radio(key="probe_source").set_value("load saved").run()
    at.radio(key="probe_dir_how").set_value("path on this machine").run()
    at.text_input(key="probe_dir_path").set_value(str(saved_probe / "probe")).run()
    _ok(at)
    assert any("calibration" in e.value for e in at.error)  # no calibration yet: says how to add it
    at.radio(key="cal_cues_how").set_value("path on this machine").run()
    at.text_input(key="cal_cues_path").set_value(str(saved_probe / "cal.safetensors")).run()
    _ok(at)
    assert [m.value for m in at.metric][0] == "0.2"  # the demo's documented delta
    at.slider(key="lynx_gen_budget").set_value(16).run()
    _click(at, "run_lynx_gen")
    # one tab per default question, each with GenerationResult.figure() and both texts
    assert len(at.tabs) == 4 and _charts(at) == 4
    assert len(_codes(at)) == 8
    # the probe (trained on late cues = right) exits for real during generation
    msg = next(s.value for s in at.success if "generations exited early" in s.value)
    n_exit = int(msg.split(": ")[1].split(" of ")[0])
    assert n_exit > 0 and sum("exit at token" in t.label for t in at.tabs) == n_exit
    assert sum("online exit" in c.value and "stop: exit" in c.value for c in at.caption) == n_exit
    at.slider(key="lynx_delta").set_value(0.4).run()
    _ok(at)
    assert [m.value for m in at.metric][0] == "0.4"
    assert "replay the probe at the slider's delta = 0.4" in next(
        s.value for s in at.success if "exited early" in s.value)


def test_probes_page_trains_live_once_then_loads_from_the_cache(app, monkeypatch, tmp_path):
    monkeypatch.setenv("STEER_CACHE", str(tmp_path / "cache"))
    at = app("probes")
    for key, value in (("lynx_ntrain", 4), ("lynx_ncal", 4), ("lynx_budget", 8)):
        at.number_input(key=key).set_value(value).run()
    at.text_input(key="lynx_cues").set_value("re:[a-z]").run()
    assert not any("is cached" in c.value for c in at.caption)
    _click(at, "run_lynx_train")
    # a random tiny model is never right: the page says the probe has nothing to learn from
    assert any("nothing to learn from" in w.value for w in at.warning)
    assert any(c.value.startswith("Training: ") for c in at.caption)
    cached = list((tmp_path / "cache" / "app" / "lynx").glob("*/probe/probe.json"))
    assert len(cached) == 1 and (cached[0].parents[1] / "cues_calibration.safetensors").exists()
    assert [m.label for m in at.metric][1].startswith("q0")
    at2 = app("probes")  # a new session with the same settings loads the cached probe
    for key, value in (("lynx_ntrain", 4), ("lynx_ncal", 4), ("lynx_budget", 8)):
        at2.number_input(key=key).set_value(value).run()
    at2.text_input(key="lynx_cues").set_value("re:[a-z]").run()
    assert any("is cached" in c.value for c in at2.caption)
    _click(at2, "run_lynx_train")
    assert any(c.value.startswith("Training: ") for c in at2.caption)


def test_probes_page_refuses_a_probe_for_another_model(app, saved_probe):
    at = app("probes", family="llama")  # same shape but dense: accepted; a wrong file is refused
    at.radio(key="probe_source").set_value("load saved").run()
    at.radio(key="probe_dir_how").set_value("path on this machine").run()
    at.text_input(key="probe_dir_path").set_value(str(saved_probe)).run()
    assert any("is not a saved probe" in e.value for e in at.error)


def test_fingerprints_make_verify_and_bad_claim(app, ckpts, tmp_path):
    at = app("fingerprints")
    at.radio(key="fp_source").set_value("make one here (provider side)").run()
    at.number_input(key="fp_tokens").set_value(6).run()
    _click(at, "run_fp")
    _click(at, "run_verify")
    # 4 sequences of 6 tokens at FPR 0.1 (0.025 each) need 240 benign tokens: 12 reruns give 288,
    # no benign window is as long as the claim, but each sequence is decided
    assert any(s.value.startswith("VERIFIED: 4 sequence(s)") for s in at.success), \
        [s.value for s in at.success + at.error + at.warning]
    at.number_input(key="fp_reruns").set_value(2).run()  # 48 benign tokens: too few, and said so
    _click(at, "run_fp")
    _click(at, "run_verify")
    assert any(s.value.startswith("INSUFFICIENT") and "needs" in s.value for s in at.warning), \
        [s.value for s in at.success + at.error + at.warning]
    assert _charts(at) == 1
    # a fingerprint file made on the other model is refused with the reason
    from steer.difr import fingerprint_prompts
    from steer.models import load

    other = load(str(ckpts["llama"]), progress=False)
    fingerprint_prompts(other.model, other.tokenizer, ["hi there"], max_new_tokens=4).save(tmp_path / "fp.safetensors")
    at.radio(key="fp_source").set_value("load a file").run()
    at.radio(key="fp_file_how").set_value("path on this machine").run()
    at.text_input(key="fp_file_path").set_value(str(tmp_path / "fp.safetensors")).run()
    _click(at, "run_verify")
    assert any("does not fit this model" in e.value for e in at.error)


def test_config_page_collects_validates_and_exports(app, tmp_path):
    at = app()
    _text_input(at, "Experts (LAYER:EXPERT").set_value("1:0, 2:5").run()
    _click(at, "run_switch")
    at.switch_page("pages/config.py")
    at.run()
    _ok(at)
    boxes = {c.label.split(" (")[0]: c for c in at.checkbox}
    assert boxes["MoTE expert switch"].value and boxes["ACT heads"].disabled
    assert any(s.value.startswith("Valid for") for s in at.success)
    doc = at.json[-1].value
    assert '"expert": 5' in doc and "qwen2_moe" in doc
    _click(at, "run_export")  # default target: vllm
    assert any(b.label.startswith("Download vllm export") for b in at.get("download_button"))
    # a saved config whose expert is out of range for this model: the field path is shown
    from steer.config import InterventionConfig, ModelIdentity, MoTESection
    from steer.models import load

    lm = load(os.environ["STEER_APP_MODEL"], progress=False)
    bad = InterventionConfig(ModelIdentity.from_model(lm.model), mote=MoTESection([(1, 42)], "off_mask"))
    bad.save(tmp_path / "cfg")
    at2 = app("config")
    at2.radio(key="cfg_file_how").set_value("path on this machine").run()
    at2.text_input(key="cfg_file_path").set_value(str(tmp_path / "cfg")).run()
    _ok(at2)
    assert any("mote.experts[0].expert: 42 out of range" in e.value for e in at2.error)


def test_upload_limit_and_pair_parsing(monkeypatch):
    from steer.apps import explorer_common as ec

    class Big:
        name, size = "huge.safetensors", (ec.MAX_UPLOAD_MB + 1) * 2**20

    with pytest.raises(ValueError, match="limit is 50 MB"):
        ec._write_upload(Big(), Path("/nonexistent"))
    assert ec.parse_pairs("7:3, 12:0\n1:1") == [(7, 3), (12, 0), (1, 1)]
    monkeypatch.setenv("STEER_APP_THREADS", "1")
    assert ec.app_threads() == 1
    monkeypatch.setenv("STEER_APP_THREADS", "two")
    with pytest.raises(ValueError, match="STEER_APP_THREADS must be a positive integer, got 'two'"):
        ec.app_threads()
    with pytest.raises(ValueError, match="'7-3' is not LAYER:EXPERT"):
        ec.parse_pairs("7-3")


def test_live_progress_keeps_a_stop_request_until_the_partial_result_is_stored(monkeypatch):
    """Streamlit raises its stop/rerun exception at the next st.* call, i.e. inside the progress
    callback: the callback must turn it into steer's cancel flag and hand it back at finish()."""
    from streamlit.runtime.scriptrunner_utils.exceptions import StopException

    from steer.apps import explorer_common as ec

    bar = ec.LiveProgress("profiling")
    bar(1, 4)
    assert not bar.cancel.is_set()

    def stop(*a, **k):
        raise StopException()

    monkeypatch.setattr(bar.bar, "progress", stop)
    bar(2, 4)  # the user pressed Stop: no exception escapes into steer's loop
    assert bar.cancel.is_set()
    bar(3, 4)  # later calls are quiet
    with pytest.raises(StopException):
        bar.finish()
    now = ec.LiveProgress("labelling", keep_partial=False)  # nothing partial to keep: stop at once
    monkeypatch.setattr(now.bar, "progress", stop)
    with pytest.raises(StopException):
        now(1, 4)


def test_steer_app_command(monkeypatch, capsys):
    from steer.cli import app as app_cli
    from steer.cli import main

    assert app_cli.app_file() == APP
    calls = []
    monkeypatch.setattr(app_cli.subprocess, "call", lambda cmd, env=None: calls.append((cmd, env)) or 0)
    assert main(["app", "--model", "tiny-dir", "--port", "8599"]) == 0
    cmd, env = calls[0]
    assert cmd[:4] == [sys.executable, "-m", "streamlit", "run"] and cmd[4] == str(APP)
    assert "--server.maxUploadSize" in cmd and "8599" in cmd and env["STEER_APP_MODEL"] == "tiny-dir"
    monkeypatch.setattr(app_cli, "APP_FILE", Path("/nonexistent/apps/explorer.py"))
    assert main(["app"]) == 2
    assert "/nonexistent/apps/explorer.py" in capsys.readouterr().err
