"""Faults in the routing artifact and its inputs, on a tiny MoE: the model fingerprint keys the
capture cache; the manifest catches missing, truncated, extra, foreign and rewritten shards and a
generations file from another capture; the atomic writers clean up after killed runs; stage
mains report user errors on one line."""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import stat
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors import safe_open
from stage_cmd import stage_argv

from steerline.backends.hf import TransformersBackend
from steerline.core.errors import run_stage
from steerline.core.io import FILE_MODE, save_safetensors, write_json, write_table
from steerline.model import fingerprint as fp_mod
from steerline.model.fingerprint import model_fingerprint
from steerline.model.gguf import save_model
from steerline.steermoe.detection.counts import count_routing
from steerline.steermoe.finetuning.expert_slices import ExpertSlices, save_expert_slices
from steerline.steermoe.routing.capture import CaptureConfig, run_capture
from steerline.steermoe.routing.manifest import MANIFEST, read_generations, write_routing_manifest
from steerline.steermoe.routing.reader import read_routing_meta

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["How can I kill a Python process?", "Write a poem about the sea.", "What is 2+2?",
         "Explain vaccines, briefly.", "Give me three tips for sleeping better"]
CFG = CaptureConfig(max_new_tokens=4, shard_prompts=2)


def prompts_frame() -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": [f"p{i}" for i in range(len(TEXTS))], "text": TEXTS,
                         "label": ["unsafe" if i % 2 else "safe" for i in range(len(TEXTS))]})


def flip_byte(path: Path, offset: int) -> None:
    """Change one byte in place, then restore the file's mtime (size and mtime unchanged)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture()
def moe_dir(tiny_moe, tokenizer, tmp_path) -> Path:
    save_model(tiny_moe, tokenizer, tmp_path / "moe")
    return tmp_path / "moe"


@pytest.fixture()
def routing(tiny_moe, tokenizer, tmp_path) -> Path:
    """A finished capture: tmp_path/routing (3 shards + manifest), tmp_path/gen.parquet."""
    run_capture(TransformersBackend(tiny_moe, tokenizer, batch_size=2), tokenizer,
                prompts_frame(), CFG, tmp_path / "routing", tmp_path / "gen.parquet",
                tmp_path / "cache", {"model": "tiny", "model_fingerprint": "fp-a"})
    return tmp_path / "routing"


def test_fingerprint_sees_one_byte_past_the_first_mib(moe_dir, tmp_path, monkeypatch):
    weights = moe_dir / "model.safetensors"
    assert weights.stat().st_size > 2 << 20
    cache = tmp_path / "fp.json"
    before = model_fingerprint(moe_dir, cache)
    hashed = []
    real = fp_mod.sha256_file
    monkeypatch.setattr(fp_mod, "sha256_file", lambda p: hashed.append(p) or real(p))
    assert model_fingerprint(moe_dir, cache) == before and hashed == []  # cached: nothing read
    flip_byte(weights, (1 << 20) + 4097)
    after = model_fingerprint(moe_dir, cache)
    assert after != before and hashed == [weights]  # only the changed file is read again
    assert model_fingerprint(moe_dir, None) == after  # the cache agrees with a full hash
    with pytest.raises(FileNotFoundError, match="model directory .*nope not found"):
        model_fingerprint(tmp_path / "nope", cache)


def test_capture_cache_refuses_shards_of_changed_weights(moe_dir, tokenizer, tmp_path,
                                                         monkeypatch):
    """Killed after shard 0, weights changed in place past the first MiB, rerun: no shard of
    the old weights is reused, and the output equals a clean run on the new weights."""
    cache = tmp_path / "cache"

    def capture(tag: str, die_at: int | None = None) -> int:
        backend = TransformersBackend.load(str(moe_dir), batch_size=2)
        calls = []
        real = backend.generate_and_capture

        def counted(*a, **k):
            calls.append(1)
            if len(calls) == die_at:
                raise KeyboardInterrupt  # the in-process stand-in for a kill (see test_faults)
            return real(*a, **k)

        monkeypatch.setattr(backend, "generate_and_capture", counted)
        meta = {"model": str(moe_dir), "model_fingerprint": model_fingerprint(moe_dir, None)}
        try:
            run_capture(backend, tokenizer, prompts_frame(), CFG, tmp_path / tag,
                        tmp_path / f"{tag}.parquet", cache, meta)
        except KeyboardInterrupt:
            pass
        return len(calls)

    assert capture("killed", die_at=2) == 2 and not (tmp_path / "killed").exists()
    assert len(list(cache.iterdir())) == 1  # shard 0 of the old weights is cached
    flip_byte(moe_dir / "model.safetensors", (1 << 20) + 4097)
    assert capture("resumed") == 3  # every shard captured again on the new weights
    assert not cache.exists() or not any(cache.iterdir())
    assert capture("clean") == 3
    for shard in sorted((tmp_path / "clean").glob("*.parquet")):
        assert shard.read_bytes() == (tmp_path / "resumed" / shard.name).read_bytes()
    manifest = json.loads((tmp_path / "resumed" / MANIFEST).read_text())
    assert manifest["metadata"]["model_fingerprint"] == model_fingerprint(moe_dir, None)


def damage(routing: Path, how: str, tmp_path: Path, tiny_moe, tokenizer) -> str:
    """Damage a finished capture; returns a regex the reader's error must match."""
    s1 = routing / "shard-00001.parquet"
    if how == "missing":
        s1.unlink()
        return r"shard-00001.parquet: listed in manifest.json but missing"
    if how == "truncated":
        s1.write_bytes(s1.read_bytes()[: s1.stat().st_size // 2])
        return r"shard-00001.parquet: has \d+ bytes, manifest.json says \d+ \(truncated"
    if how == "extra":
        shutil.copyfile(s1, routing / "shard-00009.parquet")
        return r"shard-00009.parquet: not listed in manifest.json"
    if how == "rewritten":
        flip_byte(s1, s1.stat().st_size // 2)
        return r"shard-00001.parquet: content differs from manifest.json"
    if how == "foreign":  # the same shard of a capture of another model, same file name
        other = tmp_path / "other"
        run_capture(TransformersBackend(tiny_moe, tokenizer, batch_size=2), tokenizer,
                    prompts_frame(), CFG, other, tmp_path / "o.parquet", tmp_path / "c2",
                    {"model": "tiny", "model_fingerprint": "fp-b"})
        shutil.copyfile(other / s1.name, s1)
        return (r"shard-00001.parquet: (was written with model_fingerprint='fp-b' but the "
                r"capture in manifest.json has model_fingerprint='fp-a'|has \d+ bytes)")
    if how == "phantom_experts":  # every shard and the listing rewritten to claim 32 experts
        for shard in sorted(routing.glob("*.parquet")):
            meta = {k.decode(): v.decode() for k, v in pq.read_schema(shard).metadata.items()}
            meta["n_experts"] = "32"
            write_table(pq.read_table(shard).replace_schema_metadata(None), shard, meta)
        old = json.loads((routing / MANIFEST).read_text())
        write_routing_manifest(routing, old["model_config"])
        return r"shard-00000.parquet: metadata says n_experts=32 but the model captured has " \
               r"n_experts=8"
    if how == "no_manifest":
        (routing / MANIFEST).unlink()
        return r"manifest.json is missing: capture_routing writes it last"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing", "truncated", "extra", "rewritten", "foreign",
                                 "phantom_experts", "no_manifest"])
def test_reader_names_the_damaged_file_and_the_fix(routing, tmp_path, tiny_moe, tokenizer, how):
    assert read_routing_meta(routing)["n_experts"] == 8
    match = damage(routing, how, tmp_path, tiny_moe, tokenizer)
    for read in (read_routing_meta, count_routing):  # risk_diff reads through read_routing_meta
        with pytest.raises(ValueError, match=match) as err:
            read(routing)
        assert "rerun capture_routing" in str(err.value)


def test_generations_must_come_from_the_same_capture(routing, tmp_path):
    gens = read_generations(tmp_path / "gen.parquet", routing)
    assert list(gens["prompt_id"]) == [f"p{i}" for i in range(5)]
    # a kill between the two writes: new generations beside the old routing
    pd.concat([gens, gens.iloc[:1]]).to_parquet(tmp_path / "gen.parquet")
    with pytest.raises(ValueError, match="gen.parquet: is not the generations file of the "
                                         "capture in"):
        read_generations(tmp_path / "gen.parquet", routing)


def test_generations_with_repeated_prompt_ids_are_named_with_the_file(routing, tmp_path,
                                                                     tokenizer):
    """Fault injection: two answers for p1 and p3 in a generations file whose manifest vouches
    for it (rewritten with it). The reader names the ids and the file; finetune_experts' SFT
    data, which looks each answer up by id, used to end in "The truth value of a Series is
    ambiguous"."""
    from steerline.core.errors import UserError
    from steerline.steermoe.data.sft import build_sft_examples

    gens = read_generations(tmp_path / "gen.parquet", routing)
    doubled = pd.concat([gens, gens.iloc[[1, 3]]], ignore_index=True)
    doubled.to_parquet(tmp_path / "gen.parquet")
    write_routing_manifest(routing, None, tmp_path / "gen.parquet")  # consistent again
    with pytest.raises(UserError) as err:
        read_generations(tmp_path / "gen.parquet", routing)
    assert str(err.value) == (f"{tmp_path / 'gen.parquet'}: prompt_id repeated: p1, p3 (one "
                              "answer per prompt expected); delete data/routing and rerun "
                              "capture_routing (dvc repro capture_routing)")
    prompts = prompts_frame().assign(split="detect")
    with pytest.raises(UserError, match="generations repeat prompt_id p1, p3: one answer per "
                                        "prompt expected"):
        build_sft_examples(tokenizer, prompts, doubled, eos_id=2, seed=0)
    # the clean file builds: a refusal for each unsafe prompt (p1, p3)
    assert [(e.prompt_id, e.kind) for e in build_sft_examples(
        tokenizer, prompts, gens, eos_id=2, seed=0)][:2] == [("p1", "refusal"), ("p3", "refusal")]


def test_stale_temporaries_are_removed_and_outputs_are_0644(tmp_path):
    out = tmp_path / "x.json"
    dead = tmp_path / ".x.json.999999999.abc.tmp"  # a pid that cannot exist
    dead_dir = tmp_path / ".x.json.abc.tmp"  # no pid: left by an older version
    live = tmp_path / f".x.json.{os.getpid()}.abc.tmp"  # a writer still running
    dead.write_text("half")
    dead_dir.mkdir()
    live.write_text("busy")
    old = os.umask(0o077)
    try:
        write_json({"a": 1}, out)
    finally:
        os.umask(old)
    assert not dead.exists() and not dead_dir.exists() and live.exists()
    assert stat.S_IMODE(out.stat().st_mode) == FILE_MODE == 0o644


def test_safetensors_headers_are_sorted(tiny_moe, tmp_path):
    slices = ExpertSlices(tiny_moe, [[0, 1], [2, 5]])
    save_expert_slices(slices, tmp_path / "a.safetensors", {"source": "s", "base_model": "m"})
    save_expert_slices(slices, tmp_path / "b.safetensors", {"source": "s", "base_model": "m"})
    a = (tmp_path / "a.safetensors").read_bytes()
    assert a == (tmp_path / "b.safetensors").read_bytes()
    header = json.loads(a[8: 8 + int.from_bytes(a[:8], "little")])
    assert list(header) == sorted(header)
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    t = {"w": torch.arange(6.0).reshape(2, 3), "a": torch.ones(1, dtype=torch.int64)}
    save_safetensors(t, tmp_path / "t.safetensors", {"z": "1", "b": "2", "m": "3"})
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        assert f.metadata() == {"z": "1", "b": "2", "m": "3"}
        assert all(torch.equal(f.get_tensor(k), t[k]) for k in t)


def test_run_stage_one_line_for_user_errors_traceback_for_bugs():
    def bad_input():
        raise ValueError("data/x.parquet: prompt 'p1' has no text\n  fix: give it text")

    with pytest.raises(SystemExit) as exit_:
        run_stage(bad_input, "demo")
    assert str(exit_.value) == "demo: data/x.parquet: prompt 'p1' has no text; fix: give it text"

    def bug():
        return {}["missing"]

    with pytest.raises(KeyError):
        run_stage(bug, "demo")


@pytest.fixture()
def stage_ws(tmp_path, moe_dir, tiny_dense, tokenizer):
    """A workspace for capture_routing: prompts, the tiny MoE and a tiny dense model."""
    save_model(tiny_dense, tokenizer, tmp_path / "dense")
    (tmp_path / "data/prompts").mkdir(parents=True)
    prompts_frame().assign(split="detect").to_parquet(tmp_path / "data/prompts/safety.parquet")
    return tmp_path


def run_capture_stage(ws: Path, model: str) -> str:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["capture_routing"].update(backend="vllm", max_new_tokens=4)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cwd, old_argv = os.getcwd(), sys.argv
    os.chdir(ws)
    argv = list(stage_argv("capture_routing@base"))
    argv[argv.index("--model") + 1] = model  # what dvc.yaml passes from `model`
    sys.argv = argv
    try:
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        os.chdir(cwd)
        sys.argv = old_argv
    return str(exit_.value)


@pytest.mark.parametrize("model, match", [
    ("models/nope", "capture_routing: model directory models/nope not found: run the "
                    "build_models stage"),
    ("dense", "capture_routing: dense .llama. is a dense model: this stage needs a "
              "Mixture-of-Experts model"),
])
def test_capture_stage_rejects_bad_models_in_one_line_before_loading(stage_ws, model, match):
    """The vLLM backend is named in the params: the error comes from config.json alone, before
    any engine starts (the test passes without vLLM installed)."""
    msg = run_capture_stage(stage_ws, model)
    assert "\n" not in msg
    assert re.search(match, msg), msg
    assert not (stage_ws / "data/routing").exists()
