"""steer.io: every result type round-trips through one file convention (kind, version, identity,
checksum); wrong kinds, newer versions, unknown identity schemes and other models are errors that
say so; files written before steer.io still load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from steer import io
from steer.act import ACTConfig
from steer.config import identity_problems
from steer.difr import DiFRConfig, Fingerprints, SamplingParams, calibrate, fingerprint_prompts
from steer.ftri import Profile, ProfileConfig, profile
from steer.identity import (
    LEGACY_DIFR,
    SCHEME,
    IdentitySchemeError,
    ModelMismatchError,
    check_model,
    config_hash,
    differences,
    model_identity,
)
from steer.probes.data import LabelledCues
from steer.probes.probe import LynxProbe, ProbeConfig, ProbeInfo, train_probe
from steer.sinks import SinkResult, detect_sinks
from steer.tiny import tiny_model, tiny_tokenizer

PROMPTS = ["alpha beta gamma delta", "one two three", "the cat sat on the mat today"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def moe():
    return tiny_model("qwen2_moe")


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def results(moe, llama, tok):
    """One of every result type, each computed on a tiny model (kind name -> (result, its model))."""
    prof = profile(moe, tok, {"a": PROMPTS[:2], "b": PROMPTS[2:]}, ProfileConfig(n_bootstrap=0), progress=False)
    sinks = detect_sinks(llama, tok, PROMPTS)
    act = ACTConfig([(0, 1)], model="tiny-llama", identity=model_identity(llama), search={"procedure": "paper"})
    g = torch.Generator().manual_seed(0)
    cues = LabelledCues(torch.randn(12, 8, generator=g), torch.arange(12) % 2, torch.arange(12) // 3,
                        torch.arange(12), {"model": "tiny-llama", "n_layers": 2, "points": ["final_norm.out"]},
                        model_identity(llama))
    info = ProbeInfo("tiny-llama", llama.config.num_hidden_layers, llama.config.hidden_size, ["final_norm.out"])
    probe = train_probe(cues.features, cues.labels, ProbeConfig(max_epochs=2), info)
    probe.identity = model_identity(llama)
    fp = fingerprint_prompts(llama, tok, PROMPTS, batch_size=4, chat=False, max_new_tokens=6,
                             config=DiFRConfig(k=4), sampling=SamplingParams(temperature=1.0, top_p=0.9))
    cal = calibrate(llama, [fp], target_fpr=0.1)
    return {"steer.ftri.Profile": (prof, moe), "steer.sinks.SinkResult": (sinks, llama),
            "steer.act.ACTConfig": (act, llama), "steer.lynx_cues": (cues, llama), "steer.lynx_probe": (probe, llama),
            "steer.difr.fingerprints": (fp, llama), "steer.difr.calibration": (cal, llama)}


def _save(result, d):
    """Each result's own writer; returns what steer.io.load opens."""
    if isinstance(result, Profile):
        return result.save(d / "profile")[0]
    if isinstance(result, LynxProbe):
        return result.save(d / "probe")
    name = "act.json" if isinstance(result, ACTConfig) else "result.safetensors"
    result.save(d / name)
    return d / name


def _same(a, b) -> bool:
    if isinstance(a, LynxProbe):
        sa, sb = a.state_dict(), b.state_dict()
        same_info = json.dumps(vars(a.info)) == json.dumps(vars(b.info))  # NaN losses compare as text
        return a.identity == b.identity and same_info and all(torch.equal(sa[k], sb[k]) for k in sa)
    for k, v in vars(a).items():
        w = getattr(b, k)
        if isinstance(v, torch.Tensor):
            if not torch.equal(torch.nan_to_num(v, nan=-7.0), torch.nan_to_num(w, nan=-7.0)):
                return False
        elif isinstance(v, dict) and v and isinstance(next(iter(v.values())), torch.Tensor):
            if v.keys() != w.keys() or not all(torch.equal(v[i], w[i]) for i in v):
                return False
        elif k not in ("_cache", "hidden") and v != w:
            return False
    return True


def test_every_result_type_round_trips_with_its_kind_version_and_identity(results, tmp_path):
    # every result kind steer.io knows has a result here; the intervention config (its identity is config.json's
    # `model`) round-trips in tests/test_config.py (test_config_tensors_are_checksummed)
    assert set(results) == set(io.FORMATS) - {io.INTERVENTION_CONFIG.name}
    for name, (result, model) in results.items():
        path = _save(result, tmp_path / name.replace(".", "_"))
        back = io.load(path)
        assert type(back) is type(result) and _same(result, back), name
        ident = getattr(back, "identity", None) or getattr(back, "model", None)
        assert ident == model_identity(model, any_family=True) and ident["scheme"] == SCHEME, name
        fmt = io.FORMATS[name]
        if path.suffix == ".json" or path.is_dir():
            doc = json.loads((path / "probe.json" if path.is_dir() else path).read_text())
            assert (doc["format"], doc["version"], doc["identity"]) == (name, fmt.version, ident)
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
            assert (meta["format"], meta["version"], json.loads(meta["identity"])) == (name, str(fmt.version), ident)


def test_a_file_of_another_kind_is_an_error_naming_what_it_is(results, tmp_path):
    prof_path = _save(results["steer.ftri.Profile"][0], tmp_path)
    sink_path = _save(results["steer.sinks.SinkResult"][0], tmp_path)
    with pytest.raises(io.FormatError, match=r"not a sink result file: it is an expert profile file \(open it with "
                                             r"steer.ftri.Profile.load\)"):
        SinkResult.load(prof_path)
    with pytest.raises(io.FormatError, match="not a fingerprint file: it is a sink result"):
        Fingerprints.load(sink_path)
    with pytest.raises(io.FormatError, match="not an expert profile file"):
        Profile.load(sink_path)
    act = tmp_path / "act.json"
    results["steer.act.ACTConfig"][0].save(act)
    doc = json.loads(act.read_text())
    act.write_text(json.dumps(doc | {"format": "steer.lynx_probe"}))
    with pytest.raises(io.FormatError, match="not an ACT config file: it is a LYNX probe"):
        ACTConfig.load(act)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))  # untagged, not an old sink file either
    with pytest.raises(io.FormatError, match="no steer format tag"):
        Profile.load(tmp_path / "plain.safetensors")
    with pytest.raises(io.FormatError, match="not a sink result"):
        SinkResult.load(tmp_path / "plain.safetensors")


def test_newer_versions_and_corrupt_files_are_errors(results, tmp_path):
    path = _save(results["steer.sinks.SinkResult"][0], tmp_path)
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "v9.safetensors"), metadata=meta | {"version": "9"})
    with pytest.raises(io.NewerFormatError, match="version 9, written by a newer steer; this steer reads "
                                                  "steer.sinks.SinkResult up to version 2: upgrade steer"):
        SinkResult.load(tmp_path / "v9.safetensors")
    tensors["scores"] = tensors["scores"] + 1
    save_file(tensors, str(tmp_path / "altered.safetensors"), metadata=meta)
    with pytest.raises(io.FormatError, match="checksum does not match"):
        SinkResult.load(tmp_path / "altered.safetensors")
    act = tmp_path / "act.json"
    results["steer.act.ACTConfig"][0].save(act)
    act.write_text(json.dumps(json.loads(act.read_text()) | {"version": 3}))
    with pytest.raises(io.NewerFormatError, match="newer steer"):
        ACTConfig.load(act)
    (tmp_path / "broken.safetensors").write_bytes(path.read_bytes()[:-20])
    with pytest.raises(io.FormatError, match="truncated or corrupt"):
        io.load(tmp_path / "broken.safetensors")
    with pytest.raises(FileNotFoundError, match="create one with `steer sinks"):
        SinkResult.load(tmp_path / "missing.safetensors")


def test_results_detect_another_model(results, moe, llama):
    """Same family and shape, other weights; another family: each result's check names the field."""
    other_llama = tiny_model("llama", seed=1)
    prof = results["steer.ftri.Profile"][0]
    prof.check_model(moe)
    with pytest.raises(ModelMismatchError, match="params_hash"):
        prof.check_model(tiny_model("qwen2_moe", seed=1))
    sinks, act = results["steer.sinks.SinkResult"][0], results["steer.act.ACTConfig"][0]
    sinks.check_model(llama)
    act.check_model(llama)
    with pytest.raises(ModelMismatchError, match="this sink result was computed on a different model .*params_hash"):
        sinks.check_model(other_llama)
    with pytest.raises(ModelMismatchError, match="this ACT config .*family: saved 'llama', model 'qwen2_moe'"):
        act.check_model(moe)
    with pytest.raises(ModelMismatchError, match="this ACT config .*params_hash"):  # applying checks it too
        with act.intervention().apply(other_llama):
            pass
    probe = results["steer.lynx_probe"][0]
    bigger = tiny_model("llama", num_hidden_layers=llama.config.num_hidden_layers, rms_norm_eps=1e-3)
    with pytest.raises(ModelMismatchError, match="this probe .*config_hash"):
        probe.check_compatible(bigger)


def test_identity_schemes_are_explicit():
    """An identity names how its config hash was computed; comparing across schemes, or reading an
    unknown (newer) scheme, is an error, never a config_hash 'difference'."""
    llama = tiny_model("llama")
    ident = model_identity(llama)
    legacy = model_identity(llama, scheme=LEGACY_DIFR)
    assert legacy == {"scheme": LEGACY_DIFR, "config_hash": config_hash(llama.config, LEGACY_DIFR)}
    old = {k: v for k, v in ident.items() if k != "scheme"}  # saved before identities named a scheme
    assert differences(old, ident) == [] and check_model(old, llama) is None
    with pytest.raises(IdentitySchemeError, match="compute the model's identity in the saved scheme"):
        differences(legacy, ident)
    check_model(legacy, llama)  # computed in the saved scheme: the same model passes
    newer = ident | {"scheme": "steer.identity/7"}
    with pytest.raises(IdentitySchemeError, match="written by a newer steer; upgrade steer"):
        check_model(newer, llama)
    assert identity_problems(newer, ident)[0].startswith("model.scheme: the saved model identity uses scheme")
    moe = tiny_model("qwen2_moe")
    fields = [p.split(":")[0] for p in identity_problems(ident, model_identity(moe))]
    assert {"model.family", "model.config_hash", "model.params_hash"} <= set(fields)


def test_files_written_before_steer_io_still_load(results, tmp_path):
    """The layouts of the previous writers (profile v1, untagged sinks and ACT configs, LYNX v1) read as version 1."""
    prof, _ = results["steer.ftri.Profile"]
    meta = prof.metadata() | {"format": "steer.ftri.Profile", "version": 1}
    tensors = {"scores": prof.scores.float().contiguous(), **{f"sums.{k}": v for k, v in prof.sums.items()}}
    save_file(tensors, str(tmp_path / "p1.safetensors"), metadata={"steer": json.dumps(meta, default=str)})
    back = Profile.load(tmp_path / "p1.safetensors")
    assert back.model == prof.model and torch.equal(back.scores, prof.scores)

    sinks, _ = results["steer.sinks.SinkResult"]
    params = {"tau": sinks.tau, "alpha": sinks.alpha, "eps": sinks.eps, "min_queries": sinks.min_queries,
              "model": sinks.model, "path": sinks.path}
    tensors = {"scores": sinks.scores, "n_obs": sinks.n_obs, "lengths": sinks.lengths,
               **{f"map.{k}": v for k, v in sinks.maps.items()}}
    save_file(tensors, str(tmp_path / "s0.safetensors"),
              metadata={"tokens": json.dumps(sinks.tokens), "params": json.dumps(params)})
    old = io.load(tmp_path / "s0.safetensors")
    assert isinstance(old, SinkResult) and old.identity is None and old.tokens == sinks.tokens
    assert torch.equal(old.n_obs, sinks.n_obs)

    act, _ = results["steer.act.ACTConfig"]
    (tmp_path / "act0.json").write_text(json.dumps({"method": "act", "heads": [[0, 1]], "beta": act.beta,
                                                     "model": "tiny-llama"}))
    assert io.load(tmp_path / "act0.json").heads == [(0, 1)]

    cues, _ = results["steer.lynx_cues"]
    tensors = {"features": cues.features, "labels": cues.labels, "trajectory": cues.trajectory,
               "cue_token": cues.cue_token}
    save_file(tensors, str(tmp_path / "c1.safetensors"),
              metadata={"steer": json.dumps(cues.meta), "format": "steer.lynx_cues/1"})
    c1 = LabelledCues.load(tmp_path / "c1.safetensors")
    assert c1.meta == cues.meta and c1.identity is None and torch.equal(c1.features, cues.features)

    probe, _ = results["steer.lynx_probe"]
    d = tmp_path / "probe1"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in probe.state_dict().items()}, str(d / "probe.safetensors"))
    (d / "probe.json").write_text(json.dumps({"format": "steer.lynx_probe/1", "n_features": probe.n_features,
                                              "hidden": [lin.out_features for lin in probe.linears[:-1]],
                                              "info": vars(probe.info), "calibration": None}))
    p1 = io.load(d)
    assert p1.identity is None and torch.equal(p1.mean, probe.mean)


def test_served_records_of_older_servers_name_the_legacy_scheme():
    from steer.serving import _identity

    assert _identity({"config_hash": "abc"}) == {"scheme": LEGACY_DIFR, "config_hash": "abc"}
    assert _identity({"identity": {"scheme": SCHEME, "config_hash": "x"}})["scheme"] == SCHEME
