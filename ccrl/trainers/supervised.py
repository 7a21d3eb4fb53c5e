"""Pretraining (causal LM on packed text) and SFT (loss on completion tokens only).

SFT rows are (prompt, answer) text, or whole conversations in TRL's ``messages`` format,
rendered with the tokenizer's chat template and trained on the assistant turns only (how those
are found: ``ccrl.data.chat``).

Both train any Hugging Face causal LM (the Quillan policy, a CouncilHead-wrapped model, or a
plain ``LlamaForCausalLM``). The loss of a step is the mean next-token NLL over every counted
token of the whole step, however the step is split into micro-batches: each micro-batch adds
Σ NLL / (tokens in the step), so gradient accumulation reproduces the full-batch gradient. A MoE
policy's load-balance loss (``aux_loss`` in its output) is added with the model config's
``router_aux_loss_coef``, weighted by the micro-batch's share of the step.

Several processes: every process draws the step's same ``batch_size`` rows and trains its own
contiguous ``batch_size / W`` of them; the token count is summed over the processes and divided
by W, so DDP's average of the W gradients is the single-process gradient of the whole step.
The logged loss is the whole step's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ccrl.trainers.base import Trainer


def masked_nll_sum(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Σ_t −log p(labels[t+1] | ≤t) over positions where ``loss_mask[t+1]`` is 1 (HF shift convention).

    logits (B, T, V), labels (B, T), loss_mask (B, T). Labels where the mask is 0 are never read,
    so changing prompt-token labels cannot change the loss.
    """
    logits = logits[:, :-1].float()                                            # (B, T-1, V)
    target = labels[:, 1:]                                                     # (B, T-1)
    m = loss_mask[:, 1:].bool()                                                # (B, T-1)
    safe = torch.where(m, target, torch.zeros_like(target))
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), safe.reshape(-1), reduction="none")
    return (nll.view_as(safe) * m).sum()


def aux_loss_of(model, out) -> torch.Tensor | None:
    """The router load-balance term coef · aux_loss, when the policy has one."""
    aux = getattr(out, "aux_loss", None)
    coef = getattr(getattr(model, "config", None), "router_aux_loss_coef", 0.0) or 0.0
    if aux is None or not coef:
        return None
    return coef * aux


class _SupervisedTrainer(Trainer):
    def micro_batches(self, batch_size: int) -> list[slice]:
        mb = self.stage.micro_batch_size or batch_size
        return [slice(i, min(i + mb, batch_size)) for i in range(0, batch_size, mb)]

    def run_batches(self, ids: torch.Tensor, mask: torch.Tensor, loss_mask: torch.Tensor) -> dict:
        """This process's share of the step's rows: forward/backward over micro-batches with the
        step's global token count; one update."""
        rows = self.shard_slice(ids.shape[0])
        ids, mask, loss_mask = (t[rows].to(self.device) for t in (ids, mask, loss_mask))
        W = self.world_size
        n_tokens = max(self.all_reduce([loss_mask[:, 1:].sum()])[0], 1.0) / W   # global count / W
        total, aux_total = 0.0, 0.0
        B = ids.shape[0]
        batches = self.micro_batches(B)
        for i, sl in enumerate(batches):
            with self.accumulating(last=i == len(batches) - 1):
                pos = (mask[sl].cumsum(-1) - 1).clamp_min(0)
                out = self.model(input_ids=ids[sl], attention_mask=mask[sl], position_ids=pos)
                loss = masked_nll_sum(out.logits, ids[sl], loss_mask[sl]) / n_tokens
                total += float(loss.detach())
                aux = aux_loss_of(self.unwrapped, out)
                if aux is not None:
                    aux = aux * (sl.stop - sl.start) / B
                    aux_total += float(aux.detach())
                    loss = loss + aux
                self.check_finite(loss)
                self.backward(loss)
        grad_norm = self.optimizer_step()
        total, aux_total, tokens = self.all_reduce([total, aux_total, mask.sum()])
        return {"loss": total / W, "aux_loss": aux_total / W, "grad_norm": grad_norm, "_tokens": int(tokens)}


class PretrainTrainer(_SupervisedTrainer):
    """Causal LM on the task text: each example is prompt + target + EOS, concatenated into one
    token stream and cut into blocks of ``seq_len``; each step draws ``batch_size`` random blocks."""

    kind = "pretrain"

    def __init__(self, stage, model, ctx):
        super().__init__(stage, model, ctx)
        tok = self.tokenizer
        stream: list[int] = []
        for ex in ctx.train_examples:
            text = ex.prompt + ctx.task_target(ex)
            stream.extend(tok.encode(text, add_special_tokens=False))
            stream.append(tok.eos_token_id)
        if len(stream) <= stage.seq_len:
            raise ValueError(f"stage {stage.name}: {len(stream)} tokens of text is less than one block of seq_len={stage.seq_len}")
        self.stream = torch.tensor(stream, dtype=torch.long)

    def training_step(self, step: int) -> dict:
        g = self.step_generator(step)
        L = self.stage.seq_len
        starts = torch.randint(0, self.stream.numel() - L, (self.stage.batch_size,), generator=g)
        ids = torch.stack([self.stream[s: s + L] for s in starts.tolist()])      # (B, L)
        mask = torch.ones_like(ids)
        return self.run_batches(ids, mask, mask)


def sft_batch(tokenizer, prompts: list[str], targets: list[str],
              add_eos: bool | list[bool] = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, loss_mask) for prompt + target + EOS; the loss
    mask is 1 exactly on the target and EOS tokens. ``add_eos`` False (for all rows, or per row)
    leaves the EOS out: a target rendered by a chat template already ends the turn."""
    eos = [add_eos] * len(prompts) if isinstance(add_eos, bool) else list(add_eos)
    rows, lm = [], []
    for p, t, e in zip(prompts, targets, eos):
        pi = tokenizer.encode(p, add_special_tokens=False)
        ti = tokenizer.encode(t, add_special_tokens=False) + ([tokenizer.eos_token_id] if e else [])
        rows.append(pi + ti)
        lm.append([0] * len(pi) + [1] * len(ti))
    return pad_rows(rows, lm, tokenizer.pad_token_id)


def conversation_row(tokenizer, conversation: list[dict], where: str = "conversation") -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a whole conversation rendered with the chat template; the mask is 1
    on the assistant turns only (their content and the template's end-of-turn marker), found by
    rendering turn by turn (``ccrl.data.chat.conversation_segments``)."""
    from ccrl.data.chat import conversation_segments, encode_segments

    return encode_segments(tokenizer, conversation_segments(tokenizer, conversation, where))


def pad_rows(rows: list[list[int]], lm: list[list[int]], pad_token_id: int):
    """Right-padded (input_ids, attention_mask, loss_mask) of token rows and their loss masks."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, lm)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        loss_mask[i, : len(r)] = torch.tensor(m)
    return ids, mask, loss_mask


class SFTTrainer(_SupervisedTrainer):
    """Supervised fine-tuning on (prompt, target) pairs; loss on target tokens (and EOS) only.

    Conversational rows (a ``messages`` column, TRL's conversational language-modeling format)
    are rendered whole with the chat template and trained on their assistant turns only
    (:func:`conversation_row`); they are tokenised once, when the stage starts."""

    kind = "sft"

    def __init__(self, stage, model, ctx):
        super().__init__(stage, model, ctx)
        self.conversations = {i: conversation_row(self.tokenizer, e.conversation)
                              for i, e in enumerate(ctx.train_examples) if e.conversation is not None}

    def training_step(self, step: int) -> dict:
        g = self.step_generator(step)
        exs = self.ctx.train_examples
        idx = torch.randint(0, len(exs), (self.stage.batch_size,), generator=g).tolist()
        if self.conversations:
            rows = [self.conversations[i] if i in self.conversations else self._text_row(exs[i]) for i in idx]
            ids, mask, loss_mask = pad_rows([r[0] for r in rows], [r[1] for r in rows], self.tokenizer.pad_token_id)
            return self.run_batches(ids, mask, loss_mask)
        batch = [exs[i] for i in idx]
        ids, mask, loss_mask = sft_batch(self.tokenizer, [e.prompt for e in batch],
                                         [self.ctx.task_target(e) for e in batch])
        return self.run_batches(ids, mask, loss_mask)

    def _text_row(self, e) -> tuple[list[int], list[int]]:
        ids, _, lm = sft_batch(self.tokenizer, [e.prompt], [self.ctx.task_target(e)])
        return ids[0].tolist(), lm[0].tolist()
