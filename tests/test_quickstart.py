"""The quickstart end to end (slow: two runs of up to 10 minutes each on a 2-core CPU): pretrain →
SFT → CCRL for seeds 4 and 9, then ``ccrl eval`` of the SFT and RL checkpoints. Asserts what the
README's tables report for every seed whose SFT reaches the threshold: SFT ends early, at the 0.4
training-accuracy threshold (not at its 2500-step limit or its time budget); the RL stage raises
held-out accuracy over its SFT checkpoint by at least 5 points (measured: 38.0–52.0); and the
council does not collapse onto one persona (the largest persona share, averaged over the RL
steps, stays below 0.5; a collapsed council has 1.0).

Which seeds reach the threshold depends on the CPU: floating-point sums run in another order and
each seed's trajectory changes (the README's two tables: seed 0 reached it at step 275 on an Intel
Xeon and never on an AMD EPYC). Seeds 4 and 9 reached it on both, by step 550 and 950, well inside
the budget; so this test checks what RL does from a policy at the threshold, not one CPU's
trajectory. The DPO and ORPO recipes, which build on the quickstart's SFT, run on seed 1."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ccrl.pipeline import run_recipe

ROOT = Path(__file__).resolve().parents[1]


def _eval(checkpoint: Path) -> float:
    out = subprocess.run([sys.executable, "-m", "ccrl", "eval", str(checkpoint), "--task", "arithmetic",
                          "--options", '{"digits": 2, "ops": "+", "pad": true, "reverse": true}', "--n", "200", "--max-new-tokens", "6"],
                         capture_output=True, text=True, check=True).stdout
    return float(re.search(r"heldout_accuracy: ([0-9.]+)", out).group(1))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [4, 9])
def test_quickstart_rl_gain_and_council_entropy(tmp_path, seed):
    out = tmp_path / "quickstart"
    summary = run_recipe(str(ROOT / "recipes" / "quickstart.yaml"), overrides={"output_dir": str(out), "seed": seed},
                         show_progress=False, log=lambda *_: None)
    assert [s["name"] for s in summary["stages"]] == ["pretrain", "sft", "rl"]
    sft, rl = _eval(out / "sft"), _eval(out / "rl")
    assert sft == pytest.approx(summary["stages"][1]["metrics"]["heldout_accuracy"])
    assert rl == pytest.approx(summary["stages"][2]["metrics"]["heldout_accuracy"])
    assert rl >= sft + 0.05, (sft, rl)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["stages"][1]["steps"] < 2500                      # early stop, not the step limit
    checks = [r["early_stop/accuracy"] for r in rows if r["stage"] == "sft" and "early_stop/accuracy" in r]
    assert checks[-1] >= 0.4 > max(checks[:-1]), checks
    rl_rows = [r for r in rows if r["stage"] == "rl"]
    assert len(rl_rows) == 200
    shares = [r["expert_load/max_share"] for r in rl_rows]
    assert sum(shares) / len(shares) < 0.5
    assert min(r["council_entropy"] for r in rl_rows) > 0.0


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["dpo", "orpo"])
def test_preference_recipe_on_a_seed_the_recipe_does_not_use(tmp_path, recipe):
    """recipes/dpo.yaml and orpo.yaml (the quickstart's pretrain and SFT, then the preference stage)
    on seed 1, the seed where DPO's held-out preference accuracy was lowest before the recipe took
    its present settings (0.664; docs/preference-stages.md): task accuracy on the 999 held-out
    prompts is not lower after the stage than after SFT, and held-out preference accuracy is at
    least 0.7 (measured: 0.791 DPO, 0.930 ORPO; task accuracy 0.453 after SFT, 0.711 and 0.720 after)."""
    out = tmp_path / recipe
    summary = run_recipe(str(ROOT / "recipes" / f"{recipe}.yaml"), overrides={"output_dir": str(out), "seed": 1},
                         show_progress=False, log=lambda *_: None)
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == ["pretrain", "sft", recipe]
    assert stages["sft"]["steps"] < 2500
    before, after = stages["sft"]["metrics"]["heldout_accuracy"], stages[recipe]["metrics"]["heldout_accuracy"]
    assert after >= before, (before, after)
    assert stages[recipe]["metrics"]["heldout_pairs"] == 512
    assert stages[recipe]["metrics"]["preference_accuracy"] >= 0.7
