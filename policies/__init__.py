"""The Quillan council policy (a Hugging Face causal LM) and policy wrappers.

Importing ``policies`` registers ``QuillanConfig`` / ``QuillanModel`` / ``QuillanForCausalLM``
with ``AutoConfig``, ``AutoModel`` and ``AutoModelForCausalLM`` (model_type ``"quillan"``), and
``CouncilHeadConfig`` / ``CouncilHead`` (model_type ``"ccrl_council_head"``), so
``AutoModelForCausalLM.from_pretrained(dir)`` loads a saved Quillan or council-head checkpoint.

- ``QuillanConfig`` (``.preset("toy" | "small" | "base", **overrides)``), ``count_parameters``
- ``QuillanForCausalLM``: ``logits`` are log π_Ω of the council mixture (``modeling_quillan``)
- ``CouncilHead``: an overseer and persona heads on any ``AutoModelForCausalLM`` (``council_head``)
- ``policies.ternary``: ``BitLinear`` and the ternary arithmetic
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from policies.configuration_quillan import QuillanConfig, QuillanConfigError, count_parameters
from policies.council_head import CouncilHead, CouncilHeadConfig, PersonaMixtureHead
from policies.modeling_quillan import (
    QuillanCausalLMOutput,
    QuillanForCausalLM,
    QuillanInputError,
    QuillanModel,
)

AutoConfig.register("quillan", QuillanConfig, exist_ok=True)
AutoModel.register(QuillanConfig, QuillanModel, exist_ok=True)
AutoModelForCausalLM.register(QuillanConfig, QuillanForCausalLM, exist_ok=True)
AutoConfig.register("ccrl_council_head", CouncilHeadConfig, exist_ok=True)
AutoModelForCausalLM.register(CouncilHeadConfig, CouncilHead, exist_ok=True)

__all__ = [
    "CouncilHead",
    "CouncilHeadConfig",
    "PersonaMixtureHead",
    "QuillanCausalLMOutput",
    "QuillanConfig",
    "QuillanConfigError",
    "QuillanForCausalLM",
    "QuillanInputError",
    "QuillanModel",
    "count_parameters",
]
