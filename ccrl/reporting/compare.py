"""``ccrl compare``: run every variant × seed of a recipe, then write the report.

Runs go one after another into ``<output_dir>/<variant>/seed<k>/``, seed-major (every
variant at the first seed, then every variant at the next), so a compare stopped half-way
still holds a balanced comparison over the seeds it finished.

Resuming: a run whose ``summary.json`` exists is not run again. Beside it the runner
writes ``compare.json`` with a fingerprint of the run's effective recipe; if the recipe
changed since (other steps, another learning rate, ...), reusing the old run would mix
two experiments in one table, so the compare stops and says which directory to remove.
A run without ``summary.json`` (interrupted) is started again from the beginning.

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

FINGERPRINT_FILE = "compare.json"
_COMPARE_KEYS = ("variants", "seeds", "report_dir", "output_dir", "seed")
"""recipe keys that say how to compare, not what a run does (left out of the fingerprint)"""


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
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RecipeError(f"variants: names must be unique, repeated: {dupes}")
    seeds = list(rec.seeds) or [rec.seed]
    return [(v, int(s)) for s in seeds for v in variants]


def fingerprint(raw: dict, variant_set: dict, seed: int) -> str:
    """A short hash of what one run does: the base recipe (less the compare keys), its overrides, its seed."""
    base = {k: v for k, v in raw.items() if k not in _COMPARE_KEYS}
    blob = json.dumps({"recipe": base, "set": variant_set, "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _check_finished(run_dir: Path, fp: str, seed: int) -> None:
    """Raise when a finished run directory holds a different experiment than the one asked for."""
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
        except (json.JSONDecodeError, AttributeError):
            old_seed = None
        if old_seed == seed:
            return
        why = f"it was run with seed {old_seed!r}, not {seed}"
    raise RecipeError(f"{run_dir}: holds a finished run, but {why}; remove that directory to run it again, "
                      f"or give the compare another output_dir")


def _command(recipe: Any, rec, overrides: dict | list[str] | None) -> str:
    source = recipe if isinstance(recipe, (str, os.PathLike)) else getattr(rec, "source", None)
    if not source or source == "<recipe>":
        return f"ccrl.reporting.run_compare(<recipe {rec.name!r} given as a mapping>)"
    items = overrides if isinstance(overrides, list) else [f"{k}={_yaml_scalar(v)}" for k, v in (overrides or {}).items()]
    return "ccrl compare " + " ".join([Path(source).as_posix(), *(f"--set {x}" for x in items)])


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
) -> Path:
    """Run every variant × seed of ``recipe`` (a path, a mapping or a loaded recipe), resumably,
    then write the report; return the report directory.

    ``overrides`` apply to the base recipe before the variants' own. ``run_fn(recipe_dict,
    overrides=...)`` runs one recipe (default :func:`ccrl.pipeline.run_recipe`); it gets the
    base recipe and the variant's overrides plus ``seed`` and ``output_dir``. ``runs_root``
    defaults to the recipe's output_dir, ``report_dir`` to its report_dir
    (``reports/<name>``). ``command`` is what the report shows as the command that made it.
    """
    from ccrl.reporting.metrics import load_run
    from ccrl.reporting.report import build_report

    rec = _load(recipe, overrides)
    if run_fn is None:
        from ccrl.pipeline import run_recipe as run_fn
    plan = run_plan(rec)
    root = Path(runs_root if runs_root is not None else rec.output_dir)
    out = Path(report_dir or getattr(rec, "report_dir", None) or Path("reports") / rec.name)
    n_var, n_seeds = len({v.name for v, _ in plan}), len({s for _, s in plan})
    print(f"compare {rec.name}: {n_var} variant(s) × {n_seeds} seed(s) = {len(plan)} runs under {root}", flush=True)

    done = []
    for i, (variant, seed) in enumerate(plan, 1):
        run_dir = root / variant.name / f"seed{seed}"
        tag = f"[{i}/{len(plan)}] {variant.name} seed {seed}"
        fp = fingerprint(rec.raw, dict(variant.set), seed)
        if (run_dir / "summary.json").is_file():
            _check_finished(run_dir, fp, seed)
            print(f"{tag}: finished earlier, kept ({run_dir})", flush=True)
        else:
            print(f"{tag}: running → {run_dir}", flush=True)
            t0 = time.perf_counter()
            try:
                run_fn(rec.raw, overrides={**variant.set, "seed": seed, "output_dir": str(run_dir)})
            except CcrlError as e:
                raise CcrlError(f"compare {rec.name}: run {variant.name}/seed{seed} ({i} of {len(plan)}) failed: {e} "
                                f"The {len(done)} finished run(s) are kept under {root}; run the same command again "
                                f"to resume.") from e
            if not (run_dir / "summary.json").is_file():
                raise RuntimeError(f"{tag}: the run returned but wrote no summary.json in {run_dir}")
            (run_dir / FINGERPRINT_FILE).write_text(json.dumps(
                {"variant": variant.name, "seed": seed, "set": dict(variant.set), "fingerprint": fp},
                indent=1, default=str) + "\n")
            print(f"{tag}: done in {time.perf_counter() - t0:.1f}s{_final_accuracy(run_dir)}", flush=True)
        done.append(load_run(run_dir, variant=variant.name, seed=seed))

    variants = {v.name: dict(v.set) for v, _ in plan}
    report = build_report(done, out, title=f"{rec.name}: {n_var} variant(s) × {n_seeds} seed(s)",
                          commands=[command or _command(recipe, rec, overrides)], variants=variants, runs_root=root)
    print(f"compare {rec.name}: report written to {report}", flush=True)
    return out


def _final_accuracy(run_dir: Path) -> str:
    try:
        stages = json.loads((run_dir / "summary.json").read_text())["stages"]
        acc = stages[-1]["metrics"]["heldout_accuracy"]
        return f", held-out accuracy after {stages[-1].get('name', 'the last stage')}: {float(acc):.3f}"
    except (KeyError, IndexError, TypeError, ValueError, json.JSONDecodeError):
        return ""
