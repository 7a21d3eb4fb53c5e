"""One objective path: the RL trainer takes its loss function and keyword arguments from the
objective registry, and a recipe the registry refuses (``council_beta`` for an objective other
than ccrl) fails when it is checked, with exit code 2 and one paragraph naming the key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from ccrl.cli import main
from ccrl.config import load_recipe
from ccrl.errors import RecipeError
from ccrl.objectives import ccrl_loss, get_objective, policy_loss
from tests.conftest import TINY_LLAMA

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _recipe(tmp_path, objective="grpo", model=None, **stage):
    st = {"kind": "rl", "objective": objective, "steps": 1, "lr": 1e-3, "prompts_per_step": 2, "group_size": 2,
          "max_new_tokens": 3, "rewards": [{"name": "exact_match"}],
          "data": {"task": "arithmetic", "options": {"digits": 1}, "num_examples": 20, "heldout_size": 4}}
    st.update(stage)
    return {"name": "path", "seed": 0, "output_dir": str(tmp_path / "run"),
            "model": model or {"hf_config": copy.deepcopy(TINY_LLAMA)}, "eval": {"max_new_tokens": 3},
            "stages": [{"kind": "sft", "data": st["data"], "steps": 1, "batch_size": 4}, st]}


def _write(tmp_path, rec) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(rec, sort_keys=False))
    return path


# --------------------------------------------------------------------------- refused at check time


@pytest.mark.parametrize("command", ["check", "run"])
def test_council_beta_for_grpo_exits_2_naming_the_key(tmp_path, capsys, command):
    path = _write(tmp_path, _recipe(tmp_path, "grpo", council_beta=0.05))
    assert main([command, str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().split("\n\n")) == 1                 # one paragraph (wrapped to the terminal)
    text = " ".join(err.split())
    assert f"{path}: stages[1].council_beta:" in text, err
    assert "only the ccrl objective takes it" in text, err
    assert not (tmp_path / "run").exists()                      # nothing ran


@pytest.mark.parametrize("objective", ["grpo", "dapo", "dr_grpo", "gspo"])
def test_council_beta_refused_for_every_non_ccrl_objective(tmp_path, objective):
    with pytest.raises(RecipeError, match=r"stages\[1\]\.council_beta: .*only the ccrl objective takes it"):
        load_recipe(_recipe(tmp_path, objective, council_beta=0.05))
    with pytest.raises(RecipeError, match=r"stages\[1\]\.council_beta"):   # through --set as well
        load_recipe(_recipe(tmp_path, objective), ["stages.rl.council_beta=0.1"])
    load_recipe(_recipe(tmp_path, objective, council_beta=0.0))            # 0: no council term, accepted
    load_recipe(_recipe(tmp_path, objective))


def test_other_objective_settings_are_checked_by_the_registry(tmp_path):
    # the schema allows any ε >= 0; the registry knows ε_low must stay below 1
    with pytest.raises(RecipeError, match=r"stages\[1\]\.epsilon: .*\[0, 1\)"):
        load_recipe(_recipe(tmp_path, "grpo", epsilon=1.5))
    council = {"hf_config": copy.deepcopy(TINY_LLAMA), "council_head": True}   # ccrl needs a council policy
    assert load_recipe(_recipe(tmp_path, "ccrl", council, council_beta=0.2)).stages[1].council_beta == 0.2


def test_shipped_recipes_carry_no_council_beta_for_other_objectives():
    for path in sorted(RECIPES.rglob("*.yaml")):
        assert "council_beta: null" not in path.read_text(), path
    assert main(["check", str(RECIPES / "grpo.yaml")]) == 0
    assert main(["check", str(RECIPES / "compare_objectives.yaml")]) == 0


# --------------------------------------------------------------------------- the trainer's loss


def _trainer(rec: dict):
    """The rl stage's trainer, built as ``run_recipe`` builds it (no step is run)."""
    from ccrl.pipeline import _accelerator, _context, _stage_model, _tokenizer, trainer_class

    r = load_recipe(rec)
    acc, tok = _accelerator(r), _tokenizer(r)
    stage = r.stages[1]
    ctx = _context(r, stage, 1, Path(r.output_dir), acc, tok, None, False)
    return trainer_class(stage.kind)(stage, _stage_model(r, stage, None, tok, 0), ctx)


def _tensors(P=4):
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(4, 3, generator=g, dtype=torch.float64)                    # (B, T)
    old = lp + 0.1 * torch.randn(4, 3, generator=g, dtype=torch.float64)        # (B, T)
    adv = torch.randn(4, generator=g, dtype=torch.float64)                      # (B,)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])           # (B, T)
    alpha = torch.softmax(torch.randn(4, 3, P, generator=g, dtype=torch.float64), -1)  # (B, T, P)
    counts = {"num_sequences": 4.0, "num_tokens": float(mask.sum())}
    return lp, old, adv, mask, alpha, counts


@pytest.mark.parametrize("objective", ["grpo", "dapo", "dr_grpo", "gspo"])
def test_other_objectives_never_take_the_council_term(tmp_path, objective):
    """On a council policy (α available) the loss is the registry's policy_loss with its kwargs."""
    tr = _trainer(_recipe(tmp_path, objective, model={"preset": "toy"}))
    spec = get_objective(objective)
    assert tr.spec.loss_fn is policy_loss and not tr.spec.council
    assert tr.loss_kwargs == spec.loss_kwargs()
    lp, old, adv, mask, alpha, counts = _tensors()
    loss, m = tr.loss(lp, old, adv, mask, alpha, None, counts)
    want, wm = policy_loss(lp, old, adv, mask, **spec.loss_kwargs(), max_tokens=3, **counts)
    assert torch.equal(loss, want)
    assert float(m["entropy_bonus"]) == 0.0 and "council_entropy" not in m and set(m) == set(wm)


def test_ccrl_gets_the_council_entropy_bonus(tmp_path):
    tr = _trainer(_recipe(tmp_path, "ccrl", model={"preset": "toy"}, council_beta=0.2))
    assert tr.spec.loss_fn is ccrl_loss and tr.loss_kwargs["beta"] == 0.2
    lp, old, adv, mask, alpha, counts = _tensors()
    loss, m = tr.loss(lp, old, adv, mask, alpha, None, counts)
    kw = get_objective("ccrl").loss_kwargs(council_beta=0.2)
    want, _ = ccrl_loss(lp, old, adv, mask, alpha, **kw, max_tokens=3, **counts)
    assert torch.equal(loss, want)
    pg, _ = policy_loss(lp, old, adv, mask, **{k: v for k, v in kw.items() if k != "beta"}, max_tokens=3, **counts)
    h = -(alpha * alpha.log()).sum(-1)                                          # (B, T) H_Ω
    bonus = 0.2 * float((h * mask).sum() / mask.sum())
    assert abs(float(pg - loss) - bonus) < 1e-12 and abs(float(m["entropy_bonus"]) - bonus) < 1e-12
    # the stage's unset β is the objective's default
    assert _trainer(_recipe(tmp_path, "ccrl", model={"preset": "toy"})).loss_kwargs["beta"] == 0.05
