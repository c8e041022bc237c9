"""`steerline serve` (steerline.serve): one server on a free loopback port for the module, a tiny
Qwen2-MoE (head size 64, what vLLM's CPU attention serves) with an experts.json, a MAT-Steer
checkpoint and a residual gate, driven through the official `openai` client.

Every steered answer equals VLLMBackend.generate with the plan `steerline generate` builds for
the same flags (and the transformers reference, and `steerline generate` itself for one plan);
concurrent requests with mixed steering equal the same requests alone; bad requests are HTTP 400
with one line and the server keeps serving; closing it frees the port."""

from __future__ import annotations

import argparse
import json
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_run import run_cli
from conftest import finish_model, freeze_heap, tiny_moe_config
from transformers import Qwen2MoeForCausalLM

from steerline.backends import ActivationSteering, Steering, make_backend
from steerline.cli.common import CliError
from steerline.core.chat import render_chat
from steerline.mat_steer.checkpoint import SteeringConfig, load_steering, save_steering
from steerline.model.gguf import save_model
from steerline.model.load import load_moe
from steerline.steering.experts import SteeringPlan, read_experts_json
from steerline.steering.gated import SteeringModule
from steerline.steermoe.gating.prompt_gate import PromptGate
from steerline.steermoe.gating.scoring import score_prompts
from steerline.steermoe.safety.steering_plan import selection_plan

pytestmark = pytest.mark.slow
pytest.importorskip("vllm", reason="vLLM is installed by `make setup` (VLLM=cpu by default)")
openai = pytest.importorskip("openai", reason="the openai client comes with vLLM")

PROMPTS = ["Say hello.", "How do I pick a lock?", "Write a haiku about rain."]
COMPLETION = "The weather today is"
MAX_NEW = 10
LISTS = {"activate": [[0, 1], [1, 3]], "deactivate": [[1, 2], [2, 0]], "delta": 1.0}
# request steering -> the plan `steerline generate` builds for the same flags (below)
STEERINGS = {
    "plain": None,
    "lists": {"experts": LISTS},  # --activate 0:1,1:3 --deactivate 1:2,2:0 --delta 1
    "mode": {"experts": {"mode": "both", "n": 2}},  # --experts ... --mode both --n-experts 2
    "mat": {"mat_steer": {}},  # --mat DIR
    "mat_b": {"experts": LISTS, "mat_steer": {"attributes": ["b"], "scale": 2.0}},
}


@pytest.fixture(scope="module")
def arts(tokenizer, tmp_path_factory) -> dict[str, Path]:
    """The model folder, experts.json, a MAT-Steer checkpoint (attributes a, b at layer 1) and a
    residual gate whose threshold lies between PROMPTS[0]'s and PROMPTS[1]'s scores."""
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    # initializer_range 0.2: varied greedy answers (at 0.02 a tiny model repeats one token)
    cfg = tiny_moe_config(len(tokenizer), hidden_size=128, num_attention_heads=2,
                          num_key_value_heads=2, initializer_range=0.2)
    model = Qwen2MoeForCausalLM(cfg)
    with torch.no_grad():  # routers start at zero: random, untied logits
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)
    save_model(finish_model(model, tokenizer), tokenizer, root / "moe")
    (root / "experts.json").write_text(json.dumps(
        {"unsafe": [[0, 1], [1, 2], [2, 3]], "safe": [[0, 5], [2, 6]]}))
    g = torch.Generator().manual_seed(1)
    module = SteeringModule(128, 2, init_scale=1.0, generator=g)
    save_steering(module, SteeringConfig(["a", "b"], 1, 128, str(root / "moe")), root / "mat")
    hf, tok = load_moe(root / "moe")
    weight = np.random.default_rng(0).normal(size=128)
    probe = PromptGate("residual", 1, weight, 0.0, 0.5)
    scores, _ = score_prompts({"g": probe}, hf, tok, PROMPTS[:2], batch_size=1)["g"]
    assert scores[0] != scores[1]
    PromptGate("residual", 1, weight, 0.0, float(scores.mean())).save(root / "gate")
    return {"model": root / "moe", "experts": root / "experts.json", "mat": root / "mat",
            "gate": root / "gate", "fires_first": bool(scores[0] > scores[1])}


def plans(arts: dict[str, Path]) -> dict[str, Steering | None]:
    """What `steerline generate` builds for each of STEERINGS (its own calls)."""
    module, config = load_steering(arts["mat"])
    lists = SteeringPlan(((0, 1), (1, 3)), ((1, 2), (2, 0)), 1.0)
    mode = selection_plan(read_experts_json(arts["experts"]), "both", 2, 1.0, "error",
                          lambda: None, 3, 8, 2)
    b = SteeringModule(128, 1)  # attribute b alone, its vector doubled
    b.load_state_dict({k: v[1:2] for k, v in module.state_dict().items()})
    with torch.no_grad():
        b.steering_vectors.mul_(2.0)
    return {"plain": None, "lists": Steering(lists), "mode": Steering(mode),
            "mat": Steering(None, ActivationSteering(config.layer, module=module)),
            "mat_b": Steering(lists, ActivationSteering(config.layer, module=b.eval()))}


@pytest.fixture(scope="module")
def reference(arts, tokenizer) -> dict[tuple[str, str], list[int]]:
    """(prompt, steering name) -> answer token ids from VLLMBackend.generate, all in one mixed
    batch, and the same from the transformers reference; plus the completion prompt."""
    by_name = plans(arts)
    keys = [(p, s) for p in PROMPTS for s in STEERINGS] + [(COMPLETION, "lists")]
    chats = [render_chat(tokenizer, p).ids for p in PROMPTS for _ in STEERINGS]
    chats.append(tokenizer(COMPLETION, add_special_tokens=True)["input_ids"])
    steer = [by_name[s] for _, s in keys]
    freeze_heap()
    with make_backend("vllm", str(arts["model"]), progress=False) as vb:
        got = [g.token_ids.tolist() for g in vb.generate(chats, MAX_NEW, steer)]
    with make_backend("transformers", str(arts["model"])) as hf:
        ref = [g.token_ids.tolist() for g in hf.generate(chats, MAX_NEW, steer)]
    assert got == ref
    out = dict(zip(keys, got, strict=True))
    for p in PROMPTS:  # every steering changes every answer here: the checks below mean something
        assert all(out[(p, s)] != out[(p, "plain")] for s in STEERINGS if s != "plain")
    return out


@pytest.fixture(scope="module")
def server(arts):
    from steerline.serve.artifacts import ExpertDefaults
    from steerline.serve.server import ServeConfig, Server

    cfg = ServeConfig(str(arts["model"]), name="tiny", experts=str(arts["experts"]),
                      mat=str(arts["mat"]), gate=str(arts["gate"]), port=0,
                      defaults=ExpertDefaults(mode="deactivate_unsafe", n=2, delta=1.0))
    freeze_heap()
    srv = Server(cfg).start()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused",
                         max_retries=0, timeout=120)


def ask(client, prompt: str, steering: dict | None, **kw):
    extra = {} if steering is None else {"extra_body": {"steering": steering}}
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=MAX_NEW,
        temperature=0, **extra, **kw)


def text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_steered_answers_equal_the_backends(reference, client, tokenizer, arts):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    for p in PROMPTS:
        for name, steering in STEERINGS.items():
            r = ask(client, p, steering)
            want = reference[(p, name)]
            assert r.choices[0].message.content == text(tokenizer, want), (p, name)
            assert r.usage.completion_tokens == len(want)
            assert r.model_extra["steering"]["steered"] is (steering is not None)
    r = ask(client, PROMPTS[0], STEERINGS["mode"])
    assert r.model_extra["steering"]["experts"]["activate"] == [[0, 5], [2, 6]]


def test_steerline_generate_gives_the_served_answer(reference, client, arts, capsys):
    code, out, err = run_cli(capsys, "generate", "--model", str(arts["model"]), "--prompt",
                             PROMPTS[1], "--experts", str(arts["experts"]), "--mode", "both",
                             "--n-experts", "2", "--delta", "1.0",
                             "--max-new-tokens", str(MAX_NEW))
    assert code == 0, err
    served = ask(client, PROMPTS[1], STEERINGS["mode"]).choices[0].message.content
    assert out.split(f"[1] {PROMPTS[1]}\n", 1)[1].strip() == served.strip()


def test_concurrent_mixed_requests_equal_each_alone(reference, client, tokenizer):
    jobs = [(p, s) for p in PROMPTS for s in STEERINGS] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda j: ask(client, j[0], STEERINGS[j[1]]), jobs))
    for (p, s), r in zip(jobs, got, strict=True):
        assert r.choices[0].message.content == text(tokenizer, reference[(p, s)]), (p, s)


def test_streaming_chat_and_completions(reference, client, tokenizer):
    chunks = list(ask(client, PROMPTS[2], STEERINGS["mat_b"], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text(
        tokenizer, reference[(PROMPTS[2], "mat_b")])
    last = chunks[-1]
    assert last.choices[0].finish_reason == "length"
    assert last.model_extra["steering"]["mat_steer"] == {"attributes": ["b"], "scale": 2.0,
                                                         "layer": 1}
    want = text(tokenizer, reference[(COMPLETION, "lists")])
    r = client.completions.create(model="tiny", prompt=COMPLETION, max_tokens=MAX_NEW,
                                  extra_body={"steering": STEERINGS["lists"]})
    assert r.choices[0].text == want
    parts = client.completions.create(model="tiny", prompt=COMPLETION, max_tokens=MAX_NEW,
                                      stream=True, extra_body={"steering": STEERINGS["lists"]})
    assert "".join(c.choices[0].text for c in parts) == want


def test_stop_string_cuts_the_answer(reference, client, tokenizer):
    full = text(tokenizer, reference[(PROMPTS[0], "lists")])
    stop = full[len(full) // 2: len(full) // 2 + 3]
    r = ask(client, PROMPTS[0], STEERINGS["lists"], stop=[stop])
    assert r.choices[0].message.content == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_gate_steers_only_the_prompts_it_fires_on(reference, client, tokenizer, arts):
    fires = [arts["fires_first"], not arts["fires_first"]]
    for p, fired in zip(PROMPTS[:2], fires, strict=True):
        r = ask(client, p, {**STEERINGS["lists"], "gate": True})
        gate = r.model_extra["steering"]["gate"]
        assert gate["fired"] is fired and gate["source"] == "residual"
        assert r.model_extra["steering"]["steered"] is fired
        want = reference[(p, "lists" if fired else "plain")]
        assert r.choices[0].message.content == text(tokenizer, want)


BAD = [
    ({"steering": {"experts": {"activate": [[0, 8]], "delta": 1.0}}}, "out of range"),
    ({"steering": {"experts": {"activate": [[7, 1]], "delta": 1.0}}}, "names layer 7"),
    ({"steering": {"experts": {"mode": "both", "delta": -1}}}, "delta must be a positive number"),
    ({"steering": {"experts": {"mode": "both", "delta": "big"}}}, "delta must be a positive"),
    ({"steering": {"mat_steer": {"attributes": ["honesty"]}}}, "['honesty'] not in checkpoint"),
    ({"steering": {"mat_steer": {"scale": "x"}}}, "scale must be a finite number"),
    ({"steering": {"gate": True}}, "steering.gate decides"),
    ({"steering": {"experts": LISTS, "gate": "routing"}}, "has only residual"),
    ({"steering": {"expert": {}}}, "unknown key 'expert'"),
    ({"steering": {"experts": {"mode": "sideways"}}}, "mode must be one of"),
    ({"temperature": 0.7}, "decodes greedily"),
    ({"max_tokens": 10_000}, "exceeds the model's context"),
]


@pytest.mark.parametrize(("body", "needle"), BAD, ids=[n for _, n in BAD])
def test_bad_request_is_400_with_one_line(client, body, needle):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4, extra_body=body)
    message = info.value.body["message"]
    assert info.value.status_code == 400 and needle in message and "\n" not in message


def test_malformed_json_and_unloaded_artifacts_then_good_requests(server, client, reference,
                                                                  tokenizer, arts):
    import httpx

    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    r = httpx.post(url, content=b'{"model": "tiny", "messages": [', timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url, json={"model": "other", "messages": []}, timeout=30)
    assert r.status_code == 400 and "not served here" in r.json()["error"]["message"]
    # a server started without --experts refuses a mode plan (the unit under test: parsing)
    from steerline.serve.artifacts import Artifacts
    from steerline.serve.steering import BadRequest, parse_steering

    with pytest.raises(BadRequest, match="not started with: restart it with --experts"):
        parse_steering(STEERINGS["mode"], Artifacts(), server.service.shape)
    r = ask(client, PROMPTS[1], STEERINGS["lists"])
    assert r.choices[0].message.content == text(tokenizer, reference[(PROMPTS[1], "lists")])


def test_cli_config_from_flags(arts):
    from steerline.cli import serve

    ap = argparse.ArgumentParser()
    serve.add_parser(ap.add_subparsers(), "serve")
    args = ap.parse_args(["serve", "--model", str(arts["model"]), "--mat", str(arts["mat"]),
                          "--delta", "2.5", "--port", "0"])
    cfg = serve.config(args)
    assert (cfg.host, cfg.port, cfg.mat, cfg.defaults.delta) == ("127.0.0.1", 0,
                                                                 str(arts["mat"]), 2.5)
    with pytest.raises(CliError, match="experts.json not found"):
        serve.config(ap.parse_args(["serve", "--model", str(arts["model"]), "--experts",
                                    str(arts["model"] / "experts.json")]))
    with pytest.raises(CliError, match="--steering is not valid JSON"):
        serve.config(ap.parse_args(["serve", "--model", str(arts["model"]), "--steering", "{"]))
    with pytest.raises(CliError, match="--port must be in 0..65535"):
        serve.config(ap.parse_args(["serve", "--model", str(arts["model"]), "--port", "70000"]))


def test_close_frees_the_port_and_stops_the_engine(server):
    port = server.port
    server.close()
    assert not server.engine._thread.is_alive()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
