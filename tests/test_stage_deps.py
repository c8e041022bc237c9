"""dvc.yaml lists, for every stage, exactly the package modules its script imports."""

import re
from pathlib import Path

import yaml

from steerline.cli.stages import read_stages, reruns
from tools.stage_deps import stage_src_deps

ROOT = Path(__file__).resolve().parents[1]


def test_every_stage_lists_exactly_the_modules_it_imports(monkeypatch):
    monkeypatch.chdir(ROOT)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        stage = stage.get("do", stage)  # a foreach stage: one definition for every item
        deps = [d for d in stage["deps"] if isinstance(d, str)]
        # the script its cmd runs (a stage may reuse another's script with path options)
        found = re.search(r"stages/\w+\.py", stage["cmd"])
        assert found, f"{name}: its cmd runs no stages/*.py script"
        script = found[0]
        assert script in deps, f"{name}: its script {script} is not a dep"
        listed = sorted(d for d in deps if d.startswith("src/"))
        assert listed == stage_src_deps(script), (
            f"{name}: src deps differ from its imports; run python -m tools.sync_stage_deps")


def _src_deps(stage: str) -> set[str]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    return {d for d in spec.get("do", spec)["deps"] if d.startswith("src/")}


STEERMOE = ["capture_routing", "risk_diff", "select_experts", "finetune_experts", "train_gate",
            "answer_safety_base", "answer_safety_finetuned", "eval_safety"]
MAT_STEER = ["prepare_attributes", "extract_activations", "train_steering", "eval_baselines",
             "eval_steering"]


def test_a_method_edit_reruns_no_stage_of_the_other_method():
    """Editing mat_steer/ leaves every SteerMoE stage (the 20-minute capture first) up to date,
    and editing steermoe/ leaves every MAT-Steer stage up to date: no stage of one method lists
    a module of the other among its deps."""
    for stage in STEERMOE:
        assert not {d for d in _src_deps(stage) if "/mat_steer/" in d}, stage
    for stage in MAT_STEER:
        assert not {d for d in _src_deps(stage) if "/steermoe/" in d}, stage
    # the detection stages do not import a backend either: a vLLM edit reruns only generation
    for stage in ["risk_diff", "select_experts"]:
        assert not {d for d in _src_deps(stage) if "/backends/" in d}, stage


def test_transitive_imports_include_parent_packages_and_function_level_imports(tmp_path):
    src = tmp_path / "src" / "steerline"
    (src / "sub").mkdir(parents=True)
    (src / "__init__.py").write_text("")
    (src / "sub" / "__init__.py").write_text("")
    (src / "sub" / "a.py").write_text("def f():\n    from steerline.b import g\n")
    (src / "b.py").write_text("import os\n")
    (src / "unused.py").write_text("")
    script = tmp_path / "stage.py"
    script.write_text("from steerline.sub.a import f\n")
    got = stage_src_deps(script, tmp_path / "src")
    rel = sorted(str(Path(p).relative_to(tmp_path / "src")) for p in got)
    assert rel == ["steerline/__init__.py", "steerline/b.py", "steerline/sub/__init__.py",
                   "steerline/sub/a.py"]


# params key -> (stages `dvc repro` reruns, stages after them that rerun only on a changed input)
RERUNS = {
    # a MAT-Steer training change: the baselines' ~5 minutes of scoring come from the cache
    "lambda_sparse": (["train_steering"], ["eval_steering", "summarize"]),
    "train_steering.lr": (["train_steering"], ["eval_steering", "summarize"]),
    "eval_steering.mat_scales": (["eval_steering"], ["summarize"]),
    "eval_steering.n_bootstrap": (["eval_steering"], ["summarize"]),
    "eval_steering.mean_diff_scales": (["eval_baselines", "eval_steering"], ["summarize"]),
    # adding or dropping a MAT-Steer attribute reruns every MAT-Steer stage
    "attributes": (["prepare_attributes", "extract_activations", "train_steering",
                    "eval_baselines", "eval_steering"], ["summarize"]),
    "select_experts.threshold": (["select_experts@base", "select_experts@finetuned"],
                                 ["capture_routing@finetuned", "risk_diff@finetuned",
                                  "finetune_experts", "train_gate@finetuned",
                                  "answer_safety_base", "answer_safety_finetuned",
                                  "eval_safety", "summarize"]),
    # one model's steering regenerates only that model's answers; the fine-tuned model's
    # reference input (the base answers to the safe prompts) keeps its bytes, so DVC skips it
    "expert_steering.delta": (["answer_safety_base"], ["answer_safety_finetuned", "eval_safety"]),
    "finetuned_steering.activate.delta": (["answer_safety_finetuned"], ["eval_safety"]),
    "finetuned_steering.activate.gate": (["answer_safety_finetuned"], ["eval_safety"]),
    "prompt_gate.cs": (["train_gate@base", "train_gate@finetuned"],
                       ["answer_safety_base", "answer_safety_finetuned", "eval_safety"]),
    "prompt_gate.n_bootstrap": (["train_gate@base", "train_gate@finetuned", "eval_safety"],
                                ["answer_safety_base", "answer_safety_finetuned"]),
    # the one model key: each SteerMoE stage that loads the MoE (on its cmd), then what follows
    # from their outputs; MAT-Steer's dense model likewise
    "model": (["capture_routing@base", "finetune_experts", "train_gate@base",
               "answer_safety_base"],
              ["capture_routing@finetuned", "risk_diff@base", "risk_diff@finetuned",
               "select_experts@base", "select_experts@finetuned", "train_gate@finetuned",
               "answer_safety_finetuned", "eval_safety", "summarize"]),
    "dense_model": (["extract_activations", "eval_baselines", "eval_steering"],
                    ["train_steering", "summarize"]),
    # a judge change loads no model: the answers come from the cache
    "eval_safety.judge_window": (["eval_safety"], []),
    # the goals' bounds also pick the dev-sweep rows the docs show
    "eval_safety.goals": (["eval_safety", "summarize"], []),
    "eval_safety.max_new_tokens": (["answer_safety_base", "answer_safety_finetuned"],
                                   ["eval_safety"]),
}


def test_each_params_key_reruns_only_the_stages_that_read_it():
    stages = read_stages(ROOT / "dvc.yaml")
    for key, want in RERUNS.items():
        assert reruns(stages, key) == (want[0], want[1]), key
