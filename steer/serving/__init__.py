"""Serving: apply a steer intervention config inside a real inference engine.

`steer.serving.vllm_plugin` is a vLLM general plugin (entry point `vllm.general_plugins`, installed
with steer): give vLLM a config with `hf_overrides={"steer_config": path}` (or env STEER_CONFIG)
and it switches experts exactly as steer's HF path does, and can record DiFR fingerprints of every
generated token for `steer verify`. Fingerprint files are written per request by the engine and
assembled here, on the client, with the token ids the response carried: read from the engine's
directory (`served_fingerprints`), or over HTTP from the OpenAI-compatible server itself
(`vllm serve ... --middleware steer.serving.fingerprint_route`, then `fetch_fingerprints` with the
ticket the server issued in the response headers). Records are written by `steer.serving.records`;
the threat model is in docs/serving-security.md.
"""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from steer.serving.records import (
    RecordError,
    check_key,
    new_key,
    read_record,
    record_paths,
    server_secret,
    token_for,
)

FINGERPRINT_KEY = "steer_fingerprint"  # SamplingParams.extra_args key naming a request's fingerprint record
FINGERPRINT_ROUTE = "/steer/fingerprints/"  # GET <server>/steer/fingerprints/KEY (fingerprint_route)
ENV_FINGERPRINT_DIR = "STEER_FINGERPRINT_DIR"
KEY_HEADER = "x-steer-fingerprint-key"  # response headers of a fingerprinted request (the ticket)
TOKEN_HEADER = "x-steer-fingerprint-token"  # ... and the request header that reads its record

__all__ = ["FINGERPRINT_KEY", "FINGERPRINT_ROUTE", "ENV_FINGERPRINT_DIR", "FingerprintTicket", "RecordError",
           "served_fingerprints", "fetch_fingerprints", "fingerprint_route", "FingerprintRoute"]


def fingerprint_paths(directory: str | Path, key: str) -> tuple[Path, Path]:
    """(metadata .json, fp16 rows .f16) of a finished record (ValueError for an unsafe key)."""
    paths = record_paths(directory, key)
    return paths.meta, paths.rows


def served_fingerprints(directory: str | Path, key: str, prompt_ids: list[int], output_ids: list[int], *,
                        model_id: str | None = None):
    """The steer.difr.Fingerprints of one served request (what `steer verify` checks).

    The engine wrote one fp16 row per generated token; the client supplies the prompt and output
    ids it sent and received, so a mismatch in counts (a dropped or extra step) is an error. The
    claim names the model as the engine saw it (its model_type) unless `model_id` is given (use the
    name `steer verify --model` will load), and the served config by its digest.
    """
    try:
        meta, raw = read_record(directory, key)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc}. Was the engine started with the steer plugin, a config with a difr section "
                                f"and {ENV_FINGERPRINT_DIR}={directory}?") from None
    return _claim(meta, raw, key, prompt_ids, output_ids, model_id, where=f"{directory}/{key}.f16")


@dataclass(frozen=True)
class FingerprintTicket:
    """What the server hands the client of a fingerprinted request: the record's key and the token
    that reads it (only this client received it). From the response headers: `from_headers`."""

    key: str
    token: str

    @classmethod
    def from_headers(cls, headers) -> FingerprintTicket:
        """`headers`: any mapping with .get (http.client, urllib, httpx, requests), case-insensitive names."""
        key = headers.get(KEY_HEADER) or headers.get(KEY_HEADER.title())
        token = headers.get(TOKEN_HEADER) or headers.get(TOKEN_HEADER.title())
        if not key or not token:
            raise ValueError(f"the response carries no {KEY_HEADER}/{TOKEN_HEADER} headers: send the request with "
                             f"vllm_xargs={{\"{FINGERPRINT_KEY}\": true}} to a server started with "
                             f"--middleware steer.serving.fingerprint_route")
        return cls(check_key(key), token)


def fetch_fingerprints(base_url: str, ticket: FingerprintTicket, prompt_ids: list[int], output_ids: list[int], *,
                       api_key: str | None = None, model_id: str | None = None, timeout: float = 30.0,
                       wait: float = 10.0):
    """`served_fingerprints` over HTTP: the claim of the request `ticket` was issued for, from a vLLM
    OpenAI-compatible server started with `--middleware steer.serving.fingerprint_route` (same checks
    on counts and prompt). `api_key`: the server's --api-key, if it has one. A record is published when
    its request leaves the engine's batch, which can be a step after the response ended (a stop token):
    a 409 "still being generated" is retried for up to `wait` seconds."""
    import urllib.error
    import urllib.request

    if not isinstance(ticket, FingerprintTicket):
        raise TypeError(f"fetch_fingerprints takes the FingerprintTicket the server issued (FingerprintTicket."
                        f"from_headers(response.headers)), not {type(ticket).__name__}: keys are server-issued")
    url = base_url.rstrip("/") + FINGERPRINT_ROUTE + ticket.key
    headers = {TOKEN_HEADER: ticket.token}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    deadline = time.monotonic() + wait
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
                doc = json.loads(resp.read())
            break
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            if exc.code == 409 and time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            cls = FileNotFoundError if exc.code in (404, 409) else (RecordError if exc.code == 410 else PermissionError)
            raise cls(f"{url}: HTTP {exc.code}: {detail}") from None
    return _claim(doc["meta"], base64.b64decode(doc["rows"]), ticket.key, prompt_ids, output_ids, model_id, where=url)


def _claim(meta: dict, raw_bytes: bytes, key: str, prompt_ids: list[int], output_ids: list[int],
           model_id: str | None, where: str):
    from steer.difr import DiFRConfig, Fingerprints

    k = int(meta["k"])
    raw = np.frombuffer(raw_bytes, dtype=np.float16)
    if raw.size % k:
        raise ValueError(f"{where} holds {raw.size} values, not a multiple of k={k}: the file is truncated")
    values = torch.from_numpy(raw.copy()).view(-1, k)
    if values.shape[0] != len(output_ids):
        raise ValueError(f"the engine fingerprinted {values.shape[0]} steps but the response has {len(output_ids)} "
                         f"output tokens; fingerprints and tokens must come from the same request")
    if list(meta["prompt_ids"]) != list(prompt_ids):
        raise ValueError(f"request {key!r}: the prompt ids the engine saw differ from the ones given here")
    return Fingerprints(
        values=values, prompt_ids=torch.tensor(prompt_ids, dtype=torch.int64),
        prompt_lengths=torch.tensor([len(prompt_ids)], dtype=torch.int64),
        output_ids=torch.tensor(output_ids, dtype=torch.int64),
        output_lengths=torch.tensor([len(output_ids)], dtype=torch.int64),
        model_id=model_id or meta["model_id"], identity=_identity(meta),
        config=DiFRConfig(k=k, seed=int(meta["seed"]), projection=meta["projection"]), dtype=meta["dtype"],
        intervention=meta.get("intervention") or None,
    )


def _identity(meta: dict) -> dict:
    """The claimed identity of a record (records of servers before steer.identity named a config hash)."""
    from steer.identity import LEGACY_DIFR

    if "identity" in meta:
        return meta["identity"]
    return {"scheme": LEGACY_DIFR, "config_hash": meta["config_hash"]}


# ---------------------------------------------------------------------------------------------
# The HTTP side, in the API server process: issue keys at admission, serve records to their owners

ISSUED: dict[str, float] = {}  # keys issued by the middleware in this process, not yet admitted -> time
ISSUE_TTL_S = 600.0
_ROUTE_ACTIVE = False  # set when FingerprintRoute is installed: then only issued keys are admitted


def route_active() -> bool:
    return _ROUTE_ACTIVE


def claim_issued(key: str) -> bool:
    """Admission of an issued key (once): True if this process issued `key` and it is unused."""
    now = time.monotonic()
    for k in [k for k, t in ISSUED.items() if now - t > ISSUE_TTL_S]:
        ISSUED.pop(k, None)
    return ISSUED.pop(key, None) is not None


def _json(status: int, doc: dict):
    from starlette.responses import JSONResponse

    return JSONResponse(doc, status_code=status)


def _find_key(obj, name: str) -> bool:
    if isinstance(obj, dict):
        return name in obj or any(_find_key(v, name) for v in obj.values())
    if isinstance(obj, list):
        return any(_find_key(v, name) for v in obj)
    return False


class FingerprintRoute:
    """ASGI middleware for vLLM's OpenAI-compatible server (`--middleware steer.serving.fingerprint_route`).

    - A request with `"vllm_xargs": {"steer_fingerprint": true}` is checked at admission (a server that
      records fingerprints, one prompt, n=1, no prompt logprobs: else HTTP 400 naming the problem), given a
      fresh server-issued key in place of `true`, and answered with headers `X-Steer-Fingerprint-Key` and
      `X-Steer-Fingerprint-Token` (HMAC of the key under the server's secret).
    - `GET /steer/fingerprints/KEY` with header `X-Steer-Fingerprint-Token` (and `Authorization: Bearer`
      when the server has --api-key) returns that record; anyone else gets 401/403.
    Other requests pass through untouched.
    """

    max_body = 64 << 20

    def __init__(self, app):
        global _ROUTE_ACTIVE
        self.app = app
        self._difr: bool | None = None
        _ROUTE_ACTIVE = True

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if path.startswith(FINGERPRINT_ROUTE):
            return await self._serve_record(scope, receive, send, path[len(FINGERPRINT_ROUTE):])
        if scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        return await self._admit(scope, receive, send)

    # -- reading records
    def _api_keys(self, scope) -> list[str]:
        args = getattr(getattr(scope.get("app"), "state", None), "args", None)
        keys = getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY")]
        return [k for k in ([keys] if isinstance(keys, str) else keys) if k]

    def _headers(self, scope) -> dict[str, str]:
        return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}

    async def _serve_record(self, scope, receive, send, key):
        resp = self._record_response(scope, key)
        await resp(scope, receive, send)

    def _record_response(self, scope, key):
        import hmac

        if scope.get("method") != "GET":
            return _json(405, {"error": f"{FINGERPRINT_ROUTE}KEY: only GET is supported"})
        headers = self._headers(scope)
        api_keys = self._api_keys(scope)
        if api_keys:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not any(hmac.compare_digest(given.encode(), k.encode()) for k in api_keys):
                return _json(401, {"error": "Unauthorized: this server has an API key; send Authorization: Bearer KEY"})
        directory = os.environ.get(ENV_FINGERPRINT_DIR)
        if not directory:
            return _json(503, {"error": f"the server was started without {ENV_FINGERPRINT_DIR}: no fingerprints "
                                        f"are recorded"})
        try:
            check_key(key)
        except ValueError as exc:
            return _json(400, {"error": str(exc)})
        token = headers.get(TOKEN_HEADER, "")
        if not token or not hmac.compare_digest(token.encode(), token_for(server_secret(directory), key).encode()):
            return _json(403, {"error": f"send the {TOKEN_HEADER} header the server returned with this key: a record "
                                        f"is readable only by the client whose request made it"})
        try:
            meta, raw = read_record(directory, key)
        except FileNotFoundError as exc:
            return _json(409 if "still being generated" in str(exc) else 404, {"error": str(exc)})
        except RecordError as exc:
            return _json(410, {"error": str(exc)})
        return _json(200, {"meta": meta, "rows": base64.b64encode(raw).decode("ascii")})

    # -- admission
    def _records_fingerprints(self, scope) -> str | None:
        """Why this server cannot record fingerprints (None if it can)."""
        if not os.environ.get(ENV_FINGERPRINT_DIR):
            return f"the server was started without {ENV_FINGERPRINT_DIR}: it records no fingerprints"
        if self._difr is None:
            vllm_config = getattr(getattr(scope.get("app"), "state", None), "vllm_config", None)
            if vllm_config is None:
                return None  # not known here; the engine checks again (and never crashes on it)
            from steer.serving.vllm_plugin import served_difr

            self._difr = served_difr(vllm_config)
        if not self._difr:
            return ("the server's steer config has no difr section (or the server has no steer config): it records "
                    "no fingerprints; send the request without vllm_xargs.steer_fingerprint")
        if not any(p.endswith("FingerprintLogitsProcessor") for p in _logits_processors(scope)):
            return ("the server was started without --logits-processors steer.serving.vllm_plugin:"
                    "FingerprintLogitsProcessor: it records no fingerprints")
        return None

    async def _admit(self, scope, receive, send):
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:  # not ours to judge: hand the stream on as it came
                return await self.app(scope, _replay([*chunks, chunk], receive, more=message.get("more_body")), send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if FINGERPRINT_KEY.encode() not in body:
            return await self.app(scope, _replay([body], receive), send)
        try:
            doc = json.loads(body)
        except ValueError:
            return await _json(400, {"error": f"the request mentions {FINGERPRINT_KEY} but is not valid JSON"})(
                scope, receive, send)
        xargs = doc.get("vllm_xargs") if isinstance(doc, dict) else None
        if not (isinstance(xargs, dict) and FINGERPRINT_KEY in xargs):
            if _find_key(doc, FINGERPRINT_KEY):
                return await _json(400, {"error": f"{FINGERPRINT_KEY} is accepted only as vllm_xargs.{FINGERPRINT_KEY}"
                                                  f" = true on /v1/completions and /v1/chat/completions"})(
                    scope, receive, send)
            return await self.app(scope, _replay([body], receive), send)
        problem = self._request_problem(scope, doc, xargs[FINGERPRINT_KEY])
        if problem:
            return await _json(400, {"error": {"message": f"vllm_xargs.{FINGERPRINT_KEY}: {problem}",
                                               "type": "BadRequestError", "param": f"vllm_xargs.{FINGERPRINT_KEY}",
                                               "code": 400}})(scope, receive, send)
        key = new_key()
        token = token_for(server_secret(os.environ[ENV_FINGERPRINT_DIR]), key)
        doc["vllm_xargs"] = {**xargs, FINGERPRINT_KEY: key}
        ISSUED[key] = time.monotonic()
        body = json.dumps(doc).encode()
        scope = dict(scope)
        scope["headers"] = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"] + [
            (b"content-length", str(len(body)).encode())]

        async def send_with_ticket(message):
            if message["type"] == "http.response.start" and message.get("status", 500) < 400:
                message = {**message, "headers": [*message.get("headers", []), (KEY_HEADER.encode(), key.encode()),
                                                  (TOKEN_HEADER.encode(), token.encode())]}
            await send(message)

        try:
            await self.app(scope, _replay([body], receive), send_with_ticket)
        finally:
            ISSUED.pop(key, None)  # admitted (claimed) or rejected: either way the key is spent

    def _request_problem(self, scope, doc: dict, value) -> str | None:
        if value is not True:
            return (f"keys are issued by the server; send true (got {value!r}) and read the key and token from the "
                    f"{KEY_HEADER} / {TOKEN_HEADER} response headers")
        why = self._records_fingerprints(scope)
        if why:
            return why
        prompt = doc.get("prompt")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) and len(prompt) > 1:
            return f"one prompt per fingerprinted request (got {len(prompt)}): send them as separate requests"
        for name in ("n", "best_of"):
            if doc.get(name) not in (None, 1):
                return f"{name}={doc[name]!r}: a fingerprinted request generates one sequence (n=1)"
        if doc.get("prompt_logprobs") not in (None, 0, False) or doc.get("echo"):
            return "prompt logprobs / echo cannot be fingerprinted (the engine scores extra rows)"
        return None


fingerprint_route = FingerprintRoute  # the name `--middleware steer.serving.fingerprint_route` loads


def _logits_processors(scope) -> list[str]:
    state = getattr(scope.get("app"), "state", None)
    vllm_config = getattr(state, "vllm_config", None)
    procs = getattr(getattr(vllm_config, "model_config", None), "logits_processors", None) or []
    return [p if isinstance(p, str) else f"{p.__module__}:{p.__qualname__}" for p in procs]


def _replay(chunks: list[bytes], receive, more: bool = False):
    """An ASGI receive that yields `chunks` as the body, then defers to the real `receive`."""
    pending = list(chunks)

    async def replay():
        if pending:
            chunk = pending.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending) or more}
        return await receive()

    return replay
