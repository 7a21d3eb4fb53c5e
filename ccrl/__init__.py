"""ccrl: Council-Calibrated RL for the Quillan hierarchical council policy.

Importing ``ccrl`` is cheap; the heavy parts (transformers, accelerate, datasets) load
only when a recipe runs. ``ccrl.run_recipe(path_or_dict, overrides=None)`` does what
``ccrl run`` does and returns the run summary.
"""

from __future__ import annotations

from ccrl.errors import CcrlError, CheckpointError, DataError, RecipeError, RewardError

__version__ = "0.1.0"

__all__ = [
    "CcrlError",
    "CheckpointError",
    "DataError",
    "RecipeError",
    "RewardError",
    "run_recipe",
    "__version__",
]


def run_recipe(recipe, overrides=None, resume: bool = False):
    """Run every stage of a recipe (a YAML path or a dict); return the summary dict."""
    from ccrl.pipeline import run_recipe as _run

    return _run(recipe, overrides=overrides, resume=resume)
