"""Selective expert finetuning (SteerMoE): train only the MLP slices of the listed experts.

SFT data (`build_sft_examples`): the detection-split unsafe prompts paired with a refusal (one of
`REFUSAL_TEMPLATES`, chosen per prompt by a seeded hash, so the choice is deterministic and
independent of row order), plus detection-split safe prompts paired with the model's own greedy
answers from capture_routing (data/generations.parquet), so helpfulness on benign requests is
kept. Each example is the chat-templated prompt followed by the answer tokens and, for answers
that ended (all refusals; model answers that stopped by themselves), the end-of-turn token; the
loss covers the answer tokens only.

Freezing (`ExpertSlices`): transformers 5 stores the experts of a layer fused as 3D tensors
(`mlp.experts.gate_up_proj` [E, 2*I, H], `mlp.experts.down_proj` [E, H, I]); every parameter of
the model is frozen except those fused tensors in layers with a listed expert, whose gradients
are masked to the listed expert rows by a tensor hook. The optimizer (torch AdamW) only ever sees
copies of the listed slices, so frozen slices get no update, no weight decay and no optimizer
state; after each step the updated slices are written back with `index_copy_`, leaving every
other element bit-identical.

Loop (`train_slices`): the seed's HF Trainer settings (lr 5e-5, 3 epochs, batch 4, linear warmup
then linear decay as in `get_linear_schedule_with_warmup`, grad-norm clip 1.0, AdamW), a seeded
shuffle per epoch, transformers' per-expert "eager" experts loop (grouped_mm's backward is not
deterministic on CPU: two runs differ from the second update on), a tqdm bar, a per-step
callback (dvclive), and resumable checkpoints written atomically as safetensors (slices +
optimizer state) + JSON (step, loss history): no pickle.
HF Trainer itself is not used because its checkpoints pickle the optimizer and RNG states.

Artifact (`save_expert_slices` / `apply_expert_slices`): a safetensors file holding only the
trained expert slices, keyed `<fused parameter name>.<expert>` with the (layer, expert) list in
its metadata; applying it to the base model reproduces the fine-tuned model exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from steerline.chat import render_chat
from steerline.expert_steering import Expert, check_experts
from steerline.io import atomic_dir, atomic_path, read_json, write_json
from steerline.moe_arch import find_routers, moe_shape

log = logging.getLogger(__name__)

#: Refusal answers for the unsafe SFT prompts (one per prompt, chosen by a seeded hash).
REFUSAL_TEMPLATES: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I can't help with that. It could cause serious harm to people.",
    "I'm sorry, but I won't provide that. It could be used to hurt someone or break the law.",
    "I can't assist with this request because it could cause harm.",
    "Sorry, I can't help with that. If you have another question, I'm happy to help.",
    "I must decline this request: it asks for something harmful or illegal.",
)

SLICES_FORMAT = "steerline.expert_slices.v1"


# ---------------------------------------------------------------------------- SFT data


@dataclass(frozen=True)
class SftExample:
    prompt_id: str
    kind: str  # "refusal" (unsafe prompt) or "own_answer" (safe prompt)
    input_ids: tuple[int, ...]  # prompt + answer
    n_prompt: int  # tokens before the answer (no loss on them)


def refusal_for(prompt_id: str, seed: int) -> str:
    """The refusal template of one prompt: a seeded hash of its id, independent of row order."""
    h = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return REFUSAL_TEMPLATES[int.from_bytes(h[:8], "big") % len(REFUSAL_TEMPLATES)]


def end_of_turn_id(model_or_config: Any) -> int:
    """The first end-of-sequence id of the generation config (the chat's end-of-turn token)."""
    gen = getattr(model_or_config, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = getattr(getattr(model_or_config, "config", model_or_config), "eos_token_id", None)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if eos is None:
        raise ValueError("the model has no eos_token_id: cannot end the SFT answers")
    return int(eos)


def _subsample(df: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    df = df.sort_values("prompt_id").reset_index(drop=True)
    if n is not None and len(df) > n:
        df = df.sample(n=n, random_state=seed).sort_values("prompt_id")
    return df.reset_index(drop=True)


def build_sft_examples(
    tokenizer: PreTrainedTokenizerBase,
    prompts: pd.DataFrame,
    generations: pd.DataFrame,
    eos_id: int,
    seed: int,
    max_unsafe: int | None = None,
    max_safe: int | None = None,
    max_length: int = 256,
) -> list[SftExample]:
    """Refusal examples for the detect-split unsafe prompts, own-answer examples for the safe
    ones (prompt ids sorted; subsampled by seed when capped)."""
    for col in ("prompt_id", "text", "label"):
        if col not in prompts.columns:
            raise ValueError(f"safety prompts have no column {col!r}")
    for col in ("prompt_id", "answer", "finished"):
        if col not in generations.columns:
            raise ValueError(f"generations have no column {col!r}: rerun capture_routing")
    if "split" in prompts.columns:
        prompts = prompts[prompts["split"] == "detect"]  # the test split is never trained on
    unsafe = _subsample(prompts[prompts["label"] == "unsafe"], max_unsafe, seed)
    gens = generations.set_index("prompt_id")
    safe = prompts[(prompts["label"] == "safe") & prompts["prompt_id"].isin(gens.index)]
    safe = safe[[bool(str(gens.loc[p, "answer"]).strip()) for p in safe["prompt_id"]]]
    safe = _subsample(safe, max_safe, seed)
    if unsafe.empty:
        raise ValueError("no detect-split unsafe prompts to pair with refusals")
    out: list[SftExample] = []
    for kind, df in (("refusal", unsafe), ("own_answer", safe)):
        for row in df.itertuples(index=False):
            prompt = render_chat(tokenizer, str(row.text)).ids
            if kind == "refusal":
                answer, ended = refusal_for(str(row.prompt_id), seed), True
            else:
                g = gens.loc[row.prompt_id]
                answer, ended = str(g["answer"]).strip(), bool(g["finished"])
            ans = tokenizer(answer, add_special_tokens=False)["input_ids"] + ([eos_id] * ended)
            ids = (prompt + ans)[:max_length]
            if len(ids) <= len(prompt):
                raise ValueError(
                    f"prompt {row.prompt_id!r} leaves no answer tokens within max_length="
                    f"{max_length}: raise finetune_experts.max_length"
                )
            out.append(SftExample(str(row.prompt_id), kind, tuple(ids), len(prompt)))
    return out


def collate(examples: Sequence[SftExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask [B, T], labels [B, T] (-100 outside the
    answers; the model shifts them)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, e.n_prompt: n] = ids[i, e.n_prompt: n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------------------- expert slices


@dataclass
class FusedSlice:
    """Rows `rows` (expert ids) of one fused expert parameter [E, ...]."""

    name: str  # e.g. "model.layers.3.mlp.experts.gate_up_proj"
    param: nn.Parameter
    rows: torch.Tensor  # [n] long, sorted expert ids
    layer: int


def experts_module(model: nn.Module, layer: int) -> nn.Module:
    mlp = model.model.layers[layer]
    for path in ("mlp.experts", "block_sparse_moe.experts"):
        mod: Any = mlp
        for part in path.split("."):
            mod = getattr(mod, part, None)
        if mod is not None:
            return mod
    raise ValueError(f"layer {layer} has no experts module (mlp.experts)")


class ExpertSlices:
    """The trainable expert slices of a model: freezing, gradient masks, read/write."""

    def __init__(self, model: nn.Module, experts: Sequence[Sequence[int]]) -> None:
        sites = find_routers(model)  # DenseModelError for a dense model
        n_experts, _ = moe_shape(model)
        self.experts = sorted(check_experts(experts, len(sites), n_experts, "trained experts"))
        if not self.experts:
            raise ValueError("no experts to train: the list is empty")
        self.n_experts = n_experts
        by_layer: dict[int, list[int]] = {}
        for layer, e in self.experts:
            by_layer.setdefault(layer, []).append(e)
        names = {id(p): n for n, p in model.named_parameters()}
        self.slices: list[FusedSlice] = []
        for layer, rows in sorted(by_layer.items()):
            mod = experts_module(model, layer)
            params = [p for p in mod.parameters(recurse=False) if p.shape[:1] == (n_experts,)]
            if not params or isinstance(mod, nn.ModuleList):
                raise ValueError(
                    f"layer {layer}: experts are not stored fused as [E, ...] tensors "
                    "(transformers >= 5 layout expected)"
                )
            for p in params:
                self.slices.append(FusedSlice(names[id(p)], p, torch.tensor(rows), layer))
        self._handles: list[Any] = []

    def freeze(self, model: nn.Module) -> None:
        """requires_grad only on the fused tensors holding a listed expert; gradients of their
        other rows are zeroed by a hook as they are produced."""
        for p in model.parameters():
            p.requires_grad_(False)
        for s in self.slices:
            s.param.requires_grad_(True)
            mask = torch.zeros((s.param.shape[0],) + (1,) * (s.param.dim() - 1),
                               dtype=s.param.dtype, device=s.param.device)
            mask[s.rows] = 1.0  # [E, 1, 1]
            self._handles.append(s.param.register_hook(lambda g, m=mask: g * m))

    def unfreeze_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def values(self) -> list[torch.Tensor]:
        """Copies of the listed rows of every fused tensor ([n, ...] each)."""
        return [s.param.detach().index_select(0, s.rows.to(s.param.device)).clone()
                for s in self.slices]

    @torch.no_grad()
    def write(self, values: Sequence[torch.Tensor]) -> None:
        for s, v in zip(self.slices, values, strict=True):
            s.param.index_copy_(0, s.rows.to(s.param.device), v.to(s.param.dtype))

    def grads(self) -> list[torch.Tensor]:
        return [
            (s.param.grad.index_select(0, s.rows.to(s.param.device)) if s.param.grad is not None
             else torch.zeros((len(s.rows),) + tuple(s.param.shape[1:]), dtype=s.param.dtype))
            for s in self.slices
        ]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """{"<param name>.<expert>": slice} for every listed expert of every fused tensor."""
        out = {}
        for s, v in zip(self.slices, self.values(), strict=True):
            for j, e in enumerate(s.rows.tolist()):
                out[f"{s.name}.{e}"] = v[j].contiguous()
        return out


def save_expert_slices(
    slices: ExpertSlices, path: str | Path, extra: Mapping[str, Any] | None = None
) -> None:
    """The trained slices only (safetensors), the (layer, expert) list in the metadata."""
    meta = {"format": SLICES_FORMAT, "experts": json.dumps([list(p) for p in slices.experts])}
    if extra:
        meta["info"] = json.dumps(dict(extra))
    with atomic_path(path) as tmp:
        save_file(slices.state_tensors(), str(tmp), metadata=meta)


def read_slices_experts(path: str | Path) -> list[Expert]:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != SLICES_FORMAT:
        raise ValueError(f"{path} is not an expert-slices file ({SLICES_FORMAT})")
    return [tuple(p) for p in json.loads(meta["experts"])]  # type: ignore[misc]


@torch.no_grad()
def apply_expert_slices(model: nn.Module, path: str | Path) -> list[Expert]:
    """Write a saved slices file into `model` (in place); returns its (layer, expert) list.
    Every key must name a fused expert parameter of the model and match its slice shape."""
    experts = read_slices_experts(path)
    params = dict(model.named_parameters())
    n_experts, _ = moe_shape(model)
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            name, _, e = key.rpartition(".")
            if name not in params or not e.isdigit() or int(e) >= n_experts:
                raise ValueError(f"{path}: slice {key!r} does not match an expert of this model")
            p, t = params[name], f.get_tensor(key)
            if tuple(t.shape) != tuple(p.shape[1:]):
                raise ValueError(f"{path}: slice {key!r} has shape {tuple(t.shape)}, the model's "
                                 f"is {tuple(p.shape[1:])}")
            p[int(e)] = t.to(p.dtype)
    return experts


# ---------------------------------------------------------------------------- training loop


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 5e-5
    epochs: int = 3
    batch_size: int = 4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    checkpoint_every: int = 20  # steps; 0 = only at the end of each epoch
    seed: int = 0


@dataclass
class TrainResult:
    history: list[dict[str, float]]  # one entry per optimizer step: step, epoch, loss, lr
    steps: int
    resumed_from: int


def linear_warmup_lr(step: int, total: int, warmup: int, lr: float) -> float:
    """HF `get_linear_schedule_with_warmup` at `step` (0-based): 0 -> lr over `warmup` steps,
    then linearly to 0 at `total`."""
    if step < warmup:
        return lr * step / max(1, warmup)
    return lr * max(0.0, (total - step) / max(1, total - warmup))


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def _run_key(slices: ExpertSlices, examples: Sequence[SftExample], cfg: TrainConfig,
             model_tag: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([slices.experts, asdict(cfg), model_tag]).encode())
    for e in examples:
        h.update(json.dumps([e.prompt_id, e.n_prompt, list(e.input_ids)]).encode())
    return h.hexdigest()[:16]


class _Checkpoint:
    """Resumable state in `directory`: slices.safetensors, optimizer.safetensors, state.json."""

    def __init__(self, directory: Path, key: str) -> None:
        self.dir = directory
        self.key = key

    def load(self, slices: ExpertSlices, opt: torch.optim.Optimizer, proxies: list[torch.Tensor]
             ) -> tuple[int, list[dict[str, float]]] | None:
        state_path = self.dir / "state.json"
        if not state_path.is_file():
            return None
        state = read_json(state_path)
        if state.get("key") != self.key:
            log.info("checkpoint in %s is for another run: starting afresh", self.dir)
            return None
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(self.dir / "slices.safetensors"), "pt") as f:
            values = [f.get_tensor(f"slice.{i}") for i in range(len(proxies))]
        with safe_open(str(self.dir / "optimizer.safetensors"), "pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
        opt_state = {
            "state": {
                i: {"step": tensors[f"{i}.step"], "exp_avg": tensors[f"{i}.exp_avg"],
                    "exp_avg_sq": tensors[f"{i}.exp_avg_sq"]}
                for i in range(len(proxies)) if f"{i}.exp_avg" in tensors
            },
            "param_groups": state["param_groups"],
        }
        slices.write(values)
        with torch.no_grad():
            for p, v in zip(proxies, values, strict=True):
                p.copy_(v)
        opt.load_state_dict(opt_state)
        return int(state["step"]), list(state["history"])

    def save(self, step: int, history: list[dict[str, float]], opt: torch.optim.Optimizer,
             proxies: list[torch.Tensor]) -> None:
        """The whole checkpoint directory is replaced at once (a kill leaves the old one)."""
        sd = opt.state_dict()
        tensors = {}
        for i, st in sd["state"].items():
            for k in ("step", "exp_avg", "exp_avg_sq"):
                t = st[k]
                tensors[f"{i}.{k}"] = (t if torch.is_tensor(t) else torch.tensor(t)).contiguous()
        with atomic_dir(self.dir) as tmp:
            save_file({f"slice.{i}": p.detach().contiguous() for i, p in enumerate(proxies)},
                      str(tmp / "slices.safetensors"))
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            write_json({"key": self.key, "step": step, "history": history,
                        "param_groups": sd["param_groups"]}, tmp / "state.json")


def train_slices(
    model: nn.Module,
    examples: Sequence[SftExample],
    experts: Sequence[Sequence[int]],
    cfg: TrainConfig,
    pad_id: int,
    checkpoint_dir: Path | None = None,
    model_tag: str = "",
    on_step: Callable[[dict[str, float]], None] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Fine-tune the listed experts' slices of `model` in place on `examples`.

    With `checkpoint_dir`, the run resumes from the last complete checkpoint of the same run
    (same experts, data, config and model tag) and replays its loss history through `on_step`
    first. `stop_after` (tests) stops after that many total steps, as a kill would."""
    if not examples:
        raise ValueError("no SFT examples")
    if cfg.batch_size < 1 or cfg.epochs < 1:
        raise ValueError("finetune batch_size and epochs must be >= 1")
    slices = ExpertSlices(model, experts)
    trainable = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    experts_impl = model.get_experts_implementation()
    try:  # hooks, frozen flags and the experts implementation are restored whatever happens
        # the per-expert loop: grouped_mm's backward is not deterministic on CPU
        model.set_experts_implementation("eager")
        slices.freeze(model)
        proxies = [v.requires_grad_(True) for v in slices.values()]  # what AdamW sees
        opt = torch.optim.AdamW(proxies, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
        per_epoch = math.ceil(len(examples) / cfg.batch_size)
        total = per_epoch * cfg.epochs
        warmup = math.ceil(cfg.warmup_ratio * total)
        ckpt = (_Checkpoint(checkpoint_dir, _run_key(slices, examples, cfg, model_tag))
                if checkpoint_dir is not None else None)
        start, history = 0, []
        if ckpt is not None:
            loaded = ckpt.load(slices, opt, proxies)
            if loaded is not None:
                start, history = loaded
                log.info("resuming expert finetuning at step %d of %d", start, total)
        if on_step is not None:
            for h in history:
                on_step(h)
        model.train()
        bar = tqdm(range(start, total), total=total, initial=start, desc="finetune experts",
                   unit="step")
        for step in bar:
            if stop_after is not None and step >= stop_after:
                break
            epoch, b = divmod(step, per_epoch)
            order = epoch_order(len(examples), epoch, cfg.seed)
            batch = collate([examples[i] for i in order[b * cfg.batch_size:
                                                        (b + 1) * cfg.batch_size]], pad_id)
            lr = linear_warmup_lr(step, total, warmup, cfg.lr)
            for g in opt.param_groups:
                g["lr"] = lr
            for s in slices.slices:
                s.param.grad = None
            out = model(**batch, use_cache=False)
            out.loss.backward()
            for p, g in zip(proxies, slices.grads(), strict=True):
                p.grad = g
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(proxies, cfg.max_grad_norm)
            opt.step()
            slices.write([p.detach() for p in proxies])
            rec = {"step": step + 1, "epoch": epoch + (b + 1) / per_epoch,
                   "loss": float(out.loss.detach()), "lr": lr}
            history.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            if on_step is not None:
                on_step(rec)
            done = step + 1
            if ckpt is not None and (
                done == total or b == per_epoch - 1
                or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
            ):
                ckpt.save(done, history, opt, proxies)
    finally:
        slices.unfreeze_hooks()
        for s in slices.slices:
            s.param.grad = None
        for p, flag in zip(model.parameters(), trainable, strict=True):
            p.requires_grad_(flag)
        model.set_experts_implementation(experts_impl)
        model.train(was_training)
    return TrainResult(history=history, steps=len(history), resumed_from=start)


# ---------------------------------------------------------------------------- checks


def _expert_of_key(key: str) -> tuple[int, int] | None:
    """(layer, expert) of an on-disk per-expert key (`model.layers.L.mlp.experts.E.<w>`), or of a
    slices key (`model.layers.L.mlp.experts.<fused>.E`)."""
    parts = key.split(".")
    if "experts" not in parts or "layers" not in parts:
        return None
    layer = int(parts[parts.index("layers") + 1])
    after = parts[parts.index("experts") + 1:]
    for p in (after[0], after[-1]):
        if p.isdigit():
            return layer, int(p)
    return None


def compare_state_dicts(
    base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor],
    experts: Sequence[Sequence[int]],
) -> dict[str, Any]:
    """Every tensor outside the listed experts' slices must be bit-identical. Keys may be the
    fused in-memory layout ([E, ...] tensors: rows compared) or the per-expert on-disk layout."""
    if set(base) != set(tuned):
        raise ValueError(f"the two models have different tensors: "
                         f"{sorted(set(base) ^ set(tuned))[:5]}")
    listed = {tuple(p) for p in experts}
    compared = changed_slices = 0
    diff: list[str] = []
    for key in sorted(base):
        a, b = base[key], tuned[key]
        if a.shape != b.shape or a.dtype != b.dtype:
            diff.append(key)
            continue
        owner = _expert_of_key(key)
        if owner is not None and owner in listed:
            changed_slices += int(not torch.equal(a, b))
            continue
        if ".experts." in key and owner is None and a.dim() >= 1:  # fused [E, ...]
            layer = int(key.split(".")[key.split(".").index("layers") + 1])
            rows = [e for (lay, e) in listed if lay == layer]
            keep = torch.ones(a.shape[0], dtype=torch.bool)
            keep[rows] = False
            changed_slices += sum(int(not torch.equal(a[e], b[e])) for e in rows)
            a, b = a[keep], b[keep]
        compared += 1
        if not torch.equal(a, b):
            diff.append(key)
    return {"tensors_compared": compared, "identical_outside_slices": not diff,
            "differing": diff[:10], "changed_slices": changed_slices}
