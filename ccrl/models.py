"""Building and loading policies from a recipe's ``model`` section or a checkpoint directory.

- ``{preset: small, ...overrides}``: a Quillan council policy sized to the tokenizer's vocabulary;
- ``{hf_config: {model_type: llama, ...}}``: any transformers architecture with random weights
  (``AutoConfig.for_model`` + ``AutoModelForCausalLM.from_config``), optionally wrapped in
  ``policies.CouncilHead`` with ``council_head: true``;
- ``{checkpoint: dir}``: a ccrl stage checkpoint or any local Hugging Face model directory.

A checkpoint of a stage that trained LoRA adapters holds the base model and ``adapter/``;
``load_policy`` merges the adapters by default, so the next stage starts from the merged weights.
A weights file that is missing, truncated or corrupt is a :class:`~ccrl.errors.CheckpointError`
naming the file (exit 2 in the CLI), checked before anything is loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ccrl.errors import CheckpointError, RecipeError


def build_model(spec, tokenizer, seed: int = 0):
    """A freshly initialised policy for a recipe's model section (``ccrl.config.ModelConfig``)."""
    import policies  # noqa: F401  (registers Quillan with the Auto classes)

    special = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
               "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    torch.manual_seed(seed)
    if spec.checkpoint is not None:
        model, _ = load_policy(spec.checkpoint)
        return model
    if spec.preset is not None:
        from policies import QuillanConfig, QuillanForCausalLM

        try:
            cfg = QuillanConfig.preset(spec.preset, **{**spec.overrides, **special})
        except (TypeError, ValueError) as e:
            raise RecipeError(f"model: invalid Quillan configuration: {e}") from None
        return QuillanForCausalLM(cfg)
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = dict(spec.hf_config)
    model_type = hf.pop("model_type")
    try:
        cfg = AutoConfig.for_model(model_type, **{**hf, **special})
        base = AutoModelForCausalLM.from_config(cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise RecipeError(f"model.hf_config: cannot build a {model_type!r} causal LM: {e}") from None
    if spec.council_head:
        from policies import CouncilHead

        return CouncilHead(base)
    return base


def load_policy(path, merge_adapters: bool = True):
    """(model, tokenizer) from a checkpoint directory written by a stage (or an HF model dir)."""
    import policies  # noqa: F401
    from ccrl.checkpoint import ADAPTER_DIR, check_safetensors, check_weights_file, resolve, write_errors

    path = resolve(path)
    from policies.council_head import HEAD_CONFIG, HEAD_WEIGHTS

    if (path / HEAD_CONFIG).exists():
        check_safetensors(path / HEAD_WEIGHTS)
        check_weights_file(path / "base")
    else:
        check_weights_file(path)
    if (path / ADAPTER_DIR / "adapter_model.safetensors").exists():
        check_safetensors(path / ADAPTER_DIR / "adapter_model.safetensors")
    try:
        if (path / HEAD_CONFIG).exists():
            from policies import CouncilHead

            model = CouncilHead.from_pretrained(path)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(path)
    except (ValueError, KeyError, *write_errors()) as e:
        raise CheckpointError(f"{path}: cannot load the policy: {e}") from None
    tokenizer = load_tokenizer(path)
    if (path / ADAPTER_DIR).exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path / ADAPTER_DIR, is_trainable=not merge_adapters)
        if merge_adapters:
            model = model.merge_and_unload()
    return model, tokenizer


def load_tokenizer(path):
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").exists():
        raise CheckpointError(f"{path}: no tokenizer.json in the checkpoint")
    return PreTrainedTokenizerFast.from_pretrained(path)


def load_weights_into(model, path) -> None:
    """Copy the weights of checkpoint ``path`` into an already built ``model`` (resuming a stage).

    The checkpoint is loaded the same way a stage loads it (adapters kept separate when ``model``
    has them), then copied tensor by tensor, so every policy type is covered by one path."""
    from ccrl.checkpoint import _is_peft

    src, _ = load_policy(path, merge_adapters=not _is_peft(model))
    own, theirs = model.state_dict(), src.state_dict()
    missing = sorted(set(own) - set(theirs))
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {len(missing)} weights of this model, e.g. {missing[0]}")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(theirs[k])
