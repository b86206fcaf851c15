"""dvc.yaml declares what each stage really uses, so that `dvc repro` re-runs exactly the stale stages."""

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def stage_modules(script: str) -> set[str]:
    """The stages/*.py files a stage script imports, transitively."""
    seen, todo = set(), [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse((ROOT / path).read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stages"):
                names = [node.module] if node.module != "stages" else [f"stages.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("stages.")]
            todo += [n.replace(".", "/") + ".py" for n in names]
    return seen


def test_every_stage_lists_the_code_it_runs_among_its_deps():
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    for name, stage in pipeline["stages"].items():
        assert stage["cmd"] == f"python -m stages.{name}"
        missing = stage_modules(f"stages/{name}.py") - set(stage["deps"])
        assert not missing, f"stage {name}: imports {sorted(missing)} but dvc.yaml does not list them as deps"


def test_every_stage_reads_only_declared_param_groups():
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    declared = {p.split(".")[0] for stage in pipeline["stages"].values() for p in stage["params"]}
    assert declared == set(params), "every params.yaml group belongs to a stage"


def test_models_are_dvc_outputs_and_artifacts_never_git():
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    outs = [o if isinstance(o, str) else next(iter(o)) for s in pipeline["stages"].values() for o in s.get("outs", [])]
    assert "models/adapter" in outs and "models/merged" in outs and "models/gguf" in outs
    assert {a["path"] for a in pipeline["artifacts"].values()} == {"models/adapter", "models/merged", "models/gguf"}
    assert "/models/" in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
