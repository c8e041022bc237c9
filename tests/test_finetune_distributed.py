"""Data-parallel expert finetuning (finetune_experts.strategy ddp / fsdp) on the tiny MoE: 2 gloo
workers on the same global batches train the same slices as one process (to float rounding),
leave every other tensor bit-identical, and resume exactly from their own checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from test_finetune import generations_frame, prompts_frame

from steerline.core.params import FinetuneExperts
from steerline.steermoe.data.sft import build_sft_examples, end_of_turn_id
from steerline.steermoe.finetuning.distributed import check_world, train_slices_distributed
from steerline.steermoe.finetuning.finetune import TrainConfig, train_slices

EXPERTS = [[0, 1], [2, 5], [2, 3]]
# 10 examples, global batch 4: the last batch of each epoch has 2, so rank 1's share is empty
CFG = TrainConfig(lr=1e-2, epochs=2, batch_size=4, warmup_ratio=0.2, weight_decay=0.1,
                  max_grad_norm=1.0, checkpoint_every=2, seed=0)
# The ranks' loss terms and padded widths differ from the single batch's, so the gradients
# agree to float32 rounding only; 6 AdamW steps (lr 1e-2) keep the slices within this.
ATOL = 1e-5


@pytest.fixture(scope="module")
def single(tokenizer, tmp_path_factory):
    """The tiny MoE saved for the workers, and its single-process run: (model_dir, examples,
    base state, trained model state, history)."""
    from conftest import finish_model, tiny_moe_config
    from transformers import Qwen2MoeForCausalLM

    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(tiny_moe_config(len(tokenizer)))
    with torch.no_grad():  # routers start at zero: give them random, untied logits
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)
    model = finish_model(model, tokenizer)
    examples = build_sft_examples(tokenizer, prompts_frame(), generations_frame(),
                                  end_of_turn_id(model), seed=0)[:10]
    model_dir = tmp_path_factory.mktemp("dist") / "moe"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    run = train_slices(model, examples, EXPERTS, CFG, tokenizer.pad_token_id)
    return model_dir, examples, base, model.state_dict(), run.history


def expert_rows(sd: dict[str, torch.Tensor]) -> dict[tuple[str, int], torch.Tensor]:
    listed = {tuple(x) for x in EXPERTS}
    return {(k, e): v[e] for k, v in sd.items() if ".mlp.experts." in k
            for e in range(v.shape[0]) if (int(k.split(".")[2]), e) in listed}


def check_against_single(single, tuned: dict[str, torch.Tensor], label: str) -> None:
    """Trained slices within ATOL of the single run; every other element bit-identical."""
    _, _, base, want_sd, _ = single
    want, got = expert_rows(want_sd), expert_rows(tuned)
    diff = max(float((want[k] - got[k]).abs().max()) for k in want)
    print(f"{label} vs single: max abs diff of the trained slices {diff:.3g}")
    assert diff <= ATOL, f"{label} vs single: max abs diff {diff:.3g}"
    assert all(not torch.equal(base[k][e], got[k, e]) for k, e in got)  # the slices moved
    listed = {tuple(x) for x in EXPERTS}
    for k, before in base.items():
        if ".mlp.experts." in k:
            keep = [e for e in range(before.shape[0]) if (int(k.split(".")[2]), e) not in listed]
            assert torch.equal(before[keep], tuned[k][keep]), k
        else:
            assert torch.equal(before, tuned[k]), k


def fresh(single) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(single[0])


def test_ddp_two_processes_match_one_and_resume(single, tokenizer, tmp_path):
    """Killed after step 5 (last checkpoint: step 4), then resumed from rank 0's checkpoint."""
    model_dir, examples, _, _, history = single
    pad, ckpt = tokenizer.pad_token_id, tmp_path / "ckpt"
    killed = train_slices_distributed(fresh(single), model_dir, examples, EXPERTS, CFG, pad,
                                      "ddp", 2, checkpoint_dir=ckpt, stop_after=5)
    assert killed.steps == 5
    assert json.loads((ckpt / "state.json").read_text())["step"] == 4
    model, seen = fresh(single), []
    run = train_slices_distributed(model, model_dir, examples, EXPERTS, CFG, pad, "ddp", 2,
                                   checkpoint_dir=ckpt, on_step=seen.append)
    assert run.resumed_from == 4 and run.steps == 6 and seen == run.history
    assert run.history[:4] == killed.history[:4]
    for a, b in zip(history, run.history, strict=True):
        assert a["lr"] == b["lr"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    check_against_single(single, model.state_dict(), "ddp")


def test_fsdp_two_processes_match_one(single, tokenizer):
    """FSDP2 (fully_shard, gloo): the 8 experts of each layer sharded 4 + 4 over the ranks."""
    model_dir, examples, *_ = single
    model = fresh(single)
    train_slices_distributed(model, model_dir, examples, EXPERTS, CFG, tokenizer.pad_token_id,
                             "fsdp", 2)
    check_against_single(single, model.state_dict(), "fsdp")


def test_world_errors():
    with pytest.raises(ValueError, match="not divisible by num_processes 3"):
        check_world("ddp", 3, 4)
    with pytest.raises(ValueError, match="strategy is single"):
        check_world("single", 2, 4)
    fields = dict(max_experts=None, on_empty_selection="error", fallback_top_n=1,
                  lr=1e-3, epochs=1, batch_size=4, warmup_ratio=0.0, weight_decay=0.0,
                  max_grad_norm=1.0, max_unsafe=None, max_safe=None, max_length=64,
                  checkpoint_every=0, dtype="float32")
    assert FinetuneExperts(**fields, strategy="ddp", num_processes=2).num_processes == 2
    with pytest.raises(ValueError, match="not divisible by num_processes 3"):
        FinetuneExperts(**fields, strategy="ddp", num_processes=3)
    with pytest.raises(ValueError, match="strategy"):
        FinetuneExperts(**fields, strategy="zero3", num_processes=1)
