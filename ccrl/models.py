"""Building and loading policies from a recipe's ``model`` section or a checkpoint directory.

- ``{preset: small, ...overrides}``: a Quillan council policy sized to the tokenizer's vocabulary;
- ``{hf_config: {model_type: llama, ...}}``: any transformers architecture with random weights
  (``AutoConfig.for_model`` + ``AutoModelForCausalLM.from_config``), optionally wrapped in
  ``policies.CouncilHead`` with ``council_head: true``;
- ``{checkpoint: dir}``: a ccrl stage checkpoint or any local Hugging Face causal-LM directory
  (any architecture transformers knows, e.g. Llama or Qwen2), loaded with its own tokenizer
  (``AutoTokenizer``: special tokens and chat template as saved; no pad token → the EOS token,
  as TRL does). Weights must be safetensors: a folder with only ``pytorch_model.bin`` is a
  ``CheckpointError``. With ``council_head: true`` the loaded model is wrapped in
  ``policies.CouncilHead`` (unless it is a council already), so ``objective: ccrl`` runs on it.

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
        if spec.council_head and not has_council(model):
            from policies import CouncilHead

            model = CouncilHead(model)
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


def cast_parameters(model, dtype: torch.dtype) -> None:
    """Give every floating-point parameter of ``model`` the dtype ``dtype``, in place (tied weights stay
    one tensor). Buffers keep theirs: ``model.to(torch.bfloat16)`` would also round the rotary
    embedding's inverse frequencies to bf16, which transformers itself keeps in float32."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def load_policy(path, merge_adapters: bool = True):
    """(model, tokenizer) from a checkpoint directory written by a stage (or an HF model dir)."""
    import policies  # noqa: F401
    from ccrl.checkpoint import ADAPTER_DIR, check_safetensors, check_weights_file, resolve, write_errors

    path = resolve(path)
    from policies.council_head import HEAD_CONFIG, HEAD_WEIGHTS

    if (path / HEAD_CONFIG).exists():
        check_safetensors(path / HEAD_WEIGHTS)
        check_safetensors_only(path / "base")
        check_weights_file(path / "base")
    else:
        check_safetensors_only(path)
        check_weights_file(path)
    if (path / ADAPTER_DIR / "adapter_model.safetensors").exists():
        check_safetensors(path / ADAPTER_DIR / "adapter_model.safetensors")
    try:
        if (path / HEAD_CONFIG).exists():
            from policies import CouncilHead

            model = CouncilHead.from_pretrained(path)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
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
    """The checkpoint's own tokenizer (``AutoTokenizer``: its class, special tokens and chat template).

    A tokenizer without a pad token pads with its EOS token, as TRL does."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise CheckpointError(f"{path}: no tokenizer in the checkpoint (tokenizer.json); save the tokenizer next to "
                              f"the model with tokenizer.save_pretrained(dir)")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot load the tokenizer: {e}") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise CheckpointError(f"{path}: the tokenizer has neither a pad nor an EOS token; set eos_token in "
                                  f"its tokenizer_config.json")
        tok.pad_token = tok.eos_token
    return tok


def check_safetensors_only(path) -> None:
    """Refuse a model folder whose weights exist only as pickled ``pytorch_model.bin`` / ``*.pt`` files:
    ccrl loads safetensors only (a pickle can run code when loaded)."""
    path = Path(path)
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists():
        return
    pickled = sorted(p.name for pat in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in path.glob(pat))
    if pickled:
        raise CheckpointError(
            f"{path}: the weights are only in {', '.join(pickled)} (pickle); ccrl loads safetensors only. Convert "
            f"them once: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir) writes model.safetensors")


def has_council(model) -> bool:
    """Whether a built policy is a council (Quillan, or wrapped in ``CouncilHead``)."""
    from policies import interface

    return interface.has_council(model)


def spec_has_council(spec) -> bool:
    """Whether a recipe's ``model`` section gives a council policy, judged without loading weights:
    a Quillan preset, ``council_head: true``, or a checkpoint that is a council (a Quillan config, or
    a ``CouncilHead`` folder)."""
    if spec.preset is not None or spec.council_head:
        return True
    if spec.checkpoint is None:
        return False
    import json

    from policies.council_head import HEAD_CONFIG

    path = Path(spec.checkpoint)
    if (path / HEAD_CONFIG).exists():
        return True
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "quillan"
    except (OSError, ValueError):
        return False


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
