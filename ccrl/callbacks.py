"""Callbacks: user code run at fixed points of every stage (``ccrl.run_recipe(..., callbacks=[...])``).

Modelled on transformers' ``TrainerCallback``, smaller. Subclass :class:`Callback` and override
the hooks you need; each receives a :class:`StageState` (where the stage is) and, where there
are some, the metrics of that point:

=====================================  ==================================================================
hook                                   when
=====================================  ==================================================================
``on_stage_start(state)``              before the stage's first step (after a resume: before the next one)
``on_step_end(state, metrics)``        after every optimizer step, with the step's metrics (the
                                       metrics.jsonl line); return True to end the stage there
``on_evaluate(state, metrics)``        after held-out scoring: every ``eval_every`` steps (return True to
                                       end the stage) and at the end of the stage
``on_stage_end(state, metrics)``       once the stage is over, with its summary metrics
                                       (``state.stopped_by`` says why it ended)
=====================================  ==================================================================

A stage ended by a callback (or by ``max_seconds``, an rl stage's ``max_samples``, or ``early_stop``) finishes like one that ran
all its steps: final checkpoint, held-out scoring, a summary.json entry with the steps run and
``stopped_by``, and the next stage runs. (SIGINT/SIGTERM is different: it interrupts the run,
keeping ``<stage>-last`` for ``--resume``.)

A plain function ``fn(trainer, step, metrics)`` is also accepted and called after every step (the
older form, for code that needs the trainer itself; ``trainer.request_stop()`` there interrupts
the run as SIGINT does).

    class StopAtAccuracy(ccrl.Callback):
        def on_step_end(self, state, metrics):
            return metrics.get("accuracy", 0) >= 0.9

    ccrl.run_recipe("recipes/quickstart.yaml", callbacks=[StopAtAccuracy()])

Under several processes every process calls the hooks; a stage ends when any process asks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STOP_REASONS = ("early_stop", "max_seconds", "max_samples", "callback")
"""``StageState.stopped_by`` / the summary's ``stopped_by`` when a stage ends before ``steps``"""


@dataclass
class StageState:
    """Where a stage is, as the hooks see it (a fresh snapshot at each call)."""

    stage: str
    """the stage's name"""
    kind: str
    """pretrain | sft | rl | dpo | orpo"""
    index: int
    """position of the stage in the recipe (0-based)"""
    step: int
    """optimizer steps done"""
    steps: int
    """steps planned (the stage's ``steps``)"""
    elapsed_s: float
    """training time of the stage so far (what ``max_seconds`` is compared with)"""
    output_dir: Path
    """the run's output directory"""
    stopped_by: str | None = None
    """why the stage ended before ``steps`` (``STOP_REASONS``), None while running or after all steps"""
    trainer: Any = field(default=None, repr=False)
    """the stage's trainer (``ccrl.trainers.base.Trainer``), for advanced use"""

    @property
    def model(self):
        """The policy being trained (unwrapped from accelerate)."""
        return self.trainer.unwrapped


class Callback:
    """Base class: every hook does nothing. See the module docstring."""

    def on_stage_start(self, state: StageState) -> None:
        """Before the stage's first (or, resuming, next) step."""

    def on_step_end(self, state: StageState, metrics: dict) -> bool | None:
        """After each optimizer step; return True to end the stage after this step."""

    def on_evaluate(self, state: StageState, metrics: dict) -> bool | None:
        """After held-out scoring (``eval_every`` and the end of the stage); during training, True ends
        the stage."""

    def on_stage_end(self, state: StageState, metrics: dict) -> None:
        """Once the stage is over, with its summary metrics."""


class CallbackHandler:
    """Calls the hooks of a list of callbacks (a :class:`Callback`, or a function of
    ``(trainer, step, metrics)`` called after every step)."""

    def __init__(self, callbacks=None):
        self.callbacks = list(callbacks or [])
        for cb in self.callbacks:
            if not isinstance(cb, Callback) and not callable(cb):
                raise TypeError(f"callbacks: expected ccrl.Callback instances or functions (trainer, step, metrics), "
                                f"got {type(cb).__name__}")

    def _hooks(self, name: str):
        return [getattr(cb, name) for cb in self.callbacks if isinstance(cb, Callback)]

    def stage_start(self, trainer) -> None:
        for hook in self._hooks("on_stage_start"):
            hook(trainer.callback_state())

    def step_end(self, trainer, metrics: dict) -> bool:
        """Run after a step; True when a callback asks the stage to end."""
        stop = False
        for cb in self.callbacks:
            if isinstance(cb, Callback):
                stop = bool(cb.on_step_end(trainer.callback_state(), metrics)) or stop
            else:
                cb(trainer, trainer.step, metrics)
        return stop

    def evaluate(self, trainer, metrics: dict) -> bool:
        stop = False
        for hook in self._hooks("on_evaluate"):
            stop = bool(hook(trainer.callback_state(), metrics)) or stop
        return stop

    def stage_end(self, trainer, metrics: dict) -> None:
        for hook in self._hooks("on_stage_end"):
            hook(trainer.callback_state(), metrics)
