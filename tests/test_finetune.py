"""Selective expert finetuning: SFT data, frozen weights bit-identical, slices artifact,
resume after a kill, bad inputs; one slow check of the real models/moe_finetuned."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from steerline.model.arch import DenseModelError
from steerline.steermoe.data.sft import (
    REFUSAL_TEMPLATES,
    build_sft_examples,
    collate,
    end_of_turn_id,
    refusal_for,
)
from steerline.steermoe.finetuning.expert_slices import (
    ExpertSlices,
    apply_expert_slices,
    compare_state_dicts,
    save_expert_slices,
)
from steerline.steermoe.finetuning.finetune import TrainConfig, linear_warmup_lr, train_slices

EXPERTS = [[0, 1], [2, 5], [2, 3]]
CFG = TrainConfig(lr=1e-2, epochs=2, batch_size=3, warmup_ratio=0.2, weight_decay=0.1,
                  max_grad_norm=1.0, checkpoint_every=2, seed=0)


def prompts_frame() -> pd.DataFrame:
    rows = []
    for i in range(8):
        rows.append((f"u{i}", f"Explain how to do harmful thing number {i}", "unsafe", "detect"))
    for i in range(5):
        rows.append((f"s{i}", f"Tell me a fact about animal number {i}", "safe", "detect"))
    rows.append(("u-test", "A test-split unsafe prompt", "unsafe", "test"))
    rows.append(("s-test", "A test-split safe prompt", "safe", "test"))
    return pd.DataFrame(rows, columns=["prompt_id", "text", "label", "split"])


def generations_frame() -> pd.DataFrame:
    return pd.DataFrame({
        "prompt_id": [f"s{i}" for i in range(5)] + ["u0"],
        "answer": ["Cats sleep a lot.", "Dogs can smell well.", "", "Owls fly at night.",
                   "Fish have gills", "Sure, here is how"],
        "finished": [True, True, True, False, True, True],
    })


@pytest.fixture()
def examples(tokenizer, tiny_moe):
    return build_sft_examples(tokenizer, prompts_frame(), generations_frame(),
                              end_of_turn_id(tiny_moe), seed=0)


def test_sft_examples(tokenizer, tiny_moe, examples):
    eos = end_of_turn_id(tiny_moe)
    ids = [e.prompt_id for e in examples]
    # detect split only; the safe prompt with an empty answer is skipped
    assert ids == [f"u{i}" for i in range(8)] + ["s0", "s1", "s3", "s4"]
    for e in examples:
        answer = tokenizer.decode(e.input_ids[e.n_prompt:], skip_special_tokens=True)
        if e.kind == "refusal":
            assert answer == refusal_for(e.prompt_id, 0) and e.input_ids[-1] == eos
        else:
            assert answer in set(generations_frame()["answer"])
    by_id = {e.prompt_id: e for e in examples}
    assert by_id["s3"].input_ids[-1] != eos  # unfinished answer: no end-of-turn appended
    assert by_id["s0"].input_ids[-1] == eos
    # the refusal choice is deterministic per prompt and seed, and uses several templates
    assert refusal_for("u3", 0) == refusal_for("u3", 0)
    assert len({refusal_for(f"u{i}", 0) for i in range(40)}) == len(REFUSAL_TEMPLATES)
    batch = collate(examples[:3], tokenizer.pad_token_id)
    for i, e in enumerate(examples[:3]):
        lab = batch["labels"][i]
        assert (lab[: e.n_prompt] == -100).all()  # no loss on the prompt
        assert lab[e.n_prompt: len(e.input_ids)].tolist() == list(e.input_ids[e.n_prompt:])
        assert (lab[len(e.input_ids):] == -100).all()  # nor on padding
    capped = build_sft_examples(tokenizer, prompts_frame(), generations_frame(), eos, 0,
                                max_unsafe=3, max_safe=2)
    assert sum(e.kind == "refusal" for e in capped) == 3
    assert sum(e.kind == "own_answer" for e in capped) == 2


def test_frozen_weights_bit_identical(tiny_moe, examples, tokenizer):
    base = {k: v.clone() for k, v in tiny_moe.state_dict().items()}
    impl = tiny_moe.get_experts_implementation()
    result = train_slices(tiny_moe, examples, EXPERTS, CFG, tokenizer.pad_token_id)
    assert tiny_moe.get_experts_implementation() == impl  # the eager loop only while training
    assert result.steps == 2 * 4
    tuned = tiny_moe.state_dict()
    listed = {(0, 1), (2, 5), (2, 3)}
    changed = 0
    for name, before in base.items():
        after = tuned[name]
        if ".mlp.experts." in name:  # fused [E, ...]: row by row
            layer = int(name.split(".")[2])
            for e in range(before.shape[0]):
                if (layer, e) in listed:
                    changed += int(not torch.equal(before[e], after[e]))
                else:
                    assert torch.equal(before[e], after[e]), (name, e)
        else:
            assert torch.equal(before, after), name
    assert changed == 2 * len(listed)  # gate_up_proj and down_proj of every listed expert
    report = compare_state_dicts(base, tuned, EXPERTS)
    assert report["identical_outside_slices"] and report["changed_slices"] == 6
    assert all(p.requires_grad for p in tiny_moe.parameters())  # restored afterwards
    assert not any(p._backward_hooks or p._post_accumulate_grad_hooks
                   for p in tiny_moe.parameters())  # the row hooks removed


def test_row_gradients_are_the_whole_gradients_rows_one_layer_at_a_time(tiny_moe, examples,
                                                                         tokenizer):
    """The listed rows' gradients equal the rows of autograd's whole-tensor gradient, bit for
    bit, and at most one fused tensor holds a whole gradient at any time (each is dropped once
    its rows are taken)."""
    batch = collate(list(examples[:3]), tokenizer.pad_token_id)
    tiny_moe.set_experts_implementation("eager")
    slices = ExpertSlices(tiny_moe, EXPERTS)
    for p in tiny_moe.parameters():
        p.requires_grad_(False)
    for s in slices.slices:
        s.param.requires_grad_(True)
    tiny_moe(**batch, use_cache=False).loss.backward()
    whole = [s.param.grad.index_select(0, s.rows) for s in slices.slices]
    slices.zero_grad()

    alive = []
    take = slices._take_rows

    def counting(i, param):
        alive.append(sum(s.param.grad is not None for s in slices.slices))
        take(i, param)

    slices._take_rows = counting
    slices.freeze(tiny_moe)
    try:
        tiny_moe(**batch, use_cache=False).loss.backward()
        assert len(alive) == len(slices.slices) and max(alive) == 1
        assert all(s.param.grad is None for s in slices.slices)
        for got, want in zip(slices.grads(), whole, strict=True):
            assert torch.equal(got, want)
    finally:
        slices.unfreeze_hooks()


def test_bfloat16_model_trains_float32_masters(tokenizer, examples, monkeypatch):
    """finetune_experts.dtype bfloat16: the weights stay bfloat16 and bit-identical outside the
    listed slices, AdamW steps float32 copies of the slices, and the loss falls."""
    from conftest import finish_model, tiny_moe_config
    from transformers import Qwen2MoeForCausalLM

    torch.manual_seed(0)
    model = finish_model(Qwen2MoeForCausalLM(tiny_moe_config(len(tokenizer))), tokenizer)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)
    model = model.to(torch.bfloat16)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    real_adamw = torch.optim.AdamW

    def spy(params, **kw):
        params = list(params)
        seen.extend(p.dtype for p in params)
        return real_adamw(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    result = train_slices(model, examples, EXPERTS, CFG, tokenizer.pad_token_id)
    assert seen and set(seen) == {torch.float32}
    tuned = model.state_dict()
    assert all(v.dtype == torch.bfloat16 for v in tuned.values() if v.is_floating_point())
    report = compare_state_dicts(base, tuned, EXPERTS)
    assert report["identical_outside_slices"] and report["changed_slices"] == 6
    losses = [h["loss"] for h in result.history]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) < sum(losses[:4])


def test_saved_model_and_slices_reproduce(tiny_moe, examples, tokenizer, tmp_path):
    base_dir, tuned_dir = tmp_path / "base", tmp_path / "tuned"
    tiny_moe.save_pretrained(base_dir)
    train_slices(tiny_moe, examples, EXPERTS, CFG, tokenizer.pad_token_id)
    tiny_moe.save_pretrained(tuned_dir)
    slices = ExpertSlices(tiny_moe, EXPERTS)
    save_expert_slices(slices, tmp_path / "slices.safetensors")
    # on disk (per-expert layout): identical outside the listed experts
    report = compare_state_dicts(load_file(base_dir / "model.safetensors"),
                                 load_file(tuned_dir / "model.safetensors"), EXPERTS)
    assert report["identical_outside_slices"] and report["changed_slices"] > 0
    # the stage's check reads the folders a tensor at a time, to the same report
    from steerline.pipeline.finetune_experts import DiskTensors

    lazy = DiskTensors(tuned_dir)
    assert set(lazy) == set(load_file(tuned_dir / "model.safetensors")) and len(lazy) > 0
    assert compare_state_dicts(DiskTensors(base_dir), lazy, EXPERTS) == report
    # a float32 checkpoint read as the bfloat16 model finetune_experts.dtype loads
    cast = DiskTensors(base_dir, torch.bfloat16)
    assert all(cast[k].dtype == torch.bfloat16 for k in cast if lazy[k].is_floating_point())
    # the slices file holds only the listed slices, and applying it reproduces the model
    with safe_open(tmp_path / "slices.safetensors", "pt") as f:
        keys = list(f.keys())
        assert json.loads(f.metadata()["experts"]) == sorted(EXPERTS)
    assert len(keys) == 2 * len(EXPERTS)
    rebuilt = AutoModelForCausalLM.from_pretrained(base_dir)
    assert apply_expert_slices(rebuilt, tmp_path / "slices.safetensors") == sorted(
        tuple(e) for e in EXPERTS)
    reloaded = AutoModelForCausalLM.from_pretrained(tuned_dir).state_dict()
    for k, v in rebuilt.state_dict().items():
        assert torch.equal(v, reloaded[k]), k


def test_resume_after_kill_is_exact(tokenizer, examples, tmp_path):
    from conftest import finish_model, tiny_moe_config
    from transformers import Qwen2MoeForCausalLM

    def fresh():
        torch.manual_seed(0)
        m = Qwen2MoeForCausalLM(tiny_moe_config(len(tokenizer)))
        with torch.no_grad():
            for layer in m.model.layers:
                layer.mlp.gate.weight.normal_(0, 1.0)
        return finish_model(m, tokenizer)

    pad = tokenizer.pad_token_id
    straight = fresh()
    full = train_slices(straight, examples, EXPERTS, CFG, pad)
    ckpt = tmp_path / "ckpt"
    killed = fresh()
    train_slices(killed, examples, EXPERTS, CFG, pad, checkpoint_dir=ckpt, stop_after=5)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 4  # last checkpoint before the "kill" (every 2 steps)
    # optimizer state exists only for the listed slices: [n listed in that layer, ...]
    opt = load_file(ckpt / "optimizer.safetensors")
    assert sorted(t.shape[0] for k, t in opt.items() if k.endswith("exp_avg")) == [1, 1, 2, 2]
    replayed = []
    # checkpoints of another model (another fingerprint as the model tag) are never resumed
    other = train_slices(fresh(), examples, EXPERTS, CFG, pad, checkpoint_dir=tmp_path / "c2",
                         model_tag="fingerprint-b", stop_after=3)
    assert other.resumed_from == 0
    assert train_slices(fresh(), examples, EXPERTS, CFG, pad, checkpoint_dir=tmp_path / "c2",
                        model_tag="fingerprint-a", stop_after=0).resumed_from == 0
    resumed_model = fresh()
    resumed = train_slices(resumed_model, examples, EXPERTS, CFG, pad, checkpoint_dir=ckpt,
                           on_step=replayed.append)
    assert resumed.resumed_from == 4
    assert resumed.history == full.history and replayed == full.history
    a, b = straight.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_schedule_matches_hf_linear_warmup():
    from transformers import get_linear_schedule_with_warmup

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = get_linear_schedule_with_warmup(opt, 3, 10)
    for step in range(10):
        assert linear_warmup_lr(step, 10, 3, 1.0) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()


def test_bad_inputs(tiny_moe, tiny_dense, examples, tokenizer, tmp_path):
    pad = tokenizer.pad_token_id
    before = {k: v.clone() for k, v in tiny_moe.state_dict().items()}
    with pytest.raises(ValueError, match="out of range"):
        train_slices(tiny_moe, examples, [[0, 8]], CFG, pad, checkpoint_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="layer 5"):
        train_slices(tiny_moe, examples, [[5, 0]], CFG, pad)
    with pytest.raises(ValueError, match="empty"):
        train_slices(tiny_moe, examples, [], CFG, pad)
    with pytest.raises(DenseModelError):
        train_slices(tiny_dense, examples, [[0, 1]], CFG, pad)
    assert not (tmp_path / "c").exists()
    assert all(torch.equal(v, tiny_moe.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="no column 'finished'"):
        build_sft_examples(tokenizer, prompts_frame(), generations_frame().drop(
            columns="finished"), 2, 0)


@pytest.mark.slow
def test_real_finetuned_model_frozen_outside_trained_experts():
    """models/moe_finetuned (stage finetune_experts) against models/moe, tensor by tensor on
    disk, and the slices artifact reproducing it."""
    tuned, base = Path("models/moe_finetuned"), Path("models/moe")
    if not (tuned / "trained_experts.json").is_file() or not base.is_dir():
        pytest.skip("run `dvc repro finetune_experts` first")
    info = json.loads((tuned / "trained_experts.json").read_text())
    experts = info["experts"]
    assert experts and info["n_experts"] == len(experts)
    report = compare_state_dicts(load_file(base / "model.safetensors"),
                                 load_file(tuned / "model.safetensors"), experts)
    assert report["identical_outside_slices"], report["differing"]
    assert report["changed_slices"] > 0
    rebuilt = AutoModelForCausalLM.from_pretrained(base)
    apply_expert_slices(rebuilt, tuned / "expert_slices" / "trained_experts.safetensors")
    reference = AutoModelForCausalLM.from_pretrained(tuned).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in rebuilt.state_dict().items())
