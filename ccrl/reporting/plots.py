"""PNG plots of a comparison, drawn with matplotlib's object API on the Agg canvas.

No pyplot: figures are built as ``matplotlib.figure.Figure`` on a ``FigureCanvasAgg``, so
nothing touches the user's backend or pyplot's global state. Every plot labels both axes,
keeps the legend outside the data, saves with ``bbox_inches="tight"`` (nothing clipped)
and gives each variant the same color in every figure (:func:`variant_colors`).

Series frames have the columns ``variant, seed, step, value`` (one row per point; ``step`` is the
x value, which a caller may fill with seconds).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

DPI = 130


class Panel(NamedTuple):
    """One axes of a line figure."""

    series: pd.DataFrame
    """columns variant, seed, step, value"""
    ylabel: str
    title: str
    smooth: int = 1
    """rolling-mean window in steps, applied per seed before the band is taken"""
    markers: bool = False
    """draw points (sparse series such as periodic evals)"""
    per_seed: bool = False
    """one line per seed instead of the mean and band (for an x, such as seconds, that differs between seeds)"""


def variant_colors(variants: list[str]) -> dict[str, tuple]:
    """A fixed color per variant, in the given order (tab10, then tab20 beyond ten)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(variants) <= 10 else "tab20"]
    return {v: cmap(i % cmap.N) for i, v in enumerate(variants)}


def smoothing_window(series: pd.DataFrame, points: int = 20) -> int:
    """A rolling-mean window giving about ``points`` independent points over the longest run."""
    if series.empty:
        return 1
    return max(1, int(series.groupby(["variant", "seed"])["step"].nunique().max()) // points)


def _new_figure(ncols: int, width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    return path


def _draw_variant(ax, data: pd.DataFrame, color, label: str, smooth: int, markers: bool) -> None:
    wide = data.pivot_table(index="step", columns="seed", values="value", aggfunc="mean").sort_index()
    if smooth > 1:
        wide = wide.rolling(smooth, min_periods=1).mean()
    mean = wide.mean(axis=1)
    style = {"marker": "o", "markersize": 4} if markers else {}
    ax.plot(mean.index, mean.to_numpy(), color=color, label=label, linewidth=1.6, **style)
    if wide.shape[1] > 1:
        lo, hi = wide.min(axis=1), wide.max(axis=1)
        ax.fill_between(mean.index, lo.to_numpy(), hi.to_numpy(), color=color, alpha=0.18, linewidth=0)


def _draw_seeds(ax, data: pd.DataFrame, color, label: str, markers: bool) -> None:
    style = {"marker": "o", "markersize": 3} if markers else {}
    for i, (_, g) in enumerate(data.sort_values("step").groupby("seed", sort=True)):
        ax.plot(g["step"].to_numpy(), g["value"].to_numpy(), color=color, label=label if i == 0 else None,
                linewidth=1.2, alpha=0.85, **style)


def line_figure(panels: list[Panel], path: str | Path, colors: dict[str, tuple], xlabel: str) -> Path | None:
    """Mean over seeds per variant as a line, min–max over seeds as a band (or, with
    ``Panel.per_seed``, one line per seed); one axes per panel.

    Returns None (and writes nothing) when no panel has data.
    """
    if all(p.series.empty for p in panels):
        return None
    from matplotlib.ticker import MaxNLocator

    fig = _new_figure(len(panels), 6.0, 4.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    handles: dict[str, object] = {}
    for ax, panel in zip(axes, panels):
        for variant, color in colors.items():
            data = panel.series[panel.series["variant"] == variant]
            if data.empty:
                continue
            n_seeds = data["seed"].nunique()
            label = f"{variant} ({n_seeds} seed{'s' if n_seeds != 1 else ''})"
            if panel.per_seed:
                n_lines = len(ax.lines)
                _draw_seeds(ax, data, color, label, panel.markers)
                handles.setdefault(label, ax.lines[n_lines])
            else:
                _draw_variant(ax, data, color, label, panel.smooth, panel.markers)
                handles.setdefault(label, ax.lines[-1])
        how = "one line per seed" if panel.per_seed else "mean over seeds, band: min–max" + (
            f", rolling mean of {panel.smooth} steps" if panel.smooth > 1 else "")
        ax.set_title(f"{panel.title}\n({how if not panel.series.empty else 'no data'})", fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(panel.ylabel)
        if not panel.per_seed:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=min(len(handles), 4),
               title="variant", fontsize=9, title_fontsize=9, frameon=False)
    return _save(fig, Path(path))


def persona_heatmap(usage: pd.DataFrame, path: str | Path) -> Path | None:
    """Heatmap of persona usage: rows are variants, columns the personas, cells the mean share."""
    if usage.empty:
        return None
    n_var, n_p = usage.shape
    fig = _new_figure(1, 10.0, 1.2 + 0.45 * n_var)
    ax = fig.subplots()
    im = ax.imshow(usage.to_numpy(), aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
    ax.set_yticks(range(n_var), [str(v) for v in usage.index])
    ax.set_xticks(range(n_p), [str(c) for c in usage.columns], fontsize=7)
    ax.set_xlabel("council persona (index)")
    ax.set_ylabel("variant")
    ax.set_title(f"Persona usage over the RL stage, mean over steps and seeds (uniform = 1/{n_p} ≈ {1 / n_p:.3f})",
                 fontsize=10)
    cbar = fig.colorbar(im, ax=ax, pad=0.01)
    cbar.set_label("share of routed assignments")
    return _save(fig, Path(path))


def accuracy_bars(per_run: pd.DataFrame, table: pd.DataFrame, path: str | Path, colors: dict[str, tuple],
                  metric: str = "final_accuracy", before: str = "start_accuracy") -> Path | None:
    """Bars: mean final held-out accuracy per variant with 95% CI error bars; dots: the seeds.

    A dashed tick per bar marks the mean accuracy before the compared stage, where known.
    """
    import numpy as np

    rows = table[(table["metric"] == metric) & (table["n"] > 0)].set_index("variant")
    variants = [v for v in colors if v in rows.index]
    if not variants:
        return None
    fig = _new_figure(1, max(4.5, 1.1 * len(variants) + 2.0), 4.2)
    ax = fig.subplots()
    x = np.arange(len(variants))
    means = rows.loc[variants, "mean"].to_numpy()
    err = rows.loc[variants, "ci95"].to_numpy(dtype=float)
    ax.bar(x, means, color=[colors[v] for v in variants], alpha=0.8, label="mean over seeds")
    has_ci = ~np.isnan(err)  # one seed: no interval, no error bar
    if has_ci.any():
        ax.errorbar(x[has_ci], means[has_ci], yerr=err[has_ci], fmt="none", ecolor="black", elinewidth=1.4,
                    capsize=6, label="95% CI")
    rng = np.random.default_rng(0)
    for i, v in enumerate(variants):
        seeds = per_run.loc[per_run["variant"] == v, metric].dropna().to_numpy()
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(seeds)), seeds, s=18, color="black", zorder=3,
                   label="seeds" if i == 0 else None)
    if before in table["metric"].to_numpy():
        pre = table[(table["metric"] == before) & (table["n"] > 0)].set_index("variant")
        for i, v in enumerate(variants):
            if v in pre.index:
                ax.hlines(pre.loc[v, "mean"], i - 0.4, i + 0.4, colors="black", linestyles="dashed", linewidth=1.2,
                          label="before the compared stage" if i == 0 else None)
    ax.set_xticks(x, variants, rotation=20 if len(variants) > 5 else 0)
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("variant")
    ax.set_ylabel("held-out accuracy after the compared stage")
    ax.set_title("Final held-out accuracy (mean over seeds, 95% CI)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save(fig, Path(path))


def pipeline_figure(table: pd.DataFrame, path: str | Path, title: str) -> Path | None:
    """Held-out accuracy (left) and the V_Ω terms (right) after each stage of one run.

    ``table`` is indexed by stage name (in run order) with one column per measured value.
    """
    acc_cols = [c for c in ("heldout_accuracy", "preference_accuracy") if c in table.columns]
    term_cols = [c for c in table.columns if c.startswith("reward/")] + [c for c in ("value",) if c in table.columns]
    if table.empty or not (acc_cols or term_cols):
        return None
    from matplotlib import colormaps

    fig = _new_figure(2, 5.2, 4.0)
    ax_acc, ax_terms = fig.subplots(1, 2)
    x = list(range(len(table)))
    for ax, cols, ylabel, sub in ((ax_acc, acc_cols, "accuracy on held-out data", "Held-out accuracy"),
                                  (ax_terms, term_cols, "mean on held-out prompts", "V_Ω terms")):
        cmap = colormaps["Dark2"]
        for j, c in enumerate(cols):
            vals = table[c].to_numpy(dtype=float)
            style = "--" if c == "value" else "-"
            ax.plot(x, vals, style, marker="o", color="black" if c == "value" else cmap(j % cmap.N),
                    label="V_Ω (value)" if c == "value" else c, linewidth=1.6)
        ax.set_xticks(x, [str(s) for s in table.index])
        ax.set_xlabel("after stage")
        ax.set_ylabel(ylabel)
        ax.set_title(sub if cols else sub + " (no data)", fontsize=10)
        ax.grid(alpha=0.3)
        if cols:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(title, fontsize=11)
    return _save(fig, Path(path))
