"""The package layers: ccrl → policies → rewards, imports only downward, and what crosses them
(the error root, the policy interface, the council formulas)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> set[str]:
    """Every module a source file imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("package", ["policies", "rewards"])
def test_policies_and_rewards_never_import_ccrl(package):
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in _imported_modules(path) if _top(m) == "ccrl")
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_rewards_import_nothing_of_policies_and_policies_only_the_error_root():
    for path in sorted((ROOT / "rewards").rglob("*.py")):
        assert not [m for m in _imported_modules(path) if _top(m) == "policies"], path
    for path in sorted((ROOT / "policies").rglob("*.py")):
        from_rewards = {m for m in _imported_modules(path) if _top(m) == "rewards"}
        assert from_rewards <= {"rewards.errors", "rewards.errors.InputError"}, (path, from_rewards)


@pytest.mark.parametrize("first, second", [("ternary", "packed"), ("packed", "ternary")])
def test_ternary_and_packed_import_in_either_order(first, second):
    code = (
        f"import policies.{first}, policies.{second}\n"
        "from policies.ternary import BitLinear, pack_ternary, ternary_linear, PackedTernary, quantize_weight\n"
        "import policies.packed as P, policies.quantization as Q\n"
        "assert pack_ternary is P.pack_ternary and ternary_linear is P.ternary_linear\n"
        "assert PackedTernary is P.PackedTernary and quantize_weight is Q.quantize_weight\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_every_bad_input_error_is_a_ccrl_error():
    from ccrl.errors import USER_ERRORS, CcrlError, RewardError
    from policies import QuillanConfigError, QuillanInputError
    from policies.errors import PackError, PolicyCheckpointError, PrecisionError
    from rewards import UnknownRewardError
    from rewards.errors import RewardSpecError

    for cls in (QuillanConfigError, QuillanInputError, PackError, PolicyCheckpointError, PrecisionError,
                UnknownRewardError, RewardSpecError, RewardError):
        assert issubclass(cls, CcrlError) and issubclass(cls, USER_ERRORS), cls
    for cls in (QuillanConfigError, QuillanInputError, PackError, PrecisionError):
        assert issubclass(cls, ValueError), cls     # they replace ValueErrors


@pytest.mark.parametrize("error", ["policy", "reward"])
def test_cli_reports_policy_and_reward_errors_as_bad_input(error, monkeypatch, capsys):
    import ccrl.cli as cli
    from policies.errors import PackError
    from rewards.errors import RewardError

    exc = PackError("pack_model_: the model is in training mode") if error == "policy" else RewardError("bad row")

    def boom(args):
        raise exc

    monkeypatch.setattr(cli, "_dispatch", boom)
    assert cli.main(["kernels", "info"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ccrl: error: ") and str(exc) in " ".join(err.split()) and "Traceback" not in err


# --------------------------------------------------------------------------- the policy interface


def _quillan():
    from policies import QuillanConfig, QuillanForCausalLM

    torch.manual_seed(0)
    return QuillanForCausalLM(QuillanConfig.preset("toy", routing="noaux_bias"))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def test_policy_interface_answers_for_quillan_council_head_and_plain_models():
    from policies import CouncilHead
    from policies import interface as api

    quillan, llama = _quillan(), _llama()
    head = CouncilHead(_llama(), num_personas=4, persona_head_rank=2)
    assert api.has_council(quillan) and api.has_council(head) and not api.has_council(llama)
    assert api.accepts_routes(quillan) and api.accepts_routes(head) and not api.accepts_routes(llama)
    assert api.overseer_route_index(quillan) == quillan.config.num_layers
    assert api.overseer_route_index(head) == 0 and api.overseer_route_index(llama) is None
    buffers = api.router_load_buffers(quillan)
    assert len(buffers) == quillan.config.num_layers
    assert {id(b) for b in buffers} == {id(b) for n, b in quillan.named_buffers() if n.endswith("load_counts")}
    assert api.router_load_buffers(llama) == [] and api.router_bias_update(llama) is None
    update = api.router_bias_update(quillan)
    buffers[0] += 3
    update()
    assert all(int(b.sum()) == 0 for b in buffers)


def test_the_model_computes_the_council_formulas_of_council_math():
    from policies import council_math
    from policies.council_head import mixture_log_probs, mixture_log_probs_reference

    model = _quillan().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    with torch.no_grad():
        out = model(input_ids=ids, output_persona_logprobs=True)
    alpha = out.council_weights                                                   # (B, T, P)
    torch.testing.assert_close(out.council_entropy, council_math.council_entropy(alpha), rtol=0, atol=1e-6)
    x = torch.randn(3, 4, 7, dtype=torch.float64)                                 # (N, P, V)
    log_w = torch.randn(3, 4, dtype=torch.float64).log_softmax(-1)                # (N, P)
    want = council_math.mixture_logprobs(log_w, x.log_softmax(-1))
    assert torch.equal(mixture_log_probs_reference(x, log_w), want)
    torch.testing.assert_close(mixture_log_probs(x, log_w), want, rtol=0, atol=1e-12)
    logits = torch.randn(3, 6, dtype=torch.float64)
    idx = logits.topk(2, dim=-1).indices
    dense = council_math.topk_log_alpha(logits.log_softmax(-1), 2)
    torch.testing.assert_close(council_math.kept_log_alpha(logits, idx), dense.gather(-1, idx), rtol=0, atol=1e-12)


def test_ccrl_objectives_export_the_council_math_functions():
    import ccrl.objectives as O
    from policies import council_math

    alpha = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    assert torch.equal(O.council_entropy(alpha), council_math.council_entropy(alpha))
    la = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    assert torch.equal(O.topk_log_alpha(la, 2), council_math.topk_log_alpha(la, 2))
