"""``ccrl compare``: run every variant × seed of a recipe, then write the report.

Runs go one after another into ``<output_dir>/<variant>/seed<k>/``, seed-major (every
variant at the first seed, then every variant at the next), so a compare stopped half-way
still holds a balanced comparison over the seeds it finished.

Resuming. Before a run starts, the runner writes ``compare.json`` into its directory with
a fingerprint of what the run does (the base recipe less the compare keys, the variant's
overrides, the seed). On the next ``ccrl compare``:

- a run whose ``summary.json`` lists every stage of the recipe is finished and kept;
- a run that started but did not finish is continued with ``resume=True`` (the pipeline
  skips its completed stages and picks an interrupted stage up from its last checkpoint);
- a run directory whose fingerprint differs (the recipe changed: other steps, another
  learning rate, ...) stops the compare with a message naming the directory, because
  reusing it would mix two experiments in one table.

Shared stages. With ``shared_stages: [pretrain, sft]`` the leading stages run once per seed
into ``<output_dir>/_shared/seed<k>/`` and every variant of that seed starts from their last
checkpoint, so the arms differ only where the variants differ (a paired comparison, and the
shared stages are not paid for once per arm). The shared stages' summary entries and metric
lines are copied into each variant's run directory, so every run still reads as the whole
pipeline; the report's ``metrics.csv`` stores them once per seed (variant ``shared``).

Budget. ``budget: {kind: seconds | samples, value: N}`` gives every arm's rl stages (those after the
shared stages) the same ``max_seconds`` or ``max_samples`` (:func:`budget_overrides`): they are
added to each variant's overrides, so they are part of its fingerprint and of the ``ccrl run``
line that reproduces it, and the report states the budget. ``baseline: <variant>`` names the arm
the report's paired differences are taken against.

A run that fails on bad input (:class:`ccrl.errors.CcrlError`) stops the compare with
that message; finished runs are kept, and the same command resumes after the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ccrl.errors import CcrlError, RecipeError
from ccrl.reporting.metrics import SHARED

FINGERPRINT_FILE = "compare.json"
_COMPARE_KEYS = ("variants", "seeds", "report_dir", "output_dir", "seed", "shared_stages", "budget", "baseline")
"""recipe keys that say how to compare, not what a run does (left out of the fingerprint; the budget
enters it through each variant's overrides, :func:`budget_overrides`)"""


def _load(recipe: Any, overrides: dict | list[str] | None):
    """A validated recipe object: loaded with :func:`ccrl.config.load_recipe` unless it is one."""
    if hasattr(recipe, "raw") and hasattr(recipe, "variants"):
        if not overrides:
            return recipe
        recipe = recipe.raw
    from ccrl.config import load_recipe

    return load_recipe(recipe, overrides)


def run_plan(rec) -> list[tuple[Any, int]]:
    """(variant, seed) pairs in run order: seed-major. No variants: one arm named ``base``."""
    variants = list(rec.variants) or [SimpleNamespace(name="base", set={})]
    names = [v.name for v in variants]
    for name in names:
        if not name or name in (".", "..") or "/" in name or os.sep in name:
            raise RecipeError(f"variants: {name!r} is not usable as a directory name")
        if name == SHARED and getattr(rec, "shared_stages", None):
            raise RecipeError(f"variants: {SHARED!r} names the shared stages' rows in the report's metrics.csv; "
                              f"give that variant another name")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RecipeError(f"variants: names must be unique, repeated: {dupes}")
    seeds = list(rec.seeds) or [rec.seed]
    return [(v, int(s)) for s in seeds for v in variants]


def budget_overrides(rec) -> dict[str, Any]:
    """The overrides that give every rl stage after the shared stages the compare's ``budget``
    (``{"stages.rl.max_seconds": 600}``); empty without a budget."""
    budget = getattr(rec, "budget", None)
    if budget is None:
        return {}
    shared = set(getattr(rec, "shared_stages", []) or [])
    return {f"stages.{s.name}.{budget.stage_key()}": budget.value for s in rec.stages
            if s.kind == "rl" and s.name not in shared}


def _run_set(rec, variant) -> dict[str, Any]:
    """What one variant's runs override in the base recipe: its own ``set`` and the budget."""
    return {**variant.set, **budget_overrides(rec)}


def fingerprint(raw: dict, variant_set: dict, seed: int) -> str:
    """A short hash of what one run does: the base recipe (less the compare keys), its overrides, its seed."""
    base = {k: v for k, v in raw.items() if k not in _COMPARE_KEYS}
    blob = json.dumps({"recipe": base, "set": variant_set, "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _expected_stages(rec) -> list[str]:
    """Stage names of the base recipe (a stage's name defaults to its kind)."""
    stages = getattr(rec, "stages", None)
    if stages:
        return [s.name for s in stages]
    return [str(s.get("name") or s.get("kind")) for s in rec.raw.get("stages", []) if isinstance(s, dict)]


def run_state(run_dir: Path, expected: list[str]) -> str:
    """``"new"`` (nothing there), ``"finished"`` (summary.json lists every expected stage) or ``"partial"``."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            names = {s.get("name") for s in json.loads(summary.read_text()).get("stages", [])}
        except (json.JSONDecodeError, AttributeError):
            names = set()
        if set(expected) <= names:
            return "finished"
    return "partial" if run_dir.is_dir() and any(run_dir.iterdir()) else "new"


def _check_same_experiment(run_dir: Path, fp: str, seed: int) -> None:
    """Raise when a run directory holds (part of) a different experiment than the one asked for."""
    marker = run_dir / FINGERPRINT_FILE
    if marker.is_file():
        try:
            old = json.loads(marker.read_text()).get("fingerprint")
        except (json.JSONDecodeError, AttributeError):
            old = None
        if old == fp:
            return
        why = "the recipe or the variant's overrides changed since it ran"
    else:
        try:
            old_seed = json.loads((run_dir / "summary.json").read_text()).get("seed")
        except (OSError, json.JSONDecodeError, AttributeError):
            old_seed = None
        if old_seed == seed:
            return
        why = "it was not made by this compare" if old_seed is None else f"it was run with seed {old_seed!r}, not {seed}"
    raise RecipeError(f"{run_dir}: holds a run, but {why}; remove that directory to run it again, "
                      f"or give the compare another output_dir")


def _write_marker(run_dir: Path, variant, seed: int, fp: str, status: str, run_set: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FINGERPRINT_FILE).write_text(json.dumps(
        {"variant": variant.name, "seed": seed, "set": run_set, "fingerprint": fp, "status": status},
        indent=1, default=str) + "\n")


def _source(recipe: Any, rec) -> str | None:
    source = recipe if isinstance(recipe, (str, os.PathLike)) else getattr(rec, "source", None)
    return None if not source or source == "<recipe>" else Path(source).as_posix()


def _set_args(overrides: dict | list[str] | None) -> list[str]:
    items = overrides if isinstance(overrides, list) else [f"{k}={_yaml_scalar(v)}" for k, v in (overrides or {}).items()]
    return [f"--set {x}" for x in items]


def _command(recipe: Any, rec, overrides: dict | list[str] | None) -> str:
    source = _source(recipe, rec)
    if source is None:
        return f"ccrl.reporting.run_compare(<recipe {rec.name!r} given as a mapping>)"
    return " ".join(["ccrl compare", source, *_set_args(overrides)])


def _run_command(recipe: Any, rec, overrides, run_overrides: dict) -> str:
    """The ``ccrl run`` line that reproduces one run of the compare on its own."""
    source = _source(recipe, rec)
    if source is None:
        return f"ccrl.run_recipe(<recipe {rec.name!r}>, overrides={run_overrides!r})"
    return " ".join(["ccrl run", source, *_set_args(overrides), *_set_args(run_overrides)])


def _yaml_scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return v if isinstance(v, str) else json.dumps(v)


def run_compare(
    recipe: Any,
    overrides: dict | list[str] | None = None,
    run_fn: Callable[..., dict] | None = None,
    runs_root: str | Path | None = None,
    *,
    report_dir: str | Path | None = None,
    command: str | None = None,
    jobs: int = 1,
) -> Path:
    """Run every variant × seed of ``recipe`` (a path, a mapping or a loaded recipe), resumably,
    then write the report; return the report directory.

    ``overrides`` apply to the base recipe before the variants' own. ``run_fn(recipe_dict,
    overrides=..., [resume=True])`` runs one recipe (default :func:`ccrl.pipeline.run_recipe`);
    it gets the base recipe, and as overrides the variant's plus ``seed`` and ``output_dir``;
    ``resume=True`` is passed only to continue a run that started earlier. ``runs_root``
    defaults to the recipe's output_dir, ``report_dir`` to its report_dir
    (``reports/<name>``). ``command`` is what the report shows as the command that made it.

    ``jobs`` > 1 runs that many runs at once, each in its own process (the shared stages of
    every seed first, then the variant runs), with the default ``run_fn`` only; every run is
    the same as in a sequential compare (its own seed, its own threads from the recipe), so
    set ``jobs × threads`` to the cores there are.
    """
    from ccrl.reporting.metrics import load_run
    from ccrl.reporting.report import build_report

    rec = _load(recipe, overrides)
    if run_fn is None:
        from ccrl.pipeline import run_recipe as run_fn
    plan = run_plan(rec)
    expected = _expected_stages(rec)
    root = Path(runs_root if runs_root is not None else rec.output_dir)
    out = Path(report_dir or getattr(rec, "report_dir", None) or Path("reports") / rec.name)
    n_var, n_seeds = len({v.name for v, _ in plan}), len({s for _, s in plan})
    print(f"compare {rec.name}: {n_var} variant(s) × {n_seeds} seed(s) = {len(plan)} runs under {root}", flush=True)

    done, run_commands = [], {}
    shared = list(getattr(rec, "shared_stages", []) or [])
    if shared:
        expected = [n for n in expected if n not in shared]
    if jobs > 1:
        if run_fn is not _default_run_fn():
            raise ValueError("run_compare: jobs > 1 runs each run in its own process with ccrl's own run_recipe; "
                             "a custom run_fn needs jobs=1")
        _run_parallel(recipe, overrides, rec, plan, root, shared, jobs)
    for i, (variant, seed) in enumerate(plan, 1):
        run_dir = root / variant.name / f"seed{seed}"
        run_overrides = {**_run_set(rec, variant), "seed": seed, "output_dir": run_dir.as_posix()}
        run_commands[(variant.name, seed)] = _run_command(recipe, rec, overrides, run_overrides)
        tag = f"[{i}/{len(plan)}] {variant.name} seed {seed}"
        failed = (f"compare {rec.name}: run {variant.name}/seed{seed} ({i} of {len(plan)}) failed: {{}} The "
                  f"{len(done)} finished run(s) are kept under {root}; run the same command again to resume.")
        try:
            _variant_run(rec, run_fn, variant, seed, root, shared, expected, tag, failed)
        except KeyboardInterrupt:
            print(f"compare {rec.name}: interrupted at {tag}; {len(done)} finished run(s) are kept, and the same "
                  f"command resumes", flush=True)
            raise
        done.append(load_run(run_dir, variant=variant.name, seed=seed))

    report = build_report(done, out, title=f"{rec.name}: {n_var} variant(s) × {n_seeds} seed(s)",
                          commands=[command or _command(recipe, rec, overrides)],
                          variants={v.name: dict(v.set) for v, _ in plan}, runs_root=root, run_commands=run_commands,
                          budget=getattr(rec, "budget", None), budget_stages=sorted_budget_stages(rec),
                          baseline=getattr(rec, "baseline", None))
    print(f"compare {rec.name}: report written to {report}", flush=True)
    return out


def sorted_budget_stages(rec) -> list[str]:
    """The names of the stages the budget applies to, in recipe order."""
    return [key.split(".")[1] for key in budget_overrides(rec)]


def _default_run_fn():
    from ccrl.pipeline import run_recipe

    return run_recipe


def _variant_run(rec, run_fn, variant, seed: int, root: Path, shared: list[str], expected: list[str], tag: str,
                 failed: str) -> Path:
    """One variant × seed: the seed's shared stages if not yet run, then the variant's own stages
    branched from their checkpoint, then the shared stages' records grafted in. Returns the run dir."""
    run_dir = root / variant.name / f"seed{seed}"
    run_overrides = {**_run_set(rec, variant), "seed": seed, "output_dir": run_dir.as_posix()}
    raw = rec.raw
    if shared:
        shared_dir = root / "_shared" / f"seed{seed}"
        _shared_run(rec, run_fn, shared, seed, shared_dir, failed)
        raw = branch_recipe(rec.raw, shared, shared_dir)
    _one_run(rec, run_fn, variant, seed, run_dir, run_overrides, expected, tag, failed, raw=raw)
    if shared:
        graft_shared(run_dir, shared_dir, shared)
    return run_dir


def _run_parallel(recipe, overrides, rec, plan, root: Path, shared: list[str], jobs: int) -> None:
    """Run the plan ``jobs`` at a time in worker processes (every seed's shared stages first, so
    no two runs start the same shared stages); the sequential loop after it then finds every run
    finished, or reruns a failed one and reports its error the usual way."""
    import concurrent.futures as cf
    import multiprocessing as mp

    source = recipe if isinstance(recipe, (str, os.PathLike)) else rec.raw
    errors = []
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        phases = [[(None, s) for s in sorted({s for _, s in plan})]] if shared else []
        for phase in phases + [[(v.name, s) for v, s in plan]]:
            futures = [pool.submit(_parallel_item, source, overrides, name, s, str(root)) for name, s in phase]
            errors += [e for e in (f.exception() for f in cf.as_completed(futures)) if e is not None]
    if errors:
        print(f"compare {rec.name}: {len(errors)} parallel job(s) failed; rerunning them one by one", flush=True)


def _parallel_item(source, overrides, variant_name: str | None, seed: int, root: str) -> None:
    """One job of :func:`_run_parallel`: the shared stages of ``seed`` (``variant_name`` None) or one run."""
    from ccrl.pipeline import run_recipe

    rec = _load(source, overrides)
    shared = list(getattr(rec, "shared_stages", []) or [])
    failed = "run failed: {}"
    if variant_name is None:
        _shared_run(rec, run_recipe, shared, seed, Path(root) / "_shared" / f"seed{seed}", failed)
        return
    variant = next(v for v, _ in run_plan(rec) if v.name == variant_name)
    expected = [n for n in _expected_stages(rec) if n not in shared]
    _variant_run(rec, run_recipe, variant, seed, Path(root), shared, expected, f"{variant.name} seed {seed}", failed)


def _one_run(rec, run_fn, variant, seed: int, run_dir: Path, run_overrides: dict, expected: list[str], tag: str,
             failed: str, raw: dict | None = None) -> None:
    """Run (or keep, or continue) one variant × seed; ``failed`` formats the message of a failed run."""
    raw = run_recipe_raw(rec.raw if raw is None else raw)
    run_set = _run_set(rec, variant)
    fp = fingerprint(rec.raw, run_set, seed)
    state = run_state(run_dir, expected)
    if state != "new":
        _check_same_experiment(run_dir, fp, seed)
    if state == "finished":
        print(f"{tag}: finished earlier, kept ({run_dir})", flush=True)
        return
    print(f"{tag}: {'continuing' if state == 'partial' else 'running'} → {run_dir}", flush=True)
    _write_marker(run_dir, variant, seed, fp, "running", run_set)
    t0 = time.perf_counter()
    try:
        if state == "partial":
            run_fn(raw, overrides=run_overrides, resume=True)
        else:
            run_fn(raw, overrides=run_overrides)
    except CcrlError as e:
        raise CcrlError(failed.format(e)) from e
    if run_state(run_dir, expected) != "finished":
        raise RuntimeError(f"{tag}: the run returned but {run_dir / 'summary.json'} does not list every stage "
                           f"({', '.join(expected)})")
    _write_marker(run_dir, variant, seed, fp, "finished", run_set)
    print(f"{tag}: done in {time.perf_counter() - t0:.1f}s{_final_accuracy(run_dir)}", flush=True)


def _final_accuracy(run_dir: Path) -> str:
    try:
        stages = json.loads((run_dir / "summary.json").read_text())["stages"]
        acc = stages[-1]["metrics"]["heldout_accuracy"]
        return f", held-out accuracy after {stages[-1].get('name', 'the last stage')}: {float(acc):.3f}"
    except (KeyError, IndexError, TypeError, ValueError, json.JSONDecodeError):
        return ""


# --------------------------------------------------------------------------- shared stages


def run_recipe_raw(raw: dict) -> dict:
    """The recipe one run of the compare runs: ``raw`` without the keys that say how to compare (the
    variants, seeds, shared stages, budget and baseline; the budget reaches the run as overrides)."""
    return {k: v for k, v in raw.items() if k not in ("variants", "seeds", "report_dir", "shared_stages", "budget",
                                                      "baseline")}


def shared_recipe(raw: dict, shared: list[str]) -> dict:
    """The base recipe cut to its shared leading stages (and stripped of the compare keys)."""
    out = run_recipe_raw(raw)
    out["stages"] = list(raw["stages"])[: len(shared)]
    return out


def branch_recipe(raw: dict, shared: list[str], shared_dir: Path) -> dict:
    """The base recipe's later stages, starting from the last shared stage's checkpoint."""
    import copy

    out = shared_recipe(raw, shared)
    stages = copy.deepcopy(list(raw["stages"])[len(shared):])
    data = next((s.get("data") for s in reversed(raw["stages"][: len(shared)]) if s.get("data")), None)
    if data is not None and not stages[0].get("data"):
        stages[0]["data"] = copy.deepcopy(data)
    out["stages"] = stages
    out["model"] = {"checkpoint": (shared_dir / shared[-1]).as_posix()}
    out.pop("tokenizer", None)
    return out


def _shared_run(rec, run_fn, shared: list[str], seed: int, shared_dir: Path, failed: str) -> None:
    state = run_state(shared_dir, shared)
    if state == "finished":
        return
    print(f"shared stages {shared} seed {seed}: {'continuing' if state == 'partial' else 'running'} → {shared_dir}",
          flush=True)
    overrides = {"seed": seed, "output_dir": shared_dir.as_posix()}
    try:
        if state == "partial":
            run_fn(shared_recipe(rec.raw, shared), overrides=overrides, resume=True)
        else:
            run_fn(shared_recipe(rec.raw, shared), overrides=overrides)
    except CcrlError as e:
        raise CcrlError(failed.format(e)) from e


def graft_shared(run_dir: Path, shared_dir: Path, shared: list[str]) -> None:
    """Copy the shared stages' summary entries and metric lines in front of a variant run's own
    (idempotent), so each run directory reads as the whole pipeline."""
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text())
    have = {s.get("name") for s in summary.get("stages", [])}
    if set(shared) <= have:
        return
    base = json.loads((shared_dir / "summary.json").read_text())
    summary["stages"] = [s for s in base["stages"] if s.get("name") in shared] + summary["stages"]
    summary["shared_from"] = shared_dir.as_posix()
    summary["shared_stages"] = list(shared)
    tmp = summary_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    tmp.replace(summary_path)
    metrics = run_dir / "metrics.jsonl"
    own = metrics.read_text() if metrics.exists() else ""
    base_lines = (shared_dir / "metrics.jsonl").read_text() if (shared_dir / "metrics.jsonl").exists() else ""
    metrics.write_text(base_lines + own)
