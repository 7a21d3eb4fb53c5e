"""ccrl: Council-Calibrated RL for the Quillan hierarchical council policy.

Importing ``ccrl`` is cheap; the heavy parts (transformers, accelerate, datasets) load
only when a recipe runs. ``ccrl.run_recipe(path_or_dict, overrides=None, callbacks=None)`` does
what ``ccrl run`` does and returns the run summary; ``ccrl.Callback`` is the base class of the
callbacks it takes (hooks: ``on_stage_start``, ``on_step_end``, ``on_evaluate``, ``on_stage_end``;
see ``ccrl.callbacks``).
"""

from __future__ import annotations

from ccrl.callbacks import Callback, StageState
from ccrl.errors import CcrlError, CheckpointError, DataError, RecipeError, RewardError

__version__ = "0.1.0"

__all__ = [
    "Callback",
    "CcrlError",
    "CheckpointError",
    "DataError",
    "RecipeError",
    "RewardError",
    "StageState",
    "run_recipe",
    "__version__",
]


def run_recipe(recipe, overrides=None, resume: bool = False, callbacks=None, overwrite: bool = False,
               show_progress: bool | None = None):
    """Run every stage of a recipe (a YAML path or a dict); return the summary dict.

    ``overrides``: dotted keys (``{"stages.rl.lr": 1e-5}`` or ``["stages.rl.lr=1e-5"]``);
    ``resume`` / ``overwrite``: as ``ccrl run --resume`` / ``--overwrite``; ``callbacks``: a list
    of :class:`ccrl.Callback` (or functions ``(trainer, step, metrics)`` run after every step)."""
    from ccrl.pipeline import run_recipe as _run

    return _run(recipe, overrides=overrides, resume=resume, callbacks=callbacks, overwrite=overwrite,
                show_progress=show_progress)
