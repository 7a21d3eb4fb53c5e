"""Every shipped recipe (searched recursively, compare recipes included) validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from ccrl.config import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))


def test_recipes_exist():
    assert len(RECIPES) >= 5, RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_recipe_validates(path):
    rec = load_recipe(path)
    assert rec.stages and rec.name
    for v in rec.variants:
        load_recipe(rec.raw, v.set)
