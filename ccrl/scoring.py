"""Scoring completions with a recipe's reward terms: the V_Ω combination used everywhere.

    V_Ω = Σ_k w_k · r_k,   with cost terms (``ice``) entering as −w_E · E_ICE

Each recipe reward entry ``{name, weight, **params}`` is resolved through the ``rewards``
registry (or a ``package.module:function`` path), its params bound, and called as TRL's
``GRPOTrainer`` calls reward functions: ``fn(prompts=..., completions=..., completion_ids=...,
**kwargs)``.

- ``prompts`` / ``completions`` (:func:`reward_inputs`): for plain-text data, the prompt strings
  and the decoded completions; for conversational data (a ``prompt`` of messages), each prompt
  is its message list ``[{"role": "user", "content": ...}, ...]`` and each completion is
  ``[{"role": "assistant", "content": text}]``, exactly as TRL passes them.
- ``completion_ids``: the generated token ids of each completion (list of lists; EOS included
  when it was generated, padding not).
- the dataset's columns: ``answer`` and every extra column, one entry per completion (a row's
  values repeated for each of its G completions).
- ``trainer_state``: a :class:`RewardState` with ``global_step`` (the stage's completed steps;
  one step is one rollout and its ``ppo_epochs`` updates), ``max_steps`` and ``stage``, the
  fields of transformers' ``TrainerState`` that rewards shaped by training progress read.
- ``log_metric(name, value)``: a scalar the function wants logged; an RL step logs the mean of
  the values it received under ``name`` in ``metrics.jsonl`` (TRL's ``log_metric``).
- ``log_extra(column, values)``: per-completion values of an extra column of the completions
  table (TRL's ``log_extra``; values of repeated calls for a column are appended, as TRL does, and
  must come to one per completion). An RL stage with ``log_completions_every`` > 0 writes them in
  ``<output_dir>/completions/<stage>.jsonl`` beside each completion; otherwise (and in held-out
  scoring) the call is accepted and the values dropped.
- ``answer_ids`` and ``eos_token_id`` (when the caller has the policy's tokenizer): each
  ``answer`` tokenized as it is with that tokenizer, no special tokens (None where the answer is
  None), and the tokenizer's EOS id; what ``exact_match`` with ``match: tokens`` compares
  ``completion_ids`` against.
- rollout statistics the built-ins need: ``completion_lengths``, ``max_completion_length``,
  ``council_weights`` (per completion [T_i, P]), ``chosen_token_probs`` ([T_i, P]),
  ``active_params_per_token`` and ``total_params``.

Held-out scoring (``RewardSet(specs, heldout=True)``, every stage's evaluation) scores
each stage's rows with the recipe's rewards, and a stage's rows may lack the columns a reward was
written for: an SFT stage on ``{"messages": ...}`` rows has no ``answer``. There a reward that
requires a column the rows lack (a parameter with no default, absent or None in every row) is not
called, and one that raises on such rows (``kwargs["answer"]`` holding None, or a ``KeyError``
for a column they do not have) is not scored; either way ``reward/<name>`` is NaN for that stage,
``ScoredBatch.not_scored`` says why, and evaluation logs it once. Any other error is raised as
always, and training steps call every reward, as TRL does.

Outputs are validated by ``rewards.call_reward`` (NaN, wrong length, raising functions become a
RewardError naming the function and sample); ``None`` means "no opinion" and is skipped via
``combine_rewards`` (a sample with no opinion at all is marked unscorable).
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field

import torch


@dataclass
class ScoredBatch:
    """Rewards of N completions."""

    value: torch.Tensor                 # (N,) V_Ω (NaN-free; unscorable rows are 0)
    per_reward: dict[str, torch.Tensor]  # name → (N,) raw reward values (NaN where None)
    unscorable: torch.Tensor            # (N,) bool: every reward said None
    extra: dict[str, list] = field(default_factory=dict)   # column → (N,) values passed to log_extra
    not_scored: dict[str, str] = field(default_factory=dict)  # reward → why held-out scoring skipped it


@dataclass
class RewardState:
    """What reward functions receive as ``trainer_state`` (the ``TrainerState`` fields they read)."""

    global_step: int
    """steps of the stage completed before these completions were sampled"""
    max_steps: int
    """the stage's ``steps``"""
    stage: str = ""
    """the stage's name"""


def reward_state(trainer) -> RewardState:
    """The :class:`RewardState` of a stage trainer now."""
    return RewardState(global_step=int(trainer.step), max_steps=int(trainer.stage.steps), stage=trainer.stage.name)


def reward_inputs(examples: list, completions: list[str]) -> tuple[list, list]:
    """(prompts, completions) as TRL hands them to reward functions: strings for plain-text rows; for
    conversational rows the prompt's messages and ``[{"role": "assistant", "content": text}]``.

    >>> from ccrl.data import Example
    >>> reward_inputs([Example("2+2=", "4")], [" 4"])
    (['2+2='], [' 4'])
    >>> msgs = [{"role": "user", "content": "2+2?"}]
    >>> reward_inputs([Example("<rendered>", "4", messages=msgs)], ["4"])
    ([[{'role': 'user', 'content': '2+2?'}]], [[{'role': 'assistant', 'content': '4'}]])
    """
    if examples and all(getattr(e, "messages", None) is not None for e in examples):
        return ([copy.deepcopy(e.messages) for e in examples],
                [[{"role": "assistant", "content": c}] for c in completions])
    return [e.prompt for e in examples], list(completions)


class RewardSet:
    """The resolved, bound reward terms of a stage."""

    def __init__(self, specs, keep_extra: bool = False, heldout: bool = False):
        import rewards

        self.names: list[str] = []
        self.fns = []
        self.weights: list[float] = []
        seen: dict[str, int] = {}
        for spec in specs:
            fn = rewards.bind(spec.name, **spec.params)
            label = spec.name.split(":")[-1]
            seen[label] = seen.get(label, 0) + 1
            if seen[label] > 1:
                label = f"{label}_{seen[label]}"
            sign = -1.0 if getattr(rewards.resolve(spec.name), "is_cost", False) else 1.0
            self.names.append(label)
            self.fns.append(fn)
            self.weights.append(sign * float(spec.weight))
        self._logged: dict[str, list[float]] = {}
        self.keep_extra = keep_extra
        """keep what rewards pass to ``log_extra`` (in ``ScoredBatch.extra``); False drops it"""
        self._extra: dict[str, list] = {}
        self.heldout = heldout
        """held-out scoring: a reward that cannot score these rows is skipped (module docstring), and
        rows no reward scores are not warned about (no advantage is formed from them)"""

    def log_extra(self, column: str, values) -> None:
        """What reward functions receive as ``log_extra``: ``values`` (one per completion of the
        call) appended to the completions-table column ``column``."""
        from rewards.errors import RewardError

        column = str(column)
        if column in self.table_columns():
            raise RewardError(f"log_extra: column {column!r} is one the completions table already has "
                                      f"({', '.join(sorted(self.table_columns()))}); choose another name")
        if self.keep_extra:
            values = values.tolist() if hasattr(values, "tolist") else list(values)
            self._extra.setdefault(column, []).extend(values)

    def table_columns(self) -> set[str]:
        """The completions table's own columns, which ``log_extra`` cannot name."""
        return {"step", "prompt", "completion", "value", "advantage", "overlong", *self.names}

    def log_metric(self, name: str, value: float) -> None:
        """What reward functions receive as ``log_metric``: a scalar to log with the step."""
        self._logged.setdefault(str(name), []).append(float(value))

    def pop_logged(self) -> dict[str, tuple[float, int]]:
        """(sum, count) per name of the values logged through ``log_metric`` since the last call."""
        out = {k: (sum(v), len(v)) for k, v in self._logged.items()}
        self._logged = {}
        return out

    def __len__(self) -> int:
        return len(self.fns)

    def missing_columns(self, index: int, kwargs: dict) -> list[str]:
        """The parameters reward ``index`` requires (no default; not ``prompts`` / ``completions``)
        that ``kwargs`` lacks or holds as None for every row: dataset columns these rows do not have."""
        try:
            params = inspect.signature(self.fns[index]).parameters.values()
        except (TypeError, ValueError):
            return []
        return [p.name for p in params
                if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                and p.name not in ("prompts", "completions") and _lacking(kwargs, p.name)]

    def earned(self, per_reward: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ_f w_f · r_f over this set's terms with a positive weight (NaN skipped): V_Ω without
        the costs, and without any entry of ``per_reward`` that is not one of this set's terms
        (the overlong penalty). What DAPO's dynamic sampling asks to vary within a group."""
        from ccrl.objectives import combine_rewards

        names = [n for n, w in zip(self.names, self.weights) if w > 0]
        n = next(iter(per_reward.values())).shape[0] if per_reward else 0
        if not names:
            return torch.zeros(n)
        per = torch.stack([per_reward[k] for k in names], dim=1)                  # (N, F+)
        w = [w for w in self.weights if w > 0]
        return combine_rewards(per, torch.tensor(w, dtype=torch.float32), warn=False)[0]

    def score(self, prompts: list[str], completions: list[str], **kwargs) -> ScoredBatch:
        """Call every reward on the completions and combine them into V_Ω. In held-out scoring
        (:attr:`heldout`) a reward that requires a column the rows lack, or raises on rows that
        lack one, gives None for every row and ``not_scored`` says why (module docstring)."""
        import rewards
        from ccrl.objectives import combine_rewards
        from rewards.errors import RewardError

        kwargs.setdefault("log_metric", self.log_metric)
        kwargs.setdefault("log_extra", self.log_extra)
        self._extra = {}
        cols, not_scored = [], {}
        for i, (name, fn) in enumerate(zip(self.names, self.fns)):
            missing = self.missing_columns(i, kwargs) if self.heldout else []
            if missing:
                not_scored[name] = f"it requires {', '.join(map(repr, missing))}, which these rows do not have"
                vals = [None] * len(completions)
            else:
                try:
                    vals = rewards.call_reward(fn, name, prompts, completions, **kwargs)
                except RewardError as err:
                    why = _raised_on_lacking_rows(err, kwargs) if self.heldout else None
                    if why is None:
                        raise
                    not_scored[name] = why
                    vals = [None] * len(completions)
            cols.append([float("nan") if v is None else float(v) for v in vals])
        extra, self._extra = self._extra, {}
        for column, values in extra.items():
            if len(values) != len(completions):
                raise RewardError(f"log_extra: column {column!r} got {len(values)} values for "
                                          f"{len(completions)} completions; pass one value per completion")
        per = torch.tensor(cols, dtype=torch.float32).T if cols else torch.zeros((len(prompts), 0))  # (N, F)
        total, unscorable = combine_rewards(per, torch.tensor(self.weights, dtype=torch.float32), warn=not self.heldout)
        return ScoredBatch(value=total, per_reward={n: per[:, i] for i, n in enumerate(self.names)},
                           unscorable=unscorable, extra=extra, not_scored=not_scored)


def _lacking(kwargs: dict, key: str) -> bool:
    """Whether ``kwargs`` lacks ``key`` or holds None for every row."""
    value = kwargs.get(key)
    return value is None or (isinstance(value, list | tuple) and all(v is None for v in value))


def _raised_on_lacking_rows(err: Exception, kwargs: dict) -> str | None:
    """Why a reward that raised ``err`` is not scored on rows that lack one of its columns: a
    ``KeyError`` for a key ``kwargs`` does not have, or any error when the rows have no ``answer``;
    None otherwise (the error is the reward's own)."""
    cause = err.__cause__
    if isinstance(cause, KeyError) and cause.args and isinstance(cause.args[0], str) and cause.args[0] not in kwargs:
        return f"it reads {cause.args[0]!r}, which these rows do not have"
    if _lacking(kwargs, "answer"):
        return f"it raised {type(cause or err).__name__} ({cause or err}) on rows with no 'answer'"
    return None


def merge_logged(parts: list[dict[str, tuple[float, int]]]) -> dict[str, float]:
    """The mean of each ``log_metric`` name over every process's :meth:`RewardSet.pop_logged`."""
    total: dict[str, list[float]] = {}
    for part in parts:
        for k, (v, n) in part.items():
            acc = total.setdefault(k, [0.0, 0])
            acc[0] += v
            acc[1] += n
    return {k: v / n for k, (v, n) in sorted(total.items()) if n}


def rollout_kwargs(rollout, examples: list, model=None, max_completion_length: int | None = None,
                   state: RewardState | None = None, tokenizer=None) -> dict:
    """The kwargs reward functions receive for a rollout: dataset columns + rollout statistics
    (+ ``trainer_state`` when ``state`` is given; + ``answer_ids`` and ``eos_token_id`` when the
    policy's ``tokenizer`` is given).

    ``examples`` has one entry per completion (already repeated per group)."""
    lengths = rollout.lengths.tolist()
    ids = [row[:n] for row, n in zip(rollout.completion_ids.tolist(), lengths)]
    kw = {
        "answer": [e.answer for e in examples],
        "completion_ids": ids,
        "completion_lengths": lengths,
        "max_completion_length": max_completion_length or int(rollout.completion_ids.shape[1]),
    }
    keys = sorted({k for e in examples for k in e.extra})
    for k in keys:
        kw[k] = [e.extra.get(k) for e in examples]
    if state is not None:
        kw["trainer_state"] = state
    if tokenizer is not None:
        kw["answer_ids"] = answer_ids(tokenizer, kw["answer"])
        kw["eos_token_id"] = tokenizer.eos_token_id
    if rollout.council_weights is not None:
        cw = rollout.council_weights.detach().cpu()
        kw["council_weights"] = [cw[i, :n] for i, n in enumerate(lengths)]
    if rollout.chosen_token_probs is not None:
        cp = rollout.chosen_token_probs.detach().cpu()
        kw["chosen_token_probs"] = [cp[i, :n] for i, n in enumerate(lengths)]
    if model is not None:
        counts = parameter_counts(model)
        if counts is not None:
            kw["active_params_per_token"], kw["total_params"] = counts
        kw["policy_device"] = rollout.completion_ids.device   # model-based rewards run beside the policy
    return kw


def answer_ids(tokenizer, answers: list) -> list[list[int] | None]:
    """Each answer tokenized as it is (``str(answer)``, no special tokens); None stays None.

    >>> from ccrl.data import default_tokenizer
    >>> tok = default_tokenizer()
    >>> answer_ids(tok, ["59", None]) == [tok.encode("59", add_special_tokens=False), None]
    True
    """
    cache: dict[str, list[int]] = {}
    out = []
    for a in answers:
        if a is None:
            out.append(None)
            continue
        key = str(a)
        if key not in cache:
            cache[key] = list(tokenizer.encode(key, add_special_tokens=False))
        out.append(list(cache[key]))
    return out


def parameter_counts(model) -> tuple[int, int] | None:
    """(active parameters per token, total parameters) of a policy."""
    active = getattr(model, "active_parameters_per_token", None)
    total = sum(p.numel() for p in model.parameters())
    if callable(active):
        return int(active()), int(total)
    return int(total), int(total)
