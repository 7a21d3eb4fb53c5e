"""The report builder on synthetic run outputs, and the resumable compare runner.

Every expected number here is computed by hand from the synthetic values written below,
not by the code under test.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ccrl.errors import CcrlError, DataError, RecipeError
from ccrl.reporting import (
    build_report,
    discover_runs,
    load_run,
    mean_ci,
    per_run_values,
    pipeline_table,
    read_tidy_csv,
    run_compare,
    t_quantile_975,
    tidy_metrics,
    variant_table,
)
from ccrl.reporting.metrics import CSV_KEY_COLUMNS, TIDY_COLUMNS, read_metrics_lines, write_metrics_csv

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
T2 = 4.302653  # t_{0.975, 2}
RL_STEPS = 20


# --------------------------------------------------------------------------- synthetic runs


def persona_shares(seed: int) -> list[float]:
    """32 shares summing to 1: persona 0 gets 0.2 + 0.01·seed, the rest split the remainder."""
    top = 0.2 + 0.01 * seed
    return [top] + [(1.0 - top) / 31] * 31


def reward_at(step: int, seed: int, base: float) -> float:
    return base + 0.01 * step + 0.001 * seed


def write_run(run_dir: Path, variant: str, seed: int, final_acc: float, *, kind: str = "rl",
              council: bool = True, base_reward: float = 0.2) -> None:
    """pretrain (4 steps) → sft (4 steps) → rl or dpo (RL_STEPS steps), as the pipeline writes them."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for stage, n in (("pretrain", 4), ("sft", 4)):
        for t in range(1, n + 1):
            lines.append({"stage": stage, "kind": stage, "step": t, "loss": 3.0 / t, "step_time_s": 0.1,
                          "lr": 1e-3, "tokens_per_s": 500.0})
    last = "rl" if kind == "rl" else kind
    for t in range(1, RL_STEPS + 1):
        line = {"stage": last, "kind": kind, "step": t, "loss": 1.0 / t, "step_time_s": 0.2, "lr": 1e-5,
                "tokens_per_s": 1000.0 + 10 * seed}
        if kind == "rl":
            line |= {"reward": reward_at(t, seed, base_reward), "reward/exact_match": 0.5, "kl": 0.001 * t,
                     "approx_kl": 0.001 * t, "clip_frac": 0.1, "entropy": 1.0, "council_entropy": 3.0 - 0.02 * t,
                     "completion_tokens": 8.0, "wall_time_s": 0.2 * t}
            if council:
                line["persona_usage"] = persona_shares(seed)
        lines.append(line)
        if t in (10, 20):
            acc = final_acc + 0.02 if t == 10 else final_acc  # the mid-stage eval is the best one
            lines.append({"stage": last, "kind": kind, "step": t, "eval/heldout_accuracy": acc})
    stages = [
        {"name": "pretrain", "kind": "pretrain", "checkpoint": "ckpt/pretrain", "wall_time_s": 10.0,
         "metrics": {"heldout_accuracy": 0.1, "reward/exact_match": 0.1, "reward/council_consensus": 0.3,
                     "reward/vir": 0.5, "reward/ice": 0.4, "value": 0.13}},
        {"name": "sft", "kind": "sft", "checkpoint": "ckpt/sft", "wall_time_s": 20.0,
         "metrics": {"heldout_accuracy": 0.3 + 0.01 * seed, "reward/exact_match": 0.3,
                     "reward/council_consensus": 0.5, "reward/vir": 0.6, "reward/ice": 0.3, "value": 0.345}},
        {"name": last, "kind": kind, "checkpoint": f"ckpt/{last}", "wall_time_s": 30.0 + seed,
         "metrics": {"heldout_accuracy": final_acc, "reward/exact_match": final_acc,
                     "reward/council_consensus": 0.6, "reward/vir": 0.7, "reward/ice": 0.2,
                     "value": final_acc + 0.06,
                     **({"preference_accuracy": 0.8} if kind in ("dpo", "orpo") else {})}},
    ]
    summary = {"recipe": "synthetic", "seed": seed, "output_dir": str(run_dir), "stages": stages,
               "versions": {"torch": "2.13.0", "transformers": "5.23.0", "trl": "1.16.0", "ccrl": "0.1.0"},
               "hardware": {"cpu": "test CPU", "cpu_count": 2},
               "command": f"ccrl run recipes/synthetic.yaml --set seed={seed}"}
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run_dir / "summary.json").write_text(json.dumps(summary))


ACCURACIES = {"ccrl": [0.5, 0.6, 0.7], "grpo": [0.4, 0.45, 0.5], "dpo": [0.3, 0.35, 0.4]}


def make_runs(root: Path) -> list:
    runs = []
    for variant, accs in ACCURACIES.items():
        for seed, acc in enumerate(accs):
            d = root / variant / f"seed{seed}"
            write_run(d, variant, seed, acc, kind="dpo" if variant == "dpo" else "rl",
                      council=variant == "ccrl", base_reward=0.3 if variant == "ccrl" else 0.2)
            runs.append(load_run(d, variant=variant, seed=seed))
    write_run(root / "single" / "seed0", "single", 0, 0.55)
    runs.append(load_run(root / "single" / "seed0", variant="single", seed=0))
    return runs


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One report over ccrl/grpo/dpo × 3 seeds plus a one-seed variant (plots drawn once)."""
    root = tmp_path_factory.mktemp("runs")
    runs = make_runs(root)
    out = root.parent / "report"
    path = build_report(runs, out, title="Synthetic comparison", commands=["ccrl compare recipes/synthetic.yaml"],
                        variants={"ccrl": {"stages.rl.objective": "ccrl"}, "grpo": {"stages.rl.objective": "grpo"},
                                  "dpo": {"stages.rl.kind": "dpo"}, "single": {}})
    return SimpleNamespace(root=root, out=out, report=path, text=path.read_text(), runs=runs)


def cell(table, variant: str, metric: str, field: str = "mean") -> float:
    row = table[(table["variant"] == variant) & (table["metric"] == metric)]
    assert len(row) == 1
    return float(row[field].iloc[0])


# --------------------------------------------------------------------------- statistics


def test_t_quantiles_match_reference_values():
    assert t_quantile_975(1) == pytest.approx(12.706205, abs=1e-6)
    assert t_quantile_975(2) == pytest.approx(T2, abs=1e-6)
    assert t_quantile_975(10) == pytest.approx(2.228139, abs=1e-6)
    assert t_quantile_975(30) == pytest.approx(2.042272, abs=1e-6)
    # beyond the table: the expansion against exact quantiles
    for df, exact in ((40, 2.02107539), (60, 2.00029782), (120, 1.97993041)):
        assert t_quantile_975(df) == pytest.approx(exact, abs=2e-6)
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_mean_ci_by_hand():
    mean, half, n = mean_ci([0.5, 0.6, 0.7])
    assert (mean, n) == (pytest.approx(0.6, abs=1e-12), 3)
    assert half == pytest.approx(T2 * 0.1 / math.sqrt(3), abs=1e-6)
    mean, half, n = mean_ci([0.42, float("nan")])  # NaN is "not measured", not a value
    assert (mean, n) == (0.42, 1) and math.isnan(half)
    assert mean_ci([])[2] == 0


# --------------------------------------------------------------------------- reading runs


def test_tidy_form_and_reading(tmp_path):
    write_run(tmp_path / "r", "ccrl", 1, 0.6)
    rec = load_run(tmp_path / "r")
    assert (rec.variant, rec.seed) == ("synthetic", 1)
    tidy = tidy_metrics([rec])
    assert list(tidy.columns) == TIDY_COLUMNS
    rl = tidy[tidy["stage"] == "rl"]
    assert sorted(m for m in rl["metric"].unique() if m.startswith("persona_usage/"))[-1] == "persona_usage/31"
    after = rl[rl["metric"] == "after_stage/heldout_accuracy"]
    assert after["value"].tolist() == [0.6] and after["step"].tolist() == [RL_STEPS]
    assert not tidy["value"].isna().any()


def test_a_step_logged_twice_keeps_its_last_value(tmp_path):
    write_run(tmp_path / "r", "x", 0, 0.5)
    with open(tmp_path / "r" / "metrics.jsonl", "a") as fh:  # a resumed stage repeats step 20
        fh.write(json.dumps({"stage": "rl", "kind": "rl", "step": 20, "reward": 9.0}) + "\n")
    tidy = tidy_metrics([load_run(tmp_path / "r")])
    assert tidy[(tidy.metric == "reward") & (tidy.step == 20)]["value"].tolist() == [9.0]
    assert len(tidy[tidy.metric == "reward"]) == RL_STEPS


def test_truncated_last_line_is_skipped_but_a_broken_middle_line_is_an_error(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"stage": "rl", "step": 1}\n{"stage": "rl", "st')
    with pytest.warns(UserWarning, match="truncated"):
        assert read_metrics_lines(p) == [{"stage": "rl", "step": 1}]
    p.write_text('{"stage": "rl", "st\n{"stage": "rl", "step": 2}\n')
    with pytest.raises(DataError, match=":1:"):
        read_metrics_lines(p)


def test_discover_runs_finds_variant_seed_dirs(built):
    runs = discover_runs(built.root)
    assert [(r.variant, r.seed) for r in runs][:4] == [("ccrl", 0), ("ccrl", 1), ("ccrl", 2), ("dpo", 0)]
    with pytest.raises(DataError, match="no finished runs"):
        discover_runs(built.root / "ccrl" / "nothing-here")


# --------------------------------------------------------------------------- the table


def test_table_values_and_cis_by_hand(built):
    table = read_tidy_csv(built.out / "metrics.csv").pipe(per_run_values).pipe(variant_table)
    # final accuracy of ccrl: seeds 0.5, 0.6, 0.7
    assert cell(table, "ccrl", "final_accuracy") == pytest.approx(0.6, abs=1e-9)
    assert cell(table, "ccrl", "final_accuracy", "ci95") == pytest.approx(T2 * 0.1 / math.sqrt(3), abs=1e-6)
    # grpo: 0.4, 0.45, 0.5 → s = 0.05
    assert cell(table, "grpo", "final_accuracy", "ci95") == pytest.approx(T2 * 0.05 / math.sqrt(3), abs=1e-6)
    # best: the step-10 eval, 0.02 above the final one
    assert cell(table, "ccrl", "best_accuracy") == pytest.approx(0.62, abs=1e-9)
    # before RL: sft accuracy 0.3 + 0.01·seed → 0.31
    assert cell(table, "ccrl", "start_accuracy") == pytest.approx(0.31, abs=1e-9)
    # mean train reward of ccrl seed s: 0.3 + 0.01·mean(1..20) + 0.001·s = 0.405 + 0.001·s → over seeds 0.406
    assert cell(table, "ccrl", "reward_mean") == pytest.approx(0.406, abs=1e-9)
    assert cell(table, "ccrl", "reward_mean", "ci95") == pytest.approx(T2 * 0.001 / math.sqrt(3), abs=1e-7)
    assert cell(table, "ccrl", "kl_mean") == pytest.approx(0.001 * 10.5, abs=1e-9)
    assert cell(table, "ccrl", "council_entropy_mean") == pytest.approx(3.0 - 0.02 * 10.5, abs=1e-9)
    # largest persona share: 0.2 + 0.01·seed → 0.21 over seeds
    assert cell(table, "ccrl", "max_persona_share") == pytest.approx(0.21, abs=1e-9)
    assert cell(table, "ccrl", "tokens_per_s") == pytest.approx(1010.0, abs=1e-9)
    assert cell(table, "ccrl", "wall_time_s") == pytest.approx(31.0, abs=1e-9)
    assert cell(table, "ccrl", "heldout_value") == pytest.approx(0.66, abs=1e-9)
    # grpo has no persona usage; dpo has no rollouts but a preference accuracy
    assert cell(table, "grpo", "max_persona_share", "n") == 0
    assert cell(table, "dpo", "reward_mean", "n") == 0
    assert cell(table, "dpo", "preference_accuracy") == pytest.approx(0.8, abs=1e-9)
    assert cell(table, "single", "final_accuracy", "n") == 1
    assert math.isnan(cell(table, "single", "final_accuracy", "ci95"))


def test_report_text_shows_the_table_and_the_provenance(built):
    text = built.text
    half = T2 * 0.1 / math.sqrt(3)
    assert f"0.600 ± {half:.3f}" in text  # 0.600 ± 0.248
    assert "| single | 1 |" in text and "0.550 ± n/a" in text
    assert "ccrl compare recipes/synthetic.yaml" in text
    assert "ccrl run recipes/synthetic.yaml --set seed=2" in text
    for word in ("torch", "2.13.0", "transformers", "trl", "test CPU", "Seeds: 0, 1, 2"):
        assert word in text
    assert "`stages.rl.objective=grpo`" in text
    assert "<!-- findings -->" in text and "<!-- /findings -->" in text
    # the automatic finding: ccrl has the best mean, its CI overlaps grpo's but not dpo's
    assert "Highest mean final held-out accuracy: **ccrl**" in text
    assert "single ran with a single seed (no interval)" in text
    assert "n/a" in text and "nan" not in text.lower().replace("nans", "")


def test_findings_overlap_sentence(built):
    from ccrl.reporting.report import findings_summary

    table = per_run_values(read_tidy_csv(built.out / "metrics.csv")).pipe(variant_table)
    three = table[table["variant"] != "single"]
    text = findings_summary(three, ["ccrl", "grpo", "dpo"])
    # ccrl 0.6 ± 0.248 → [0.352, 0.848]; grpo 0.45 ± 0.124 overlaps; dpo 0.35 ± 0.124 → [0.226, 0.474] overlaps too
    assert "overlaps those of grpo, dpo" in text
    tight = three.copy()
    tight.loc[tight["metric"] == "final_accuracy", "ci95"] = 0.01
    assert "does not overlap those of grpo, dpo" in findings_summary(tight, ["ccrl", "grpo", "dpo"])


def test_metrics_csv_reads_back_tidy_and_matches_the_table(built):
    import pandas as pd

    tidy = read_tidy_csv(built.out / "metrics.csv")
    assert list(tidy.columns) == TIDY_COLUMNS
    columns = list(pd.read_csv(built.out / "metrics.csv", nrows=1).columns)   # one row per step, one column per metric
    assert columns[:5] == CSV_KEY_COLUMNS and {"loss", "reward", "after_stage/heldout_accuracy"} <= set(columns)
    # rebuilding the table from metrics.csv alone gives table.csv
    rebuilt = variant_table(per_run_values(tidy), ["ccrl", "grpo", "dpo", "single"])
    written = pd.read_csv(built.out / "table.csv")
    pd.testing.assert_frame_equal(rebuilt.reset_index(drop=True), written, check_dtype=False, atol=1e-12)
    # and the rows of the csv are the raw inputs: ccrl seed 1's final accuracy
    row = tidy[(tidy.variant == "ccrl") & (tidy.seed == 1) & (tidy.metric == "after_stage/heldout_accuracy")
               & (tidy.stage == "rl")]
    assert row["value"].tolist() == [0.6]


def test_metrics_csv_precision_per_step_held_out_and_whole_numbers(tmp_path):
    """Per-step values: 4 significant digits; held-out values: 8; whole numbers (sample counts,
    steps) in full, whatever their size."""
    import pandas as pd

    tidy = pd.DataFrame(
        [("a", 0, "rl", "rl", 1, "reward", 0.123456789), ("a", 0, "rl", "rl", 1, "samples", 51712.0),
         ("a", 0, "rl", "rl", 1, "persona_usage/00", 0.0312345678), ("a", 0, "rl", "rl", 1, "loss", -1.5e-7),
         ("a", 0, "rl", "rl", 1, "eval/heldout_accuracy", 0.123456789)], columns=TIDY_COLUMNS)
    path = write_metrics_csv(tidy, tmp_path / "metrics.csv")
    row = pd.read_csv(path, dtype=str).iloc[0]
    assert (row["reward"], row["samples"], row["persona_usage/00"], row["loss"]) == ("0.1235", "51712", "0.03123",
                                                                                    "-1.5e-07")
    assert row["eval/heldout_accuracy"] == "0.12345679"
    back = read_tidy_csv(path).set_index("metric")["value"]
    assert back["samples"] == 51712 and back["reward"] == 0.1235


def test_plots_are_valid_nontrivial_pngs(built):
    names = ["reward.png", "heldout_accuracy.png", "kl_entropy.png", "persona_usage.png", "final_accuracy.png",
             "pipeline.png"]
    for name in names:
        p = built.out / name
        assert p.is_file(), name
        assert p.read_bytes()[:8] == PNG_SIGNATURE, name
        assert p.stat().st_size > 5_000, name
        assert f"]({name})" in built.text


def test_pipeline_view_table(built):
    tidy = read_tidy_csv(built.out / "metrics.csv")
    pipe = pipeline_table(tidy, "ccrl", 2)
    assert list(pipe.index) == ["pretrain", "sft", "rl"]
    assert list(pipe.columns[:7]) == ["kind", "heldout_accuracy", "reward/exact_match", "reward/council_consensus",
                                      "reward/vir", "reward/ice", "value"]
    assert pipe["heldout_accuracy"].tolist() == pytest.approx([0.1, 0.32, 0.7])
    assert pipe["reward/vir"].tolist() == pytest.approx([0.5, 0.6, 0.7])
    assert pipe["value"].tolist() == pytest.approx([0.13, 0.345, 0.76])
    assert "## Pipeline view: ccrl, seed 0" in built.text
    assert "| sft | sft | 0.300 | 0.300 | 0.500 | 0.600 | 0.300 | 0.345 |" in built.text


def test_rebuilding_keeps_the_human_findings(built, tmp_path):
    out = tmp_path / "rep"
    build_report(built.runs[:3], out)
    text = (out / "report.md").read_text()
    (out / "report.md").write_text(text.replace("<!-- findings -->\n", "<!-- findings -->\nWritten by hand.\n"))
    build_report(built.runs[:3], out)
    again = (out / "report.md").read_text()
    assert "<!-- findings -->\nWritten by hand.\n<!-- /findings -->" in again


# --------------------------------------------------------------------------- the compare runner


def fake_recipe(output_dir: Path, report_dir: Path, steps: int = 5):
    variants = [SimpleNamespace(name="grpo", set={"stages.rl.objective": "grpo"}),
                SimpleNamespace(name="ccrl", set={"stages.rl.objective": "ccrl", "stages.rl.council_beta": 0.05})]
    raw = {"name": "fake", "seed": 0, "output_dir": str(output_dir),
           "stages": [{"kind": "pretrain"}, {"kind": "sft"}, {"kind": "rl", "steps": steps}]}
    return SimpleNamespace(name="fake", seed=0, output_dir=str(output_dir), variants=variants, seeds=[0, 1],
                           report_dir=str(report_dir), raw=raw, source="recipes/fake.yaml")


class FakeRunner:
    """Writes a synthetic run; on the call numbered ``fail_on`` raises CcrlError, after writing
    a summary with only the first stage when ``partial`` (as the pipeline does after each stage)."""

    def __init__(self, fail_on: int | None = None, partial: bool = False):
        self.calls: list[dict] = []
        self.fail_on, self.partial = fail_on, partial

    def __call__(self, recipe: dict, overrides: dict, resume: bool = False) -> dict:
        self.calls.append({**overrides, "resume": resume})
        out = Path(overrides["output_dir"])
        write_run(out, "?", overrides["seed"], 0.5 + 0.1 * overrides["seed"])
        if len(self.calls) == self.fail_on:
            summary = json.loads((out / "summary.json").read_text())
            if self.partial:
                (out / "summary.json").write_text(json.dumps({**summary, "stages": summary["stages"][:1]}))
            else:
                (out / "summary.json").unlink()
            raise RecipeError("recipes/fake.yaml: stages.rl.lr: expected a positive number")
        return json.loads((out / "summary.json").read_text())


def test_interrupted_compare_resumes_without_redoing_finished_runs(tmp_path, capsys):
    rec = fake_recipe(tmp_path / "runs", tmp_path / "reports" / "fake")
    first = FakeRunner(fail_on=3)
    with pytest.raises(CcrlError, match=r"run grpo/seed1 \(3 of 4\) failed: .*stages.rl.lr.*2 finished"):
        run_compare(rec, run_fn=first)
    # seed-major order: both variants at seed 0 first
    assert [(c["output_dir"][-10:], c["seed"]) for c in first.calls] == [
        ("grpo/seed0", 0), ("ccrl/seed0", 0), ("grpo/seed1", 1)]
    assert first.calls[1]["stages.rl.council_beta"] == 0.05
    assert (tmp_path / "runs" / "ccrl" / "seed0" / "summary.json").is_file()
    assert not (tmp_path / "runs" / "grpo" / "seed1" / "summary.json").exists()

    second = FakeRunner()
    out = run_compare(rec, run_fn=second)
    assert [c["output_dir"][-10:] for c in second.calls] == ["grpo/seed1", "ccrl/seed1"]
    assert [c["resume"] for c in second.calls] == [True, False]  # grpo/seed1 had started: continued
    log = capsys.readouterr().out
    assert "[1/4] grpo seed 0: finished earlier, kept" in log and "[4/4] ccrl seed 1: running" in log
    assert out == tmp_path / "reports" / "fake"
    text = (out / "report.md").read_text()
    assert "ccrl compare recipes/fake.yaml" in text and "| ccrl | 2 |" in text
    assert ("ccrl run recipes/fake.yaml --set stages.rl.objective=ccrl --set stages.rl.council_beta=0.05 "
            "--set seed=1 --set output_dir=") in text

    third = FakeRunner()  # everything finished: nothing runs, the report is rebuilt
    run_compare(rec, run_fn=third)
    assert third.calls == []


def test_a_run_that_stopped_after_some_stages_is_continued_not_kept(tmp_path):
    rec = fake_recipe(tmp_path / "runs", tmp_path / "rep")
    with pytest.raises(CcrlError):
        run_compare(rec, run_fn=FakeRunner(fail_on=1, partial=True))
    assert (tmp_path / "runs" / "grpo" / "seed0" / "summary.json").is_file()  # lists pretrain only
    again = FakeRunner()
    run_compare(rec, run_fn=again)
    assert [(c["output_dir"][-10:], c["resume"]) for c in again.calls] == [
        ("grpo/seed0", True), ("ccrl/seed0", False), ("grpo/seed1", False), ("ccrl/seed1", False)]


def test_compare_refuses_a_finished_run_of_a_changed_recipe(tmp_path):
    rec = fake_recipe(tmp_path / "runs", tmp_path / "rep")
    run_compare(rec, run_fn=FakeRunner())
    changed = fake_recipe(tmp_path / "runs", tmp_path / "rep", steps=50)
    with pytest.raises(RecipeError, match="changed since it ran"):
        run_compare(changed, run_fn=FakeRunner())


def test_compare_lets_bugs_through_unchanged(tmp_path):
    def broken(recipe, overrides):
        raise ZeroDivisionError("bug")

    with pytest.raises(ZeroDivisionError):
        run_compare(fake_recipe(tmp_path / "runs", tmp_path / "rep"), run_fn=broken)


def test_importing_reporting_is_cheap():
    code = ("import sys, ccrl.reporting; "
            "print(any(m in sys.modules for m in ('pandas', 'matplotlib', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_versions_and_hardware_are_gathered_when_runs_did_not_record_them(tmp_path):
    from ccrl.reporting.report import _environment_md, _gathered_hardware, _gathered_versions

    write_run(tmp_path / "r", "x", 0, 0.5)
    rec = load_run(tmp_path / "r")
    rec.summary.pop("versions")
    text = _environment_md([rec], "versions", _gathered_versions)
    assert "gathered when the report was built" in text and "| torch |" in text and "| trl |" in text
    assert "| cpu_count |" in _environment_md([rec], "hardware", _gathered_hardware)


def test_council_entropy_uses_the_key_every_variant_logs():
    import pandas as pd

    from ccrl.reporting.report import council_entropy_key

    rows = [("ccrl", 0, "rl", "rl", 1, "council_entropy", 3.0), ("ccrl", 0, "rl", "rl", 1, "council/entropy_rollout", 3.1),
            ("grpo", 0, "rl", "rl", 1, "council/entropy_rollout", 3.2)]
    assert council_entropy_key(pd.DataFrame(rows, columns=TIDY_COLUMNS)) == "council/entropy_rollout"
    assert council_entropy_key(pd.DataFrame(rows[:1], columns=TIDY_COLUMNS)) == "council_entropy"


def test_findings_for_a_tie_and_for_one_seed():
    import pandas as pd

    from ccrl.reporting.report import findings_summary

    def table(rows):
        return pd.DataFrame([{"variant": v, "metric": "final_accuracy", "n": n, "mean": m, "ci95": h}
                             for v, n, m, h in rows])

    tie = findings_summary(table([("a", 2, 0.5, 0.1), ("b", 2, 0.5, 0.2), ("c", 2, 0.1, 0.01)]), ["a", "b", "c"])
    assert tie.startswith("**a** and **b** tie") and "The 95% CI of a does not overlap those of c" in tie
    one = findings_summary(table([("a", 1, 0.7, float("nan")), ("b", 3, 0.5, 0.1)]), ["a", "b"])
    assert "It has a single seed" in one
