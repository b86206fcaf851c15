"""dvc.yaml declares what each stage really uses, so that `dvc repro` re-runs exactly the stale stages."""

from pathlib import Path

import yaml
from import_graph import closure

ROOT = Path(__file__).resolve().parents[1]


def stage_modules(script: str) -> set[str]:
    """The project files (stages/, table2text/) a stage script runs, transitively, as repo-relative paths."""
    run = closure(ROOT / script) | closure(ROOT / "stages" / "__init__.py")  # `python -m stages.x` runs both
    return {p.relative_to(ROOT).as_posix() for p in run}


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


def plot_definitions(dvc_yaml: Path) -> dict:
    return {name: spec for entry in yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")).get("plots", [])
            for name, spec in entry.items()}


def test_the_plots_page_starts_with_the_curves_and_draws_buckets_as_bars():
    plots = plot_definitions(ROOT / "dvc.yaml")
    assert list(plots)[:2] == ["train_loss", "train_learning_rate"]  # the user's own curves first
    for name, spec in plots.items():
        files = list(spec["y"])
        if all(f.endswith(".tsv") for f in files):  # dvclive curves over the optimiser step
            assert spec["template"] == "linear" and spec["x"] == "step", name
        else:  # per-bucket CSVs: bars, one per bucket, in the file's order
            assert spec["template"] == "bar_buckets" and set(spec["y"].values()) == {"bucket"}, name
    assert (ROOT / ".dvc" / "plots" / "bar_buckets.json").is_file()
    # no stage declares plots of its own: they would render again, as raw files against the row index
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    assert not [name for name, stage in pipeline["stages"].items() if "plots" in stage]


def test_bench_plots_live_in_their_own_dvc_project_with_unique_ids():
    """DVC merges every dvc.yaml of a project into one page; bench/results is a subrepo (its own .dvc/), so its
    plots show only with `dvc --cd bench/results plots show`, and no id there repeats one of the pipeline's."""
    assert (ROOT / "bench" / "results" / ".dvc" / "config").is_file()
    bench = [p for p in (ROOT / "bench" / "results").rglob("dvc.yaml")]
    ids = list(plot_definitions(ROOT / "dvc.yaml")) + [i for p in bench for i in plot_definitions(p)]
    assert len(ids) == len(set(ids)), ids
    for path in bench:
        for name, spec in plot_definitions(path).items():
            if any("by_" in f for f in spec["y"]):
                assert spec["template"] == "bar_buckets_by_file", name
    assert (ROOT / "bench" / "results" / ".dvc" / "plots" / "bar_buckets_by_file.json").is_file()


def test_checkpoints_are_no_dvc_output_and_runtime_files_are_git_ignored():
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    outs = [o if isinstance(o, str) else next(iter(o)) for s in pipeline["stages"].values() for o in s.get("outs", [])]
    declared = outs + [next(iter(m)) for s in pipeline["stages"].values() for m in s.get("metrics", [])]
    assert "checkpoints" not in declared and not [p for p in declared if p.startswith("metrics/runtime")]
    ignored = (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
    assert {"/checkpoints/", "/metrics/runtime/", "/dvc_plots/"} <= set(ignored)


def uncached_plain_outs(stage: dict) -> list[str]:
    """The outs that keep DVC 3.67 from saving the stage in its run cache: Stage.run saves a run-cache entry
    only when no out under `outs:` has cache: false (uncached metrics and plots are fine: the run cache
    copies them in)."""
    return [next(iter(o)) for o in stage.get("outs", []) if isinstance(o, dict)
            and next(iter(o.values())).get("cache", True) is False]


def test_train_merge_and_export_are_found_in_the_run_cache():
    """A `dvc exp run` of params seen before restores these stages ("Stage 'train' is cached - skipping
    run") instead of training again. Evaluate is not among them: its predictions and bucket CSVs are
    git-tracked outs (cache: false), so it runs again."""
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    for name in ("preprocess", "train", "merge", "export"):
        assert not uncached_plain_outs(pipeline["stages"][name]), name
    # dvclive's whole folder is the out: its summary (metrics/train/metrics.json) is removed before a run and
    # restored with the curves, never left over from another run; DVC's cache holds it, so git ignores it
    assert "metrics/train" in pipeline["stages"]["train"]["outs"]
    assert "/metrics/train/" in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
    curves = {f for spec in plot_definitions(ROOT / "dvc.yaml").values() for f in spec["y"] if f.endswith(".tsv")}
    assert curves and all(f.startswith("metrics/train/") for f in curves)  # the plots read the out's files
