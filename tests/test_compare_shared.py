"""``ccrl compare`` with shared stages: the leading stages run once per seed, every variant
branches from their checkpoint, and each run directory still reads as the whole pipeline."""

from __future__ import annotations

import json

import pytest

from ccrl.config import load_recipe
from ccrl.errors import RecipeError
from ccrl.pipeline import run_recipe
from ccrl.reporting.compare import run_compare


def _compare(tiny_recipe, tmp_path):
    rec = tiny_recipe(output_dir=str(tmp_path / "cmp"), report_dir=str(tmp_path / "report"))
    rec["stages"][0]["steps"] = 2
    rec["stages"][1]["steps"] = 2
    rec["stages"].append({"kind": "rl", "objective": "grpo", "steps": 1, "prompts_per_step": 2, "group_size": 2,
                          "max_new_tokens": 3, "rewards": [{"name": "exact_match"}]})
    rec["variants"] = [{"name": "grpo", "set": {}}, {"name": "dapo", "set": {"stages.rl.objective": "dapo"}}]
    rec["shared_stages"] = ["pretrain", "sft"]
    return rec


def test_shared_stages_run_once_and_graft(tmp_path, tiny_recipe):
    rec = _compare(tiny_recipe, tmp_path)
    calls = []

    def counting(raw, overrides=None, resume=False):
        calls.append([s.get("name") or s["kind"] for s in raw["stages"]])
        return run_recipe(raw, overrides=overrides, resume=resume, show_progress=False, log=lambda *_: None)

    run_compare(rec, run_fn=counting)
    assert calls == [["pretrain", "sft"], ["rl"], ["rl"]]
    root = tmp_path / "cmp"
    for v in ("grpo", "dapo"):
        s = json.loads((root / v / "seed0" / "summary.json").read_text())
        assert [x["name"] for x in s["stages"]] == ["pretrain", "sft", "rl"]
        stages = {json.loads(x)["stage"] for x in (root / v / "seed0" / "metrics.jsonl").read_text().splitlines()}
        assert stages == {"pretrain", "sft", "rl"}
    assert (tmp_path / "report" / "report.md").exists()
    calls.clear()
    run_compare(rec, run_fn=counting)                     # everything finished: nothing runs again
    assert calls == []


def test_variants_may_not_touch_shared_stages(tiny_recipe, tmp_path):
    rec = _compare(tiny_recipe, tmp_path)
    rec["variants"][1]["set"] = {"stages.sft.lr": 1e-4}
    with pytest.raises(RecipeError, match=r"variants\[1\] \(dapo\).set.stages.sft.lr: a variant may not change a shared"):
        load_recipe(rec)
    rec = _compare(tiny_recipe, tmp_path)
    rec["shared_stages"] = ["sft"]
    with pytest.raises(RecipeError, match="shared_stages: expected leading stage names"):
        load_recipe(rec)


def test_parallel_jobs_give_the_sequential_runs(tmp_path, tiny_recipe):
    """``jobs=2`` runs the same runs in worker processes: the same metrics as a sequential compare,
    each run directory complete, the report written, and a rerun keeps every run."""
    seq = _compare(tiny_recipe, tmp_path / "a")
    par = _compare(tiny_recipe, tmp_path / "b")
    par["seeds"] = seq["seeds"] = [0, 1]
    par["threads"] = seq["threads"] = 1
    run_compare(seq)
    run_compare(par, jobs=2)
    for v in ("grpo", "dapo"):
        for s in (0, 1):
            a = [json.loads(x) for x in (tmp_path / "a" / "cmp" / v / f"seed{s}" / "metrics.jsonl").read_text().splitlines()]
            b = [json.loads(x) for x in (tmp_path / "b" / "cmp" / v / f"seed{s}" / "metrics.jsonl").read_text().splitlines()]
            drop = lambda r: {k: x for k, x in r.items() if "time" not in k and k not in ("tokens_per_s", "elapsed_s")}  # noqa: E731
            assert [drop(r) for r in a] == [drop(r) for r in b]
    assert (tmp_path / "b" / "report" / "report.md").exists()
    with pytest.raises(ValueError, match="custom run_fn"):
        run_compare(par, run_fn=lambda *a, **k: {}, jobs=2)
