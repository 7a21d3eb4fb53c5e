"""Reading run outputs: ``summary.json``, ``metrics.jsonl``, their tidy (long) form and ``metrics.csv``.

A run directory holds ``summary.json`` (one entry per stage, with the metrics measured
after the stage) and ``metrics.jsonl`` (one object per optimizer step, plus periodic
``eval/...`` lines). Any key may be missing from a line; missing means NaN.

The tidy form has one row per measured number, with the columns :data:`TIDY_COLUMNS`:

- per-step values keep their ``metrics.jsonl`` name (``loss``, ``reward``, ``kl``,
  ``eval/heldout_accuracy``, ...); ``persona_usage`` (a list of 32 shares) becomes
  ``persona_usage/00`` ... ``persona_usage/31`` (in ``metrics.csv``, their mean over each
  stage's steps: ``stage_mean/persona_usage/00`` ..., see :func:`stage_means`);
- the values ``summary.json`` records after each stage are named ``after_stage/<key>``
  (``after_stage/heldout_accuracy``, ``after_stage/reward/vir``, ``after_stage/value``,
  ``after_stage/wall_time_s``, ...) and carry the stage's last step;
- a step logged twice (a stage resumed from a checkpoint repeats the steps after it)
  keeps its last value.

- the values ``summary.json`` records about a stage besides its metrics: ``after_stage/steps``
  (steps run) and, for rl stages, ``after_stage/samples`` (completions sampled).

Rows keep the order of the stages in ``summary.json``, so the tidy table alone (for
example ``metrics.csv`` read back) is enough to rebuild every number of a report.

``metrics.csv`` (:func:`write_metrics_csv`) holds the same numbers one row per logged step:
the columns :data:`CSV_KEY_COLUMNS` (``variant`` says which arm a row belongs to, ``seed`` which
seed), then one column per metric under its ``metrics.jsonl`` name (``after_stage/<key>`` on the
stage's last step, ``eval/<key>`` on the step it was measured at). Stages a compare shares between
its arms (``shared_stages``) are written once per seed, under the variant :data:`SHARED`. A
report writes every logged step of its compared stages and at most 100 evenly spaced steps of
the stages before them (:func:`thin_steps`; their held-out values all stay), and the persona
shares as their mean over each stage (:func:`stage_means`).
Per-step values keep 4 significant digits (whole numbers, such as ``samples``, stay exact),
held-out ones (``eval/``, ``after_stage/``) 8: a per-step statistic of one batch of rollouts is
not known to more than 4 digits, and 30 RL runs of 100-200 logged steps with 32 persona shares
each stay under 2 MB. A report computes every number from the file it wrote, so its tables
follow from the CSV exactly.
:func:`read_tidy_csv` reads it back into the tidy form, giving every arm its seed's shared rows
again; it also reads the long ``metrics.csv`` of earlier versions (the tidy columns themselves).

pandas is imported inside the functions that need it, so importing this module is cheap.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ccrl.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

TIDY_COLUMNS = ["variant", "seed", "stage", "kind", "step", "metric", "value"]
"""columns of the tidy table (and of ``metrics.csv``)"""

AFTER_STAGE = "after_stage/"
"""prefix of the values ``summary.json`` records after each stage"""

CSV_KEY_COLUMNS = ["variant", "seed", "stage", "kind", "step"]
"""the leading columns of ``metrics.csv``; one column per metric follows"""

STEP_DIGITS = 4
"""significant digits of per-step values in ``metrics.csv``"""

HELDOUT_DIGITS = 8
"""significant digits of held-out values (``eval/``, ``after_stage/``) in ``metrics.csv``"""

SHARED = "shared"
"""``metrics.csv``'s variant for the rows of stages every arm of a compare shares (once per seed)"""

HELDOUT_PREFIXES = (AFTER_STAGE, "eval/")
"""metrics measured on held-out data, written with 8 significant digits (per-step values: 4)"""

STAGE_MEAN = "stage_mean/"
"""prefix of a per-step series that ``metrics.csv`` stores as its mean over the stage's logged steps
(:func:`stage_means`; the persona shares), on the stage's last logged step, with 8 significant digits"""

PERSONA_USAGE = "persona_usage"
"""per-step list of the share of routed assignments per persona"""

ALIGNMENT_KINDS = ("rl", "dpo", "orpo")
"""stage kinds a comparison is about; the last one of a run is its "compared stage"."""

_KEY_COLUMNS = ("stage", "kind", "step")
_SEED_DIR = re.compile(r"^seed(-?\d+)$")


@dataclass
class RunRecord:
    """One finished run: which arm and seed it is, its summary and its per-step lines."""

    variant: str
    """the variant (arm) name shown in reports"""
    seed: int
    """the seed the run used"""
    output_dir: Path
    """the run's output directory"""
    summary: dict[str, Any]
    """``summary.json`` as a dict"""
    lines: list[dict[str, Any]] = field(default_factory=list, repr=False)
    """``metrics.jsonl``, one dict per line (empty when the file is missing)"""
    shared_stages: list[str] = field(default_factory=list)
    """stages this run shares with the other arms of its compare (run once per seed, then grafted in)"""


def read_summary(path: str | Path) -> dict[str, Any]:
    """Read a run's ``summary.json``; a missing or malformed file is a :class:`DataError`."""
    path = Path(path)
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: run summary not found (the run did not finish)") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("stages"), list):
        raise DataError(f"{path}: expected an object with a 'stages' list")
    return summary


def read_metrics_lines(path: str | Path) -> list[dict[str, Any]]:
    """Read ``metrics.jsonl``: one dict per non-blank line.

    A malformed *last* line is what an interrupted write leaves behind: it is skipped with a
    warning. A malformed line anywhere else is a :class:`DataError` naming the line.
    """
    path = Path(path)
    text = path.read_text()
    numbered = [(i + 1, s) for i, s in enumerate(text.splitlines()) if s.strip()]
    lines = []
    for j, (lineno, s) in enumerate(numbered):
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            if j == len(numbered) - 1:
                warnings.warn(f"{path}:{lineno}: skipping a truncated last line ({e})", stacklevel=2)
                continue
            raise DataError(f"{path}:{lineno}: not a JSON object ({e})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        lines.append(obj)
    return lines


def load_run(output_dir: str | Path, variant: str | None = None, seed: int | None = None) -> RunRecord:
    """Load one run directory; ``variant`` defaults to the recipe name, ``seed`` to the summary's."""
    output_dir = Path(output_dir)
    summary = read_summary(output_dir / "summary.json")
    metrics_path = output_dir / "metrics.jsonl"
    lines = read_metrics_lines(metrics_path) if metrics_path.is_file() else []
    return RunRecord(
        variant=str(variant if variant is not None else summary.get("recipe", output_dir.name)),
        seed=int(seed if seed is not None else summary.get("seed", 0)),
        output_dir=output_dir,
        summary=summary,
        lines=lines,
        shared_stages=shared_stage_names(summary),
    )


def shared_stage_names(summary: dict) -> list[str]:
    """The stages a compare grafted into this run from its seed's shared run: ``shared_stages`` as
    the compare records it, or (runs of earlier versions) the stages whose checkpoint lies under
    ``shared_from``."""
    names = summary.get("shared_stages")
    if isinstance(names, list):
        return [str(n) for n in names]
    base = summary.get("shared_from")
    if not isinstance(base, str) or not base:
        return []
    root = Path(base)
    return [str(s.get("name")) for s in summary.get("stages", [])
            if isinstance(s, dict) and isinstance(s.get("checkpoint"), str) and Path(s["checkpoint"]).parent == root]


def discover_runs(root: str | Path) -> list[RunRecord]:
    """Every finished run under ``root``: ``<root>/<variant>/seed<k>/summary.json``.

    ``root`` may also be a single run directory (it holds ``summary.json`` itself). Variants
    come in name order, seeds in numeric order; directories without a summary are skipped.
    """
    root = Path(root)
    if (root / "summary.json").is_file():
        return [load_run(root)]
    runs = []
    for vdir in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        seeds = sorted(
            (int(m.group(1)), d) for d in vdir.iterdir() if d.is_dir() and (m := _SEED_DIR.match(d.name))
        )
        for seed, sdir in seeds:
            if (sdir / "summary.json").is_file():
                runs.append(load_run(sdir, variant=vdir.name, seed=seed))
    if not runs:
        raise DataError(f"{root}: no finished runs found (expected <root>/<variant>/seed<k>/summary.json)")
    return runs


def _number(value: Any) -> float | None:
    """A JSON scalar as float, or None when it is not a number (strings, lists, null)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _run_rows(rec: RunRecord, collapse_shared: bool = False) -> list[tuple]:
    shared = set(rec.shared_stages) if collapse_shared else set()
    arm = lambda stage: SHARED if stage in shared else rec.variant   # noqa: E731
    stages = [s for s in rec.summary.get("stages", []) if isinstance(s, dict)]
    kind_of = {s.get("name"): s.get("kind") for s in stages}
    last_step: dict[str, int] = {}
    for line in rec.lines:
        st, step = line.get("stage"), line.get("step")
        if st is not None and isinstance(step, (int, float)):
            last_step[st] = max(last_step.get(st, int(step)), int(step))

    rows: list[tuple] = []
    for s in stages:
        name, kind = s.get("name"), s.get("kind")
        values = dict(s.get("metrics") or {})
        values["wall_time_s"] = s.get("wall_time_s")
        for key in ("steps", "samples"):
            if key in s and key not in values:
                values[key] = s[key]
        for key, value in values.items():
            x = _number(value)
            if x is not None:
                rows.append((arm(name), rec.seed, name, kind, last_step.get(name), AFTER_STAGE + key, x))
    for line in rec.lines:
        st = line.get("stage")
        kind = line.get("kind", kind_of.get(st))
        step = line.get("step")
        step = int(step) if isinstance(step, (int, float)) else None
        for key, value in line.items():
            if key in _KEY_COLUMNS:
                continue
            if key == PERSONA_USAGE and isinstance(value, list):
                for i, share in enumerate(value):
                    x = _number(share)
                    if x is not None:
                        rows.append((arm(st), rec.seed, st, kind, step, f"{PERSONA_USAGE}/{i:02d}", x))
                continue
            x = _number(value)
            if x is not None:
                rows.append((arm(st), rec.seed, st, kind, step, key, x))
    return rows


def tidy_metrics(runs: list[RunRecord], collapse_shared: bool = False) -> pd.DataFrame:
    """All runs in the tidy long form (:data:`TIDY_COLUMNS`); NaN values are left out.

    ``collapse_shared``: the rows of each run's shared stages (``RunRecord.shared_stages``) go under
    the variant :data:`SHARED`, once per seed (what ``metrics.csv`` stores); by default every run
    keeps its own copy."""
    import pandas as pd

    rows = [row for rec in runs for row in _run_rows(rec, collapse_shared)]
    df = pd.DataFrame.from_records(rows, columns=TIDY_COLUMNS).dropna(subset=["value"])
    # a stage resumed from a checkpoint logs the steps after that checkpoint again: keep the last
    df = df.drop_duplicates(["variant", "seed", "stage", "step", "metric"], keep="last")
    return _typed(df.reset_index(drop=True))


def write_metrics_csv(tidy: pd.DataFrame, path: str | Path) -> Path:
    """Write the tidy table as ``metrics.csv``: one row per (variant, seed, stage, step), one column
    per metric (see the module docstring). Rows keep each run's stage order, steps ascending (a
    stage's after-stage values without any logged step come last); columns: per-step metrics in
    the order first logged, then ``eval/``, then ``after_stage/``."""
    import pandas as pd

    path = Path(path)
    df = tidy.copy()
    df["_run"] = pd.factorize(pd.Series(list(zip(df["variant"], df["seed"]))))[0]
    df["_stage"] = df.groupby("_run", sort=False)["stage"].transform(lambda s: pd.factorize(s)[0])
    df["_step"] = df["step"].astype("Float64").fillna(float("inf"))           # no step: after the logged ones
    names = list(dict.fromkeys(df["metric"]))
    order = ([m for m in names if not m.startswith((*HELDOUT_PREFIXES, STAGE_MEAN))]
             + [m for m in names if m.startswith(STAGE_MEAN)] + [m for m in names if m.startswith("eval/")]
             + [m for m in names if m.startswith(AFTER_STAGE)])
    keys = ["_run", "_stage", "_step"]
    wide = df.set_index(keys + ["metric"])["value"].unstack("metric").reindex(columns=order)
    first = df.drop_duplicates(keys).set_index(keys)[CSV_KEY_COLUMNS]
    wide = first.join(wide).sort_index()
    out = wide[CSV_KEY_COLUMNS].astype({"seed": "int64", "step": "Int64"}).astype(str)
    out["step"] = out["step"].replace("<NA>", "")
    for m in order:
        digits = HELDOUT_DIGITS if m.startswith((*HELDOUT_PREFIXES, STAGE_MEAN)) else STEP_DIGITS
        out[m] = [_format_value(v, digits) for v in wide[m].to_numpy(dtype=float)]
    out.to_csv(path, index=False)
    return path


def stage_means(tidy: pd.DataFrame, prefix: str = PERSONA_USAGE + "/") -> pd.DataFrame:
    """The tidy table with each run stage's per-step rows of the metrics starting with ``prefix``
    replaced by one row per metric, ``stage_mean/<metric>``: their mean over the stage's logged
    steps, on the stage's last logged step. What a report reads of the persona shares is exactly
    that mean (the usage heatmap, the largest share), and 32 shares per step are most of a
    council run's ``metrics.csv``."""
    import pandas as pd

    sel = tidy["metric"].str.startswith(prefix)
    if not sel.any():
        return tidy
    keys = ["variant", "seed", "stage"]
    series = tidy[sel]
    means = series.groupby([*keys, "metric"], sort=False).agg(kind=("kind", "first"), step=("step", "max"),
                                                               value=("value", "mean")).reset_index()
    means["metric"] = STAGE_MEAN + means["metric"]
    # appended after the other rows: every run stage has those (its after-stage values), so the runs'
    # and stages' order, which write_metrics_csv keeps, is unchanged
    return _typed(pd.concat([tidy[~sel], means[TIDY_COLUMNS]], ignore_index=True))


def thin_steps(tidy: pd.DataFrame, keep: set[str], max_steps: int = 100) -> pd.DataFrame:
    """The tidy table with the per-step rows of each run stage whose name is not in ``keep`` cut to
    ``max_steps`` evenly spaced logged steps (the first and the last among them); held-out rows
    (``eval/``, ``after_stage/``) all stay. A report reads only its compared stages step by step
    (``keep``); of the stages before them it reads the held-out values, so their curves are kept
    at a resolution a plot shows and the full logs stay in each run's ``metrics.jsonl``."""
    if max_steps < 2:
        raise ValueError(f"thin_steps: max_steps must be >= 2, got {max_steps}")
    import pandas as pd

    held = tidy["metric"].str.startswith(HELDOUT_PREFIXES)
    drop = pd.Series(False, index=tidy.index)
    for _, g in tidy[~held & ~tidy["stage"].isin(keep)].groupby(["variant", "seed", "stage"], sort=False):
        steps = sorted(g["step"].dropna().unique())
        if len(steps) <= max_steps:
            continue
        kept = {steps[round(i * (len(steps) - 1) / (max_steps - 1))] for i in range(max_steps)}
        drop |= tidy.index.isin(g.index[~g["step"].isin(kept)])
    return tidy[~drop].reset_index(drop=True)


def _format_value(v: float, digits: int) -> str:
    """``v`` with ``digits`` significant digits; whole numbers in full; NaN empty."""
    if v != v:
        return ""
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.{digits}g}"


def read_tidy_csv(path: str | Path, expand_shared: bool = True) -> pd.DataFrame:
    """Read a ``metrics.csv`` written by :func:`ccrl.reporting.build_report` back into the tidy form
    (either layout: one column per metric, or the long one of earlier versions).

    ``expand_shared``: every arm gets its seed's :data:`SHARED` rows (before its own), so each
    (variant, seed) reads as its whole pipeline; False keeps them under ``shared``."""
    import pandas as pd

    df = pd.read_csv(path, dtype={"variant": str, "stage": str, "kind": str, "metric": str})
    if set(df.columns) == set(TIDY_COLUMNS):                     # the long layout of earlier versions
        tidy = _typed(df[TIDY_COLUMNS])
    else:
        missing = [c for c in CSV_KEY_COLUMNS if c not in df.columns]
        if missing:
            raise DataError(f"{path}: missing columns {missing}; expected {CSV_KEY_COLUMNS} followed by one "
                            f"column per metric")
        metrics = [c for c in df.columns if c not in CSV_KEY_COLUMNS]
        long = df.melt(id_vars=CSV_KEY_COLUMNS, value_vars=metrics, var_name="_metric", value_name="_value",
                       ignore_index=False)                           # "value" is a metric's name (V_Ω)
        long = long.sort_index(kind="stable").dropna(subset=["_value"]).reset_index(drop=True)
        tidy = _typed(long.rename(columns={"_metric": "metric", "_value": "value"})[TIDY_COLUMNS])
    return expand_shared_rows(tidy) if expand_shared else tidy


def expand_shared_rows(tidy: pd.DataFrame) -> pd.DataFrame:
    """The tidy table with its :data:`SHARED` rows copied to every other variant of the same seed,
    placed before that run's own rows."""
    import pandas as pd

    is_shared = tidy["variant"] == SHARED
    if not is_shared.any():
        return tidy
    shared, own = tidy[is_shared], tidy[~is_shared]
    parts = []
    for (variant, seed), g in own.groupby(["variant", "seed"], sort=False):
        parts += [shared[shared["seed"] == seed].assign(variant=variant), g]
    return _typed(pd.concat(parts, ignore_index=True)) if parts else own


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["seed"] = df["seed"].astype("int64")
    df["step"] = df["step"].astype("Int64")
    df["value"] = df["value"].astype("float64")
    return df
