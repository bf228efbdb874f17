"""LoRA / BaLoRA layers on plain nn.Linear: identity at init, merge, closed-form moments, draws."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from matbalora.adapters import (
    BaLoRALinear,
    LoRALinear,
    NoiseContext,
    inject_adapters,
    mark_only_adapters_trainable,
    neg_kl_log_uniform,
    select_targets,
    total_kl,
)
from matbalora.config import AdapterConfig


def _linear(d_in=12, d_out=5, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out)


def test_lora_starts_equal_to_base():
    base = _linear()
    x = torch.randn(7, 12)
    ref = base(x).detach()
    layer = LoRALinear(base, AdapterConfig(rank=3))
    assert torch.allclose(layer(x), ref, atol=1e-6)


def test_lora_merge_unmerge_restores_and_matches():
    layer = LoRALinear(_linear(), AdapterConfig(rank=3))
    nn.init.normal_(layer.lora_B)
    x = torch.randn(9, 12)
    before = layer(x).detach()
    base_before = layer.base(x).detach()
    assert not torch.allclose(before, base_before, atol=1e-3)  # random B really changes the output
    layer.merge()
    assert torch.allclose(layer(x), before, atol=1e-5)
    layer.unmerge()
    assert torch.allclose(layer(x), before, atol=1e-5)
    assert torch.allclose(layer.base(x), base_before, atol=1e-5)
    with pytest.raises(RuntimeError):
        layer.unmerge()


def test_merge_refuses_nan():
    layer = LoRALinear(_linear(), AdapterConfig(rank=2))
    with torch.no_grad():
        layer.lora_B.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        layer.merge()


def test_balora_tiny_noise_equals_lora():
    cfg = AdapterConfig(rank=4, bayesian=True, log_a_min=-40.0, log_a_init=-40.0)
    ctx = NoiseContext()
    bal = BaLoRALinear(_linear(), cfg, ctx)
    lora = LoRALinear(_linear(), AdapterConfig(rank=4))
    lora.load_state_dict({k: v for k, v in bal.state_dict().items() if k != "log_a"})
    nn.init.normal_(bal.lora_B)
    lora.lora_B.data.copy_(bal.lora_B.data)
    x = torch.randn(6, 12)
    with ctx.sampling("sample", torch.Generator().manual_seed(1)):
        assert torch.allclose(bal(x), lora(x), atol=1e-6)


@pytest.mark.parametrize("noise", ["per_crystal", "per_row"])
def test_sampled_low_rank_moments_match_closed_form(noise):
    cfg = AdapterConfig(rank=3, bayesian=True, noise=noise, log_a_init=-1.0)
    ctx = NoiseContext()
    layer = BaLoRALinear(_linear(d_in=6), cfg, ctx)
    with torch.no_grad():
        layer.log_a.copy_(torch.tensor([-2.0, -0.5, 0.5]))
    x = torch.randn(1, 6).repeat(20000, 1)  # one row per draw (each row its own group)
    with torch.no_grad(), ctx.sampling("sample", torch.Generator().manual_seed(0)):
        h = layer.low_rank(x)
    M, a = layer.lora_A.detach(), layer.log_a.detach().exp()
    mean = (x[0] @ M.T)
    var = a * ((M * M) @ (x[0] * x[0]))
    assert torch.allclose(h.mean(0), mean, atol=4 * (var / 20000).sqrt().max().item())
    assert torch.allclose(h.var(0), var, rtol=0.05)


def test_rows_of_a_group_share_one_draw_and_groups_differ():
    cfg = AdapterConfig(rank=3, bayesian=True, log_a_init=0.0)
    ctx = NoiseContext()
    layer = BaLoRALinear(_linear(d_in=6), cfg, ctx)
    layer.row_kind = "atom"
    x_row = torch.randn(1, 6)
    x = x_row.repeat(5, 1)
    ctx.owners = {"atom": torch.tensor([0, 0, 0, 1, 1])}
    with torch.no_grad(), ctx.sampling("sample", torch.Generator().manual_seed(0)):
        h = layer.low_rank(x)
    assert torch.allclose(h[0], h[1]) and torch.allclose(h[0], h[2]) and torch.allclose(h[3], h[4])
    assert not torch.allclose(h[0], h[3])
    # unsorted owners give the same per-group draw as sorted ones
    ctx.owners = {"atom": torch.tensor([1, 0, 1, 0, 0])}
    with torch.no_grad(), ctx.sampling("sample", torch.Generator().manual_seed(0)):
        h2 = layer.low_rank(x)
    assert torch.allclose(h2[1], h[0]) and torch.allclose(h2[0], h[3])


def test_mean_mode_is_deterministic_posterior_mean():
    ctx = NoiseContext()
    layer = BaLoRALinear(_linear(), AdapterConfig(rank=3, bayesian=True, log_a_init=1.0), ctx)
    x = torch.randn(4, 12)
    assert torch.equal(layer.low_rank(x), x @ layer.lora_A.T)


def test_merged_balora_refuses_to_sample():
    ctx = NoiseContext()
    layer = BaLoRALinear(_linear(), AdapterConfig(rank=3, bayesian=True), ctx)
    layer.merge()
    with ctx.sampling("sample"), pytest.raises(RuntimeError, match="posterior mean"):
        layer(torch.randn(2, 12))


def test_kl_matches_molchanov_formula():
    log_a = torch.tensor([-6.0, 0.0, 1.5])
    k1, k2, k3 = 0.63576, 1.87320, 1.48695
    expected = [k1 / (1 + math.exp(-(k2 + k3 * la))) - 0.5 * math.log1p(math.exp(-la)) - k1 for la in log_a.tolist()]
    assert torch.allclose(neg_kl_log_uniform(log_a), torch.tensor(expected), atol=1e-6)
    ctx = NoiseContext()
    layer = BaLoRALinear(_linear(d_in=10), AdapterConfig(rank=3, bayesian=True), ctx)
    with torch.no_grad():
        layer.log_a.copy_(log_a)
    assert math.isclose(layer.kl().item(), -10 * sum(expected), rel_tol=1e-5)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.ModuleDict({"inner": nn.Linear(4, 4), "other": nn.Linear(4, 4)})
        self.out = nn.Linear(4, 1)


def test_injection_targets_excludes_and_dry_run():
    model = _Toy()
    cfg = AdapterConfig(targets=(r"block\..*",), exclude=(r".*other",), rank=2)
    assert select_targets(model, cfg) == ["block.inner"]
    wrapped = inject_adapters(model, cfg)
    assert list(wrapped) == ["block.inner"] and isinstance(model.block["inner"], LoRALinear)
    mark_only_adapters_trainable(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"block.inner.lora_A", "block.inner.lora_B"}
    assert total_kl(model).item() == 0.0


def test_no_match_lists_available_layers():
    with pytest.raises(ValueError, match=r"available linear layers: \['block.inner', 'block.other', 'out'\]"):
        select_targets(_Toy(), AdapterConfig(targets=(r"nothing",)))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="rank=0"):
        AdapterConfig(rank=0)
    with pytest.raises(ValueError, match="noise='sometimes'"):
        AdapterConfig(noise="sometimes")


def test_per_row_noise_has_finite_gradients_on_zero_input_rows():
    """Local reparameterisation takes sqrt of the variance: a zero input row (variance 0) must not
    give NaN gradients (it did, and the per-row benchmark run diverged at step 2)."""
    cfg = AdapterConfig(rank=3, bayesian=True, noise="per_row", log_a_init=-2.0)
    ctx = NoiseContext()
    layer = BaLoRALinear(_linear(d_in=6), cfg, ctx)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 6)
    x[1] = 0.0
    with ctx.sampling("sample", torch.Generator().manual_seed(0)):
        layer(x).sum().backward()
    for p in (layer.lora_A, layer.lora_B, layer.log_a):
        assert torch.isfinite(p.grad).all()


def test_last_blocks_keeps_the_highest_block_indices():
    model = nn.ModuleDict({
        "conv": nn.ModuleList([nn.ModuleDict({"lin": nn.Linear(4, 4)}) for _ in range(4)]),
        "bond": nn.ModuleList([nn.ModuleDict({"lin": nn.Linear(4, 4)}) for _ in range(3)]),
        "head": nn.Linear(4, 1),
    })
    every = select_targets(model, AdapterConfig(targets=(r"(conv|bond)\..*", r"head"), last_blocks=0))
    assert len(every) == 8
    assert select_targets(model, AdapterConfig(targets=(r"(conv|bond)\..*", r"head"), last_blocks=1)) == ["conv.3.lin", "head"]
    assert select_targets(model, AdapterConfig(targets=(r"(conv|bond)\..*",), last_blocks=2)) == ["conv.2.lin", "conv.3.lin", "bond.2.lin"]
    with pytest.raises(ValueError, match="last_blocks"):
        AdapterConfig(last_blocks=-1)


@pytest.mark.parametrize("dtype, width, out", [(torch.float32, 16, 8), (torch.bfloat16, 16, 8), (torch.float32, 5, 8), (torch.float32, 16, 6)])
def test_grouped_matmul_equals_one_matmul_per_block(dtype, width, out):
    """The grouped GEMM (and its fallback for shapes it does not take: width 5 or 6 float32 is not
    16-byte aligned; 16 x 6 runs forward but not backward) gives each row block its own matrix,
    empty blocks included, with the same gradients as a loop."""
    from matbalora.adapters import grouped_matmul

    torch.manual_seed(0)
    counts = [3, 0, 7, 1, 0, 5]
    x = torch.randn(sum(counts), width, dtype=dtype, requires_grad=True)
    mats = torch.randn(len(counts), width, out, requires_grad=True)
    got_out = grouped_matmul(x, counts, mats)
    ref = torch.cat([seg @ m.to(dtype) for seg, m in zip(torch.split(x, counts), mats.unbind(0))])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got_out.shape == (sum(counts), out) and torch.allclose(got_out.float(), ref.float(), atol=tol, rtol=tol)
    g = torch.randn_like(got_out)
    got, want = torch.autograd.grad(got_out, (x, mats), g), torch.autograd.grad(ref, (x, mats), g)
    for a, b in zip(got, want):
        assert torch.allclose(a.float(), b.float(), atol=10 * tol, rtol=10 * tol)
    summed = torch.autograd.grad(grouped_matmul(x, counts, mats).sum(), (x, mats))  # an expanded gradient
    ref = torch.cat([seg @ m.to(dtype) for seg, m in zip(torch.split(x, counts), mats.unbind(0))])
    for a, b in zip(summed, torch.autograd.grad(ref.sum(), (x, mats))):
        assert torch.allclose(a.float(), b.float(), atol=10 * tol, rtol=10 * tol)
    with pytest.raises(RuntimeError, match="row blocks"):
        grouped_matmul(x, counts[:-1], mats)
    assert grouped_matmul(x[:0], [0] * len(counts), mats).shape == (0, out)
