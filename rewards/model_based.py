"""Model-based rewards: a local reward model (``reward_model``) and a local LLM judge (``judge``).

Both read a local Hugging Face folder (``config.json``, safetensors weights and the model's own
tokenizer, as ``save_pretrained`` writes them), load it once per process (cached per folder,
device and dtype; :func:`clear_cache` empties the cache), keep it in eval mode and score under
``torch.inference_mode()``, ``batch_size`` samples per forward pass. Recipe entries:

    {name: reward_model, path: DIR, batch_size: 8, max_length: null, normalize: {mean: 0, std: 1}}
    {name: judge, path: DIR, question: "Is the answer correct?", yes: "Yes", no: "No"}

reward_model — what TRL's GRPOTrainer does with a sequence classifier in ``reward_funcs``
------------------------------------------------------------------------------------------
DIR holds an ``AutoModelForSequenceClassification`` with one label (``num_labels=1``).

    text  = tok.apply_chat_template(prompt + completion, tokenize=False)   conversational
          = prompt + completion                                           plain strings
    ids   = tok(text, add_special_tokens=False), the *first* tokens cut when longer than
            max_length (default: the model's limit, min(tok.model_max_length,
            max_position_embeddings)), so the completion's end, where the score is read, stays
    r     = logit of the model's one label (transformers pools it at the last token that is not
            the pad token; the pad token is the tokenizer's, or its eos token if it has none, and
            the model's config gets the same id, as TRL sets it)
    score = (r − mean) / std   with ``normalize: {mean, std}``, else r

A prompt is conversational when it is a list of ``{role, content}`` messages (TRL's format); its
completion is then ``[{"role": "assistant", "content": ...}]`` (a bare string is wrapped so).
Batches are padded on the right, so a sample's score does not depend on its batch (up to float
rounding of the padded matrix products).

judge — the probability a generative model answers "yes" to a rubric question
-----------------------------------------------------------------------------
DIR holds an ``AutoModelForCausalLM``. For each sample the judge reads

    body  = template.format(prompt=P, completion=C, question=question, yes=yes, no=no)

with P the prompt text (a conversation as ``role: content`` lines) and C the completion text
(the default template is :data:`JUDGE_TEMPLATE`). Then

    with a chat template:   text = tok.apply_chat_template([{"role": "user", "content": body}],
                                                           add_generation_prompt=True, tokenize=False)
                            ids  = tok(text, add_special_tokens=False)
                            y, n = first token of tok.encode(yes), of tok.encode(no)   (no special tokens)
    without one:            text = body + "\\nAnswer:"
                            ids  = tok(text)                    (the tokenizer's special tokens added)
                            y, n = first token of tok.encode(" " + yes), of tok.encode(" " + no)

    z     = the model's next-token logits after the last token of ids (float32)
    score = p(y) / (p(y) + p(n)) = σ(z_y − z_n),   p = softmax(z)

so 1 means "certainly yes", 0 "certainly no", 0.5 undecided. Long inputs lose their first tokens
(max_length as above); the default template puts the question last so it survives. ``yes`` and
``no`` must start with different tokens (checked when the recipe is checked).

Device
------
``device`` (a recipe param) wins: ``cpu``, ``cuda``, ``cuda:1`` or ``auto`` (CUDA when
available). Without it the model follows the keyword argument ``policy_device``, which ccrl's
trainers pass with every rollout (``ccrl.scoring.rollout_kwargs``): the policy's CUDA device if it
is on one, else the CPU.

Errors: a path that is missing, a folder without safetensors weights or tokenizer, a model of the
wrong kind (``reward_model`` on a causal LM, a classifier with more than one label, ``judge`` on a
classifier) and bad parameters are a RewardSpecError naming the path, raised when ``ccrl check``
binds the recipe's rewards (``register(check=...)``), not at the first training step.

Imports only the standard library at module level (``import rewards`` stays cheap); torch and
transformers load with a model.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rewards.errors import RewardError, RewardSpecError
from rewards.registry import register

if TYPE_CHECKING:
    import torch

JUDGE_QUESTION = "Is the response a correct and helpful answer to the prompt?"
"""The judge's default rubric question."""

JUDGE_TEMPLATE = "Prompt:\n{prompt}\n\nResponse:\n{completion}\n\nQuestion: {question}\nAnswer {yes} or {no}."
"""The judge's default user message; fields: prompt, completion, question, yes, no."""

_DTYPES = ("float32", "bfloat16", "float16", "auto")
_WEIGHTS = ("*.safetensors",)
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass
class LoadedModel:
    """A model folder loaded for scoring (what the cache holds)."""

    model: Any
    """the transformers model, in eval mode, on ``device``"""
    tokenizer: Any
    """its own tokenizer, set to pad on the right and truncate on the left"""
    device: torch.device
    max_length: int | None
    """the model's limit: min(tokenizer.model_max_length, max_position_embeddings); None if unknown"""
    logits_to_keep: bool = False
    """the forward takes ``logits_to_keep`` (the judge then projects only the positions it reads)"""


_CACHE: dict[tuple, LoadedModel] = {}


def clear_cache() -> None:
    """Forget every loaded model (the next call loads its folder again)."""
    _CACHE.clear()


# ---------------------------------------------------------------- the two rewards


def _check_reward_model(params: dict[str, Any]) -> None:
    _check_common("reward_model", params)
    _check_normalize(params.get("normalize"))
    _load_tokenizer("reward_model", _folder("reward_model", params["path"]))


def _check_judge(params: dict[str, Any]) -> None:
    _check_common("judge", params)
    for key in ("question", "yes", "no", "template"):
        value = params.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise RewardSpecError(f"reward 'judge': {key!r} must be a non-empty string, got {value!r}")
    template = params.get("template") or JUDGE_TEMPLATE
    try:
        template.format(prompt="", completion="", question="", yes="", no="")
    except (KeyError, IndexError, ValueError) as e:
        raise RewardSpecError(
            f"reward 'judge': template {template!r} is not a format string over "
            f"{{prompt}}, {{completion}}, {{question}}, {{yes}}, {{no}}: {type(e).__name__}: {e}"
        ) from None
    if "{completion}" not in template:
        raise RewardSpecError("reward 'judge': template must contain {completion}")
    folder = _folder("judge", params["path"])
    tok = _load_tokenizer("judge", folder)
    _answer_tokens(tok, params.get("yes") or "Yes", params.get("no") or "No", folder)


@register("reward_model", check=_check_reward_model)
def reward_model(
    prompts: list,
    completions: list,
    *,
    path: str | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    normalize: dict | None = None,
    device: str | None = None,
    dtype: str = "float32",
    policy_device: Any = None,
    **kwargs: Any,
) -> list[float | None]:
    """The logit of a local sequence-classification reward model (num_labels=1) per sample.

        score = logit(text) [− mean] [/ std],  text = chat template of prompt + completion
                (conversational) or prompt + completion (strings); see the module docstring

    Params: ``path`` (required), ``batch_size``, ``max_length`` (default the model's limit),
    ``normalize: {mean, std}``, ``device``, ``dtype`` (float32 | bfloat16 | float16 | auto).
    kwargs read: ``policy_device`` (optional). A sample whose text has no tokens gets None.
    """
    params = {"path": path, "batch_size": batch_size, "max_length": max_length, "device": device, "dtype": dtype}
    _check_common("reward_model", params)
    _check_normalize(normalize)
    lm = load_model("reward_model", path, _device(device, policy_device), dtype)
    texts = [_reward_model_text(lm.tokenizer, p, c, path, i) for i, (p, c) in enumerate(zip(prompts, completions))]
    scores = _batched(texts, batch_size, lambda chunk: _classify(lm, chunk, max_length or lm.max_length))
    if normalize:
        mean, std = float(normalize.get("mean", 0.0)), float(normalize.get("std", 1.0))
        scores = [None if s is None else (s - mean) / std for s in scores]
    return scores


@register("judge", check=_check_judge)
def judge(
    prompts: list,
    completions: list,
    *,
    path: str | None = None,
    question: str = JUDGE_QUESTION,
    yes: str = "Yes",
    no: str = "No",
    template: str | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    device: str | None = None,
    dtype: str = "float32",
    policy_device: Any = None,
    **kwargs: Any,
) -> list[float | None]:
    """p(yes) / (p(yes) + p(no)) of a local causal LM asked ``question`` about each sample.

        score = σ(z_yes − z_no), z = next-token logits after the (chat-templated) judge prompt,
                yes/no = the first token of each answer word; see the module docstring

    Params: ``path`` (required), ``question``, ``yes``, ``no``, ``template`` (default
    :data:`JUDGE_TEMPLATE`), ``batch_size``, ``max_length``, ``device``, ``dtype``.
    kwargs read: ``policy_device`` (optional).
    """
    params = {"path": path, "batch_size": batch_size, "max_length": max_length, "device": device, "dtype": dtype}
    _check_common("judge", params)
    lm = load_model("judge", path, _device(device, policy_device), dtype)
    tok = lm.tokenizer
    chat = bool(getattr(tok, "chat_template", None))
    y, n = _answer_tokens(tok, yes, no, path)
    texts = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        body = (template or JUDGE_TEMPLATE).format(
            prompt=_prompt_text(p, i), completion=_completion_text(c, i), question=question, yes=yes, no=no
        )
        texts.append(judge_text(tok, body))
    limit = max_length or lm.max_length
    return _batched(texts, batch_size, lambda chunk: _judge_scores(lm, chunk, limit, y, n, special=not chat))


def judge_text(tok, body: str) -> str:
    """The text the judge reads for a filled-in template: its chat template with the generation
    prompt, or ``body + "\\nAnswer:"`` for a tokenizer without one."""
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template([{"role": "user", "content": body}], add_generation_prompt=True,
                                       tokenize=False)
    return body + "\nAnswer:"


# ---------------------------------------------------------------- scoring


def _batched(texts: list[str], batch_size: int, score_chunk) -> list[float | None]:
    out: list[float | None] = []
    for start in range(0, len(texts), batch_size):
        out.extend(score_chunk(texts[start: start + batch_size]))
    return out


def _encode(lm: LoadedModel, texts: list[str], max_length: int | None, special: bool):
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True, truncation=max_length is not None,
                       max_length=max_length, add_special_tokens=special)
    return enc["input_ids"].to(lm.device), enc["attention_mask"].to(lm.device)   # (B, T), (B, T)


def _classify(lm: LoadedModel, texts: list[str], max_length: int | None) -> list[float | None]:
    import torch
    ids, mask = _encode(lm, texts, max_length, special=False)
    lengths = mask.sum(dim=1)                                                       # (B,)
    if ids.shape[1] == 0:
        return [None] * len(texts)
    with torch.inference_mode():
        logits = lm.model(input_ids=ids, attention_mask=mask).logits[:, 0].float()  # (B,)
    return [float(v) if n > 0 else None for v, n in zip(logits.cpu().tolist(), lengths.tolist())]


def _judge_scores(lm: LoadedModel, texts: list[str], max_length: int | None, y: int, n: int,
                  special: bool) -> list[float | None]:
    import torch
    ids, mask = _encode(lm, texts, max_length, special)
    lengths = mask.sum(dim=1)                                                       # (B,)
    if ids.shape[1] == 0:
        return [None] * len(texts)
    last = (lengths - 1).clamp(min=0)                                               # (B,)
    rows = torch.arange(ids.shape[0], device=ids.device)
    with torch.inference_mode():
        if lm.logits_to_keep:
            keep, pos = torch.unique(last, return_inverse=True)                      # (K,), (B,)
            logits = lm.model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits  # (B, K, V)
            z = logits[rows, pos].float()                                           # (B, V)
        else:
            z = lm.model(input_ids=ids, attention_mask=mask).logits[rows, last].float()  # (B, V)
        score = torch.sigmoid(z[:, y] - z[:, n])                                    # (B,) = p_y / (p_y + p_n)
    return [float(s) if k > 0 else None for s, k in zip(score.cpu().tolist(), lengths.tolist())]


# ---------------------------------------------------------------- rendering


def _is_conversation(x: Any) -> bool:
    return isinstance(x, list | tuple) and len(x) > 0 and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in x)


def _as_messages(completion: Any, i: int) -> list[dict]:
    if isinstance(completion, str):
        return [{"role": "assistant", "content": completion}]
    if isinstance(completion, dict) and "content" in completion:
        return [completion]
    if _is_conversation(completion):
        return list(completion)
    raise RewardError(f"completions[{i}] is a {type(completion).__name__}; expected a string or a list of messages")


def _prompt_text(prompt: Any, i: int) -> str:
    if isinstance(prompt, str):
        return prompt
    if _is_conversation(prompt):
        return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    raise RewardError(f"prompts[{i}] is a {type(prompt).__name__}; expected a string or a list of messages")


def _completion_text(completion: Any, i: int) -> str:
    if isinstance(completion, str):
        return completion
    return "\n".join(str(m["content"]) for m in _as_messages(completion, i))


def _reward_model_text(tok, prompt: Any, completion: Any, path: str, i: int) -> str:
    """What the reward model reads (TRL's GRPOTrainer rendering)."""
    if _is_conversation(prompt):
        if not getattr(tok, "chat_template", None):
            raise RewardSpecError(
                f"reward 'reward_model': the tokenizer in {path!r} has no chat template, "
                "but the prompts are conversations (lists of messages)"
            )
        return tok.apply_chat_template(list(prompt) + _as_messages(completion, i), tokenize=False)
    return _prompt_text(prompt, i) + _completion_text(completion, i)


def _answer_tokens(tok, yes: str, no: str, path: Any) -> tuple[int, int]:
    """The first token of each answer word, as the judge compares them."""
    space = "" if getattr(tok, "chat_template", None) else " "
    ids = []
    for word in (yes, no):
        enc = tok.encode(space + word, add_special_tokens=False)
        if not enc:
            raise RewardSpecError(f"reward 'judge': the tokenizer in {str(path)!r} encodes {word!r} to no tokens")
        ids.append(enc[0])
    if ids[0] == ids[1]:
        raise RewardSpecError(
            f"reward 'judge': {yes!r} and {no!r} start with the same token ({ids[0]}) in the tokenizer of "
            f"{str(path)!r}; choose answer words that start differently"
        )
    return ids[0], ids[1]


# ---------------------------------------------------------------- loading


def _device(device: str | None, policy_device: Any) -> torch.device:
    import torch
    if device is None:
        if policy_device is not None and torch.device(policy_device).type == "cuda":
            return torch.device(policy_device)
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(kind: str, path: str | Path, device: torch.device | str = "cpu", dtype: str = "float32") -> LoadedModel:
    """The model folder ``path`` for ``kind`` ("reward_model" or "judge"), loaded once per process.

    Cached per (folder, device, dtype) and the weights' size and modification time, so a folder
    rewritten in place is loaded again. Raises RewardSpecError naming the path for a bad folder."""
    import torch

    folder = _folder(kind, path)
    device = torch.device(device)
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in _weight_files(folder))
    key = (kind, str(folder.resolve()), str(device), dtype, stamp)
    if key not in _CACHE:
        _CACHE[key] = _load(kind, folder, device, dtype)
    return _CACHE[key]


def _load(kind: str, folder: Path, device: torch.device, dtype: str) -> LoadedModel:
    import torch
    import transformers

    tok = _load_tokenizer(kind, folder)
    auto = transformers.AutoModelForSequenceClassification if kind == "reward_model" else transformers.AutoModelForCausalLM
    extra = {"num_labels": 1} if kind == "reward_model" else {}
    try:
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        model, info = auto.from_pretrained(str(folder), dtype=torch_dtype, output_loading_info=True, **extra)
    except Exception as e:  # an unknown architecture, a corrupt file: the folder is bad input
        raise RewardSpecError(f"reward {kind!r}: cannot load {str(folder)!r} as "
                              f"{auto.__name__}: {type(e).__name__}: {e}") from e
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise RewardSpecError(
            f"reward {kind!r}: the weights in {str(folder)!r} lack {missing[:4]}"
            f"{' ...' if len(missing) > 4 else ''}; it is not a trained "
            f"{'sequence classifier' if kind == 'reward_model' else 'causal language model'}"
        )
    text_config = model.config.get_text_config()
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise RewardSpecError(f"reward {kind!r}: the tokenizer in {str(folder)!r} has no pad or eos token")
        tok.pad_token = tok.eos_token  # as TRL does
    if kind == "reward_model":
        text_config.pad_token_id = tok.pad_token_id  # where the classifier pools: the last non-pad token
    tok.padding_side, tok.truncation_side = "right", "left"
    model.eval().requires_grad_(False).to(device)
    limits = [getattr(tok, "model_max_length", None), getattr(text_config, "max_position_embeddings", None)]
    limits = [v for v in limits if isinstance(v, int) and 0 < v < 10**9]
    return LoadedModel(model=model, tokenizer=tok, device=device, max_length=min(limits) if limits else None,
                       logits_to_keep="logits_to_keep" in inspect.signature(model.forward).parameters)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
"""One of these must be in a model folder: without them some transformers releases (5.4) build a
default tokenizer from the config instead of failing, which would score with the wrong vocabulary."""


def _load_tokenizer(kind: str, folder: Path):
    from transformers import AutoTokenizer

    if not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise RewardSpecError(f"reward {kind!r}: cannot load the tokenizer in {str(folder)!r}: none of "
                              f"{', '.join(TOKENIZER_FILES)} is there (the model's own tokenizer must be saved "
                              f"beside it: tokenizer.save_pretrained(dir))")
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise RewardSpecError(f"reward {kind!r}: cannot load the tokenizer in {str(folder)!r} "
                              f"(the model's own tokenizer must be saved beside it): {type(e).__name__}: {e}") from e


def _weight_files(folder: Path) -> list[Path]:
    return sorted(f for pattern in _WEIGHTS for f in folder.glob(pattern))


def _folder(kind: str, path: Any) -> Path:
    """``path`` as a model folder of the right kind; RewardSpecError naming it otherwise."""
    if path is None:
        raise RewardSpecError(f"reward {kind!r} needs a 'path': a local folder saved with save_pretrained")
    if not isinstance(path, str | Path):
        raise RewardSpecError(f"reward {kind!r}: 'path' must be a folder path, got {type(path).__name__}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise RewardSpecError(f"reward {kind!r}: path {str(path)!r} is not a folder "
                              "(expected a local model folder saved with save_pretrained)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise RewardSpecError(f"reward {kind!r}: {str(path)!r} has no config.json")
    if not _weight_files(folder):
        raise RewardSpecError(f"reward {kind!r}: {str(path)!r} has no safetensors weights (*.safetensors); "
                              "save the model with save_pretrained")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise RewardSpecError(f"reward {kind!r}: cannot read {str(config_file)!r}: {e}") from None
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    if kind == "reward_model":
        if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
            raise RewardSpecError(f"reward 'reward_model': {str(path)!r} holds {archs}, not a sequence classifier "
                                  "(AutoModelForSequenceClassification with num_labels=1)")
        labels = config.get("id2label")
        n = len(labels) if isinstance(labels, dict) else _head_rows(folder)
        if n is not None and n != 1:
            raise RewardSpecError(f"reward 'reward_model': {str(path)!r} is a classifier with {n} labels; "
                                  "a reward model has one (num_labels=1)")
    elif archs and not any(a.endswith(_CAUSAL_SUFFIXES) for a in archs):
        raise RewardSpecError(f"reward 'judge': {str(path)!r} holds {archs}, not a generative model "
                              "(AutoModelForCausalLM)")
    return folder


def _head_rows(folder: Path) -> int | None:
    """Output rows of a classifier head in the safetensors headers (``score.weight`` of the decoder
    classifiers, ``classifier[.out_proj].weight`` of the encoders), None if there is none. Reads only
    the JSON header of each file (8-byte little-endian length, then JSON), not the weights; needed
    because a config saved with the default two labels does not list them."""
    heads = ("score.weight", "classifier.weight", "classifier.out_proj.weight")
    for f in _weight_files(folder):
        try:
            with open(f, "rb") as fh:
                header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        except (OSError, ValueError, struct.error):
            continue
        for name, entry in header.items():
            if name.split(".", 1)[-1] in heads or name in heads:
                if isinstance(entry, dict) and entry.get("shape"):
                    return int(entry["shape"][0])
    return None


def _check_common(kind: str, params: dict[str, Any]) -> None:
    if params.get("path") is None:
        raise RewardSpecError(f"reward {kind!r} needs a 'path': a local folder saved with save_pretrained")
    bs = params.get("batch_size", 8)
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise RewardSpecError(f"reward {kind!r}: batch_size must be a positive integer, got {bs!r}")
    ml = params.get("max_length")
    if ml is not None and (isinstance(ml, bool) or not isinstance(ml, int) or ml < 1):
        raise RewardSpecError(f"reward {kind!r}: max_length must be a positive integer or null, got {ml!r}")
    dtype = params.get("dtype", "float32")
    if dtype not in _DTYPES:
        raise RewardSpecError(f"reward {kind!r}: dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    device = params.get("device")
    if device is not None:
        import torch

        try:
            ok = device == "auto" or torch.device(device).type in ("cpu", "cuda", "mps", "xpu")
        except (RuntimeError, TypeError):
            ok = False
        if not ok:
            raise RewardSpecError(f"reward {kind!r}: device must be cpu, cuda, cuda:N or auto, got {device!r}")


def _check_normalize(normalize: Any) -> None:
    if normalize is None:
        return
    if not isinstance(normalize, dict) or not normalize or set(normalize) - {"mean", "std"}:
        raise RewardSpecError(f"reward 'reward_model': normalize must be {{mean: m, std: s}}, got {normalize!r}")
    for key, value in normalize.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise RewardSpecError(f"reward 'reward_model': normalize.{key} must be a finite number, got {value!r}")
    if "std" in normalize and normalize["std"] <= 0:
        raise RewardSpecError(f"reward 'reward_model': normalize.std must be positive, got {normalize['std']!r}")
