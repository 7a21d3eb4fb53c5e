"""BitLinear (QAT with the straight-through estimator) against the quantisation arithmetic of policies.ternary."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ccrl.errors import CcrlError
from policies.ternary import (
    BitLinear,
    PrecisionError,
    dequantize_activation,
    dequantize_weight,
    fake_quantize_activation,
    fake_quantize_weight,
    frozen_quantization,
    quantize_activation,
    quantize_stacked,
    quantize_weight,
    quantize_weight_binary,
)


def reference_output(layer: BitLinear, x: torch.Tensor) -> torch.Tensor:
    """y = deq(q(x)) · deq(q(W))ᵀ built from the shared arithmetic, outside the layer."""
    quant = quantize_weight if layer.precision == "ternary" else quantize_weight_binary
    w = dequantize_weight(*quant(layer.weight, layer.group_size), layer.group_size)
    xq = dequantize_activation(*quantize_activation(x, layer.act_block_size), layer.act_block_size)
    return F.linear(xq, w, layer.bias)


@pytest.mark.parametrize("precision", ["ternary", "binary"])
@pytest.mark.parametrize("group, block", [(128, 64), (None, None), (64, 32), (128, None)])
@pytest.mark.parametrize("k", [256, 200])   # 200: ragged last group and block
def test_bitlinear_equals_dequantised_reference(precision, group, block, k):
    torch.manual_seed(0)
    layer = BitLinear(k, 24, bias=True, precision=precision, group_size=group, act_block_size=block)
    x = torch.randn(3, 5, k) * 2.0
    assert torch.equal(layer(x), reference_output(layer, x))


def test_ternary_weights_hand_computed():
    # one scale per tensor: γ = mean|W| = (0.5 + 1.0 + 0.1 + 2.0) / 4 = 0.9
    w = torch.tensor([[0.5, -1.0, 0.1, 2.0]])
    q, scale = quantize_weight(w, None)
    assert q.tolist() == [[1, -1, 0, 1]]
    assert scale.item() == pytest.approx(0.9 + 1e-5, abs=1e-7)
    deq = fake_quantize_weight(w, "ternary", None)
    assert torch.allclose(deq, torch.tensor([[0.90001, -0.90001, 0.0, 0.90001]]), atol=1e-6)


def test_binary_weights_hand_computed():
    w = torch.tensor([[0.5, -1.0, 0.0, 2.0]])          # sign(0) = +1; scale = mean|W| = 0.875
    q, scale = quantize_weight_binary(w, None)
    assert q.tolist() == [[1, -1, 1, 1]]
    assert scale.item() == pytest.approx(0.875, abs=1e-7)


@pytest.mark.parametrize("group", [128, 32, None])
def test_weights_exactly_ternary_after_quantisation(group):
    torch.manual_seed(1)
    layer = BitLinear(300, 40, precision="ternary", group_size=group)
    q, scale = layer.quantized_weight()
    assert set(q.unique().tolist()) <= {-1, 0, 1} and q.dtype == torch.int8
    deq = fake_quantize_weight(layer.weight, "ternary", group).detach()
    from policies.ternary import expand_scale

    ratio = deq / expand_scale(scale, 300, group)           # exactly −1, 0 or +1 everywhere
    assert set(ratio.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert (ratio == 0).any() and (ratio == 1).any() and (ratio == -1).any()


def test_ste_gradients_are_the_dequantised_layers_gradients():
    torch.manual_seed(2)
    layer = BitLinear(130, 7, precision="ternary", group_size=64, act_block_size=32)
    x = torch.randn(4, 130, requires_grad=True)
    target = torch.randn(4, 7)
    F.mse_loss(layer(x), target).backward()
    # The same loss on leaf copies of the dequantised weight and activation.
    w_leaf = fake_quantize_weight(layer.weight, "ternary", 64).detach().requires_grad_()
    x_leaf = fake_quantize_activation(x, 32).detach().requires_grad_()
    F.mse_loss(F.linear(x_leaf, w_leaf), target).backward()
    assert layer.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    torch.testing.assert_close(layer.weight.grad, w_leaf.grad, rtol=0, atol=1e-7)
    torch.testing.assert_close(x.grad, x_leaf.grad, rtol=0, atol=1e-7)


def test_fp_precision_is_a_plain_linear():
    torch.manual_seed(3)
    layer = BitLinear(16, 8, precision="fp")
    x = torch.randn(2, 16)
    assert torch.equal(layer(x), F.linear(x, layer.weight))


def test_stacked_weights_quantise_per_row():
    torch.manual_seed(4)
    w = torch.randn(3, 10, 96)                               # (P, N, K): each of the 30 rows on its own
    stacked = fake_quantize_weight(w, "ternary", 32)
    rows = torch.cat([fake_quantize_weight(w[p], "ternary", 32) for p in range(3)])
    assert torch.equal(stacked.reshape(30, 96), rows)


def test_qat_fits_a_ternary_target():
    # STE training drives a BitLinear to a ternary target map: the loss falls by > 90%.
    torch.manual_seed(5)
    target = BitLinear(64, 16, precision="ternary", group_size=None, act_block_size=None)
    layer = BitLinear(64, 16, precision="ternary", group_size=None, act_block_size=None)
    opt = torch.optim.Adam(layer.parameters(), lr=3e-2)
    x = torch.randn(256, 64)
    y = target(x).detach()
    first = None
    for _ in range(150):
        loss = F.mse_loss(layer(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first


def test_bad_precision_and_sizes_raise():
    with pytest.raises(PrecisionError, match="precision"):
        BitLinear(4, 4, precision="int4")
    with pytest.raises(CcrlError, match="group_size"):
        BitLinear(4, 4, group_size=0)


def test_packed_names_are_lazy():
    import policies.ternary as ternary

    with pytest.raises(AttributeError):
        ternary.no_such_name  # noqa: B018


@pytest.mark.parametrize("precision", ["ternary", "binary"])
@pytest.mark.parametrize("group", [128, 64, None])
def test_quantize_stacked_is_what_fake_quantisation_uses(precision, group):
    torch.manual_seed(6)
    from policies.ternary import expand_scale

    stack = torch.randn(5, 12, 200)                           # 5 matrices, ragged last group
    q, scale = quantize_stacked(stack, precision, group)
    assert q.shape == (5, 12, 200) and q.dtype == torch.int8
    assert scale.shape == ((5, 1, 1) if group is None else (5, 12, -(-200 // group)))
    deq = q.float() * expand_scale(scale, 200, group)
    assert torch.equal(deq, fake_quantize_weight(stack, precision, group))
    # 2-D weights: exactly quantize_weight / quantize_weight_binary
    q2, s2 = quantize_stacked(stack[0], precision, group)
    ref = (quantize_weight if precision == "ternary" else quantize_weight_binary)(stack[0], group)
    assert torch.equal(q2, ref[0]) and torch.equal(s2, ref[1])
    # per-matrix scales: each matrix of the stack alone gives the same values
    assert torch.equal(fake_quantize_weight(stack[2:3], precision, group), deq[2:3])


def test_frozen_quantization_reuses_until_the_weight_changes():
    torch.manual_seed(7)
    layer = BitLinear(64, 8)
    x = torch.randn(2, 64)
    with frozen_quantization():
        a = fake_quantize_weight(layer.weight)
        b = fake_quantize_weight(layer.weight)
        assert a.data_ptr() == b.data_ptr()                   # computed once
        y0 = layer(x)
        with torch.no_grad():
            layer.weight.mul_(-1.0)                           # an in-place update bumps the version
        torch.testing.assert_close(layer(x), -y0, rtol=0, atol=1e-6)
        import policies.ternary as ternary

        assert len(ternary._FROZEN) == 1                      # replaced, not accumulated
    c = fake_quantize_weight(layer.weight)
    d = fake_quantize_weight(layer.weight)
    assert c.data_ptr() != d.data_ptr()                       # no caching outside the block


def test_quantized_parameters_and_their_learning_rate():
    """``quantized_parameters`` finds exactly the latent weights the forward quantises, and a stage
    with ``quantized_lr_scale`` trains them at ``lr × scale`` in a second AdamW group."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from ccrl.config import SFTStage
    from ccrl.trainers.base import RunContext, Trainer
    from policies import QuillanConfig, QuillanForCausalLM
    from policies.ternary import BitLinear, quantized_parameters

    cfg = QuillanConfig.preset("toy", vocab_size=40, attention_precision="ternary", micro_precision="ternary")
    model = QuillanForCausalLM(cfg)
    found = {id(p) for p in quantized_parameters(model)}
    names = {n for n, p in model.named_parameters() if id(p) in found}
    bit = {f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, BitLinear) and mod.precision != "fp"}
    assert bit and bit <= names
    for layer in range(cfg.num_layers):
        pre = f"model.layers.{layer}.council"
        assert {f"{pre}.experts.gate_up_proj", f"{pre}.experts.down_proj",
                f"{pre}.micro.down.weight", f"{pre}.micro.up.weight"} <= names
    assert not any(("norm" in n or "embed" in n or "overseer" in n or "router" in n) for n in names), names
    assert len(found) == len(names)

    ctx = RunContext(output_dir=".", seed=0, stage_index=0, stage_name="sft", accelerator=Accelerator(cpu=True),
                     tokenizer=SimpleNamespace())
    trainer = Trainer(SFTStage(kind="sft", steps=1, lr=1e-3, quantized_lr_scale=0.25), model, ctx)
    groups = trainer.optimizer.param_groups
    assert [g["lr"] for g in groups] == [pytest.approx(1e-3), pytest.approx(2.5e-4)]
    assert {id(p) for p in groups[1]["params"]} == found
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == sum(1 for p in model.parameters() if p.requires_grad)
    single = Trainer(SFTStage(kind="sft", steps=1, lr=1e-3), QuillanForCausalLM(cfg), ctx).optimizer.param_groups
    assert len(single) == 1
