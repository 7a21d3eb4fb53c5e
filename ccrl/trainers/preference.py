"""Preference alignment: DPO (sigmoid, IPO) and ORPO, usually through PEFT LoRA adapters.

A stage orchestrates; the losses are the registry's ``dpo_loss`` / ``orpo_loss``:

1. **pairs** — (prompt, chosen, rejected) from the stage's file (``data.path``, columns
   prompt/chosen/rejected as text or, in TRL's conversational preference format, as message lists
   with or without a separate prompt, rendered with the chat template: ``ccrl.data.files``; split
   into train and held-out rows by the prompt's hash), or built
   online at the start of the stage: ``pairs.group_size`` completions per prompt sampled from the
   current policy, scored with the stage's rewards (V_Ω; the task's own answer check when the
   recipe names no reward), best vs worst kept when their values differ. Held-out pairs are
   built the same way from the task's held-out prompts. Every pair is written to
   ``<output_dir>/<stage>-pairs.jsonl``; a resumed stage reads them back (and checks their hash)
   instead of sampling again from weights that have since changed.
2. **reference** (DPO only) — the same model with its adapters disabled (PEFT: no second copy
   in memory), or a frozen copy of the starting weights without PEFT. Its log-probs of every
   pair are computed once, before the first step, and cached: the reference never changes during
   the stage, so a per-batch reference forward would recompute the same numbers on every step
   (``steps · batch_size`` sequences instead of one pass over the pairs). Without PEFT the frozen
   copy is dropped once the cache is filled, so training holds one model. (TRL's
   ``precompute_ref_log_probs`` does the same; ``cache_reference=False`` computes them per
   micro-batch instead, which ``bench/preference_memory.py`` uses to measure the reference.)
3. **step** — ``batch_size`` pairs, drawn as epoch-wise permutations of the pair set (a function
   of the step, so a resume draws what an uninterrupted run would); chosen and rejected rows go
   through one concatenated forward; completion log-probs are summed (DPO) or length-averaged
   (ORPO) over the completion tokens only (target + EOS, as SFT). Micro-batches contribute
   ``loss_mb · n_mb / batch_size`` (both losses are means over pairs), and ORPO's NLL term (and
   DPO's, with ``nll_weight``) is the token mean over every chosen token of the step (TRL's
   ``CrossEntropyLoss`` mean), so gradient accumulation reproduces the full-batch loss exactly.

Metrics per step (TRL's names): ``loss``, ``rewards/chosen``, ``rewards/rejected``,
``rewards/margins``, ``rewards/accuracies`` (preference accuracy of the train batch),
``logps/chosen``, ``logps/rejected`` (both falling together is the known DPO failure mode, which
``nll_weight`` counters), ``nll_loss`` (ORPO; DPO with ``nll_weight``) and ORPO's ``log_odds_*``. ``final_metrics()`` adds ``preference_accuracy`` on the
held-out pairs: the fraction whose implicit reward margin β((π_c − ref_c) − (π_r − ref_r)) is > 0
(DPO; 0 at the start, where policy = reference) or whose log-odds ratio is > 0 (ORPO), with the
same number at the start of the stage (``preference_accuracy_start``) and the pair counts.

Several processes (``accelerate launch``): self-generated pairs are built by the main process
(so they are the pairs one process would build) and handed to the others; every process caches
the reference log-probs of the whole pair set, draws the step's same ``batch_size`` pairs and
trains its own contiguous ``batch_size / W`` of them. ORPO's NLL (and DPO's) divides by the step's chosen
tokens summed over the processes (over W), and the logged metrics are those of the whole step.

Deviations, stated up front: IPO divides each log-ratio by its completion length (TRL 1.16,
confirmed with the IPO authors); self-generated completions are re-tokenised from their text and
end with EOS even when sampling truncated them (as a preference file would be read).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from pathlib import Path

import torch

from ccrl.errors import DataError
from ccrl.trainers.base import Trainer
from ccrl.trainers.supervised import aux_loss_of, sft_batch

_PAIRS_SALT = 7_919
_PERM_SALT = 104_729
_CHUNK_PAIRS = 32
"""pairs per no-grad forward when computing reference / held-out log-probs"""


# --------------------------------------------------------------------------- pure helpers


def pair_batch(tokenizer, prompts: list[str], chosen: list[str], rejected: list[str],
               add_eos: bool | list[bool] = True):
    """(input_ids, attention_mask, loss_mask) of 2n right-padded rows: rows [0, n) are prompt +
    chosen + EOS, rows [n, 2n) prompt + rejected + EOS; the loss mask covers completion + EOS.
    ``add_eos`` False (all pairs, or per pair) for completions a chat template rendered, which
    end the assistant's turn themselves (TRL adds EOS to plain-text pairs only)."""
    eos = [add_eos] * len(prompts) if isinstance(add_eos, bool) else list(add_eos)
    return sft_batch(tokenizer, list(prompts) + list(prompts), list(chosen) + list(rejected), eos + eos)


def pairs_batch(tokenizer, pairs: list[dict]):
    """:func:`pair_batch` of pair rows ``{prompt, chosen, rejected[, chat]}``."""
    return pair_batch(tokenizer, [r["prompt"] for r in pairs], [r["chosen"] for r in pairs],
                      [r["rejected"] for r in pairs], [not r.get("chat", False) for r in pairs])


def sequence_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, loss_mask: torch.Tensor):
    """Σ_t log π(y_t | x, y_<t) over the completion tokens of each row, and their count.

    Returns (logps (R,), lengths (R,), model output)."""
    from ccrl.objectives import token_logprobs

    pos = (mask.cumsum(-1) - 1).clamp_min(0)                                    # (R, T)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, return_dict=True)
    lp = token_logprobs(out.logits[:, :-1], ids[:, 1:])                         # (R, T-1)
    m = loss_mask[:, 1:].to(lp.dtype)                                           # (R, T-1)
    return (lp * m).sum(-1), m.sum(-1), out


def _trim(ids, mask, loss_mask):
    """Drop right-padding columns no row of this slice uses."""
    w = int(mask.sum(-1).max())
    return ids[:, :w], mask[:, :w], loss_mask[:, :w]


def _distinct(examples: list) -> list:
    seen, out = set(), []
    for e in examples:
        if e.prompt not in seen:
            seen.add(e.prompt)
            out.append(e)
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- the trainer


class PreferenceTrainer(Trainer):
    """See the module docstring. ``stage`` is a ``PreferenceStage`` of kind "dpo" or "orpo".

    ``cache_reference``: compute the DPO reference log-probs once per pair set (default) or in
    every micro-batch. ``separate_reference``: keep a frozen copy of the starting weights as the
    reference even under PEFT (for the memory benchmark; the default disables the adapters)."""

    kind = "preference"

    def __init__(self, stage, model, ctx, *, cache_reference: bool = True, separate_reference: bool = False):
        from ccrl.objectives import get_objective

        if stage.kind not in ("dpo", "orpo"):
            raise ValueError(f"stage {stage.name}: PreferenceTrainer trains dpo/orpo stages, not {stage.kind!r}")
        super().__init__(stage, model, ctx)
        self.kind = stage.kind
        self.spec = get_objective(stage.kind)
        hp = {"beta": stage.beta}
        if stage.kind == "dpo":
            hp["loss_type"] = stage.loss_type
            hp["nll_weight"] = stage.nll_weight
        self.loss_kwargs = self.spec.loss_kwargs(**hp)
        self.cache_reference = cache_reference
        policy = self.unwrapped
        self.is_peft = hasattr(policy, "disable_adapter") and hasattr(policy, "get_base_model")
        self.ref_model = None
        if self.needs_reference and (separate_reference or not self.is_peft):
            ref = copy.deepcopy(self.full_model)   # unsharded under FSDP2
            if self.is_peft:
                ref = ref.merge_and_unload()  # the starting policy (LoRA B = 0) as a plain model
            self.ref_model = ref.eval().requires_grad_(False)
        self.pairs_path = Path(ctx.output_dir) / f"{ctx.stage_name}-pairs.jsonl"
        self.train_pairs: list[dict] = []
        self.heldout_pairs: list[dict] = []
        self.pairs_sha = ""
        self.pair_stats: dict[str, float] = {}
        self.start_metrics: dict[str, float] = {}
        self._ref: dict[str, torch.Tensor] = {}      # split → (2n,) [ref chosen; ref rejected]
        self._perms: dict[int, list[int]] = {}
        self._rewards = None                         # RewardSet ranking self-generated samples

    @property
    def needs_reference(self) -> bool:
        return self.stage.kind == "dpo"

    @property
    def sampling_model(self):
        """The policy for generation: under PEFT the base model with the LoRA layers injected (the
        adapters are active), called directly. PeftModel.forward passes ``return_dict=None``, which
        a policy whose forward defaults ``return_dict=True`` without reading the config turns
        into a tuple; calling the injected model avoids that wrapper and computes the same thing.
        Under FSDP2 the unsharded replica (``gather_full_weights`` first)."""
        m = self.full_model
        return m.get_base_model() if self.is_peft else m

    # ----------------------------------------------------------------- stage start / resume

    def train(self, resume: Path | None = None) -> dict[str, float]:
        self.prepare(resuming=resume is not None)
        return super().train(resume)

    def prepare(self, resuming: bool = False) -> None:
        """Pairs: built from the policy, read from the data file, or (resuming) read back from the
        pairs file the interrupted stage wrote; then :meth:`use_pairs`."""
        if resuming:
            rows = self._read_pairs()
        else:
            if self.stage.data is not None and self.stage.data.path:
                rows = self._file_pairs()
            else:  # sampled by the main process only; every process trains on its pairs
                self.gather_full_weights()   # FSDP2: a collective, so before the main process goes alone
                rows, self.pair_stats = self.on_main(lambda: (self.build_pairs(), self.pair_stats))
            self._write_pairs(rows)
        self.pairs_sha = _sha256(self.pairs_path) if self.pairs_path.exists() else ""
        self.use_pairs(rows, at_start=not resuming)

    def use_pairs(self, rows: list[dict], at_start: bool = True) -> None:
        """Train on ``rows`` ({prompt, chosen, rejected, split: train | heldout}): cache the DPO
        reference log-probs and, at the start of the stage, measure the held-out preference accuracy."""
        self.train_pairs = [r for r in rows if r["split"] == "train"]
        self.heldout_pairs = [r for r in rows if r["split"] == "heldout"]
        self._perms = {}
        if not self.train_pairs:
            raise DataError(
                f"stage {self.stage.name!r}: no training preference pairs. Every group of "
                f"{self.stage.pairs.group_size} completions scored the same; raise pairs.temperature or "
                f"pairs.group_size, use rewards that separate the completions, or give a preference file "
                f"(data.path with prompt/chosen/rejected columns)")
        if not self.heldout_pairs:
            warnings.warn(f"stage {self.stage.name!r}: no held-out preference pairs; preference_accuracy "
                          "will be NaN", stacklevel=2)
        self._ref = {}
        if self.needs_reference and self.cache_reference:
            self._ref = {split: self.reference_logprobs(pairs)
                         for split, pairs in (("train", self.train_pairs), ("heldout", self.heldout_pairs))}
            if not self.is_peft:
                self.ref_model = None  # cached: the copy is no longer needed
        if at_start:
            start = self.heldout_preference()
            self.start_metrics = {f"{k}_start": v for k, v in start.items()}

    def extra_state(self) -> dict:
        return {"pairs_file": self.pairs_path.name, "pairs_sha256": self.pairs_sha,
                "start_metrics": self.start_metrics, "pair_stats": self.pair_stats}

    def load_extra_state(self, extra: dict) -> None:
        want = extra.get("pairs_sha256")
        if want and want != self.pairs_sha:
            raise DataError(f"{self.pairs_path}: these preference pairs are not the ones the interrupted stage "
                            f"{self.stage.name!r} trained on (hash mismatch); rerun the stage without --resume")
        self.start_metrics = dict(extra.get("start_metrics", {}))
        self.pair_stats = dict(extra.get("pair_stats", {}))

    # ----------------------------------------------------------------- pairs

    def _file_pairs(self) -> list[dict]:
        """Pairs of the stage's preference file: the pipeline's train / held-out split of its rows."""
        train, heldout = self.ctx.train_examples, self.ctx.heldout
        if not train or not all("chosen" in e.extra and "rejected" in e.extra for e in train + heldout):
            from ccrl.data.files import examples_from_rows, load_rows

            d = self.stage.data
            train = examples_from_rows(load_rows(d.path, "preference", d.columns, split="train"), self.tokenizer, d.path)
            heldout = examples_from_rows(load_rows(d.path, "preference", d.columns, split="heldout"), self.tokenizer,
                                         d.path)
        heldout = heldout[: self.stage.pairs.heldout_pairs]
        # conversational pairs ("chat"): rendered by the chat template, which ends the turn (no EOS added)
        return [{"prompt": e.prompt, "chosen": e.extra["chosen"], "rejected": e.extra["rejected"], "split": split,
                 **({"chat": True} if e.messages is not None else {})}
                for split, exs in (("train", train), ("heldout", heldout)) for e in exs]

    @torch.no_grad()
    def build_pairs(self) -> list[dict]:
        """Rank the policy's own samples: best vs worst of each prompt's group, when they differ."""
        p = self.stage.pairs
        cpu = self.step_generator(0, salt=_PAIRS_SALT)
        train = _distinct(self.ctx.train_examples)
        order = torch.randperm(len(train), generator=cpu).tolist()
        # sampling draws on the policy's device, which needs a generator of that device
        gen = cpu
        if self.device.type != "cpu":
            gen = torch.Generator(device=self.device)
            gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=cpu)))
        train = [train[i] for i in order[: p.num_prompts]]
        rows, stats = self._rank(train, gen, "train", limit=None)
        held, hstats = self._rank(_distinct(self.ctx.heldout), gen, "heldout", limit=p.heldout_pairs)
        self.pair_stats = {"pairs/prompts": stats["prompts"], "pairs/kept_frac": stats["kept"] / max(1, stats["prompts"]),
                           "pairs/chosen_value": stats["chosen_value"], "pairs/rejected_value": stats["rejected_value"],
                           "pairs/heldout_prompts": hstats["prompts"]}
        return rows + held

    def _rank(self, examples: list, gen: torch.Generator, split: str, limit: int | None):
        from ccrl.evaluation import decode_completions
        from ccrl.rollout import generate

        p = self.stage.pairs
        G = p.group_size
        sampling = p.sampling_config()
        tok = self.tokenizer
        chunk = max(1, 256 // G)
        rows: list[dict] = []
        tried = 0
        for i in range(0, len(examples), chunk):
            if limit is not None and len(rows) >= limit:
                break
            exs = examples[i: i + chunk]
            ids = [tok.encode(e.prompt, add_special_tokens=False) for e in exs]
            ro = generate(self.sampling_model, ids, sampling, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, group_size=G, generator=gen)
            texts = decode_completions(tok, ro)
            reps = [e for e in exs for _ in range(G)]
            value, valid = self._score(ro, reps, texts)
            for j, e in enumerate(exs):
                tried += 1
                v, ok = value[j * G:(j + 1) * G], valid[j * G:(j + 1) * G]
                if int(ok.sum()) < 2:
                    continue
                cand = ok.nonzero().squeeze(-1)
                best = int(cand[v[cand].argmax()])
                worst = int(cand[v[cand].argmin()])
                c, r = texts[j * G + best], texts[j * G + worst]
                if v[best] > v[worst] and c != r:
                    rows.append({"prompt": e.prompt, "chosen": c, "rejected": r, "split": split,
                                 "chosen_value": float(v[best]), "rejected_value": float(v[worst])})
                if limit is not None and len(rows) >= limit:
                    break
        mean = lambda k: sum(r[k] for r in rows) / len(rows) if rows else float("nan")
        return rows, {"prompts": tried, "kept": len(rows), "chosen_value": mean("chosen_value"),
                      "rejected_value": mean("rejected_value")}

    def _score(self, rollout, reps: list, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(V_Ω (N,), scorable (N,)) of sampled completions."""
        if self.ctx.reward_specs:
            from ccrl.scoring import RewardSet, reward_inputs, reward_state, rollout_kwargs

            if self._rewards is None:
                self._rewards = RewardSet(self.ctx.reward_specs)
            kw = rollout_kwargs(rollout, reps, self.unwrapped, self.stage.pairs.max_new_tokens,
                                state=reward_state(self), tokenizer=self.tokenizer)
            sb = self._rewards.score(*reward_inputs(reps, texts), **kw)
            return sb.value, ~sb.unscorable
        task = self.ctx.task
        if task is None or any(e.answer is None for e in reps):
            raise DataError(f"stage {self.stage.name!r}: building pairs from the policy needs rewards to rank its "
                            f"samples (stage or recipe 'rewards'), or a task with answers")
        value = torch.tensor([float(task.is_correct(t, e)) for t, e in zip(texts, reps)])
        return value, torch.ones_like(value, dtype=torch.bool)

    def _write_pairs(self, rows: list[dict]) -> None:
        if self.acc.is_main_process:
            self.pairs_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.pairs_path.with_name(self.pairs_path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            os.replace(tmp, self.pairs_path)
        self.acc.wait_for_everyone()

    def _read_pairs(self) -> list[dict]:
        f = self.pairs_path
        if not f.exists():
            raise DataError(f"{f}: the preference pairs of the interrupted stage {self.stage.name!r} are missing; "
                            f"a resumed stage must train on the pairs it started with (rerun without --resume)")
        rows = []
        for i, line in enumerate(f.read_text().splitlines(), start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{f}: line {i} is not valid JSON ({e.msg})") from None
            missing = [k for k in ("prompt", "chosen", "rejected", "split") if k not in row]
            if missing:
                raise DataError(f"{f}: line {i} lacks {missing}")
            rows.append(row)
        return rows

    # ----------------------------------------------------------------- log-probs

    def _chunks(self, pairs: list[dict]):
        for i in range(0, len(pairs), _CHUNK_PAIRS):
            part = pairs[i: i + _CHUNK_PAIRS]
            yield part, pairs_batch(self.tokenizer, part)

    @torch.no_grad()
    def reference_logprobs(self, pairs: list[dict]) -> torch.Tensor:
        """(2n,) summed reference log-probs: [chosen of every pair; rejected of every pair]."""
        chosen, rejected = [], []
        for part, batch in self._chunks(pairs):
            lp = self._reference_forward(*(t.to(self.device) for t in batch))
            chosen.append(lp[: len(part)])
            rejected.append(lp[len(part):])
        if not chosen:
            return torch.zeros(0, device=self.device)
        return torch.cat(chosen + rejected)

    @torch.no_grad()
    def _reference_forward(self, ids, mask, loss_mask) -> torch.Tensor:
        if self.ref_model is not None:
            return sequence_logprobs(self.ref_model, ids, mask, loss_mask)[0]
        model = self.unwrapped
        was = model.training
        model.eval()
        try:
            with model.disable_adapter():
                return sequence_logprobs(model, ids, mask, loss_mask)[0]
        finally:
            model.train(was)

    @torch.no_grad()
    def policy_logprobs(self, pairs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logps (2n,), lengths (2n,)) of the current policy in eval mode, same layout as the reference."""
        model = self.unwrapped
        was = model.training
        model.eval()
        lps, lens = [[], []], [[], []]
        try:
            for part, batch in self._chunks(pairs):
                lp, n, _ = sequence_logprobs(model, *(t.to(self.device) for t in batch))
                k = len(part)
                lps[0].append(lp[:k]), lps[1].append(lp[k:]), lens[0].append(n[:k]), lens[1].append(n[k:])
        finally:
            model.train(was)
        if not lps[0]:
            z = torch.zeros(0, device=self.device)
            return z, z
        return torch.cat(lps[0] + lps[1]), torch.cat(lens[0] + lens[1])

    def implicit_margins(self, logps: torch.Tensor, lengths: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
        """Per pair: DPO's β((π_c − ref_c) − (π_r − ref_r)), or ORPO's log-odds ratio
        (c − r) − (log(1 − e^c) − log(1 − e^r)) on length-averaged log-probs (arXiv 2403.07691 Eq. 5)."""
        n = logps.shape[0] // 2
        if self.needs_reference:
            return self.stage.beta * ((logps[:n] - ref[:n]) - (logps[n:] - ref[n:]))
        from ccrl.objectives.preference import log1mexp

        avg = logps / lengths.clamp_min(1)
        c, r = avg[:n], avg[n:]
        return (c - r) - (log1mexp(c) - log1mexp(r))

    def heldout_preference(self) -> dict[str, float]:
        """Preference accuracy (margin > 0), mean margin and mean log-probs on the held-out pairs."""
        if not self.heldout_pairs:
            return {"preference_accuracy": float("nan")}
        logps, lengths = self.policy_logprobs(self.heldout_pairs)
        ref = None
        if self.needs_reference:
            ref = self._ref.get("heldout")
            if ref is None:
                ref = self.reference_logprobs(self.heldout_pairs)
        margins = self.implicit_margins(logps, lengths, ref)
        n = margins.shape[0]
        return {"preference_accuracy": float((margins > 0).float().mean()),
                "preference_margin": float(margins.mean()),
                "heldout_logps/chosen": float(logps[:n].mean()), "heldout_logps/rejected": float(logps[n:].mean())}

    def final_metrics(self) -> dict[str, float]:
        m = self.heldout_preference()
        m.update(self.start_metrics)
        m.update(self.pair_stats)
        m["pairs"] = len(self.train_pairs)
        m["heldout_pairs"] = len(self.heldout_pairs)
        return m

    # ----------------------------------------------------------------- the step

    def batch_indices(self, step: int) -> list[int]:
        """The train pairs of ``step``: consecutive slices of per-epoch permutations of the pair set."""
        N, B = len(self.train_pairs), self.stage.batch_size
        out = []
        for k in range(step * B, (step + 1) * B):
            epoch, j = divmod(k, N)
            if epoch not in self._perms:
                self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
                self._perms[epoch] = torch.randperm(N, generator=self.step_generator(epoch, salt=_PERM_SALT)).tolist()
            out.append(self._perms[epoch][j])
        return out

    def objective(self, logps, lengths, ref, nll_norm):
        """The registry loss on 2n rows [chosen; rejected]. ``nll_norm``: the divisor of ORPO's NLL and of
        DPO's with ``nll_weight`` (see module doc)."""
        n = logps.shape[0] // 2
        if not self.needs_reference:
            avg = logps / lengths.clamp_min(1)                                    # (2n,)
            nll = -logps[:n].sum() / nll_norm                                     # ()
            return self.spec.loss_fn(avg[:n], avg[n:], nll, **self.loss_kwargs)
        kw = dict(self.loss_kwargs)
        if kw.get("loss_type") == "ipo":
            kw.update(chosen_lengths=lengths[:n], rejected_lengths=lengths[n:])
        if kw.get("nll_weight"):
            kw["chosen_nll"] = -logps[:n].sum() / nll_norm                         # () as ORPO's NLL
        return self.spec.loss_fn(logps[:n], logps[n:], ref[:n], ref[n:], **kw)

    def training_step(self, step: int) -> dict:
        idx = self.batch_indices(step)[self.shard_slice(self.stage.batch_size)]   # this process's pairs
        pairs = [self.train_pairs[i] for i in idx]
        B = len(pairs)
        W = self.world_size
        ids, mask, loss_mask = (t.to(self.device) for t in pairs_batch(self.tokenizer, pairs))
        chosen_tokens = max(self.all_reduce([loss_mask[:B, 1:].sum()])[0], 1.0) / W  # the step's, over W
        cached = self._ref.get("train")
        mb = self.stage.micro_batch_size or B
        starts = list(range(0, B, mb))
        total, aux_total = 0.0, 0.0
        all_lp, all_len, all_ref = [[], []], [[], []], [[], []]
        for s in starts:
            e = min(s + mb, B)
            n = e - s
            with self.accumulating(last=s == starts[-1]):
                rows = torch.cat([torch.arange(s, e), torch.arange(B + s, B + e)]).to(self.device)
                batch = _trim(ids[rows], mask[rows], loss_mask[rows])
                lp, lengths, out = sequence_logprobs(self.model, *batch)
                ref = None
                if self.needs_reference:
                    if cached is not None:
                        sel = torch.tensor(idx[s:e], device=self.device)
                        ref = torch.cat([cached[sel], cached[sel + len(self.train_pairs)]])
                    else:
                        ref = self._reference_forward(*batch)
                loss, _ = self.objective(lp, lengths, ref, chosen_tokens * n / B)
                loss = loss * (n / B)
                total += float(loss.detach())
                aux = aux_loss_of(self.unwrapped, out)
                if aux is not None:
                    aux = aux * (n / B)
                    aux_total += float(aux.detach())
                    loss = loss + aux
                self.check_finite(loss)
                self.backward(loss)
            for acc, t in ((all_lp, lp.detach()), (all_len, lengths), (all_ref, ref)):
                if t is not None:
                    acc[0].append(t[:n]), acc[1].append(t[n:])
        grad_norm = self.optimizer_step()
        # the step's metrics over every process's pairs: [chosen of all; rejected of all]
        local = [[torch.cat(part).cpu() if part else None for part in parts] for parts in (all_lp, all_len, all_ref)]
        gathered = self.all_gather((local, total, aux_total, int(mask.sum())))
        cat = lambda j: None if gathered[0][0][j][0] is None else torch.cat(
            [g[0][j][0] for g in gathered] + [g[0][j][1] for g in gathered]).to(self.device)
        _, metrics = self.objective(cat(0), cat(1), cat(2), chosen_tokens * W)
        out = {k: float(v) for k, v in metrics.items()}
        total = sum(g[1] for g in gathered) / W
        aux_total = sum(g[2] for g in gathered) / W
        out.update(loss=total, grad_norm=grad_norm, _tokens=sum(g[3] for g in gathered))
        if aux_total:
            out["aux_loss"] = aux_total
        return out
