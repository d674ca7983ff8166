"""Fingerprint records (steer.serving.records) and the HTTP route's admission and access rules.

Fast, without vLLM: the writer is driven as the engine's logits processor drives it, and the
middleware (steer.serving.FingerprintRoute) runs in front of a small Starlette app that echoes
the request body it received. The same paths against a real vLLM server are in tests/test_vllm.py
and tests/test_vllm_load.py.
"""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from steer.serving import (
    KEY_HEADER,
    TOKEN_HEADER,
    FingerprintRoute,
    FingerprintTicket,
    served_fingerprints,
)
from steer.serving.records import (
    RecordError,
    RecordWriter,
    check_key,
    read_record,
    record_paths,
    retention_from_env,
    server_secret,
    token_for,
)

META = {"k": 4, "seed": 0, "projection": "gaussian", "model_id": "tiny", "dtype": "float32",
        "identity": {"scheme": "steer.identity/1", "model_type": "tiny", "config_hash": "c"},
        "intervention": None}


def _rows(n: int, k: int = 4, seed: int = 0) -> list[bytes]:
    g = np.random.default_rng(seed)
    return [g.standard_normal(k).astype(np.float16).tobytes() for _ in range(n)]


def _write(w: RecordWriter, key: str, n: int, seed: int = 0) -> list[bytes]:
    assert w.start(key, {**META, "prompt_ids": [1, 2, 3]})
    rows = _rows(n, seed=seed)
    for r in rows:
        w.append(key, r)
    w.finish(key)
    return rows


def test_record_is_published_atomically_and_reads_back(tmp_path):
    w = RecordWriter(tmp_path)
    assert w.start("a", {**META, "prompt_ids": [1, 2, 3]})
    rows = _rows(3)
    for r in rows:
        w.append("a", r)
    paths = record_paths(tmp_path, "a")
    assert paths.part.exists() and not paths.meta.exists() and not paths.rows.exists()
    with pytest.raises(FileNotFoundError, match="still being generated"):
        read_record(tmp_path, "a")  # a half record is never readable
    w.finish("a")
    assert not paths.part.exists()
    meta, raw = read_record(tmp_path, "a")
    assert raw == b"".join(rows) and meta["rows"] == 3 and meta["key"] == "a"
    fp = served_fingerprints(tmp_path, "a", [1, 2, 3], [7, 8, 9])
    assert fp.values.shape == (3, 4)
    with pytest.raises(ValueError, match="fingerprinted 3 steps"):
        served_fingerprints(tmp_path, "a", [1, 2, 3], [7, 8])


def test_a_key_is_never_overwritten(tmp_path):
    w = RecordWriter(tmp_path)
    first = _write(w, "victim", 3)
    assert not w.start("victim", {**META, "prompt_ids": [9]})  # refused, logged
    w.append("victim", _rows(1, seed=5)[0])  # a row for the refused request goes nowhere
    w.finish("victim")
    meta, raw = read_record(tmp_path, "victim")
    assert raw == b"".join(first) and meta["prompt_ids"] == [1, 2, 3]
    # two writers (two engines on one directory) racing for one key: exclusive create
    w2 = RecordWriter(tmp_path)
    assert w.start("race", {**META, "prompt_ids": [1]})
    assert not w2.start("race", {**META, "prompt_ids": [2]})


def test_preempted_request_resumes_its_own_record(tmp_path):
    w = RecordWriter(tmp_path)
    rows = _write(w, "p", 2)  # left the batch (preempted): published
    assert w.start("p", {**META, "prompt_ids": [1, 2, 3]}, resume=True)
    more = _rows(2, seed=1)
    for r in more:
        w.append("p", r)
    w.finish("p")
    assert read_record(tmp_path, "p")[1] == b"".join(rows + more)
    # a resume for a record this writer did not finish is a new request: refused
    assert not RecordWriter(tmp_path).start("p", META, resume=True)


def test_failed_record_says_why_and_altered_rows_are_caught(tmp_path):
    w = RecordWriter(tmp_path)
    assert w.start("f", {**META, "prompt_ids": [1]})
    w.fail("f", "disk full")
    assert not record_paths(tmp_path, "f").part.exists()
    with pytest.raises(RecordError, match="disk full"):
        read_record(tmp_path, "f")
    _write(w, "t", 3)
    p = record_paths(tmp_path, "t").rows
    p.write_bytes(p.read_bytes()[:-2])
    with pytest.raises(RecordError, match="altered"):
        read_record(tmp_path, "t")
    with pytest.raises(FileNotFoundError, match="retention"):
        read_record(tmp_path, "never")


@pytest.mark.parametrize("key", ["", "../x", "a/b", ".hidden", "a b", "x" * 129, 5, None, "é"])
def test_unsafe_keys_are_refused(key):
    with pytest.raises(ValueError, match="1-128 letters"):
        check_key(key)


def test_retention_by_bytes_and_age(tmp_path, monkeypatch):
    per_record = None
    w = RecordWriter(tmp_path, max_bytes=10**9)
    _write(w, "r0", 8)
    per_record = sum(p.stat().st_size for p in (record_paths(tmp_path, "r0").meta, record_paths(tmp_path, "r0").rows))
    w = RecordWriter(tmp_path, max_bytes=int(per_record * 3.5))  # rescans r0
    for i in range(1, 6):
        _write(w, f"r{i}", 8, seed=i)
        time.sleep(0.01)
    kept = sorted(p.stem for p in tmp_path.glob("*.json"))
    assert kept == ["r3", "r4", "r5"], kept  # the oldest went first; the bound holds after every write
    assert sum(p.stat().st_size for p in tmp_path.iterdir() if not p.name.startswith(".")) <= per_record * 3.5
    # age: a record older than the limit is removed at the next write, and a stale .part at startup
    old = time.time() - 100
    for p in (record_paths(tmp_path, "r3").meta, record_paths(tmp_path, "r3").rows):
        os.utime(p, (old, old))
    stale = tmp_path / "crashed.f16.part"
    stale.write_bytes(b"\0" * 8)
    os.utime(stale, (old, old))
    w = RecordWriter(tmp_path, max_age_s=50)
    assert not stale.exists() and not record_paths(tmp_path, "r3").meta.exists()
    assert record_paths(tmp_path, "r5").meta.exists()
    monkeypatch.setenv("STEER_FINGERPRINT_MAX_BYTES", "lots")
    with pytest.raises(ValueError, match="STEER_FINGERPRINT_MAX_BYTES='lots' must be a positive number"):
        retention_from_env()
    monkeypatch.setenv("STEER_FINGERPRINT_MAX_BYTES", "1000")
    monkeypatch.setenv("STEER_FINGERPRINT_MAX_AGE_S", "-1")
    with pytest.raises(ValueError, match="STEER_FINGERPRINT_MAX_AGE_S"):
        RecordWriter(tmp_path)


def test_secret_persists_and_tokens_bind_keys(tmp_path, monkeypatch):
    monkeypatch.delenv("STEER_FINGERPRINT_SECRET", raising=False)
    s = server_secret(tmp_path)
    assert server_secret(tmp_path) == s  # a restart keeps issued tokens valid
    assert (tmp_path / ".steer-secret").stat().st_mode & 0o777 == 0o600
    assert token_for(s, "a") != token_for(s, "b")
    assert token_for(s, "a") != token_for(server_secret(tmp_path / "other"), "a")


# ---------------------------------------------------------------------------------------------
# The HTTP middleware, in front of an app that echoes what reached it


@pytest.fixture
def client(tmp_path, monkeypatch):
    starlette = pytest.importorskip("starlette")
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    del starlette
    monkeypatch.setenv("STEER_FINGERPRINT_DIR", str(tmp_path))
    monkeypatch.delenv("STEER_FINGERPRINT_SECRET", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)

    async def echo(request):
        return JSONResponse({"got": json.loads(await request.body())})

    app = Starlette(routes=[Route("/v1/completions", echo, methods=["POST"])])
    app.add_middleware(FingerprintRoute)
    app.state.args = SimpleNamespace(api_key=None)
    app.state.vllm_config = None  # unknown here: the engine side decides whether it records
    c = TestClient(app)
    c.dir = tmp_path
    yield c
    import steer.serving as serving

    serving._ROUTE_ACTIVE = False  # this process is not an API server beyond this test


def test_route_issues_keys_and_serves_records_only_to_their_owner(client):
    r = client.post("/v1/completions", json={"prompt": [1, 2, 3], "vllm_xargs": {"steer_fingerprint": True}})
    assert r.status_code == 200
    ticket = FingerprintTicket.from_headers(r.headers)
    assert r.json()["got"]["vllm_xargs"]["steer_fingerprint"] == ticket.key  # the engine gets the issued key
    rows = _write(RecordWriter(client.dir), ticket.key, 2)
    url = f"/steer/fingerprints/{ticket.key}"
    assert client.get(url).status_code == 403  # no token
    assert client.get(url, headers={TOKEN_HEADER: "0" * 64}).status_code == 403
    other = client.post("/v1/completions", json={"prompt": [1], "vllm_xargs": {"steer_fingerprint": True}})
    assert client.get(url, headers={TOKEN_HEADER: other.headers[TOKEN_HEADER]}).status_code == 403
    ok = client.get(url, headers={TOKEN_HEADER: ticket.token})
    assert ok.status_code == 200 and ok.json()["meta"]["rows"] == 2
    import base64

    assert base64.b64decode(ok.json()["rows"]) == b"".join(rows)
    # an issued key whose record is not finished / never written
    missing = FingerprintTicket.from_headers(other.headers)
    assert client.get(f"/steer/fingerprints/{missing.key}", headers={TOKEN_HEADER: missing.token}).status_code == 404
    assert client.post(url).status_code == 405
    assert client.get("/steer/fingerprints/..%2Fx", headers={TOKEN_HEADER: "x"}).status_code in (400, 404)
    # untouched: requests without fingerprints get no ticket
    plain = client.post("/v1/completions", json={"prompt": "steer_fingerprint is just text here"})
    assert plain.status_code == 200 and KEY_HEADER not in plain.headers


@pytest.mark.parametrize("body, message", [
    ({"prompt": [1], "vllm_xargs": {"steer_fingerprint": "victim"}}, "keys are issued by the server"),
    ({"prompt": [[1], [2]], "vllm_xargs": {"steer_fingerprint": True}}, "one prompt per fingerprinted request"),
    ({"prompt": ["a", "b"], "vllm_xargs": {"steer_fingerprint": True}}, "one prompt per fingerprinted request"),
    ({"prompt": [1], "n": 2, "vllm_xargs": {"steer_fingerprint": True}}, "n=1"),
    ({"prompt": [1], "prompt_logprobs": 1, "vllm_xargs": {"steer_fingerprint": True}}, "prompt logprobs"),
    ({"prompt": [1], "sampling_params": {"extra_args": {"steer_fingerprint": "x"}}}, "only as vllm_xargs"),
])
def test_route_rejects_bad_fingerprint_requests_at_admission(client, body, message):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400 and message in json.dumps(r.json()), r.text
    assert KEY_HEADER not in r.headers


def test_route_requires_the_api_key_when_the_server_has_one(client):
    client.app.state.args = SimpleNamespace(api_key=["sekrit"])
    r = client.post("/v1/completions", json={"prompt": [1], "vllm_xargs": {"steer_fingerprint": True}})
    t = FingerprintTicket.from_headers(r.headers)
    _write(RecordWriter(client.dir), t.key, 1)
    url = f"/steer/fingerprints/{t.key}"
    assert client.get(url, headers={TOKEN_HEADER: t.token}).status_code == 401
    assert client.get(url, headers={TOKEN_HEADER: t.token, "Authorization": "Bearer wrong"}).status_code == 401
    assert client.get(url, headers={TOKEN_HEADER: t.token, "Authorization": "Bearer sekrit"}).status_code == 200


def test_admission_in_the_engine_api(tmp_path, monkeypatch):
    """validate_params (vLLM's admission hook) without the HTTP route: caller-chosen keys, used once."""
    from steer.serving.vllm_plugin import STATE, FingerprintLogitsProcessor

    monkeypatch.setattr(STATE, "fingerprinting", None)
    monkeypatch.setattr(FingerprintLogitsProcessor, "_admitted", {})

    def params(key, **kw):
        return SimpleNamespace(extra_args={"steer_fingerprint": key}, n=kw.get("n", 1),
                               prompt_logprobs=kw.get("prompt_logprobs"))

    monkeypatch.delenv("STEER_FINGERPRINT_DIR", raising=False)
    with pytest.raises(ValueError, match="started without STEER_FINGERPRINT_DIR"):
        FingerprintLogitsProcessor.validate_params(params("a"))
    monkeypatch.setenv("STEER_FINGERPRINT_DIR", str(tmp_path))
    FingerprintLogitsProcessor.validate_params(SimpleNamespace(extra_args=None))  # not fingerprinted
    for bad, match in [(params("../a"), "1-128 letters"), (params(["a"]), "1-128 letters"),
                       (params("a", n=3), "n=3"), (params("a", prompt_logprobs=1), "prompt_logprobs")]:
        with pytest.raises(ValueError, match=match):
            FingerprintLogitsProcessor.validate_params(bad)
    FingerprintLogitsProcessor.validate_params(params("a"))
    with pytest.raises(ValueError, match="already used"):
        FingerprintLogitsProcessor.validate_params(params("a"))
    _write(RecordWriter(tmp_path), "ondisk", 1)
    with pytest.raises(ValueError, match="already used"):
        FingerprintLogitsProcessor.validate_params(params("ondisk"))
    # the engine (another process) announced it has no difr section
    (tmp_path / ".steer-engine.json").write_text(json.dumps({"difr": False}))
    with pytest.raises(ValueError, match="no difr section"):
        FingerprintLogitsProcessor.validate_params(params("b"))
    monkeypatch.setattr(STATE, "fingerprinting", False)  # ... or the engine runs in this process
    with pytest.raises(ValueError, match="no difr section"):
        FingerprintLogitsProcessor.validate_params(params("c"))


def test_claim_values_round_trip(tmp_path):
    w = RecordWriter(tmp_path)
    rows = _write(w, "v", 5)
    fp = served_fingerprints(tmp_path, "v", [1, 2, 3], list(range(5)))
    expect = torch.from_numpy(np.frombuffer(b"".join(rows), dtype=np.float16).copy()).view(5, 4)
    assert torch.equal(fp.values, expect)


def test_processor_writes_only_kept_rows_and_never_raises(tmp_path, monkeypatch):
    """FingerprintLogitsProcessor driven through vLLM's v1 logits-processor protocol (update_state with
    BatchUpdate-shaped values, then apply after each compute_logits): a partial-prefill step (its
    sampled token discarded, the output list does not grow) writes no row; a request moved in the
    batch keeps its rows; leaving the batch publishes the record; a request the engine cannot
    record (no difr section) is filed as an error, not raised."""
    from enum import Enum

    from steer.config import DiFRSection, InterventionConfig, ModelIdentity
    from steer.serving.vllm_plugin import STATE, FingerprintLogitsProcessor

    class Dir(Enum):
        SWAP = 1
        UNIDIRECTIONAL = 2

    ident = ModelIdentity("qwen2_moe", "qwen2_moe", 2, 8, 4, "c", "p", [0, 1], 2)
    cfg_dir = InterventionConfig(ident, difr=DiFRSection(k=4, seed=0)).save(tmp_path / "cfg")
    vllm_config = SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace(steer_config=str(cfg_dir))))
    monkeypatch.setenv("STEER_FINGERPRINT_DIR", str(tmp_path / "fp"))
    monkeypatch.setattr(STATE, "difr_meta", dict(META))
    monkeypatch.setattr(STATE, "fingerprinting", None)
    proc = FingerprintLogitsProcessor(vllm_config, "cpu", False)

    def params(key):
        return SimpleNamespace(extra_args={"steer_fingerprint": key} if key else None)

    def step(rows: torch.Tensor):
        STATE.pending = rows
        proc.apply(torch.zeros(rows.shape[0], 10))

    out_a, out_b, out_c, out_p = [], [], [], []
    proc.update_state(SimpleNamespace(removed=[], moved=[], added=[(0, params("a"), [1, 2], out_a),
                                                                  (1, params("c"), [3], out_c),
                                                                  (2, params("b"), [4], out_b),
                                                                  (3, params(None), [5], out_p)]))
    step(torch.full((4, 4), 0.0))  # a: partial prefill (discarded), b, c: prefill done (kept)
    out_b.append(7)
    out_c.append(7)
    out_p.append(7)
    proc.update_state(None)
    step(torch.stack([torch.full((4,), 1.0), torch.full((4,), 9.0), torch.full((4,), 2.0), torch.zeros(4)]))
    out_a.append(5)
    out_b.append(8)
    out_c.append(8)
    # c finished: vLLM condenses by moving b into c's slot, reporting only the move (the slot is reused);
    # the plain request at 3 finished too and a new fingerprinted one takes its slot (only an add)
    out_d = []
    proc.update_state(SimpleNamespace(removed=[], added=[(3, params("d"), [6], out_d)],
                                      moved=[(2, 1, Dir.UNIDIRECTIONAL)]))
    assert read_record(tmp_path / "fp", "c")[0]["rows"] == 2  # published when its slot was reused
    step(torch.stack([torch.full((4,), 3.0), torch.full((4,), 4.0), torch.zeros(4), torch.full((4,), 6.0)]))
    out_a.append(6)  # a kept; b is aborted: its token is discarded
    out_d.append(1)
    proc.update_state(SimpleNamespace(removed=[0, 1, 3], added=[], moved=[]))
    assert np.frombuffer(read_record(tmp_path / "fp", "d")[1], dtype=np.float16)[0] == 6.0
    meta_a, raw_a = read_record(tmp_path / "fp", "a")
    meta_b, raw_b = read_record(tmp_path / "fp", "b")
    vals_a = np.frombuffer(raw_a, dtype=np.float16).reshape(-1, 4)[:, 0].tolist()
    vals_b = np.frombuffer(raw_b, dtype=np.float16).reshape(-1, 4)[:, 0].tolist()
    assert vals_a == [1.0, 3.0] and meta_a["prompt_ids"] == [1, 2]
    assert vals_b == [0.0, 2.0, 4.0] and meta_b["prompt_ids"] == [4]  # aborted after its third row
    # a request's last row (max_tokens reached) publishes the record at once, without waiting for a
    # later engine step (an in-process engine may never run one)
    out_e = []
    proc.update_state(SimpleNamespace(removed=[], moved=[], added=[(0, SimpleNamespace(
        extra_args={"steer_fingerprint": "e"}, max_tokens=2), [1], out_e)]))
    step(torch.full((1, 4), 1.5))
    out_e.append(3)
    step(torch.full((1, 4), 2.5))
    assert np.frombuffer(read_record(tmp_path / "fp", "e")[1], dtype=np.float16)[::4].tolist() == [1.5, 2.5]
    proc.update_state(SimpleNamespace(removed=[0], added=[], moved=[]))
    assert not list((tmp_path / "fp").glob("*.part"))
    # a reused key and an engine without difr: filed/refused, never raised inside the engine
    proc.update_state(SimpleNamespace(removed=[], moved=[], added=[(0, params("a"), [1], [])]))
    step(torch.zeros(1, 4))
    proc.update_state(SimpleNamespace(removed=[0], added=[], moved=[]))
    assert read_record(tmp_path / "fp", "a")[1] == raw_a
    monkeypatch.setattr(STATE, "difr_meta", None)
    proc.update_state(SimpleNamespace(removed=[], moved=[], added=[(0, params("z"), [1], [])]))
    step(torch.zeros(1, 4))
    with pytest.raises(RecordError, match="no difr projection"):
        read_record(tmp_path / "fp", "z")
