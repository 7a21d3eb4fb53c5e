"""Online RL: one trainer for GRPO, DAPO, Dr. GRPO, GSPO and CCRL.

A step orchestrates; every formula lives in ``ccrl.objectives``:

1. **rollout** — ``prompts_per_step`` prompts × G completions from the current policy
   (``ccrl.rollout``; one prefill per prompt, KV cache, finished rows leave the batch; on CUDA
   one captured graph of the decode step replayed per token, ``cuda_graph``, drawing from the
   step's generator on the policy's device), with the
   sampling log-probs as π_old, the overseer's α and the routed personas of every token. With
   ``packed_rollout`` the policy sampled is a packed ternary snapshot of the current weights
   (``true``: every step; ``auto``: on CPU, if one timed rollout each way at the start of the stage
   says it is faster, packing included, and never on other devices, where the packed kernel does
   not run; the choice is kept across resume, ``rollout/packed`` logs it);
2. **reward** — the recipe's reward terms combined into V_Ω (``ccrl.scoring``; called with TRL's
   arguments: message lists for conversational data, ``completion_ids``, the dataset's columns,
   ``trainer_state``, ``log_metric``, ``log_extra``), plus DAPO's overlong shaping when
   ``overlong_cache`` > 0; every ``log_completions_every`` steps the step's completions table
   (prompt, completion, each reward, V_Ω, advantage and the ``log_extra`` columns) is appended to
   ``<output_dir>/completions/<stage>.jsonl`` (TRL's ``log_completions``);
3. **dynamic sampling** (DAPO §3.2) — groups whose rewards are all equal carry no signal; they are
   dropped and more prompts are sampled, up to ``max_resample_tries`` rounds. Every completion
   sampled, dropped or kept, counts towards ``samples`` (logged each step, the running total) and
   the stage's ``max_samples`` budget. "Rewards" are by
   default what the completions earned (``dynamic_sampling_signal: rewards``: V_Ω without costs
   such as ICE and without the overlong penalty), as DAPO filters on correctness: ICE counts tokens,
   so filtering on V_Ω keeps every all-wrong group whose completions differ in length;
4. **advantage** — ``group_advantages`` (group / batch / none scaling, optional clip; samples every
   reward abstained on get 0);
5. **objective** — for each of μ = ``ppo_epochs`` passes: a forward over prompt + completion with
   the rollout's persona routes replayed (R3, arXiv 2510.11370) so π_θ and π_old route alike, the
   objective registry's loss function and keyword arguments (``policy_loss``; ``ccrl_loss``, with
   the overseer's α, for ``ccrl`` only) with the *step's* sequence and token counts
   as normalisers, so micro-batches sum to the full-batch loss, plus the MoE load-balance loss;
   then one optimizer update (and the aux-loss-free router bias update for ``noaux_bias``).
   Only the completion positions go through the output head; on a plain causal LM the head runs
   chunk by chunk over those tokens from the final hidden states (``logprob_chunk_size``;
   ``ccrl.objectives.chunked_token_logprobs``), so no (rows, T, V) logits exist, in the forward or
   the backward, in the training passes and the reference scoring alike; rows whose loss is
   exactly 0 (advantage 0 with no KL, entropy bonus or routing) skip the forward and backward
   (``gradient_rows``); the logged ``entropy`` is the sampling policy's, from the rollout.
   ``micro_batch_size`` rows go through each forward (training passes and reference scoring).

Several processes (``accelerate launch -m ccrl run``, DDP; ``prompts_per_step`` must be a
multiple of the process count W): every process draws the step's same prompts and samples its
own contiguous ``prompts_per_step / W`` of them with its own sampling generator, so a group never
spans processes and group advantages stay local (``scale_rewards: batch`` takes its std over the
rewards of every process). Dynamic sampling fills each process's share; every process runs the
same number of rounds (whether any share is still short is reduced over the processes), and when
no process found an informative group, all train on their last round as one process does. The
loss normalisers (sequences, tokens) are the step's, summed over the processes and divided by W,
so DDP's gradient average is the single-process gradient of the whole batch. Every process runs
the same number of forward/backward passes per update: one with fewer micro-batches (fewer
informative groups, skipped zero-loss rows) adds passes of weight 0 on one row. The logged
metrics are computed from every process's rows. The sampled completions differ from a
one-process run of the same recipe (each process's generator sees its own share); the update on
a given batch does not (``tests/test_distributed.py``).

The KL reference (only when ``kl_beta`` > 0) is the base model with adapters disabled under
PEFT (no second copy), otherwise a frozen copy taken at the start of the stage.

Deviations, stated up front: π_old is the rollout's log-probs (no second "old" forward; exact
when μ = 1, the standard choice in TRL and verl); the loss uses the sampling temperature as TRL
does; top-k/top-p truncation is not reflected in π_old (also as TRL).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch

from ccrl.evaluation import decode_completions
from ccrl.objectives import aggregate, council_entropy
from ccrl.rollout.engine import Rollout, SamplingConfig, concat_rollouts, generate
from ccrl.scoring import RewardSet, merge_logged, reward_inputs, reward_state, rollout_kwargs
from ccrl.trainers.base import Trainer
from policies import interface as policy_api
from policies.hf_compat import cache_kwargs, output_cache


@dataclass
class Batch:
    """One step's training data (N = groups · G completions)."""

    rollout: Rollout
    examples: list                   # (N,) the example behind each completion
    completions: list[str]           # (N,)
    value: torch.Tensor              # (N,) V_Ω incl. overlong shaping
    per_reward: dict                 # name → (N,)
    advantages: torch.Tensor         # (N,)
    valid: torch.Tensor              # (N,) scorable
    stats: dict
    spare: Rollout | None = None     # one sampled row, for passes of weight 0 when N is 0 here
    extra: dict = field(default_factory=dict)   # column → (N,) values rewards passed to log_extra

    def select(self, rows: list[int]) -> Batch:
        """The batch restricted to ``rows`` (whole groups, to keep advantages meaningful)."""
        idx = torch.tensor(rows, dtype=torch.long)
        ro = self.rollout.select(idx.to(self.rollout.lengths.device))
        return replace(self, rollout=ro, examples=[self.examples[i] for i in rows],
                       completions=[self.completions[i] for i in rows], value=self.value[idx],
                       per_reward={k: v[idx] for k, v in self.per_reward.items()},
                       advantages=self.advantages[idx.to(self.advantages.device)], valid=self.valid[idx],
                       extra={k: [v[i] for i in rows] for k, v in self.extra.items()},
                       spare=self.spare if self.spare is not None else self.rollout.select(
                           torch.zeros(1, dtype=torch.long, device=self.rollout.lengths.device)))


_PROCESS_SALT = 7_927
"""separates the sampling generators of the processes (process 0 draws what one process would)"""
_ADDITIVE = ("loss", "loss/policy", "loss/kl", "entropy_bonus")
"""loss metrics that are the micro-batches' (and processes') contributions to one sum"""


class Sampled(NamedTuple):
    """One rollout round's rows (all of them, or the informative groups that dynamic sampling kept)."""

    rollout: Rollout
    examples: list                   # (n,) the example behind each completion
    completions: list[str]           # (n,)
    value: torch.Tensor              # (n,) V_Ω incl. overlong shaping
    per_reward: dict                 # name → (n,)
    unscorable: torch.Tensor         # (n,) every reward abstained
    extra: dict                      # column → (n,) values rewards passed to log_extra

    def select(self, rows: torch.Tensor) -> Sampled:
        """The rows ``rows`` (a 1-D index tensor on the CPU)."""
        picked = rows.tolist()
        return Sampled(self.rollout.select(rows.to(self.rollout.lengths.device)), [self.examples[i] for i in picked],
                       [self.completions[i] for i in picked], self.value[rows],
                       {k: v[rows] for k, v in self.per_reward.items()}, self.unscorable[rows],
                       {k: [v[i] for i in picked] for k, v in self.extra.items()})


def resolve_hparams(stage, spec) -> dict:
    """The stage's objective hyper-parameters: the registry's merge of its defaults with the stage's
    settings (``ObjectiveSpec.hparams``), plus the overlong-shaping length ``overlong_cache``."""
    hp = spec.hparams(**stage.objective_settings())
    hp["overlong_cache"] = stage.overlong_cache if stage.overlong_cache is not None \
        else (round(0.2 * stage.max_new_tokens) if hp.get("overlong_shaping") else 0)
    return hp


class RLTrainer(Trainer):
    """See the module docstring."""

    kind = "rl"
    share_prompt_prefix: bool = False
    """run each distinct prompt once per step in the training forward of a plain causal LM
    (:class:`PromptPrefix`; ~28% less forward/backward at 6-token prompts and 16-token completions,
    G = 8). Off by default: the update equals the unshared one only up to float rounding, and
    AdamW's first step turns rounding in gradients smaller than its eps (1e-8) into parameter
    differences above the 1e-6 that tests/test_rl.py's micro-batching test allows."""

    def __init__(self, stage, model, ctx):
        from ccrl.objectives import get_objective

        self.spec = get_objective(stage.objective)
        self.hp = resolve_hparams(stage, self.spec)
        self.loss_kwargs = self.spec.loss_kwargs(**stage.objective_settings())   # the loss function's own
        super().__init__(stage, model, ctx)
        self.rewards = RewardSet(stage.rewards, keep_extra=stage.log_completions_every > 0)
        self.overlong = None
        if self.hp["overlong_cache"] > 0:
            import rewards

            self.overlong = rewards.get("overlong")
        policy = self.unwrapped
        self.replay_ok = policy_api.accepts_routes(policy)
        self.overseer_start = policy_api.overseer_route_index(policy)
        # the training forward computes the output head on the completion positions only, where the
        # policy takes logits_to_keep and any replayed overseer routes can be cut to match
        self.keep_logits = _accepts_logits_to_keep(policy) and (not self.replay_ok or self.overseer_start is not None)
        # a plain causal LM: the head applied chunk by chunk to the final hidden states (None: the model's logits).
        # Not under FSDP2: the chunks' backward reads the head's weight outside the forward that FSDP2 gathers
        # it for, which crashed (SIGSEGV) with accelerate 1.10; a sharded model scores its own logits
        self.head_chunk = (head_chunk_size(policy, stage.logprob_chunk_size)
                           if self.keep_logits and not self.fsdp else None)
        self.is_peft = hasattr(policy, "disable_adapter") and hasattr(policy, "get_base_model")
        # a plain causal LM (no routes, no council outputs) can run each distinct prompt once in training
        # (PromptPrefix; two forwards before one backward: one process only, DDP expects one of each)
        self.share_prefix = (self.share_prompt_prefix and not self.replay_ok and not self._has_council()
                             and self.acc.num_processes == 1 and PromptPrefix.applies(policy))
        self.ref = None
        if self.hp["kl_beta"] > 0 and not self.is_peft:
            self.ref = copy.deepcopy(self.full_model).eval().requires_grad_(False)   # unsharded under FSDP2
        self.aux_coef = stage.router_aux_coef
        if self.aux_coef is None:
            self.aux_coef = getattr(getattr(policy, "config", None), "router_aux_loss_coef", 0.0) or 0.0
        self.sampling = stage.sampling_config()
        if self.spec.council and not self._has_council():
            raise ValueError(f"stage {stage.name}: objective {stage.objective!r} needs a council policy (a Quillan preset, "
                             f"or model.council_head: true); this model returns no council_weights")
        # packed_rollout: True / False, or None until the auto measurement of the first step decides
        self.packed: bool | None = stage.packed_rollout if stage.packed_rollout != "auto" else None
        if self.packed is None and self.device.type != "cpu":
            self.packed = False     # the packed kernel is CPU-only: elsewhere its PyTorch reference would run
        if not self._packable():
            if self.packed:
                raise ValueError(f"stage {stage.name}: packed_rollout: true needs a policy with ternary layers that "
                                 f"can be packed (a Quillan preset) and no PEFT adapters; use auto or false")
            self.packed = False
        self._snapshot = None   # (optimizer updates when taken, packed copy of the policy)
        self.samples = 0        # completions sampled in the stage so far (every process, dropped groups included)
        if stage.kl_guard:
            # Adam's first updates are its largest (about lr on every weight, whatever the gradient), before
            # the guard has measured anything: start at a tenth of the rate and let kl_guard_scale raise it
            self.lr_scale = KL_GUARD_START
            self.apply_lr_scale()

    def _has_council(self) -> bool:
        return policy_api.has_council(self.unwrapped)

    def total_updates(self) -> int:
        return self.stage.steps * self.stage.ppo_epochs

    def sharded_sizes(self) -> dict[str, int]:
        return {"prompts_per_step": self.stage.prompts_per_step}

    # ----------------------------------------------------------------- rollout → reward → advantage

    def rollout(self, examples: list, generator: torch.Generator) -> tuple[Rollout, list[str]]:
        tok = self.tokenizer
        ids = [tok.encode(e.prompt, add_special_tokens=False) for e in examples]
        ro = generate(self.rollout_policy(), ids, self.sampling, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, group_size=self.stage.group_size, generator=generator)
        return ro, decode_completions(tok, ro)

    # ----------------------------------------------------------------- packed ternary rollouts

    def _packable(self) -> bool:
        return callable(getattr(self.unwrapped, "pack_ternary", None)) and not self.is_peft

    def rollout_policy(self):
        """The policy a rollout samples from: the trained (QAT) model, or with ``packed_rollout`` a
        packed snapshot of its current weights (2-bit codes and the C++ kernel), taken once per
        optimizer update and shared by the step's dynamic-sampling rounds. Under FSDP2 the unsharded
        replica (gathered at the start of :meth:`collect`), so that each process generates alone."""
        if not self.packed:
            return self.full_model
        if self._snapshot is None or self._snapshot[0] != self.updates:
            self._snapshot = None                                                  # free the old one first
            self._snapshot = (self.updates, packed_snapshot(self.full_model))
        return self._snapshot[1]

    def choose_packed(self, examples: list) -> dict:
        """``packed_rollout: auto``: time one rollout of ``examples`` from the QAT model and one from
        a freshly packed snapshot (packing included), after a two-token warm-up of each, and keep
        the faster for the whole stage. Uses its own generators (the step's draws are untouched)."""
        tok = self.tokenizer
        ids = [tok.encode(e.prompt, add_special_tokens=False) for e in examples]
        warm = replace(self.sampling, max_new_tokens=2)

        cuda = self.device.type == "cuda"

        def timed(packed: bool, sampling: SamplingConfig, prompts) -> float:
            if cuda:                                      # the clock reads what the GPU has finished
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            policy = packed_snapshot(self.full_model) if packed else self.full_model
            generate(policy, prompts, sampling, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     group_size=self.stage.group_size, generator=torch.Generator().manual_seed(0))
            if cuda:
                torch.cuda.synchronize(self.device)
            return time.perf_counter() - t0

        for packed in (False, True):
            timed(packed, warm, ids[:1])
        t_qat, t_packed = timed(False, self.sampling, ids), timed(True, self.sampling, ids)
        W = self.world_size
        t_qat, t_packed = (t / W for t in self.all_reduce([t_qat, t_packed]))   # one decision for all processes
        self.packed = t_packed < t_qat
        return {"rollout/auto_qat_time_s": t_qat, "rollout/auto_packed_time_s": t_packed}

    def extra_state(self) -> dict:
        # a resumed run keeps the auto decision, the completions count and the kl_guard's learning-rate scale
        return {"packed_rollout": self.packed, "samples": self.samples, "lr_scale": self.lr_scale}

    def load_extra_state(self, extra: dict) -> None:
        if extra.get("packed_rollout") is not None and self._packable():
            self.packed = bool(extra["packed_rollout"])
        if extra.get("lr_scale") is not None:
            self.lr_scale = float(extra["lr_scale"])
            self.apply_lr_scale()
        self.samples = int(extra.get("samples", 0))

    def budget_spent(self) -> str | None:
        """``max_seconds``, then ``max_samples``: the completions sampled so far against the budget."""
        spent = super().budget_spent()
        budget = self.stage.max_samples
        if spent is None and budget is not None and self.samples >= budget and self.step < self.stage.steps:
            spent = "max_samples"
        return spent

    def score(self, ro: Rollout, examples: list, completions: list[str]):
        reps = [e for e in examples for _ in range(self.stage.group_size)]
        kw = rollout_kwargs(ro, reps, self.unwrapped, self.stage.max_new_tokens, state=reward_state(self),
                            tokenizer=self.tokenizer)
        sb = self.rewards.score(*reward_inputs(reps, completions), **kw)   # as TRL passes them
        value = sb.value.clone()
        per = dict(sb.per_reward)
        if self.overlong is not None:
            pen = torch.tensor(self.overlong([e.prompt for e in reps], completions,
                                             completion_lengths=kw["completion_lengths"],
                                             max_completion_length=self.stage.max_new_tokens,
                                             overlong_cache=self.hp["overlong_cache"]), dtype=torch.float32)
            value = value + self.stage.overlong_weight * pen
            per["overlong"] = pen
        return reps, value, per, sb.unscorable, sb.extra

    def collect(self, step: int) -> Batch:
        """Sample, score and (DAPO) filter until this process's share of the step's batch is full;
        compute advantages. One process: the whole ``prompts_per_step``."""
        from ccrl.objectives import informative_groups

        self.gather_full_weights()   # FSDP2: every process here together, before rounds that differ between them
        G, W, total = self.stage.group_size, self.world_size, self.stage.prompts_per_step
        want = total // W                                                          # this process's groups
        share = self.shard_slice(total)
        # sampling draws on the policy's device (no host round trip per token; a CUDA graph can draw there)
        gen = self.step_generator(step, salt=1 + _PROCESS_SALT * self.acc.process_index, device=self.device)
        pick = self.step_generator(step, salt=2)                                   # the same prompts everywhere
        tries = self.stage.max_resample_tries if self.hp["dynamic_sampling"] else 1
        parts, kept_groups, sampled_groups, rounds, last = [], 0, 0, 0, None
        auto_stats = {}
        for _ in range(tries):
            rounds += 1
            idx = torch.randint(0, len(self.ctx.train_examples), (total,), generator=pick).tolist()[share]
            if kept_groups < want:                                                 # this share is not full yet
                exs = [self.ctx.train_examples[i] for i in idx]
                if self.packed is None:
                    auto_stats = self.choose_packed(exs)
                ro, texts = self.rollout(exs, gen)
                reps, value, per, unscorable, extra = self.score(ro, exs, texts)
                last = Sampled(ro, reps, texts, value, per, unscorable, extra)
                sampled_groups += want
                keep = torch.ones(want, dtype=torch.bool)
                if self.hp["dynamic_sampling"]:
                    signal = value if self.stage.dynamic_sampling_signal == "value" else self.rewards.earned(per)
                    keep = informative_groups(signal, G, valid=~unscorable)
                rows = keep.repeat_interleave(G).nonzero().squeeze(-1)
                if rows.numel():
                    parts.append(last.select(rows))
                    kept_groups += int(keep.sum())
            short = kept_groups < want
            if W > 1 and tries > 1:                                                # every process samples again, or none
                short = bool(self.all_reduce([short], "max")[0])
            if not short:
                break
        informative, sampled = self.all_reduce([kept_groups, sampled_groups])
        self.samples += int(sampled) * G
        if not parts:
            if informative == 0:  # no group was informative anywhere: train on the last round (all advantages 0)
                parts.append(last)
                kept_groups = want
            else:                 # other processes have informative groups: this one has no rows
                parts.append(last.select(torch.zeros(0, dtype=torch.long)))
        ro = concat_rollouts([p.rollout for p in parts])
        n = min(kept_groups, want) * G
        ro = ro.select(torch.arange(n, device=ro.lengths.device))
        examples = [e for p in parts for e in p.examples][:n]
        completions = [c for p in parts for c in p.completions][:n]
        value = torch.cat([p.value for p in parts])[:n]
        per = {k: torch.cat([p.per_reward[k] for p in parts])[:n] for k in parts[0].per_reward}
        unscorable = torch.cat([p.unscorable for p in parts])[:n]
        extra = {k: [v for p in parts for v in p.extra.get(k, [None] * len(p.examples))][:n]
                 for k in sorted({k for p in parts for k in p.extra})}     # a column some rounds lack: None there
        adv = self.advantages(value, unscorable)
        stats = {"dynamic_sampling/rounds": rounds, "dynamic_sampling/kept_frac": informative / max(1, sampled),
                 "rollout/packed": int(bool(self.packed)), "samples": self.samples, **auto_stats}
        self._snapshot = None
        spare = last.rollout.select(torch.zeros(1, dtype=torch.long, device=last.rollout.lengths.device))
        return Batch(ro, examples, completions, value, per, adv, ~unscorable, stats, spare, extra)

    def advantages(self, value: torch.Tensor, unscorable: torch.Tensor) -> torch.Tensor:
        """Group advantages of this process's rows; ``scale_rewards: batch`` takes the std over every
        process's rows (groups never span processes, so the other scales need no exchange)."""
        from ccrl.objectives import group_advantages

        G = self.stage.group_size
        clip = self.hp["advantage_clip"]
        if self.hp["scale"] != "batch" or self.world_size == 1:
            return group_advantages(value, G, scale=self.hp["scale"], clip=clip, valid=~unscorable)
        parts = self.all_gather((value.cpu(), unscorable.cpu()))
        start = sum(p[0].numel() for p in parts[: self.acc.process_index])
        adv = group_advantages(torch.cat([p[0] for p in parts]), G, scale="batch", clip=clip,
                               valid=~torch.cat([p[1] for p in parts]))
        return adv[start: start + value.numel()]

    # ----------------------------------------------------------------- objective

    def forward_logprobs(self, ro: Rollout, rows: slice, replay: bool, prefix: PromptPrefix | None = None):
        """π_θ log-probs of the completion tokens (and α, routes, aux) for rows of a rollout.

        Only the last T + 1 positions go through the output head (``logits_to_keep``): the
        prompt's other positions predict nothing the loss reads, and on a council policy the
        head (every persona's distribution) is a large part of the forward. With ``prefix`` (a plain
        causal LM) only the completion tokens run, on the step's shared prompt cache."""
        if prefix is not None:
            lp, out = prefix.logprobs(self.model, ro, rows, self.stage.temperature)
            return lp, None, out
        T = ro.completion_ids.shape[1]
        kw = {}
        if replay and ro.routing_indices is not None:
            kw["routing_indices"] = _replay_routes(ro.routing_indices, rows, self.overseer_start,
                                                   T + 1 if self.keep_logits else None)
        head = policy_api.output_head(self.unwrapped) if self.head_chunk else None
        lp, out = completion_logprobs(self.model, ro, rows, self.stage.temperature, keep=self.keep_logits,
                                      head=head, chunk=self.head_chunk, **kw)
        alpha = getattr(out, "council_weights", None)
        if alpha is not None:
            alpha = alpha[:, -(T + 1): -1]                                         # (n, T, P) α at the state choosing a_t
        return lp, alpha, out

    def gradient_rows(self, adv: torch.Tensor) -> torch.Tensor | None:
        """Rows whose loss can be non-zero, or None for all of them.

        With no KL term, no council entropy bonus and no routed experts (whose load-balance
        loss and router statistics see every token), a completion with advantage exactly 0
        has per-token loss −min(ρ·0, clip(ρ)·0) = 0 and contributes nothing to the loss or
        its gradient under any aggregation (the step's normalisers stay those of the whole
        batch). Its forward and backward are skipped: the update is the same up to float
        summation order. Zero-variance groups (all right or all wrong) are the common case."""
        if self.hp["kl_beta"] != 0 or self.replay_ok or (self.spec.council and self.hp["council_beta"] > 0):
            return None
        keep = adv != 0
        if bool(keep.all()):
            return None
        return keep.nonzero().squeeze(-1)

    def reference_logprobs(self, ro: Rollout, rows: slice) -> torch.Tensor:
        with torch.no_grad():
            # without a copy: the replica under FSDP2 (the processes score different numbers of micro-batches,
            # and each forward of the sharded model is a collective; the base weights it reads never change)
            model = self.ref if self.ref is not None else self.full_model
            adapters = contextlib.nullcontext() if self.ref is not None else model.disable_adapter()
            with adapters:
                head = policy_api.output_head(model) if self.head_chunk else None
                return completion_logprobs(model, ro, rows, self.stage.temperature, keep=self.keep_logits,
                                           head=head, chunk=self.head_chunk)[0]

    def loss(self, lp, old, adv, mask, alpha, ref, counts):
        """The objective's loss function from the registry, with its keyword arguments (``loss_kwargs``)
        and the step's normalisers; a council objective (ccrl) also gets the overseer's α."""
        kwargs = dict(self.loss_kwargs, ref_logprobs=ref, max_tokens=self.stage.max_new_tokens, **counts)
        if not self.spec.council:
            return self.spec.loss_fn(lp, old, adv, mask, **kwargs)
        if alpha is None:       # a fully masked dummy row (_neutral_loss_metrics): one persona, H_Ω = 0
            alpha = torch.ones((*lp.shape, 1), dtype=lp.dtype, device=lp.device)
        return self.spec.loss_fn(lp, old, adv, mask, alpha, **kwargs)

    def training_step(self, step: int) -> dict:
        from ccrl.rollout.engine import varying_shape_attention

        with varying_shape_attention(self.device):       # every step's shapes differ (see its docstring)
            t0 = time.perf_counter()
            self.model.eval()
            batch = self.collect(step)
            self.model.train()
            metrics = self.update(batch, rollout_time_s=time.perf_counter() - t0)
        every = self.stage.log_completions_every
        if every and (step + 1) % every == 0:
            self.log_completions(step + 1, batch)
        for k, v in merge_logged(self.all_gather(self.rewards.pop_logged())).items():   # rewards' log_metric
            metrics.setdefault(k, v)
        return metrics

    # ----------------------------------------------------------------- the completions table

    @property
    def completions_file(self) -> Path:
        """``<output_dir>/completions/<stage>.jsonl``, where ``log_completions_every`` writes."""
        return Path(self.ctx.output_dir) / "completions" / f"{self.stage.name}.jsonl"

    def log_completions(self, step: int, batch: Batch) -> None:
        """Append the step's completions table (every process's trained rows, in process order) to
        :attr:`completions_file`; the main process writes. TRL's ``log_completions`` table: step,
        prompt, completion, each reward, plus V_Ω (``value``), ``advantage`` and the ``log_extra``
        columns."""
        parts = self.all_gather(completions_table(batch, step))
        if not self.acc.is_main_process:
            return
        self.completions_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.completions_file, "a") as fh:
            for row in (r for part in parts for r in part):
                fh.write(json.dumps(row, default=str) + "\n")

    def resume_from(self, path) -> dict:
        meta = super().resume_from(path)
        f = self.completions_file
        if f.exists() and self.acc.is_main_process:   # drop the table's rows of steps after the checkpoint
            keep = [x for x in f.read_text().splitlines() if x.strip() and json.loads(x).get("step", 0) <= self.step]
            f.write_text("".join(x + "\n" for x in keep))
        return meta

    def update(self, batch: Batch, rollout_time_s: float = 0.0) -> dict:
        """``ppo_epochs`` optimizer updates on this process's share of the step's batch; returns the
        step's metrics, computed over every process's rows."""
        ro = batch.rollout
        N, W = ro.completion_ids.shape[0], self.world_size
        n_seq, n_tok = self.all_reduce([N, ro.completion_mask.sum()])
        counts = {"num_sequences": n_seq / W, "num_tokens": n_tok / W}       # the whole step's normalisers, over W
        adv = batch.advantages.to(self.device)
        rows = self.gradient_rows(adv)
        if rows is not None:
            ro, adv = ro.select(rows), adv[rows]
        n = ro.completion_ids.shape[0]                                             # rows that carry gradient
        mask = ro.completion_mask
        mb = self.stage.micro_batch_size or max(n, 1)
        slices = [slice(i, min(i + mb, n)) for i in range(0, n, mb)]
        # every process runs as many passes as the busiest one: each backward joins a gradient reduction
        passes = len(slices) if W == 1 else int(self.all_reduce([len(slices)], "max")[0])
        ref = None
        if self.hp["kl_beta"] > 0:
            ref = torch.cat([self.reference_logprobs(ro, s) for s in slices]) if slices else None
        replay = self.stage.routing_replay and self.replay_ok
        agg: dict[str, float] = {}
        first_ratio_dev = 0.0
        for epoch in range(self.stage.ppo_epochs):
            head = policy_api.output_head(self.unwrapped) if self.head_chunk else None
            prefix = PromptPrefix(self.model, ro, head, self.head_chunk) if self.share_prefix and n else None
            for i in range(passes):
                with self.accumulating(last=i == passes - 1):
                    if i >= len(slices):
                        self._idle_pass(batch.spare if batch.spare is not None else batch.rollout, replay)
                        continue
                    s = slices[i]
                    lp, alpha, out = self.forward_logprobs(ro, s, replay, prefix)
                    loss, m = self.loss(lp, ro.logprobs[s], adv[s], mask[s], alpha,
                                        None if ref is None else ref[s], counts)
                    if alpha is not None and "council_entropy" not in m:
                        # logged for every objective on a council policy, so reports compare like with like
                        m["council_entropy"] = aggregate(council_entropy(alpha.detach()), mask[s], "token")
                    aux = getattr(out, "aux_loss", None)
                    if aux is not None and self.aux_coef:
                        loss = loss + self.aux_coef * aux * (s.stop - s.start) / counts["num_sequences"]
                        m["aux_loss"] = aux.detach()
                    self.check_finite(loss)
                    self.backward(loss)
                m["loss"] = loss.detach()
                if epoch == 0:
                    dev = float(((lp.detach() - ro.logprobs[s]).abs() * mask[s]).max())
                    first_ratio_dev = max(first_ratio_dev, dev)
                    if not replay and ro.routing_indices is not None and getattr(out, "routing_indices", None):
                        m["routing/mismatch"] = _route_mismatch(ro, s, out.routing_indices)
                _accumulate(agg, m, rows_share=(s.stop - s.start) / n / self.stage.ppo_epochs,
                            sum_share=1 / self.stage.ppo_epochs)
            if prefix is not None:
                prefix.backward()
                del prefix
            if not passes:   # nothing carries gradient anywhere: the update sees zero gradients, as a full backward would give
                for p in self.model.parameters():
                    if p.requires_grad:
                        p.grad = torch.zeros_like(p)
            grad_norm = self.optimizer_step()
        spare = batch.spare if batch.spare is not None else batch.rollout
        guard = self.guard_update(ro, slices, passes, replay, spare) if self.stage.kl_guard else {}
        if not n:
            agg = self._neutral_loss_metrics(ro, counts)
        parts = self.all_gather({"agg": agg, "n": n, "N": N, "gap": first_ratio_dev, "time": rollout_time_s,
                                 "rows": row_stats(batch, self.ctx.task), "council": council_counts(batch.rollout)})
        metrics = self.step_metrics([p["rows"] for p in parts], batch.stats, _merge_loss_metrics(parts),
                                    [p["council"] for p in parts])
        metrics.update(grad_norm=grad_norm, rollout_time_s=max(p["time"] for p in parts),
                       rows_trained_frac=sum(p["n"] for p in parts) / max(1, sum(p["N"] for p in parts)),
                       logprob_gap_first_epoch=max(p["gap"] for p in parts))
        metrics["_tokens"] = int(sum(int(p["rows"]["lengths"].sum()) for p in parts))
        metrics.update(guard)
        return metrics

    @torch.no_grad()
    def guard_update(self, ro: Rollout, slices: list[slice], passes: int, replay: bool, spare: Rollout) -> dict:
        """``kl_guard``: the update's KL on the trained rows, and the learning-rate scale it sets.

        KL(π_old ‖ π_new) per completion token by the k3 estimate (ρ − 1) − log ρ, ρ = π_new/π_old,
        on the tokens π_old sampled; averaged over the trained tokens of every process. The next
        updates run at ``lr_scale`` × the scheduled rate, lr_scale ← min(1, lr_scale · clamp(√(target /
        KL), 0.1, 1.5)): the step size that would have given the target, as KL ≈ c · step² for small
        steps. Every process runs ``passes`` forwards (FSDP2 forwards are collectives)."""
        total, tokens = 0.0, 0.0
        self.model.eval()
        for i in range(passes):
            if i >= len(slices):      # as many forwards as the busiest process (see update)
                self.forward_logprobs(spare, slice(0, 1), replay)
                continue
            s = slices[i]
            lp, _, _ = self.forward_logprobs(ro, s, replay)
            r = (lp.float() - ro.logprobs[s].float()).clamp(-20.0, 20.0)
            m = ro.completion_mask[s].to(r.dtype)
            total += float(((r.exp() - 1.0 - r) * m).sum())
            tokens += float(m.sum())
        self.model.train()
        total, tokens = self.all_reduce([total, tokens])
        target = float(self.stage.kl_guard)
        kl = total / tokens if tokens > 0 else 0.0
        if tokens > 0:
            self.lr_scale = kl_guard_scale(self.lr_scale, kl, target)
            self.apply_lr_scale()
        return {"update_kl": kl, "lr_scale": self.lr_scale}

    def _idle_pass(self, spare: Rollout, replay: bool) -> None:
        """A forward and backward of weight 0 on one row, so that a process with fewer micro-batches
        than the others still joins each of their gradient reductions. The routers' load counts
        (``noaux_bias``) are put back: the row is not part of the step."""
        loads = [(b, b.clone()) for b in policy_api.router_load_buffers(self.unwrapped)]
        lp, alpha, out = self.forward_logprobs(spare, slice(0, 1), replay)
        zero = lp.sum() * 0.0
        if alpha is not None:
            zero = zero + alpha.sum() * 0.0
        aux = getattr(out, "aux_loss", None)
        if aux is not None:
            zero = zero + aux * 0.0
        self.backward(zero)
        for buf, saved in loads:
            buf.copy_(saved)

    def _neutral_loss_metrics(self, ro: Rollout, counts: dict) -> dict:
        """The objective's metrics with no token carrying gradient (loss 0, ratio 1, nothing clipped):
        evaluated on one fully masked dummy row."""
        T = ro.completion_ids.shape[1]
        zeros = torch.zeros((1, max(T, 1)), device=self.device)                   # (1, T)
        with torch.no_grad():
            loss, m = self.loss(zeros, zeros, zeros[:, 0], zeros.long(), None,
                                zeros if self.hp["kl_beta"] > 0 else None, counts)
        out = {k: float(v) for k, v in m.items()}
        out["loss"] = float(loss)
        return out

    def step_metrics(self, rows: list[dict], stats: dict, agg: dict, council: list[dict]) -> dict:
        """The step's metrics from every process's :func:`row_stats` (in process order) and
        :func:`council_counts`; ``agg`` holds the merged loss metrics, ``stats`` the rollout's."""
        cat = lambda k: torch.cat([r[k] for r in rows])
        m = dict(agg)
        m.update(stats)
        value, valid = cat("value"), cat("valid")
        v = value[valid]
        m["reward"] = float(v.mean()) if v.numel() else float("nan")
        m["value"] = m["reward"]
        G = self.stage.group_size
        m["reward_std"] = float(value.view(-1, G).std(-1).mean())
        m["frac_reward_zero_std"] = float((value.view(-1, G).std(-1) == 0).float().mean())
        for k in rows[0]["per_reward"]:
            t = torch.cat([r["per_reward"][k] for r in rows])
            t = t[~t.isnan()]
            m[f"reward/{k}"] = float(t.mean()) if t.numel() else float("nan")
        correct = cat("correct")
        if not bool(correct.isnan().any()):
            m["accuracy"] = float(correct.mean())
        m["completion_tokens"] = float(cat("lengths").float().mean())
        if rows[0]["entropy"] is not None:   # the sampling policy's mean token entropy over the batch
            m["entropy"] = float(cat("entropy").sum() / cat("tokens").sum().clamp_min(1))
        m["truncated_frac"] = float(cat("truncated").float().mean())
        m.update(council_usage(council))
        return m


KL_GUARD_START = 0.1
"""``lr_scale`` of a ``kl_guard`` stage's first update (it grows by at most 1.5× per update)"""


def kl_guard_scale(scale: float, kl: float, target: float) -> float:
    """The ``kl_guard`` learning-rate scale after an update whose KL(π_old ‖ π_new) was ``kl``:

        scale' = min(1, scale · clamp(√(target / kl), 0.1, 1.5))     (kl = 0: scale · 1.5)

    For small steps KL ≈ c · (step size)², and Adam's step size is proportional to the learning
    rate, so √(target / kl) is the factor that would have met the target; the clamp keeps one noisy
    measurement from moving the rate more than 10× down or 1.5× up, and the cap keeps it at or
    below the schedule's."""
    factor = 1.5 if kl <= 0 else min(1.5, max(0.1, math.sqrt(target / kl)))
    return min(1.0, scale * factor)


def completions_table(batch: Batch, step: int) -> list[dict]:
    """One row per completion of ``batch``: prompt and completion as reward functions receive them
    (messages for conversational data), each reward (None where it abstained), V_Ω, the advantage
    and the ``log_extra`` columns."""
    prompts, completions = reward_inputs(batch.examples, batch.completions)
    rewards = {k: [None if math.isnan(x) else x for x in v.tolist()] for k, v in batch.per_reward.items()}
    value, adv = batch.value.tolist(), batch.advantages.tolist()
    rows = []
    for i in range(len(prompts)):
        row = {"step": step, "prompt": prompts[i], "completion": completions[i]}
        row.update({k: v[i] for k, v in rewards.items()})
        row.update({"value": value[i], "advantage": adv[i]})
        row.update({k: _json_value(v[i]) for k, v in batch.extra.items()})
        rows.append(row)
    return rows


def _json_value(v):
    """A ``log_extra`` value as JSON writes it (tensors and arrays as numbers or lists)."""
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def row_stats(batch: Batch, task) -> dict:
    """Per completion, on the CPU: what the step's logged metrics are computed from (gathered over
    the processes). ``correct`` is NaN where the task cannot check a completion."""
    ro = batch.rollout
    mask = ro.completion_mask.float()
    if task is not None and all(e.answer is not None for e in batch.examples):
        correct = torch.tensor([float(task.is_correct(c, e)) for c, e in zip(batch.completions, batch.examples)])
    else:
        correct = torch.full((len(batch.examples),), float("nan"))
    ent = None if ro.entropies is None else (ro.entropies * mask).sum(-1).cpu()
    return {"value": batch.value.cpu(), "valid": batch.valid.cpu(), "correct": correct,
            "per_reward": {k: v.cpu() for k, v in batch.per_reward.items()}, "lengths": ro.lengths.cpu(),
            "entropy": ent, "tokens": mask.sum(-1).cpu(), "truncated": ro.truncated.cpu()}


def council_counts(ro: Rollout) -> dict:
    """Sums over the completion tokens that :func:`council_usage` turns into persona load and
    overseer statistics: routed assignments per persona (all council layers), Σ max_i α_i,
    Σ −Σ_i α_i log α_i and the token count."""
    out = {}
    mask = ro.completion_mask.bool()
    if ro.routing_indices:
        P = ro.prompt_ids.shape[1]
        idx = torch.cat([r[:, P:][mask].reshape(-1) for r in ro.routing_indices])
        n = ro.council_weights.shape[-1] if ro.council_weights is not None else (int(idx.max()) + 1 if idx.numel() else 0)
        out["assignments"] = torch.bincount(idx, minlength=n).float().cpu()
    if ro.council_weights is not None:
        a = ro.council_weights[mask]                                               # (tokens, P)
        h = council_entropy(a)                                                     # (tokens) H_Ω
        out["alpha"] = torch.stack([a.max(-1).values.sum() if a.numel() else a.new_zeros(()), h.sum(),
                                    a.new_tensor(float(a.shape[0]))]).double().cpu()
    return out


def council_usage(counts: list[dict]) -> dict:
    """Persona load over the completion tokens of every process: share of routed assignments per
    persona, its max and entropy; and the overseer's mean largest weight max_i α_i."""
    out = {}
    loads = [c["assignments"] for c in counts if "assignments" in c]
    if loads:
        share = torch.zeros(max(x.numel() for x in loads))
        for x in loads:
            share[: x.numel()] += x
        share = share / share.sum().clamp_min(1)
        out["persona_usage"] = [round(float(x), 5) for x in share]
        out["expert_load/max_share"] = float(share.max())
        nz = share[share > 0]
        out["expert_load/entropy"] = float(-(nz * nz.log()).sum())
    alphas = [c["alpha"] for c in counts if "alpha" in c]
    if alphas:
        max_sum, h_sum, tokens = torch.stack(alphas).sum(0).tolist()
        if tokens:
            out["council/max_alpha"] = max_sum / tokens
            out["council/entropy_rollout"] = h_sum / tokens
    return out


def _accumulate(agg: dict, m: dict, rows_share: float, sum_share: float) -> None:
    """Fold one micro-batch's loss metrics into ``agg``: contributions to the loss are summed, the
    ratio's extremes kept, every other metric averaged with the micro-batch's share of the rows."""
    for k, v in m.items():
        v = float(v)
        if k in _ADDITIVE:
            agg[k] = agg.get(k, 0.0) + v * sum_share
        elif k == "ratio/min":
            agg[k] = min(agg.get(k, math.inf), v)
        elif k == "ratio/max":
            agg[k] = max(agg.get(k, -math.inf), v)
        else:
            agg[k] = agg.get(k, 0.0) + v * rows_share


def _merge_loss_metrics(parts: list[dict]) -> dict:
    """The step's loss metrics from every process's ``agg`` and trained row count ``n``: the loss
    contributions (each over the normaliser / W) averaged, the ratio's extremes over processes with
    rows, the other metrics weighted by rows. One process: its own ``agg``."""
    if len(parts) == 1:
        return dict(parts[0]["agg"])
    W = len(parts)
    busy = [p for p in parts if p["n"]] or parts[:1]
    out = {}
    for k in sorted({k for p in parts for k in p["agg"]}):
        have = [p for p in busy if k in p["agg"]]
        if k in _ADDITIVE:
            out[k] = sum(p["agg"].get(k, 0.0) for p in parts) / W
        elif not have:
            out[k] = next(p["agg"][k] for p in parts if k in p["agg"])
        elif k == "ratio/min":
            out[k] = min(p["agg"][k] for p in have)
        elif k == "ratio/max":
            out[k] = max(p["agg"][k] for p in have)
        else:
            weight = sum(p["n"] for p in have)
            out[k] = (sum(p["agg"][k] * p["n"] for p in have) / weight) if weight else have[0]["agg"][k]
    return out


def packed_snapshot(model):
    """A packed inference copy of a Quillan policy's current weights (``pack_ternary`` on an eval-mode
    deep copy); the trained model is untouched."""
    snap = copy.deepcopy(model).eval().requires_grad_(False)
    return snap.pack_ternary()


class PromptPrefix:
    """The distinct prompts of a rollout run once per epoch, for a plain causal LM.

    The G completions of a group share their prompt, and a causal model's prompt positions never
    see the completion, so the prompt's keys/values and last logits are the same for all of them.
    The step's distinct prompts run once (with grad) into a KV cache; each micro-batch reads
    detached leaf copies of those tensors, indexed out to its rows, and runs only its completion
    tokens on top. Backward through a micro-batch stops at the leaves, which sum the gradient
    of every row that shares a prompt; :meth:`backward` then sends that sum through the prompt
    forward once. The loss and gradient are those of a forward over every row up to float
    rounding, with (G − 1)/G of the prompt tokens' forward and backward saved, and the prompt's
    backward runs once per step whether or not the step is micro-batched."""

    def __init__(self, model, ro: Rollout, head=None, chunk: int | None = None):
        self.head, self.chunk = head, chunk            # a plain output head: applied chunk by chunk (logprobs)
        mask = ro.prompt_mask
        pos = (mask.cumsum(-1) - 1).clamp_min(0)                                   # (N, P)
        uniq, self.inverse = torch.unique(ro.prompt_ids, dim=0, return_inverse=True)  # (u, P), (N,)
        n = ro.prompt_ids.shape[0]
        first = torch.full((uniq.shape[0],), n, dtype=torch.long, device=uniq.device)
        first = first.scatter_reduce(0, self.inverse, torch.arange(n, device=uniq.device), "amin")
        kw = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
        with policy_api.head_inputs(head) if head is not None else contextlib.nullcontext({}) as caught:
            out = model(input_ids=uniq, attention_mask=mask[first], position_ids=pos[first], use_cache=True, **kw)
        self.cache = output_cache(out)
        last = caught["hidden"][:, -1] if head is not None else out.logits[:, -1]  # (u, H) or (u, V)
        self.tensors = [last]                                                       # then (u, H, P, D) each
        for layer in self.cache.layers:
            self.tensors += [layer.keys, layer.values]
        self.leaves = [t.detach().requires_grad_() for t in self.tensors]

    @staticmethod
    def applies(model) -> bool:
        """Whether the model's cache is plain per-layer keys/values (no sliding windows, no states)."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cfg = getattr(model, "config", None)
        try:
            layers = DynamicCache(config=cfg).layers if cfg is not None else []
        except Exception:  # noqa: BLE001 - an unusual config: do not share
            return False
        return all(type(layer) is DynamicLayer for layer in layers)

    def rows(self, rows: slice):
        """(last prompt logits (n, V), or with a head its input (n, H); a cache holding the rows' prompt
        keys/values) for ``rows``."""
        idx = self.inverse[rows]
        cache = copy.copy(self.cache)
        cache.layers = []
        for i, layer in enumerate(self.cache.layers):
            new = copy.copy(layer)
            new.keys, new.values = self.leaves[1 + 2 * i][idx], self.leaves[2 + 2 * i][idx]
            cache.layers.append(new)
        return self.leaves[0][idx], cache

    def logprobs(self, model, ro: Rollout, rows: slice, temperature: float):
        """(log π(a_t) of the completion tokens of ``rows`` (n, T), the forward's output): only the
        completion tokens run, on the rows' shared prompt cache."""
        from ccrl.objectives import chunked_token_logprobs, token_logprobs

        last, cache = self.rows(rows)
        mask = ro.attention_mask[rows]
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        P = ro.prompt_ids.shape[1]
        targets = ro.completion_ids[rows]                                          # (n, T)
        kw = dict(input_ids=targets, attention_mask=mask, position_ids=pos[:, P:], use_cache=True,
                  **cache_kwargs(cache))
        if self.head is None:
            out = model(**kw)
            logits = torch.cat([last[:, None], out.logits[:, :-1]], dim=1)         # (n, T, V) predicts a_t
            return token_logprobs(logits, targets, temperature), out
        with policy_api.head_inputs(self.head) as caught:
            out = model(**kw)
        hidden = torch.cat([last[:, None], caught["hidden"][:, :-1]], dim=1)       # (n, T, H) predicts a_t
        with _head_precision(caught):
            lp, _ = chunked_token_logprobs(hidden, _full(self.head.weight), targets, self.chunk,
                                           bias=_full(self.head.bias), temperature=temperature)
        return lp, out

    def backward(self) -> None:
        """Send the gradient collected on the leaves through the prompt forward (once)."""
        pairs = [(t, leaf.grad) for t, leaf in zip(self.tensors, self.leaves) if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


def _route_mismatch(ro: Rollout, rows: slice, routes) -> float:
    T = ro.completion_ids.shape[1]
    mask = ro.completion_mask[rows].bool()
    diff, total = 0, 0
    for rec, cur in zip(ro.routing_indices, routes):
        a = rec[rows][:, -(T + 1): -1].sort(-1).values                            # (n, T, k) routes choosing a_t
        b = cur[:, -(T + 1): -1].sort(-1).values
        diff += int(((a != b).any(-1) & mask).sum())
        total += int(mask.sum())
    return diff / max(1, total)


def completion_logprobs(model, ro: Rollout, rows: slice, temperature: float, keep: bool = True, head=None,
                        chunk: int | None = None, **kw):
    """(log π(a_t) of the completion tokens of ``rows`` (n, T), the forward's output) under ``model``.

    The forward keeps the last T + 1 positions (``logits_to_keep``, when ``keep``). With ``head`` (the
    model's plain output head, :func:`policies.interface.output_head`) and ``chunk``, the head's matmul
    is skipped inside the forward and applied here to the final hidden states, ``chunk`` tokens at a
    time (:func:`ccrl.objectives.chunked_token_logprobs`): the (n, T, V) logits never exist. Otherwise
    the model's logits of those positions are scored (:func:`ccrl.objectives.token_logprobs`)."""
    from ccrl.objectives import chunked_token_logprobs, token_logprobs

    ids, mask = ro.input_ids[rows], ro.attention_mask[rows]                    # (n, P+T)
    T = ro.completion_ids.shape[1]
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    if keep:
        kw["logits_to_keep"] = T + 1
    targets = ro.completion_ids[rows]                                          # (n, T)
    if head is None:
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **kw)
        return token_logprobs(out.logits[:, -(T + 1): -1], targets, temperature), out   # (n, T, V) predicts a_t
    with policy_api.head_inputs(head) as caught:
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **kw)
    hidden = caught["hidden"][:, -(T + 1): -1]                                 # (n, T, H) predicts a_t
    with _head_precision(caught):
        lp, _ = chunked_token_logprobs(hidden, _full(head.weight), targets, chunk, bias=_full(head.bias),
                                       temperature=temperature)
    return lp, out


def _head_precision(caught: dict):
    """The autocast the skipped head would have run under inside the model's forward (mixed
    precision wraps the forward, not the trainer's code), so its chunks' matmuls run in that dtype."""
    dtype = caught.get("autocast")
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(caught["hidden"].device.type, dtype=dtype)


def head_chunk_size(policy, setting: int | str) -> int | None:
    """Tokens per chunk of the chunked output head for ``policy`` under the stage's
    ``logprob_chunk_size`` (``auto``: :func:`ccrl.objectives.auto_chunk_size` of the vocabulary), or
    None where the model's own logits are scored: ``0``, or a policy without a plain output head
    (a council policy, :func:`policies.interface.output_head`)."""
    from ccrl.objectives import auto_chunk_size

    head = policy_api.output_head(policy)
    if head is None or setting == 0:
        return None
    return auto_chunk_size(head.out_features) if setting == "auto" else int(setting)


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    """A parameter as one whole tensor: FSDP2 may leave a root module's weight sharded (a DTensor)."""
    return t.full_tensor() if t is not None and hasattr(t, "full_tensor") else t


def _accepts_logits_to_keep(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def _replay_routes(routes: tuple, rows: slice, overseer_start: int | None, keep: int | None) -> tuple:
    """The recorded routes of ``rows``; overseer entries cut to the last ``keep`` positions."""
    out = [r[rows] for r in routes]
    if keep is not None and overseer_start is not None:
        out = out[:overseer_start] + [r[:, -keep:] for r in out[overseer_start:]]
    return tuple(out)
