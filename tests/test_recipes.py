"""Every shipped recipe (searched recursively, compare recipes included) validates. A recipe that
reads generated model folders (the chat example) gets them written into a temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from ccrl.config import load_recipe
from tests.conftest import chat_example_overrides

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
NEEDS_MODELS = {"chat_reward_model.yaml": chat_example_overrides}   # python -m ccrl.data.local_models OUT


def test_recipes_exist():
    assert len(RECIPES) >= 5, RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_recipe_validates(path, request, monkeypatch):
    monkeypatch.chdir(ROOT)                 # recipes name data files relative to the repository root
    overrides = NEEDS_MODELS[path.name](request.getfixturevalue("chat_example_models")) if path.name in NEEDS_MODELS else []
    rec = load_recipe(path, overrides)
    assert rec.stages and rec.name
    for v in rec.variants:
        load_recipe(rec.raw, v.set)
