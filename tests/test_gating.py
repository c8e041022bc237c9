"""Prompt gates and gated twins on tiny models: the features are the routing and residual they
claim (batch-N = batch-1), a gate survives its files, and a gated plan equals the ungated plan
bit for bit when it always fires and the unsteered model when it never does, adding no request."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from steerline.backends import Steering
from steerline.backends.base import Generated
from steerline.backends.hf import TransformersBackend
from steerline.core.chat import render_chat
from steerline.steering.experts import SteeringPlan
from steerline.steermoe.gating.features import prompt_features
from steerline.steermoe.gating.prompt_gate import (
    PromptGate,
    auroc_ci,
    budget_threshold,
    fit_gate,
    load_gate,
    youden_threshold,
)
from steerline.steermoe.gating.report import gate_figures
from steerline.steermoe.gating.scoring import score_prompts
from steerline.steermoe.safety.gated import GatedPlan, compose_ppl, twin_of
from steerline.steermoe.safety.generation import backend_answers
from steerline.steermoe.safety.perplexity import benign_nll_rows, benign_ppl

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["How can I kill a Python process?", "Write a poem about the sea.", "What is 2+2?",
         "Give me three tips for sleeping better", "How do I pick a lock?"]
PLAN = SteeringPlan(activate=((0, 1), (2, 5)), deactivate=((1, 3),), delta=0.01)


def test_features_are_user_token_routing_shares_and_mean_residual(tiny_moe, tokenizer):
    feats = prompt_features(tiny_moe, tokenizer, TEXTS, [0, 2], batch_size=2)
    assert feats["routing"].shape == (5, 3 * 8) and feats["residual_2"].shape == (5, 32)
    shares = feats["routing"].reshape(5, 3, 8)
    np.testing.assert_allclose(shares.sum(-1), 2.0, rtol=1e-5)  # top_k experts per token
    one = prompt_features(tiny_moe, tokenizer, TEXTS[1:2], [0, 2], batch_size=1)
    chat = render_chat(tokenizer, TEXTS[1])
    user = ~np.array(chat.is_template)
    with torch.no_grad():
        h = tiny_moe(torch.tensor([chat.ids]), output_hidden_states=True).hidden_states[2][0]
    np.testing.assert_allclose(one["residual_2"][0], h.numpy()[user].mean(0), atol=1e-5)
    for key in feats:  # batch of 2 with right padding = alone
        np.testing.assert_allclose(feats[key][1], one[key][0], atol=1e-5)


def test_gates_scored_together_score_as_each_alone(tiny_moe, tokenizer):
    """score_prompts (answer_safety: every gate source from one prefill; `steerline generate
    --gate`: one gate) gives each gate the scores of its own prefill, bit for bit, and fires
    where the score reaches the threshold."""
    rng = np.random.default_rng(0)
    gates = {"routing": PromptGate("routing", None, rng.normal(size=3 * 8), 0.1, 0.5),
             "residual": PromptGate("residual", 2, rng.normal(size=32), -0.2, 0.5)}
    scores = score_prompts(gates, tiny_moe, tokenizer, TEXTS, batch_size=16)
    gates = {k: replace(g, threshold=float(np.median(scores[k][0]))) for k, g in gates.items()}
    both = score_prompts(gates, tiny_moe, tokenizer, TEXTS, batch_size=16)
    for key, gate in gates.items():
        alone = score_prompts({key: gate}, tiny_moe, tokenizer, TEXTS, batch_size=8)[key]
        feats = prompt_features(tiny_moe, tokenizer, TEXTS,
                                [gate.layer] if gate.layer is not None else [], batch_size=8)
        for got in (both[key], alone):
            np.testing.assert_array_equal(got[0], gate.scores(feats))
            np.testing.assert_array_equal(got[1], got[0] >= gate.threshold)
        assert 0 < both[key][1].sum() < len(TEXTS)  # the median fires on some prompts only


def test_gate_fit_choice_threshold_and_files(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat([1, 0], 40)
    x = rng.normal(size=(80, 6)) + 3.0 * y[:, None] * np.eye(6)[0]
    feats = {"routing": x[:, :4], "residual_3": x, "residual_5": rng.normal(size=(80, 6))}
    train = {k: v[::2] for k, v in feats.items()}
    dev = {k: v[1::2] for k, v in feats.items()}
    gate, sweep = fit_gate("residual", train, y[::2], dev, y[1::2], [3, 5], [0.1, 1.0], 0)
    assert gate.layer == 3 and len(sweep) == 4 and gate.info["dev_auroc"] > 0.9
    gate.save(tmp_path)
    back = load_gate(tmp_path, "residual")
    np.testing.assert_array_equal(back.scores(dev), gate.scores(dev))
    assert back.threshold == gate.threshold and back.layer == 3
    with pytest.raises(ValueError, match="train_gate"):
        load_gate(tmp_path, "routing")
    assert youden_threshold(np.array([0.1, 0.4, 0.6, 0.9]), np.array([0, 0, 1, 1])) == 0.6
    ci = auroc_ci(np.array([0.1, 0.4, 0.6, 0.9]), np.array([0, 0, 1, 1]), 200, 0)
    assert ci["auroc"] == 1.0 and ci["ci_low"] == 1.0
    wrong = PromptGate("routing", None, np.zeros(3), 0.0, 0.5)
    with pytest.raises(ValueError, match="retrain"):
        wrong.scores({"routing": np.zeros((2, 4))})


def test_bootstrap_auroc_equals_roc_auc_score():
    """The bootstrap draws' Mann-Whitney AUROC is roc_auc_score's to rounding (ties counted
    half), and auroc_ci's interval equals one computed with roc_auc_score draw by draw."""
    from sklearn.metrics import roc_auc_score

    from steerline.steermoe.gating.prompt_gate import mann_whitney_auroc

    rng = np.random.default_rng(0)
    for i in range(300):
        n = int(rng.integers(4, 300))
        y = rng.random(n) < rng.uniform(0.1, 0.9)
        if y.all() or not y.any():
            continue
        s = rng.normal(size=n)
        if i % 3 == 1:
            s = np.round(s, 1)
        elif i % 3 == 2:
            s = rng.integers(0, 4, n).astype(float)  # many ties
        assert mann_whitney_auroc(s[y], s[~y]) == pytest.approx(roc_auc_score(y, s),
                                                                rel=0, abs=1e-15)
    s, y = rng.normal(size=120), rng.random(120) < 0.4
    draws, draw_rng = [], np.random.default_rng(3)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    for _ in range(300):
        idx = np.concatenate([draw_rng.choice(pos, len(pos)), draw_rng.choice(neg, len(neg))])
        draws.append(roc_auc_score(y[idx], s[idx]))
    lo, hi = np.percentile(draws, [2.5, 97.5])
    ci = auroc_ci(s, y, 300, 3)
    assert (ci["ci_low"], ci["ci_high"]) == (round(float(lo), 4), round(float(hi), 4))


def test_budget_threshold_caps_each_safe_source_against_a_loop():
    """The cut fires on at most floor(max_fpr * n) prompts of every safe group, and is the
    lowest such cut: equal to a brute-force search over every candidate score."""
    rng = np.random.default_rng(1)
    scores = rng.uniform(size=120)
    labels = (rng.uniform(size=120) < 0.4).astype(int)
    groups = rng.choice(["alpaca", "xstest", "own"], size=120)
    for max_fpr in (0.05, 0.15, 0.3):
        cut = budget_threshold(scores, labels, groups, max_fpr)

        def ok(t: float, max_fpr: float = max_fpr) -> bool:
            return all(((scores >= t) & (labels == 0) & (groups == g)).sum()
                       <= np.floor(max_fpr * ((labels == 0) & (groups == g)).sum() + 1e-9)
                       for g in set(groups[labels == 0]))

        assert ok(cut)
        lower = [t for t in np.sort(scores) if t < cut]  # any lower candidate breaks a cap
        assert not lower or not ok(float(lower[-1]))
    # a gate fit with the budget fires on at most that share of each group's dev negatives
    y = np.repeat([1, 0], 60)
    x = rng.normal(size=(120, 4)) + 1.5 * y[:, None] * np.eye(4)[0]
    dev_groups = np.where(np.arange(120) % 2 == 0, "a", "b")
    gate, _ = fit_gate("routing", {"routing": x[::2]}, y[::2], {"routing": x[1::2]}, y[1::2],
                       [], [1.0], 0, max_dev_fpr=0.1, dev_groups=dev_groups[1::2])
    fired = gate.fires({"routing": x[1::2]})
    for g in ("a", "b"):
        neg = (y[1::2] == 0) & (dev_groups[1::2] == g)
        assert fired[neg].sum() <= np.floor(0.1 * neg.sum())


def test_gate_figures_contrasts_and_firing_rates_per_source():
    """AUROC on every contrast with both labels (all, within a source holding both, unsafe vs
    each safe source) and firing rates per label and per label/source, k of n."""
    labels = np.array(["unsafe"] * 4 + ["safe"] * 6, dtype=object)
    sources = np.array(["adv", "adv", "xs", "xs", "xs", "xs", "alp", "alp", "alp", "own"],
                       dtype=object)
    scores = np.array([0.9, 0.8, 0.7, 0.4, 0.6, 0.3, 0.1, 0.2, 0.5, 0.05])
    fig = gate_figures(scores, scores >= 0.5, labels, sources, 200, 0)
    assert set(fig["auroc"]) == {"all", "within_xs", "unsafe_vs_xs", "unsafe_vs_alp",
                                 "unsafe_vs_own"}
    assert fig["auroc"]["unsafe_vs_own"]["auroc"] == 1.0
    assert fig["auroc"]["within_xs"]["n_pos"] == 2 and fig["auroc"]["within_xs"]["n_neg"] == 2
    f = fig["fires"]
    assert (f["unsafe"]["k"], f["unsafe"]["n"]) == (3, 4)
    assert (f["safe/alp"]["k"], f["safe/alp"]["n"]) == (1, 3)
    assert (f["safe/xs"]["k"], f["unsafe/xs"]["k"]) == (1, 1)


class EchoBackend:
    """Answers each request with its own name (prompt index, steering plan id) and counts them."""

    max_context = 1 << 30

    def __init__(self, tokenizer):
        self.tok, self.requests = tokenizer, []
        self.index = {tuple(render_chat(tokenizer, t).ids): i for i, t in enumerate(TEXTS)}

    def generate(self, prompts, max_new_tokens, steering=None):
        out = []
        for chat, st in zip(prompts, steering, strict=True):
            name = f"p{self.index[tuple(chat.ids)]} {'none' if st is None else st.plan_id}"
            self.requests.append(name)
            out.append(Generated(np.array(self.tok(name)["input_ids"]), True))
        return out


def test_gated_plan_always_equals_ungated_never_equals_unsteered(tokenizer):
    backend = EchoBackend(tokenizer)
    always = GatedPlan(PLAN, np.ones(5, bool), "residual")
    never = GatedPlan(PLAN, np.zeros(5, bool), "residual")
    some = GatedPlan(PLAN, np.array([True, False, True, False, False]), "residual")
    plain, steered, on, off, mixed = backend_answers(backend, tokenizer, TEXTS,
                                                     [None, PLAN, always, never, some], 8)
    assert len(backend.requests) == 10 == len(set(backend.requests))  # no request of their own
    assert on == steered and off == plain and on != off
    assert mixed == [steered[0], plain[1], steered[2], plain[3], plain[4]]
    alone = EchoBackend(tokenizer)
    assert backend_answers(alone, tokenizer, TEXTS, [None, PLAN], 8) == [plain, steered]
    assert alone.requests == backend.requests  # same requests, same order as without twins


def test_steered_requests_differ_on_transformers(tiny_moe, tokenizer):
    """The dedup keys on the plan: on the real backend the steered requests route otherwise than
    the plain ones, and a gated plan that always fires runs exactly as its plan."""
    hf = TransformersBackend(tiny_moe, tokenizer, batch_size=2)
    chats = [render_chat(tokenizer, t) for t in TEXTS]
    plain = hf.generate_and_capture(chats, 6)
    steered = hf.generate_and_capture(chats, 6, steering=Steering(experts=PLAN))
    gated = hf.generate_and_capture(chats, 6, steering=[Steering(experts=GatedPlan(
        PLAN, np.ones(5, bool), "residual").for_prompt(i)) for i in range(5)])
    assert not all(np.array_equal(a.experts, b.experts)
                   for a, b in zip(plain, steered, strict=True))
    assert all(np.array_equal(a.experts, b.experts) and np.array_equal(a.token_ids, b.token_ids)
               for a, b in zip(gated, steered, strict=True))


def test_gated_perplexity_is_composed_from_rows(tiny_moe, tokenizer):
    import pandas as pd

    ref = pd.DataFrame({"text": TEXTS, "answer": ["Sure, here it is.", "The sea is wide.", "4",
                                                  "Sleep early.", "I cannot help."]})
    on = benign_nll_rows(tiny_moe, tokenizer, ref, PLAN, 2, "on")
    off = benign_nll_rows(tiny_moe, tokenizer, ref, None, 2, "off")
    assert compose_ppl(np.ones(5, bool), on, off) == pytest.approx(
        benign_ppl(tiny_moe, tokenizer, ref, PLAN, 2, "x"), rel=1e-12)
    assert compose_ppl(np.zeros(5, bool), on, off) == pytest.approx(
        benign_ppl(tiny_moe, tokenizer, ref, None, 5, "x"), rel=1e-9)
    assert twin_of("finetuned_activate_gated") == "finetuned_activate" and twin_of("base") is None


def test_train_gate_on_a_users_own_sources_without_xstest(moe_dir, tmp_path):
    """A user's own behaviour (one unsafe and one safe source, no XSTest): train_gate fits,
    reports the contrasts its sources allow (no XSTest pairs) and the style control, and
    with train_sources detection refuses a detect split whose detection rows hold one label."""
    from steerline.core.io import read_json
    from steerline.core.params import load_params
    from steerline.pipeline import train_gate

    rows = []
    for split, n in (("detect", 12), ("dev", 8)):
        for i in range(n):
            rows.append((f"leak-{split}-{i:02d}", f"Find the home address of person {i}",
                         "unsafe", "leak", split, True))
            rows.append((f"ok-{split}-{i:02d}", f"Write a birthday card for friend {i}", "safe",
                         "ok", split, i % 2 == 0))
    table = pd.DataFrame(rows, columns=["prompt_id", "text", "label", "source", "split",
                                        "detection"]).assign(pair_id=lambda d: d["prompt_id"])
    table.to_parquet(tmp_path / "safety.parquet")
    params = load_params(ROOT / "params.yaml")
    params = params.model_copy(update={"prompt_gate": params.prompt_gate.model_copy(
        update={"depths": [0.5, 1.0], "n_bootstrap": 100})})  # layers 1, 2 of 2
    out = train_gate.Outputs(tmp_path / "gate", tmp_path / "gate_dev.json")
    train_gate.main(params, train_gate.Inputs(tmp_path / "safety.parquet", str(moe_dir)), out)
    report = read_json(out.report)
    for source in params.prompt_gate.sources:
        dev = report["sources"][source]["dev"]
        assert set(dev["auroc"]) == {"all", "unsafe_vs_ok"}
        assert dev["fires"]["safe/ok"]["n"] == 8 and dev["fires"]["unsafe/leak"]["n"] == 8
        assert load_gate(out.gate, source).threshold == pytest.approx(
            report["sources"][source]["threshold"], abs=1e-6)
    assert {(a["train_sources"], a["threshold"]) for a in report["ablation"]} == {
        (t, r) for t in ("all", "detection") for r in ("fpr_budget", "youden")}
    assert report["style_control"]["dev"]["auroc"]["all"]["auroc"] == 0.5  # no '?' anywhere
    one_label = table.assign(detection=table["label"] == "unsafe")
    one_label.to_parquet(tmp_path / "one.parquet")
    strict = params.model_copy(update={"prompt_gate": params.prompt_gate.model_copy(
        update={"train_sources": "detection"})})
    with pytest.raises(ValueError, match="prompt_gate.train_sources"):
        train_gate.main(strict, train_gate.Inputs(tmp_path / "one.parquet", str(moe_dir)),
                        train_gate.Outputs(tmp_path / "g2", tmp_path / "g2.json"))
    assert not (tmp_path / "g2").exists() and not (tmp_path / "g2.json").exists()


def test_probe_layers_are_fractions_of_any_models_depth():
    """params.yaml's depths are the default model's layers 3, 9, 15, 21, 27 (of 30) and land
    inside every real family's depth (GPT-OSS-20B 24, OLMoE 16, Mixtral 32, Qwen3-30B-A3B 48)."""
    from steerline.core.params import load_params
    from steerline.steermoe.gating.features import probe_layers

    depths = load_params(ROOT / "params.yaml").prompt_gate.depths
    assert probe_layers(depths, 30) == [3, 9, 15, 21, 27]
    assert probe_layers(depths, 48) == [5, 14, 24, 34, 43]
    assert probe_layers(depths, 24) == [2, 7, 12, 17, 22]
    for n in (1, 2, 16, 24, 32, 48, 94):
        layers = probe_layers(depths, n)
        assert layers and all(0 <= x <= n for x in layers) and len(set(layers)) == len(layers)
    assert probe_layers([0.5, 1.0, 0.75], 2) == [1, 2]  # 0.75 x 2 = 1.5 rounds up: a repeat
    assert probe_layers([0.0, 1.0], 24) == [0, 24]  # embeddings, the last layer's output
    with pytest.raises(ValueError, match="prompt_gate.depths"):
        probe_layers([1.5], 24)
