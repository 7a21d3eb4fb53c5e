"""Conversational rows (TRL's formats): checking message lists and rendering them with a chat template.

A *conversation* is a non-empty list of messages ``{"role": str, "content": str}`` (further keys
such as ``name`` are kept and handed to the template). Rendering uses the tokenizer's own chat
template, as TRL does (``trl.data_utils.apply_chat_template``):

- a prompt whose last message is from the user (or a tool, or the system) is rendered with
  ``add_generation_prompt=True``, so the text ends where the assistant's reply begins; one whose
  last message is the assistant's is rendered with ``continue_final_message=True`` (the model
  continues that message);
- a completion of a preference pair is the text the template adds after the prompt:
  ``render(prompt + chosen)[len(prompt_text):]`` (with the prompt text cut to the common prefix
  of the two, as TRL does for templates such as DeepSeek-R1's that change the generation prompt).
  No EOS is appended to it: the template writes the end of the assistant's turn;
- an SFT conversation is cut into segments by rendering it incrementally (see
  :func:`conversation_segments`): the loss covers the assistant turns only.

How the assistant spans are found (``conversation_segments``). For the k-th message, when it is
the assistant's, two renders bracket it: ``before = render(messages[:k], add_generation_prompt=True)``
and ``upto = render(messages[:k + 1])``. The text ``upto[len(before):]`` is the assistant turn as
the template writes it: its content and the template's end-of-turn marker (``<|im_end|>\\n`` for
ChatML, ``<|eot_id|>`` for Llama 3), which is what the model must learn to emit so that it stops.
The generation prompt (``<|im_start|>assistant\\n``) belongs to ``before`` and is not trained on,
exactly the tokens a rollout is given. Every render must extend the previous one (a template that
rewrites earlier turns, e.g. one that drops past reasoning, is refused with a ``DataError``). The
segments are tokenised one by one and concatenated, so the trained tokens are the ones the model
produces after that prompt at generation time; no ``{% generation %}`` markers are needed.
"""

from __future__ import annotations

import json
from typing import Any

from ccrl.errors import DataError

ROLES_BEFORE_REPLY = ("user", "system", "tool")


def is_conversation(value: Any) -> bool:
    """Whether ``value`` looks like a message list (a list whose items are dicts with a ``role``)."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def check_conversation(value: Any, where: str) -> list[dict]:
    """``value`` as a list of messages, or a DataError naming ``where`` (file, row, column)."""
    if not isinstance(value, list):
        raise DataError(f"{where}: expected a list of messages [{{role, content}}, ...], got "
                        f"{type(value).__name__} {value!r}")
    if not value:
        raise DataError(f"{where}: the list of messages is empty")
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {j} is a {type(m).__name__}, expected {{role, content}}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role.strip():
            raise DataError(f"{where}: message {j} has no 'role' (a string such as 'user' or 'assistant'); "
                            f"it has keys {sorted(m)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {j} ({role}) needs a string 'content', got "
                            f"{type(content).__name__} {content!r}")
    return value


def conversation_key(messages: list[dict]) -> str:
    """A canonical string of a conversation: what decides its train / held-out split."""
    return json.dumps([{"role": m["role"], "content": m["content"]} for m in messages], ensure_ascii=False,
                      separators=(",", ":"))


def extract_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) of a preference row with an implicit prompt: the longest common
    prefix of whole messages is the prompt (``trl.data_utils.extract_prompt``)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def require_template(tokenizer, where: str) -> None:
    """A DataError naming ``where`` when ``tokenizer`` cannot render conversations."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{where}: the rows are conversations (lists of {{role, content}} messages) but the tokenizer has no "
            f"chat template to render them with; start from a checkpoint whose tokenizer has one "
            f"(model: {{checkpoint: DIR}}, tokenizer_config.json or chat_template.jinja), or give plain-text "
            f"prompts")


def render(tokenizer, messages: list[dict], where: str, **kwargs) -> str:
    """``tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)``, errors named by ``where``."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as e:  # jinja2 errors (TemplateError, raise_exception in the template), TypeError, ...
        raise DataError(f"{where}: the tokenizer's chat template cannot render this conversation: "
                        f"{type(e).__name__}: {e}") from None
    if not isinstance(text, str):
        raise DataError(f"{where}: the chat template returned {type(text).__name__}, expected text")
    return text


def render_prompt(tokenizer, messages: list[dict], where: str) -> str:
    """The prompt text a reply is generated after (see the module docstring)."""
    if messages[-1]["role"] == "assistant":
        return render(tokenizer, messages, where, continue_final_message=True)
    return render(tokenizer, messages, where, add_generation_prompt=True)


def render_pair(tokenizer, prompt: list[dict], chosen: list[dict], rejected: list[dict],
                where: str) -> tuple[str, str, str]:
    """(prompt text, chosen text, rejected text) of a conversational preference pair, as TRL renders it."""
    text = render_prompt(tokenizer, prompt, where) if prompt else ""
    full_c = render(tokenizer, prompt + chosen, where)
    full_r = render(tokenizer, prompt + rejected, where)
    n = min(_common_prefix(text, full_c), _common_prefix(text, full_r))
    text = text[:n]
    return text, full_c[n:], full_r[n:]


def conversation_segments(tokenizer, messages: list[dict], where: str) -> list[tuple[str, bool]]:
    """The rendered conversation cut into ``(text, trained)`` segments; ``trained`` marks the
    assistant turns (see the module docstring). ``"".join(texts)`` is ``render(messages)``."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if k == 0:
            raise DataError(f"{where}: message 0 is an assistant turn; a conversation to train on starts with a "
                            f"system or user message")
        before = render(tokenizer, messages[:k], where, add_generation_prompt=True)
        upto = render(tokenizer, messages[: k + 1], where)
        if not before.startswith(done) or not upto.startswith(before):
            raise DataError(
                f"{where}: the chat template renders message {k} (assistant) inconsistently: the conversation up "
                f"to it does not extend the text rendered before it, so the assistant turn cannot be located "
                f"(templates that rewrite earlier turns are not supported for SFT)")
        segments += [(before[len(done):], False), (upto[len(before):], True)]
        done = upto
    if not segments:
        raise DataError(f"{where}: the conversation has no assistant message to train on")
    full = render(tokenizer, messages, where)
    if not full.startswith(done):
        raise DataError(f"{where}: the chat template renders the whole conversation differently from its turns "
                        f"one by one; the assistant turns cannot be located")
    if full[len(done):]:
        segments.append((full[len(done):], False))
    return [(t, trained) for t, trained in segments if t]


def encode_segments(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of segments tokenised one by one (mask 1 on trained segments)."""
    ids: list[int] = []
    mask: list[int] = []
    for text, trained in segments:
        part = tokenizer.encode(text, add_special_tokens=False)
        ids += part
        mask += [int(trained)] * len(part)
    return ids, mask


def last_reply_split(messages: list[dict]) -> tuple[list[dict], str | None]:
    """(the messages before the last assistant turn, that turn's content) of an SFT conversation:
    the prompt its held-out evaluation decodes from."""
    for k in range(len(messages) - 1, -1, -1):
        if messages[k]["role"] == "assistant":
            return messages[:k], messages[k]["content"]
    return messages, None


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
