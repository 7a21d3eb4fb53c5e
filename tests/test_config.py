"""Recipe validation: every kind of bad input is a RecipeError naming the file and the key,
and the CLI turns it into exit code 2 with one paragraph and no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from ccrl.config import RLStage, apply_overrides, load_recipe, parse_set
from ccrl.errors import RecipeError


def _write(tmp_path, rec, name="r.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(rec, sort_keys=False))
    return p


def _rl(**kw):
    st = {"kind": "rl", "objective": "grpo", "steps": 2, "rewards": [{"name": "exact_match"}]}
    st.update(kw)
    return st


@pytest.mark.parametrize(
    "mutate, expected",
    [
        # unknown key with a did-you-mean
        (lambda r: r["stages"][1].update(stepz=3), ["stages[1].stepz", "unknown key", "did you mean 'steps'"]),
        # wrong type
        (lambda r: r["stages"][0].update(steps="ten"), ["stages[0].steps", "expected an integer", "'ten'"]),
        # out of range
        (lambda r: r["stages"][0].update(lr=-1.0), ["stages[0]", "lr", "(0.0, 1.0]"]),
        # missing file
        (lambda r: r["stages"][0].update(data={"path": "nope/missing.jsonl"}), ["stages[0]", "data.path", "file not found"]),
        # unknown task
        (lambda r: r["stages"][0]["data"].update(task="arithmetc"), ["stages[0]", "arithmetic"]),
        # unknown stage kind
        (lambda r: r["stages"][1].update(kind="stf"), ["stages[1].kind", "did you mean 'sft'"]),
        # unknown objective
        (lambda r: r["stages"].append(_rl(objective="grpoo")), ["stages[2]", "objective", "grpo"]),
        # unknown reward
        (lambda r: r["stages"].append(_rl(rewards=[{"name": "exact_mach"}])), ["stages[2]", "rewards[0]", "exact_match"]),
        # rl without rewards
        (lambda r: r["stages"].append(_rl(rewards=[])), ["stages[2]", "rewards", "at least one reward"]),
        # group too small
        (lambda r: r["stages"].append(_rl(group_size=1)), ["stages[2]", "group_size", ">= 2"]),
        # bad literal
        (lambda r: r["stages"][0].update(lr_schedule="cosin"), ["stages[0].lr_schedule", "did you mean 'cosine'"]),
        # model section missing / ambiguous
        (lambda r: r.pop("model"), ["model", "preset"]),
        (lambda r: r["model"].update(preset="toy"), ["model", "exactly one of"]),
        # no stages
        (lambda r: r.update(stages=[]), ["stages", "at least one stage"]),
        # duplicated stage names
        (lambda r: r["stages"][1].update(name="pretrain"), ["stage names must be unique"]),
        # DPO's NLL weight on an ORPO stage (ORPO has its own)
        (lambda r: r["stages"].append({"kind": "orpo", "nll_weight": 0.5}), ["stages[2]", "nll_weight", "orpo"]),
        (lambda r: r["stages"].append({"kind": "dpo", "nll_weight": -1}), ["stages[2]", "nll_weight"]),
    ],
)
def test_bad_recipes_name_the_key(tmp_path, tiny_recipe, mutate, expected):
    rec = tiny_recipe()
    mutate(rec)
    path = _write(tmp_path, rec)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert msg.startswith(str(path)), msg
    for piece in expected:
        assert piece in msg, f"{piece!r} not in: {msg}"


def test_invalid_yaml_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nstages: [\n  - {kind: sft\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: not valid YAML at line \d+"):
        load_recipe(p)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_defaults_come_from_previous_stage_and_objective(tiny_recipe):
    rec = tiny_recipe()
    rec["stages"].append(_rl(objective="dapo", rewards=[{"name": "exact_match", "weight": 2.0}, "format"]))
    r = load_recipe(rec)
    rl = r.stages[2]
    assert isinstance(rl, RLStage) and rl.name == "rl"
    assert rl.data is r.stages[0].data                        # inherited
    assert rl.epsilon_high is None                            # filled from the objective at train time
    assert [s.name for s in rl.rewards] == ["exact_match", "format"]
    assert rl.rewards[0].weight == 2.0 and rl.rewards[1].weight == 1.0
    assert r.output_dir.endswith("run") and r.seeds == [0]


def test_overrides_by_stage_name_and_index(tiny_recipe):
    raw = tiny_recipe()
    out = apply_overrides(raw, {"stages.sft.lr": 1e-4, "stages.0.steps": 7, "eval.max_new_tokens": 3})
    assert out["stages"][1]["lr"] == 1e-4 and out["stages"][0]["steps"] == 7
    assert out["eval"]["max_new_tokens"] == 3
    assert raw["stages"][1]["lr"] == 3e-3                     # the input is not modified
    with pytest.raises(RecipeError, match="no stage named 'stf'.*did you mean 'sft'"):
        apply_overrides(raw, {"stages.stf.lr": 1.0})


def test_parse_set_reads_yaml_scalars():
    assert parse_set(["a.b=1e-4", "c=true", "d=[1, 2]", "e=grpo"]) == {"a.b": 1e-4, "c": True, "d": [1, 2], "e": "grpo"}
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        parse_set(["novalue"])


def test_override_type_error_is_reported(tiny_recipe):
    with pytest.raises(RecipeError, match=r"stages\[1\]\.steps: expected an integer"):
        load_recipe(tiny_recipe(), ["stages.sft.steps=many"])


def test_cli_bad_recipe_exits_2_without_traceback(tmp_path, tiny_recipe):
    rec = tiny_recipe()
    rec["stages"][1]["stepz"] = 3
    path = _write(tmp_path, rec)
    proc = subprocess.run([sys.executable, "-m", "ccrl", "run", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "stages[1].stepz" in proc.stderr and "did you mean 'steps'" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "ccrl", "check", str(path), "--set", "stages.sft.stepz=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_base_recipe_deep_merge_and_set(tmp_path, tiny_recipe):
    """A recipe with ``base:`` starts from the base, merges its keys over it, then applies ``set:``."""
    sub = tmp_path / "sub"
    sub.mkdir()
    _write(tmp_path, tiny_recipe(), "base.yaml")
    (sub / "child.yaml").write_text(yaml.safe_dump({
        "base": "../base.yaml", "name": "child", "eval": {"max_new_tokens": 3},
        "set": {"stages.sft.lr": 5.0e-4, "stages.0.steps": 7}}))
    rec = load_recipe(sub / "child.yaml")
    base = load_recipe(tmp_path / "base.yaml")
    assert rec.name == "child" and base.name == "tiny"
    assert rec.eval.max_new_tokens == 3 and rec.eval.batch_size == base.eval.batch_size  # merged, not replaced
    assert rec.stage("sft").lr == 5.0e-4 and rec.stages[0].steps == 7
    assert rec.stage("sft").steps == base.stage("sft").steps
    assert rec.model == base.model and "base" not in rec.raw and "set" not in rec.raw
    # --set still applies last, over the file's own set:
    assert load_recipe(sub / "child.yaml", ["stages.sft.lr=1e-5"]).stage("sft").lr == 1e-5
    # a chain of bases
    (sub / "grandchild.yaml").write_text(yaml.safe_dump({"base": "child.yaml", "seed": 9}))
    g = load_recipe(sub / "grandchild.yaml")
    assert g.seed == 9 and g.name == "child" and g.stage("sft").lr == 5.0e-4


@pytest.mark.parametrize("doc, expected", [
    ({"base": "missing.yaml"}, ["a.yaml", "base:", "missing.yaml", "not found"]),
    ({"base": "a.yaml"}, ["a.yaml", "cycle"]),
    ({"base": 3}, ["a.yaml", "base:", "expected the path"]),
    ({"base": "b.yaml", "set": ["x=1"]}, ["a.yaml", "set:", "mapping of dotted keys"]),
    ({"base": "b.yaml", "set": {"stages.nope.lr": 1.0}}, ["a.yaml", "nope"]),
])
def test_bad_base_recipes(tmp_path, tiny_recipe, doc, expected):
    _write(tmp_path, tiny_recipe(), "b.yaml")
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "a.yaml")
    for part in expected:
        assert part in str(e.value), (part, str(e.value))


def test_sampling_settings_are_declared_once_and_become_one_sampling_config(tiny_recipe):
    """The rl stage and the pairs section inherit the sampling keys (written flat in the recipe) and
    hand the rollout one SamplingConfig with every one of them."""
    import dataclasses

    from ccrl.config import PairsConfig, PreferenceStage, SamplingSettings
    from ccrl.rollout import SamplingConfig

    keys = [f.name for f in dataclasses.fields(SamplingSettings)]
    assert set(keys) <= {f.name for f in dataclasses.fields(SamplingConfig)}
    assert issubclass(RLStage, SamplingSettings) and issubclass(PairsConfig, SamplingSettings)
    rec = tiny_recipe()
    rec["stages"].append(_rl(max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=3, cuda_graph=False, attend_window=32))
    rec["stages"].append({"kind": "dpo", "steps": 1, "pairs": {"max_new_tokens": 6, "temperature": 0.8}})
    r = load_recipe(rec)
    sc = r.stages[2].sampling_config()
    assert isinstance(sc, SamplingConfig) and not sc.greedy
    assert (sc.max_new_tokens, sc.temperature, sc.top_p, sc.top_k, sc.cuda_graph) == (5, 0.7, 0.9, 3, False)
    assert sc.attend_window == 32
    dpo = r.stages[3]
    assert isinstance(dpo, PreferenceStage)
    pc = dpo.pairs.sampling_config()
    assert (pc.max_new_tokens, pc.temperature, pc.top_p, pc.top_k, pc.cuda_graph) == (6, 0.8, 1.0, 0, "auto")
    assert pc.attend_window == 128
    assert r.stages[2].sampling_config(max_new_tokens=2).max_new_tokens == 2
    for bad, piece in (({"temperature": 0.0}, "stages[3].pairs: temperature"), ({"top_p": 2.0}, "stages[3].pairs: top_p"),
                       ({"attend_window": -1}, "stages[3].pairs: attend_window")):
        rec["stages"][3]["pairs"] = bad
        with pytest.raises(RecipeError) as err:
            load_recipe(rec)
        assert piece in str(err.value), str(err.value)
