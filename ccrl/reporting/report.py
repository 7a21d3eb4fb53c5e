"""The comparison report: per-run values, mean ± 95% CI per variant, plots, ``report.md``.

Every number in the report is computed from the tidy table that is written as
``metrics.csv`` (the file is written first and read back), so the tables can be
rebuilt from that file alone: ``variant_table(per_run_values(read_tidy_csv(path)))``.

Definitions (per run; the *compared stage* is the run's last rl/dpo/orpo stage, or its
last stage when it has none, unless ``stage=`` names one):

- ``start_accuracy``: held-out accuracy after the stage before the compared one;
- ``final_accuracy``: held-out accuracy after the compared stage (``summary.json``);
- ``best_accuracy``: the largest of the periodic ``eval/heldout_accuracy`` values of the
  compared stage and ``final_accuracy``;
- ``preference_accuracy``, ``heldout_value``: after the compared stage (V_Ω = ``value``);
- ``reward_mean``, ``kl_mean``, ``council_entropy_mean``, ``tokens_per_s``: means over
  the compared stage's optimizer steps of ``reward``, ``kl``, the council entropy (see
  :data:`COUNCIL_ENTROPY_KEYS`), ``tokens_per_s``;
- ``max_persona_share``: the largest entry of the per-persona mean of ``persona_usage``
  over the compared stage's steps;
- ``wall_time_s``: the compared stage's wall time.

Over seeds: mean ± t_{0.975, n−1} · s / √n with s the sample standard deviation (ddof 1)
and n the number of seeds with a value; n = 1 has no interval ("± n/a").

Paired against a baseline arm (``baseline:`` of a compare recipe; :func:`paired_differences`):
per seed d_k = final_accuracy(arm, seed k) − final_accuracy(baseline, seed k), both runs starting
from that seed's same shared checkpoint; then mean(d) ± t_{0.975, n−1} · s_d / √n over the n
seeds both arms finished. The verdict (:func:`paired_verdict`) is "better" when the whole 95%
interval is above 0, "worse" when it is below 0, and "not separable at n seeds" otherwise (or
with a single seed, which has no interval). t comes from :func:`t_quantile_975` (a table for
df ≤ 30, then a series; no scipy).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ccrl.reporting.metrics import (
    AFTER_STAGE,
    ALIGNMENT_KINDS,
    PERSONA_USAGE,
    STAGE_MEAN,
    RunRecord,
    discover_runs,
    expand_shared_rows,
    read_tidy_csv,
    stage_means,
    thin_steps,
    tidy_metrics,
    write_metrics_csv,
)

if TYPE_CHECKING:
    import pandas as pd

# --------------------------------------------------------------------------- Student's t

T_975 = {
    1: 12.7062047, 2: 4.30265273, 3: 3.18244631, 4: 2.77644511, 5: 2.57058184,
    6: 2.44691185, 7: 2.36462425, 8: 2.30600414, 9: 2.26215716, 10: 2.22813885,
    11: 2.20098516, 12: 2.17881283, 13: 2.16036866, 14: 2.14478669, 15: 2.13144955,
    16: 2.11990530, 17: 2.10981558, 18: 2.10092204, 19: 2.09302405, 20: 2.08596345,
    21: 2.07961384, 22: 2.07387307, 23: 2.06865761, 24: 2.06389856, 25: 2.05953855,
    26: 2.05552944, 27: 2.05183052, 28: 2.04840714, 29: 2.04522964, 30: 2.04227246,
}
"""The 0.975 quantile of Student's t with df = 1..30 degrees of freedom (two-sided 95%).

Values as in any t table (e.g. NIST/SEMATECH e-Handbook of Statistical Methods, §1.3.6.7.2),
given here to 9 significant digits, computed by inverting the regularised incomplete beta
function (t CDF) at 0.975.
"""

_Z_975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """Two-sided 95% Student's t quantile t_{0.975, df}.

    df ≤ 30 from :data:`T_975`; beyond it the Cornish–Fisher expansion of Abramowitz &
    Stegun 26.7.5 (error below 1e-6 for df > 30).
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df in T_975:
        return T_975[df]
    z = _Z_975
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def mean_ci(values) -> tuple[float, float, int]:
    """(mean, 95% CI half-width, n) of the non-NaN values; the half-width is NaN for n < 2."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(xs) / n
    if n == 1:
        return mean, math.nan, 1
    s = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, t_quantile_975(n - 1) * s / math.sqrt(n), n


# --------------------------------------------------------------------------- per-run values


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    decimals: int
    group: str
    """"outcome" (held-out, after the stage) or "training" (over the stage's steps)"""
    doc: str
    optional: bool = False
    """shown only when some run has a value"""


COLUMNS = [
    Column("start_accuracy", "held-out acc. before", 3, "outcome",
           "held-out accuracy after the stage before the compared one (the starting point)"),
    Column("final_accuracy", "final held-out acc.", 3, "outcome", "held-out accuracy after the compared stage"),
    Column("best_accuracy", "best held-out acc.", 3, "outcome",
           "largest held-out accuracy among the compared stage's periodic evals and its final value"),
    Column("preference_accuracy", "preference acc.", 3, "outcome",
           "share of held-out preference pairs ranked correctly (dpo/orpo)", optional=True),
    Column("heldout_value", "held-out V_Ω", 3, "outcome", "V_Ω (the recipe's weighted reward) on held-out prompts"),
    Column("reward_mean", "mean train reward", 3, "training", "mean V_Ω of the training rollouts, over RL steps"),
    Column("kl_mean", "KL", 4, "training", "mean KL to the reference policy, over steps"),
    Column("council_entropy_mean", "council entropy", 3, "training",
           "mean H_Ω of the overseer's persona weights (nats; max ln 32 ≈ 3.466)"),
    Column("max_persona_share", "largest persona share", 3, "training",
           "largest per-persona share of routed assignments, averaged over steps (uniform: 1/32 ≈ 0.031)"),
    Column("tokens_per_s", "tokens/s", 0, "training", "mean training throughput"),
    Column("steps", "steps run", 1, "training",
           "optimizer steps the compared stage ran (fewer than planned when a budget or a callback ended it)",
           optional=True),
    Column("samples", "completions sampled", 0, "training",
           "completions the compared stage sampled (dynamic sampling's dropped groups included)", optional=True),
    Column("wall_time_s", "wall time (s)", 1, "training", "wall-clock time of the compared stage"),
]
COLUMN_KEYS = [c.key for c in COLUMNS]

COUNCIL_ENTROPY_KEYS = ("council_entropy", "council/entropy_rollout")
"""Where H_Ω is logged: ``council_entropy`` by objectives with the entropy bonus (ccrl),
``council/entropy_rollout`` (H_Ω at rollout time) by every run of a council policy. A report
uses one key for all variants, the one the most runs log, so the column compares like with like."""


_PERSONA_PREFIXES = (PERSONA_USAGE + "/", STAGE_MEAN + PERSONA_USAGE + "/")
"""persona shares in a tidy table: per step, or (``metrics.csv``) their mean over the stage"""


def council_entropy_key(tidy: pd.DataFrame) -> str:
    """The entry of :data:`COUNCIL_ENTROPY_KEYS` logged by the most runs (the first on a tie)."""
    sel = tidy[tidy["metric"].isin(COUNCIL_ENTROPY_KEYS)]
    runs = sel.drop_duplicates(["variant", "seed", "metric"])["metric"].value_counts()
    return max(COUNCIL_ENTROPY_KEYS, key=lambda k: (int(runs.get(k, 0)), -COUNCIL_ENTROPY_KEYS.index(k)))


def _choose_stage(g: pd.DataFrame, stage: str | None) -> tuple[str | None, str | None, str | None]:
    """(compared stage, its kind, the stage before it) of one run's tidy rows."""
    order = list(dict.fromkeys(g["stage"].dropna()))
    kinds = g.dropna(subset=["stage"]).drop_duplicates("stage").set_index("stage")["kind"].to_dict()
    if stage is not None:
        chosen = stage if stage in order else None
    else:
        aligned = [s for s in order if kinds.get(s) in ALIGNMENT_KINDS]
        chosen = aligned[-1] if aligned else (order[-1] if order else None)
    i = order.index(chosen) if chosen in order else -1
    return chosen, kinds.get(chosen), (order[i - 1] if i > 0 else None)


def compared_stages(tidy: pd.DataFrame, stage: str | None = None) -> pd.DataFrame:
    """One row per run: variant, seed, ``stage`` (the compared stage), ``kind``, ``previous``."""
    import pandas as pd

    rows = [(variant, int(seed), *_choose_stage(g, stage))
            for (variant, seed), g in tidy.groupby(["variant", "seed"], sort=False)]
    return pd.DataFrame(rows, columns=["variant", "seed", "stage", "kind", "previous"])


def _run_values(g: pd.DataFrame, stage: str | None, previous: str | None, entropy_key: str) -> dict[str, float]:
    nan = math.nan
    at = g[g["stage"] == stage]
    is_after = at["metric"].str.startswith(AFTER_STAGE)
    after = dict(zip(at.loc[is_after, "metric"].str.slice(len(AFTER_STAGE)), at.loc[is_after, "value"]))
    steps = at[~is_after]

    def step_mean(metric: str) -> float:
        v = steps.loc[steps["metric"] == metric, "value"]
        return float(v.mean()) if len(v) else nan

    before = g[(g["stage"] == previous) & (g["metric"] == AFTER_STAGE + "heldout_accuracy")]["value"]
    final = after.get("heldout_accuracy", nan)
    evals = steps.loc[steps["metric"] == "eval/heldout_accuracy", "value"].tolist()
    candidates = [x for x in [*evals, final] if not math.isnan(x)]
    usage = steps[steps["metric"].str.startswith(_PERSONA_PREFIXES)]   # per step, or their stage mean
    return {
        "start_accuracy": float(before.iloc[0]) if len(before) else nan,
        "final_accuracy": final,
        "best_accuracy": max(candidates) if candidates else nan,
        "preference_accuracy": after.get("preference_accuracy", nan),
        "heldout_value": after.get("value", nan),
        "reward_mean": step_mean("reward"),
        "kl_mean": step_mean("kl"),
        "council_entropy_mean": step_mean(entropy_key),
        "max_persona_share": float(usage.groupby("metric")["value"].mean().max()) if len(usage) else nan,
        "tokens_per_s": step_mean("tokens_per_s"),
        "steps": after.get("steps", nan),
        "samples": after.get("samples", nan),
        "wall_time_s": after.get("wall_time_s", nan),
    }


def per_run_values(tidy: pd.DataFrame, stage: str | None = None) -> pd.DataFrame:
    """One row per run: variant, seed, stage (the compared stage) and the :data:`COLUMNS` values."""
    import pandas as pd

    rows, entropy_key = [], council_entropy_key(tidy)
    for (variant, seed), g in tidy.groupby(["variant", "seed"], sort=False):
        chosen, _, previous = _choose_stage(g, stage)
        rows.append({"variant": variant, "seed": int(seed), "stage": chosen,
                     **_run_values(g, chosen, previous, entropy_key)})
    return pd.DataFrame(rows, columns=["variant", "seed", "stage", *COLUMN_KEYS])


def variant_table(per_run: pd.DataFrame, order: list[str] | None = None) -> pd.DataFrame:
    """Long table over seeds: variant, metric, n, mean, ci95 (the 95% CI half-width)."""
    import pandas as pd

    order = order or list(dict.fromkeys(per_run["variant"]))
    rows = []
    for variant in order:
        g = per_run[per_run["variant"] == variant]
        for key in COLUMN_KEYS:
            mean, half, n = mean_ci(g[key].tolist())
            rows.append({"variant": variant, "metric": key, "n": n, "mean": mean, "ci95": half})
    return pd.DataFrame(rows, columns=["variant", "metric", "n", "mean", "ci95"])


# --------------------------------------------------------------------------- paired differences


def paired_verdict(mean: float, half: float, n: int) -> str:
    """``"better"`` / ``"worse"`` when the 95% interval mean ± half lies wholly above / below 0, else
    ``"not separable at n seeds"`` (also for n < 2, where there is no interval)."""
    if n >= 2 and not math.isnan(half):
        if mean - half > 0:
            return "better"
        if mean + half < 0:
            return "worse"
    return f"not separable at {n} seed{'s' if n != 1 else ''}"


def paired_differences(per_run: pd.DataFrame, baseline: str, order: list[str] | None = None,
                       metric: str = "final_accuracy") -> pd.DataFrame:
    """One row per arm other than ``baseline``: its per-seed differences ``metric`` − the baseline's
    at the same seed (``diffs``, seed → difference, over the seeds both have a value for), and their
    ``n``, ``mean``, ``ci95`` (Student-t half-width, :func:`mean_ci`), ``low``, ``high`` and
    ``verdict`` (:func:`paired_verdict`)."""
    import pandas as pd

    order = order or list(dict.fromkeys(per_run["variant"]))
    base = per_run[per_run["variant"] == baseline].set_index("seed")[metric].dropna()
    rows = []
    for variant in order:
        if variant == baseline:
            continue
        mine = per_run[per_run["variant"] == variant].set_index("seed")[metric].dropna()
        seeds = sorted(set(mine.index) & set(base.index))
        diffs = {int(k): float(mine[k] - base[k]) for k in seeds}
        mean, half, n = mean_ci(list(diffs.values()))
        rows.append({"variant": variant, "baseline": baseline, "metric": metric, "n": n, "mean": mean, "ci95": half,
                     "low": mean - half, "high": mean + half, "verdict": paired_verdict(mean, half, n),
                     "diffs": diffs})
    return pd.DataFrame(rows, columns=["variant", "baseline", "metric", "n", "mean", "ci95", "low", "high",
                                       "verdict", "diffs"])


def paired_sentence(row) -> str:
    """One plain sentence for a row of :func:`paired_differences`."""
    what = "final held-out accuracy" if row["metric"] == "final_accuracy" else row["metric"]
    if row["n"] == 0:
        return f"{row['variant']} vs {row['baseline']}: no seed where both have a {what}, so they are not compared."
    interval = ("no interval with one seed" if math.isnan(row["ci95"])
                else f"95% CI [{row['low']:+.3f}, {row['high']:+.3f}]")
    verdict = row["verdict"]
    tail = {"better": f"{row['variant']} is better", "worse": f"{row['variant']} is worse"}.get(
        verdict, f"{verdict}")
    return (f"{row['variant']} vs {row['baseline']}: {what} {row['mean']:+.3f} on average over "
            f"{int(row['n'])} paired seed{'s' if row['n'] != 1 else ''} ({interval}): {tail}.")


# --------------------------------------------------------------------------- pipeline view


def pipeline_table(tidy: pd.DataFrame, variant: str, seed: int) -> pd.DataFrame:
    """One run's values after each stage, in run order: index stage; columns kind, then
    held-out accuracy, preference accuracy, each ``reward/<name>``, ``value`` (V_Ω), the rest."""
    import pandas as pd

    g = tidy[(tidy["variant"] == variant) & (tidy["seed"] == seed) & tidy["metric"].str.startswith(AFTER_STAGE)]
    if g.empty:
        return pd.DataFrame()
    g = g.assign(metric=g["metric"].str.slice(len(AFTER_STAGE)))
    stages = list(dict.fromkeys(g["stage"]))
    wide = g.pivot_table(index="stage", columns="metric", values="value", aggfunc="first").reindex(stages)
    names = list(dict.fromkeys(g["metric"]))
    first = [c for c in ("heldout_accuracy", "preference_accuracy") if c in names]
    terms = [c for c in names if c.startswith("reward/")] + [c for c in ("value",) if c in names]
    rest = [c for c in names if c not in first and c not in terms]
    out = wide[first + terms + rest]
    out.insert(0, "kind", g.drop_duplicates("stage").set_index("stage")["kind"].reindex(stages))
    out.index.name = "stage"
    out.columns.name = None
    return out


# --------------------------------------------------------------------------- series for the plots


def stage_series(tidy: pd.DataFrame, chosen: pd.DataFrame, metric: str) -> pd.DataFrame:
    """``metric`` per step of each run's compared stage: variant, seed, step, value."""
    sel = tidy[tidy["metric"] == metric].merge(chosen[["variant", "seed", "stage"]], on=["variant", "seed", "stage"])
    return sel.dropna(subset=["step"])[["variant", "seed", "step", "value"]].reset_index(drop=True)


def accuracy_series(tidy: pd.DataFrame, chosen: pd.DataFrame) -> pd.DataFrame:
    """Held-out accuracy over the compared stage: the previous stage's value at step 0, the
    periodic evals, and the after-stage value at the last step (unless an eval is there)."""
    import pandas as pd

    evals = stage_series(tidy, chosen, "eval/heldout_accuracy")
    final = stage_series(tidy, chosen, AFTER_STAGE + "heldout_accuracy")
    final = final.merge(evals[["variant", "seed", "step"]], how="left", indicator=True)
    final = final[final["_merge"] == "left_only"].drop(columns="_merge")
    prev = chosen.dropna(subset=["previous"])[["variant", "seed", "previous"]].rename(columns={"previous": "stage"})
    start = tidy[tidy["metric"] == AFTER_STAGE + "heldout_accuracy"].merge(prev, on=["variant", "seed", "stage"])
    start = start.assign(step=0)[["variant", "seed", "step", "value"]]
    out = pd.concat([start, evals, final], ignore_index=True)
    out["step"] = out["step"].astype("int64")
    return out.sort_values(["variant", "seed", "step"], kind="stable").reset_index(drop=True)


def elapsed_seconds(tidy: pd.DataFrame, chosen: pd.DataFrame) -> pd.DataFrame:
    """Training seconds at each step of each run's compared stage: variant, seed, step, seconds.

    ``elapsed_s`` where the run logged it (the clock ``max_seconds`` reads, evaluations included);
    for runs of earlier versions the running sum of ``step_time_s`` (training steps only)."""
    import pandas as pd

    logged = stage_series(tidy, chosen, "elapsed_s")
    steps = stage_series(tidy, chosen, "step_time_s").sort_values(["variant", "seed", "step"], kind="stable")
    steps = steps.assign(value=steps.groupby(["variant", "seed"], sort=False)["value"].cumsum())
    have = set(zip(logged["variant"], logged["seed"]))
    summed = steps[[(v, k) not in have for v, k in zip(steps["variant"], steps["seed"])]]
    out = pd.concat([logged, summed], ignore_index=True).rename(columns={"value": "seconds"})
    return out.drop_duplicates(["variant", "seed", "step"], keep="first")


def accuracy_seconds_series(tidy: pd.DataFrame, chosen: pd.DataFrame) -> pd.DataFrame:
    """:func:`accuracy_series` with the compared stage's training seconds in the ``step`` column (0 for
    the value before the stage); points without a known time are left out."""
    acc = accuracy_series(tidy, chosen)
    secs = elapsed_seconds(tidy, chosen)
    out = acc.merge(secs, on=["variant", "seed", "step"], how="left")
    out.loc[out["step"] == 0, "seconds"] = 0.0
    out = out.dropna(subset=["seconds"])
    return out.assign(step=out["seconds"].astype(float))[["variant", "seed", "step", "value"]].reset_index(drop=True)


def persona_usage_matrix(tidy: pd.DataFrame, chosen: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Variants × personas: mean share over the compared stage's steps, then over seeds."""
    sel = tidy[tidy["metric"].str.startswith(_PERSONA_PREFIXES)]
    sel = sel.merge(chosen[["variant", "seed", "stage"]], on=["variant", "seed", "stage"])
    if sel.empty:
        return sel.iloc[:0, :0]
    per_run = sel.groupby(["variant", "seed", "metric"])["value"].mean().reset_index()
    m = per_run.pivot_table(index="variant", columns="metric", values="value", aggfunc="mean")
    m.columns = [int(c.rsplit("/", 1)[1]) for c in m.columns]
    return m.reindex([v for v in order if v in m.index])[sorted(m.columns)]


# --------------------------------------------------------------------------- formatting


def format_ci(mean: float, half: float, n: int, decimals: int) -> str:
    """``0.600 ± 0.248``; ``0.600 ± n/a`` for one seed; ``n/a`` for none."""
    if n == 0 or math.isnan(mean):
        return "n/a"
    ci = "n/a" if n < 2 or math.isnan(half) else f"{half:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {ci}"


def _md_table(header: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def _num(x: Any, decimals: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{decimals}f}" if isinstance(x, (int, float)) else str(x)


def _table_md(table: pd.DataFrame, per_run: pd.DataFrame, order: list[str], group: str,
              notes: dict[str, str] | None = None) -> str:
    cols = [c for c in COLUMNS if c.group == group and not (c.optional and per_run[c.key].isna().all())]
    seeds = per_run.groupby("variant")["seed"].nunique()
    idx = table.set_index(["variant", "metric"])
    rows = []
    for v in order:
        row = [v, int(seeds.get(v, 0))]
        for c in cols:
            r = idx.loc[(v, c.key)]
            text = format_ci(r["mean"], r["ci95"], int(r["n"]), c.decimals)
            if 0 < r["n"] < seeds.get(v, 0):
                text += f" (n={int(r['n'])})"
            row.append(text)
        rows.append(row)
    return _md_table(["variant", "seeds", *(c.label for c in cols)], rows) + "\n\n" + "\n".join(
        f"- **{c.label}**: {c.doc}{(notes or {}).get(c.key, '')}." for c in cols)


def findings_summary(table: pd.DataFrame, order: list[str]) -> str:
    """Factual sentences: the best variant by mean final accuracy and whether 95% CIs overlap."""
    fa = table[(table["metric"] == "final_accuracy") & (table["n"] > 0)].set_index("variant")
    fa = fa.reindex([v for v in order if v in fa.index])
    if fa.empty:
        return "No run reported a held-out accuracy after the compared stage, so the variants are not ranked."
    top = fa["mean"].max()
    best = [v for v in fa.index if fa.loc[v, "mean"] == top]
    b = best[0]
    r = fa.loc[b]
    ci = f"{format_ci(r['mean'], r['ci95'], int(r['n']), 3)}, 95% CI over {int(r['n'])} seed{'s' if r['n'] != 1 else ''}"
    if len(best) == 1:
        out = [f"Highest mean final held-out accuracy: **{b}** ({ci})."]
    else:
        cis = "; ".join(f"{v}: {format_ci(fa.loc[v, 'mean'], fa.loc[v, 'ci95'], int(fa.loc[v, 'n']), 3)}" for v in best)
        out = [f"{' and '.join(f'**{v}**' for v in best)} tie for the highest mean final held-out accuracy ({cis})."]
    its_ci = "Its 95% CI" if len(best) == 1 else f"The 95% CI of {b}"
    others = [v for v in fa.index if v not in best and fa.loc[v, "n"] >= 2]
    single = [v for v in fa.index if v not in best and fa.loc[v, "n"] < 2]
    if r["n"] < 2:
        out.append(f"{'It has' if len(best) == 1 else f'{b} has'} a single seed, so there is no confidence "
                   "interval and this ranking is not evidence of a difference.")
    elif not others and not single and len(best) == 1:
        out.append("No other variant has a final held-out accuracy to compare with.")
    elif others:
        lo, hi = r["mean"] - r["ci95"], r["mean"] + r["ci95"]
        overlap = [v for v in others if fa.loc[v, "mean"] - fa.loc[v, "ci95"] <= hi
                   and fa.loc[v, "mean"] + fa.loc[v, "ci95"] >= lo]
        apart = [v for v in others if v not in overlap]
        if overlap:
            out.append(f"{its_ci} overlaps those of {', '.join(overlap)}: these seeds do not separate them.")
        if apart:
            out.append(f"{'It' if overlap else its_ci} does not overlap those of {', '.join(apart)}.")
        out.append("(Overlapping 95% intervals are a coarse check, not a significance test.)")
    if single and r["n"] >= 2:
        out.append(f"{', '.join(single)} ran with a single seed (no interval), so {'it is' if len(single) == 1 else 'they are'} "
                   "not compared.")
    st = table[(table["metric"] == "start_accuracy") & (table["n"] > 0)].set_index("variant")
    deltas = [f"{v} {fa.loc[v, 'mean'] - st.loc[v, 'mean']:+.3f}" for v in fa.index if v in st.index]
    if deltas:
        out.append("Mean change of held-out accuracy over the compared stage: " + ", ".join(deltas) + ".")
    return " ".join(out)


# --------------------------------------------------------------------------- environment


def _gathered_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("ccrl", "torch", "transformers", "trl", "peft", "accelerate", "numpy", "pandas", "matplotlib"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gathered_hardware() -> dict[str, Any]:
    return {"platform": platform.platform(), "cpu": _cpu_model(), "cpu_count": os.cpu_count()}


def _environment_md(runs: list[RunRecord], key: str, gather) -> str:
    groups: dict[str, list[str]] = {}
    for rec in runs:
        value = rec.summary.get(key)
        if isinstance(value, dict) and value:
            groups.setdefault(json.dumps(value, sort_keys=True, default=str), []).append(f"{rec.variant}/seed{rec.seed}")
    if not groups:
        table = gather()
        note = "The runs did not record this; gathered when the report was built."
        return note + "\n\n" + _md_table(["", key], [[k, v] for k, v in table.items()], "ll")
    parts = []
    for blob, names in groups.items():
        head = "All runs:" if len(groups) == 1 and len(names) == len(runs) else f"Runs {', '.join(names)}:"
        parts.append(head + "\n\n" + _md_table(["", key], [[k, _flat(v)] for k, v in json.loads(blob).items()], "ll"))
    missing = [f"{r.variant}/seed{r.seed}" for r in runs if not isinstance(r.summary.get(key), dict)]
    if missing:
        parts.append(f"Not recorded by: {', '.join(missing)}.")
    return "\n\n".join(parts)


def _flat(v: Any) -> str:
    return json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v)


def _display_path(p: str | Path | None) -> str:
    if p is None:
        return "n/a"
    p = Path(p)
    if not p.is_absolute():
        return p.as_posix()
    try:
        return p.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return p.name


# --------------------------------------------------------------------------- the report

FINDINGS_BEGIN, FINDINGS_END = "<!-- findings -->", "<!-- /findings -->"
_FINDINGS_RE = re.compile(re.escape(FINDINGS_BEGIN) + r"\n?(.*?)" + re.escape(FINDINGS_END), re.S)


def _kept_findings(report_path: Path) -> str:
    """The human-written text between the findings markers of an existing report, if any."""
    if not report_path.is_file():
        return ""
    m = _FINDINGS_RE.search(report_path.read_text())
    return m.group(1).strip() if m else ""


def build_report(
    runs: list[RunRecord] | str | Path,
    out_dir: str | Path,
    title: str | None = None,
    commands: list[str] | None = None,
    *,
    variants: dict[str, dict] | None = None,
    stage: str | None = None,
    pipeline_run: tuple[str, int] | None = None,
    runs_root: str | Path | None = None,
    run_commands: dict[tuple[str, int], str] | None = None,
    budget=None,
    budget_stages: list[str] | None = None,
    baseline: str | None = None,
) -> Path:
    """Write ``report.md``, ``metrics.csv`` (one row per logged step of the compared stages, at most
    100 evenly spaced steps of the stages before them, shared stages once per seed, persona shares as
    their mean over each stage: ``ccrl.reporting.metrics``), ``table.csv``, ``per_run.csv``, ``pipeline.csv``, with a baseline
    ``paired.csv``, and the PNG plots into ``out_dir``; return the path of ``report.md``.

    ``runs``: run records (their order sets the variant order) or a runs root
    (``<root>/<variant>/seed<k>/``). ``commands``: the commands that produced the runs and
    the report, shown verbatim. ``variants``: each variant's overrides, for the report's
    variant list. ``stage``: the compared stage's name (default: each run's last rl/dpo/orpo
    stage). ``pipeline_run``: (variant, seed) for the pipeline view (default: the first
    variant's lowest seed). ``run_commands``: (variant, seed) → the command that reproduces
    that run alone (default: each summary's ``command``). ``budget``: the compare's
    ``BudgetConfig`` (kind, value), stated in the report with ``budget_stages``, the stages it
    applied to. ``baseline``: the variant the paired differences are taken against. Text a person
    wrote between ``<!-- findings -->`` and ``<!-- /findings -->`` in an existing ``report.md`` is kept.
    """
    if isinstance(runs, (str, Path)):
        runs_root = runs_root or runs
        runs = discover_runs(runs)
    if not runs:
        raise ValueError("build_report needs at least one run")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    order = list(dict.fromkeys(r.variant for r in runs))
    if runs_root is None:  # <root>/<variant>/seed<k>: the common parent of the variant folders
        runs_root = Path(os.path.commonpath([os.path.abspath(r.output_dir.parent) for r in runs]))

    collapsed = tidy_metrics(runs, collapse_shared=True)
    compared = set(compared_stages(expand_shared_rows(collapsed), stage)["stage"].dropna())
    write_metrics_csv(thin_steps(stage_means(collapsed), compared), out / "metrics.csv")
    tidy = read_tidy_csv(out / "metrics.csv")  # every number below comes from the file
    chosen = compared_stages(tidy, stage)
    per_run = per_run_values(tidy, stage)
    table = variant_table(per_run, order)
    per_run.to_csv(out / "per_run.csv", index=False, float_format="%.8g")
    table.to_csv(out / "table.csv", index=False, float_format="%.8g")
    if baseline is not None and baseline not in order:
        raise ValueError(f"build_report: baseline {baseline!r} is not one of the variants {order}")
    paired = paired_differences(per_run, baseline, order) if baseline is not None else None
    if paired is not None:
        paired.assign(diffs=[json.dumps(d) for d in paired["diffs"]]).to_csv(out / "paired.csv", index=False,
                                                                               float_format="%.8g")

    if pipeline_run is None:
        first = order[0]
        pipeline_run = (first, min(r.seed for r in runs if r.variant == first))
    pipe = pipeline_table(tidy, *pipeline_run)
    if not pipe.empty:
        pipe.to_csv(out / "pipeline.csv", float_format="%.8g")

    figures = _make_plots(tidy, chosen, per_run, table, pipe, pipeline_run, order, out)
    text = _render(
        title=title or f"Comparison of {len(order)} variants",
        runs=runs, tidy=tidy, order=order, chosen=chosen, per_run=per_run, table=table, pipe=pipe,
        pipeline_run=pipeline_run, figures=figures, commands=commands or [], variants=variants or {},
        runs_root=runs_root, kept=_kept_findings(out / "report.md"), run_commands=run_commands or {},
        budget=budget, budget_stages=budget_stages or [], paired=paired,
    )
    (out / "report.md").write_text(text)
    return out / "report.md"


def _make_plots(tidy, chosen, per_run, table, pipe, pipeline_run, order, out: Path) -> dict[str, Path | None]:
    from ccrl.reporting import plots

    colors = plots.variant_colors(order)
    xlabel = "optimizer step in the compared stage"
    reward = stage_series(tidy, chosen, "reward")
    kl = stage_series(tidy, chosen, "kl")
    entropy_key = council_entropy_key(tidy)
    ent = stage_series(tidy, chosen, entropy_key)
    w = plots.smoothing_window(reward)
    return {
        "reward": plots.line_figure([plots.Panel(reward, "mean reward V_Ω of the rollouts", "Training reward", w)],
                                   out / "reward.png", colors, xlabel),
        "accuracy": plots.line_figure(
            [plots.Panel(accuracy_series(tidy, chosen), "held-out accuracy (step 0: before the stage)",
                         "Held-out accuracy", 1, markers=True)],
            out / "heldout_accuracy.png", colors, xlabel),
        "accuracy_seconds": plots.line_figure(
            [plots.Panel(accuracy_seconds_series(tidy, chosen), "held-out accuracy (0 s: before the stage)",
                         "Held-out accuracy over training time", 1, markers=True, per_seed=True)],
            out / "heldout_accuracy_seconds.png", colors, "training seconds in the compared stage (elapsed_s)"),
        "kl_entropy": plots.line_figure(
            [plots.Panel(kl, "KL to the reference policy", "KL", plots.smoothing_window(kl)),
             plots.Panel(ent, f"council entropy H_Ω (nats; {entropy_key})", "Council entropy",
                         plots.smoothing_window(ent))],
            out / "kl_entropy.png", colors, xlabel),
        "persona": plots.persona_heatmap(persona_usage_matrix(tidy, chosen, order), out / "persona_usage.png"),
        "final": plots.accuracy_bars(per_run, table, out / "final_accuracy.png", colors),
        "pipeline": plots.pipeline_figure(pipe.drop(columns=["kind", "wall_time_s"], errors="ignore"),
                                          out / "pipeline.png",
                                          f"After each stage: {pipeline_run[0]}, seed {pipeline_run[1]}"),
    }


_CAPTIONS = {
    "reward": ("Training reward", "Mean V_Ω of the training rollouts per step; line: mean over seeds, band: "
               "min–max over seeds."),
    "accuracy": ("Held-out accuracy", "Held-out accuracy during the compared stage; step 0 is the value after "
                 "the previous stage. Line: mean over seeds, band: min–max."),
    "accuracy_seconds": ("Held-out accuracy over training time", "The same points against the training seconds "
                         "of the compared stage (`elapsed_s`, evaluations included: the clock `max_seconds` reads; "
                         "runs that did not log it: the sum of their step times). One line per seed, since seeds "
                         "reach their evaluations at different times."),
    "kl_entropy": ("KL and council entropy", "KL to the reference policy and the overseer's entropy H_Ω per step."),
    "persona": ("Persona usage", "Share of routed assignments per council persona, averaged over the compared "
                "stage's steps and the seeds (variants whose policy reports persona usage)."),
    "final": ("Final held-out accuracy", "Mean over seeds with 95% CI error bars; dots are single seeds; dashed "
              "ticks the accuracy before the compared stage."),
}


def _render(*, title, runs, tidy, order, chosen, per_run, table, pipe, pipeline_run, figures, commands, variants,
            runs_root, kept, run_commands, budget=None, budget_stages=(), paired=None) -> str:
    import ccrl

    seeds = sorted({r.seed for r in runs})
    entropy_key = council_entropy_key(tidy)
    stages = ", ".join(f"`{s}`" for s in dict.fromkeys(chosen["stage"].dropna())) or "n/a"
    recipes = ", ".join(f"`{r}`" for r in dict.fromkeys(str(r.summary.get("recipe", "?")) for r in runs))
    md = [f"# {title}", "",
          f"{len(order)} variant{'s' if len(order) != 1 else ''} × seeds {', '.join(map(str, seeds))} "
          f"({len(runs)} runs) of recipe {recipes}; compared stage: {stages}; runs under "
          f"`{_display_path(runs_root)}`. Built by ccrl {ccrl.__version__} on "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}.", "",
          "## Findings", "", findings_summary(table, order), ""]
    if paired is not None and len(paired):
        md += [f"Paired by seed against the baseline **{paired['baseline'].iloc[0]}** (final held-out accuracy): "
               + " ".join(paired_sentence(r) for _, r in paired.iterrows()), ""]
    md += [FINDINGS_BEGIN] + ([kept] if kept else []) + [FINDINGS_END, ""]
    md += ["## Results", ""]
    if budget is not None:
        md += [_budget_md(budget, budget_stages), ""]
    md += ["Mean ± half-width of the 95% confidence interval over seeds (Student's t with n − 1 degrees of "
           "freedom, n = seeds with a value; one seed: no interval).", "",
           "### Held-out outcome", "", _table_md(table, per_run, order, "outcome"), "",
           "### Training, over the compared stage", "",
           _table_md(table, per_run, order, "training", {"council_entropy_mean": f", logged as `{entropy_key}`"}), "",
           "<details><summary>Per-run values</summary>", "",
           _md_table(["variant", "seed", "stage", *(c.label for c in COLUMNS)],
                     [[r["variant"], r["seed"], r["stage"], *(_num(r[c.key], c.decimals) for c in COLUMNS)]
                      for _, r in per_run.iterrows()], "lrl" + "r" * len(COLUMNS)), "", "</details>", ""]
    if paired is not None:
        md += _paired_md(paired)
    md += ["## Plots", ""]
    for key, (name, caption) in _CAPTIONS.items():
        path = figures.get(key)
        md += [f"**{name}.** {caption}", "", f"![{name}]({path.name})" if path else "_(no data to plot)_", ""]
    md += _pipeline_md(pipe, pipeline_run, figures.get("pipeline"))
    md += _variants_md(per_run, order, variants)
    md += _reproduce_md(runs, commands, seeds, run_commands)
    return "\n".join(md).rstrip() + "\n"


def _budget_md(budget, stages) -> str:
    kind, value = getattr(budget, "kind", "seconds"), getattr(budget, "value", None)
    where = ", ".join(f"`{s}`" for s in stages) or "the rl stages"
    if kind == "seconds":
        what = f"at most {value:g} s of training (`max_seconds`, evaluations included)"
    else:
        what = f"at most {int(value)} sampled completions (`max_samples`)"
    return (f"**Budget.** Every arm's {where} stage ran {what}, the same for every arm; a stage also ends at its "
            "planned `steps` if it gets there first. Steps run and completions sampled are in the training table, "
            "held-out accuracy against training seconds in the plots.")


def _paired_md(paired) -> list[str]:
    base = paired["baseline"].iloc[0] if len(paired) else "?"
    md = [f"### Paired differences against the baseline, {base}", "",
          f"For each seed, an arm's final held-out accuracy minus {base}'s at the same seed (both branch from "
          "that seed's same checkpoint); mean over the seeds both finished ± the 95% t-interval half-width "
          "(Student's t, n − 1 degrees of freedom). *better* / *worse*: the interval lies wholly above / below 0; "
          "otherwise the seeds do not separate the two arms.", ""]
    rows = []
    for _, r in paired.iterrows():
        per_seed = ", ".join(f"{k}: {v:+.3f}" for k, v in sorted(r["diffs"].items())) or "n/a"
        ci = "n/a" if math.isnan(r["ci95"]) else f"[{r['low']:+.3f}, {r['high']:+.3f}]"
        mean = "n/a" if math.isnan(r["mean"]) else f"{r['mean']:+.3f}"
        rows.append([r["variant"], int(r["n"]), per_seed, mean, ci, r["verdict"]])
    md += [_md_table(["variant", "paired seeds", f"difference per seed (seed: arm − {base})", "mean difference",
                      "95% CI", "verdict"], rows, "lrlrrl"), ""]
    md += [f"- {paired_sentence(r)}" for _, r in paired.iterrows()] + ["", "Also in `paired.csv`.", ""]
    return md


def _pipeline_md(pipe, pipeline_run, figure) -> list[str]:
    md = [f"## Pipeline view: {pipeline_run[0]}, seed {pipeline_run[1]}", ""]
    if pipe.empty:
        return md + ["_(this run recorded no after-stage values)_", ""]
    cols = [c for c in pipe.columns if c in ("heldout_accuracy", "preference_accuracy", "value", "wall_time_s")
            or c.startswith("reward/")]
    rows = [[stage, pipe.loc[stage, "kind"], *(_num(pipe.loc[stage, c], 1 if c == "wall_time_s" else 3) for c in cols)]
            for stage in pipe.index]
    md += ["Held-out accuracy and the V_Ω terms on held-out prompts measured after each stage "
           "(`value` is V_Ω; `reward/ice` is the energy cost, subtracted in V_Ω).", "",
           _md_table(["stage", "kind", *cols], rows, "ll" + "r" * len(cols)), "",
           "All values recorded after each stage are in `pipeline.csv`.", ""]
    if figure:
        md += [f"![pipeline view]({figure.name})", ""]
    return md


def _variants_md(per_run, order, variants) -> list[str]:
    rows = []
    for v in order:
        sets = variants.get(v)
        text = ", ".join(f"`{k}={_flat(x)}`" for k, x in sets.items()) if sets else (
            "base recipe" if sets is not None else "n/a")
        seeds = ", ".join(str(s) for s in sorted(per_run.loc[per_run["variant"] == v, "seed"]))
        rows.append([v, text, seeds])
    return ["## Variants", "", _md_table(["variant", "overrides of the base recipe", "seeds"], rows, "lll"), ""]


def _program_name(command: str) -> str:
    """A recorded command line with its program reduced to its name (no install path)."""
    head, _, rest = command.strip().partition(" ")
    return " ".join(x for x in (Path(head).name, rest) if x)


def _reproduce_md(runs, commands, seeds, run_commands) -> list[str]:
    md = ["## Reproduce", "", "### Commands", ""]
    md += (["```", *commands, "```"] if commands else ["_(not recorded)_"]) + [""]
    per_run = [(f"{r.variant}/seed{r.seed}", run_commands.get((r.variant, r.seed))
                or _program_name(str(r.summary.get("command") or ""))) for r in runs]
    per_run = [(name, cmd) for name, cmd in per_run if cmd]
    if per_run:
        md += ["<details><summary>Command of each run</summary>", "", "```",
               *(f"# {name}\n{cmd}" for name, cmd in per_run), "```", "", "</details>", ""]
    md += [f"Seeds: {', '.join(map(str, seeds))}.", "",
           "### Versions", "", _environment_md(runs, "versions", _gathered_versions), "",
           "### Hardware", "", _environment_md(runs, "hardware", _gathered_hardware), "",
           "### Files", "",
           "- `metrics.csv`: every measured number, one row per logged step (columns variant, seed, stage, kind, "
           "step, then one per metric under its `metrics.jsonl` name; `persona_usage/NN` is persona NN's share, "
           "`elapsed_s` the stage's training seconds, `eval/<key>` a periodic held-out value, `after_stage/<key>` "
           "what `summary.json` records after a stage, on its last step). Stages every arm shares are written once "
           "per seed under the variant `shared`. Per-step values have 6 significant digits, held-out ones 8. "
           "`ccrl.reporting.read_tidy_csv` reads it back as (variant, seed, stage, kind, step, metric, value) rows.",
           "- `per_run.csv`: the per-run values above; `table.csv`: mean, n and 95% CI half-width per variant; "
           "`paired.csv` (with a baseline): the paired differences.",
           "- `pipeline.csv`: the pipeline view's table.", ""]
    return md
