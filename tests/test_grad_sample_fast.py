"""synthgate's per-sample gradient hooks and samplers (privacy/grad_sample.py), each checked against plain autograd
run on one example at a time.

An "example" is a run of K consecutive rows (the trainer's noise multiplicity); the samplers return, per example,
`scale` × the sum of its rows' gradients, and the hooks turn that into Opacus' convention averaged over the K rows.
"""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privacy import grad_sample
from privacy.dp import DPConfig, make_strategy
from privacy.grad_sample import (
    conv2d_grad_sample,
    fold_noise_multiplicity,
    group_norm_grad_sample,
    linear_grad_sample,
    use_fast_grad_samples,
)
from synth.model import build_unet, preset


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _reference(layer: nn.Module, x: torch.Tensor, backprops: torch.Tensor, k: int, scale: float) -> dict:
    """scale × Σ over each example's k rows of d(Σ layer(x_r)·backprops_r)/dθ, by autograd one example at a time."""
    out = {p: [] for p in layer.parameters()}
    for i in range(x.shape[0] // k):
        rows = slice(i * k, (i + 1) * k)
        layer.zero_grad()
        (layer(x[rows]) * backprops[rows]).sum().backward()
        for p in layer.parameters():
            out[p].append(p.grad * scale)
    return {p: torch.stack(gs) for p, gs in out.items()}


def _check_sampler(sampler, layer, x, k: int, scale: float = 2.5) -> None:
    with torch.no_grad():
        backprops = torch.randn_like(layer(x))
    got = sampler(layer, [x], backprops, scale=scale, rows_per_example=k)
    want = _reference(layer, x, backprops, k, scale)
    assert set(got) == set(want)
    for p, g in got.items():
        assert g.shape == (x.shape[0] // k, *p.shape)
        assert _rel_err(g, want[p]) < 1e-5


# ------------------------------------------------------------------------------------------------ samplers


CONVS = [
    pytest.param(dict(in_channels=4, out_channels=6, kernel_size=3, padding=1), id="3x3"),
    pytest.param(dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1), id="downsample"),
    pytest.param(dict(in_channels=4, out_channels=6, kernel_size=1), id="1x1"),
    pytest.param(dict(in_channels=4, out_channels=6, kernel_size=1, bias=False), id="1x1-nobias"),
    pytest.param(
        dict(in_channels=4, out_channels=6, kernel_size=(3, 2), padding=(2, 0), dilation=(2, 1), groups=2),
        id="dilated-grouped",
    ),
    pytest.param(dict(in_channels=4, out_channels=6, kernel_size=3, padding="same", bias=False), id="opacus-fallback"),
]


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("conv", CONVS)
def test_conv_sampler_sums_each_examples_rows(conv, channels_last, k):
    torch.manual_seed(0)
    layer = nn.Conv2d(**conv)
    x = torch.randn(4 * k, 4, 9, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    _check_sampler(conv2d_grad_sample, layer, x, k)


@pytest.mark.parametrize("k", [1, 2])
def test_conv_sampler_unfold_path_sums_rows_too(k, monkeypatch):
    monkeypatch.setattr(grad_sample, "GROUPED_CONV_MIN_PIXELS", 10**9)  # every map "small": Opacus' unfold
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 5, 3, padding=1)
    _check_sampler(
        conv2d_grad_sample, layer, torch.randn(3 * k, 3, 7, 7).contiguous(memory_format=torch.channels_last), k
    )


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", ["2d", "tokens", "tokens-transposed", "4d"])
def test_linear_sampler_sums_each_examples_rows(shape, bias, k):
    torch.manual_seed(0)
    layer = nn.Linear(6, 5, bias=bias)
    n = 3 * k
    x = {
        "2d": lambda: torch.randn(n, 6),
        "tokens": lambda: torch.randn(n, 7, 6),
        # diffusers' attention feeds to_q/to_k/to_v a transposed (non-contiguous) view of the feature map
        "tokens-transposed": lambda: torch.randn(n, 6, 7).transpose(1, 2),
        "4d": lambda: torch.randn(n, 2, 4, 6),
    }[shape]()
    _check_sampler(linear_grad_sample, layer, x, k)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("offset", [0.0, 8.0])  # inputs far from zero mean: no cancellation trouble
@pytest.mark.parametrize("spatial", [(5, 5), (9,)])  # conv feature maps; attention's (B, C, tokens)
def test_group_norm_sampler_sums_each_examples_rows(spatial, offset, k):
    torch.manual_seed(0)
    layer = nn.GroupNorm(2, 6)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(3 * k, 6, *spatial) * 2 + offset
    _check_sampler(group_norm_grad_sample, layer, x, k)


# ------------------------------------------------------------------------------------------------ hooks


class _Toy(nn.Module):
    """The layer kinds and call patterns of the UNet, small: an embedding of an integer input and a LayerNorm
    (Opacus' samplers), a first conv whose input needs no gradient, a channels_last feature map, GroupNorm, token
    Linear layers on a transposed view, a Linear called twice, and a frozen Linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(3, 4)
        self.conv_in = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.to_q = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.shared = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x, y):
        h = self.conv_in(x) + self.embed(y)[:, :, None, None]
        h = self.norm(h).contiguous(memory_format=torch.channels_last)
        h = torch.nn.functional.silu(self.conv(h))
        b, c, hh, ww = h.shape
        tokens = h.reshape(b, c, -1).transpose(1, 2)
        tokens = self.shared(self.shared(self.ln(self.to_q(tokens))))
        tokens = self.frozen(tokens)
        return self.head(tokens.transpose(1, 2).reshape(b, c, hh, ww))


def _toy_batch(b: int, k: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b * k, 1, 6, 6, generator=g)
    y = torch.randint(0, 3, (b,), generator=g).repeat_interleave(k)
    target = torch.randn(b * k, 1, 6, 6, generator=g)
    return x, y, target


def _row_losses(model, x, y, target):
    return ((model(x, y) - target) ** 2).mean(dim=(1, 2, 3))


def _per_example_reference(model, x, y, target, b: int, k: int) -> dict[str, torch.Tensor]:
    """name → (B, *shape): gradient of each example's mean-over-K loss, one example at a time."""
    out: dict[str, list] = {n: [] for n, p in model.named_parameters() if p.requires_grad}
    for i in range(b):
        rows = slice(i * k, (i + 1) * k)
        model.zero_grad()
        _row_losses(model, x[rows], y[rows], target[rows]).mean().backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                out[n].append(p.grad.clone())
    return {n: torch.stack(gs) for n, gs in out.items()}


def _fast(model: nn.Module, k: int) -> GradSampleModule:
    gsm = GradSampleModule(model, loss_reduction="mean")
    assert use_fast_grad_samples(gsm, noise_multiplicity=k)
    return gsm


@pytest.mark.parametrize("k", [1, 3])
def test_hooks_give_autograd_per_example_gradients(k):
    torch.manual_seed(0)
    model = _Toy().train()
    reference = copy.deepcopy(model)
    b = 4
    x, y, target = _toy_batch(b, k)
    want = _per_example_reference(reference, x, y, target, b, k)

    gsm = _fast(model, k)
    _row_losses(gsm, x, y, target).mean().backward()
    fold_noise_multiplicity(gsm, batch_size=b, multiplicity=k)
    for name, p in model.named_parameters():
        if name.startswith("frozen"):
            assert not p.requires_grad and getattr(p, "grad_sample", None) is None and p.grad is None
            continue
        assert p.requires_grad
        assert p.grad_sample.shape == (b, *p.shape), name  # one row per example, not B·K
        assert _rel_err(p.grad_sample, want[name]) < 1e-5, name


def test_hooks_skip_the_discarded_batch_weight_gradients():
    """The speed-up itself: layers whose input needs a gradient record no weight gradient in autograd. The first
    layers (inputs are data or integer labels) keep theirs, so that their output has a gradient to hook."""
    torch.manual_seed(0)
    model = _Toy().train()
    gsm = _fast(model, 1)
    x, y, target = _toy_batch(3, 1)
    _row_losses(gsm, x, y, target).mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"embed.weight", "conv_in.weight", "conv_in.bias"}
    assert all(p.grad_sample is not None for p in model.parameters() if p.requires_grad)


def test_requires_grad_is_restored_when_a_forward_raises():
    torch.manual_seed(0)
    model = _Toy().train()
    gsm = _fast(model, 1)
    _, y, _ = _toy_batch(2, 1)
    with pytest.raises(RuntimeError):
        gsm(torch.randn(2, 2, 6, 6, requires_grad=True), y)  # conv_in wants 1 channel: raises inside its forward
    with pytest.raises(RuntimeError):
        model.conv(torch.randn(1, 3, 6, 6, requires_grad=True))  # wrong channel count, after the pre-hook ran
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["frozen.weight", "frozen.bias"]


def test_no_capture_when_disabled_in_eval_or_without_grad():
    torch.manual_seed(0)
    model = _Toy().train()
    gsm = _fast(model, 1)
    x, y, target = _toy_batch(2, 1)

    gsm.disable_hooks()
    _row_losses(gsm, x, y, target).mean().backward()
    assert all(p.grad_sample is None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)  # ordinary backward
    gsm.enable_hooks()

    with torch.no_grad():
        gsm(x, y)
    gsm.eval()
    _row_losses(gsm, x, y, target).mean().backward()
    assert all(p.grad_sample is None for p in model.parameters() if p.requires_grad)


def test_buffers_are_reused_only_once_the_samples_were_dropped():
    """Per-example gradients live in buffers kept across steps; Poisson batch sizes vary, so they are sliced (and
    grown); a backward never writes over samples still on `p.grad_sample`."""
    torch.manual_seed(0)
    model = _Toy().train()
    reference = copy.deepcopy(model)
    gsm = _fast(model, 1)
    storage = None
    for b in (4, 3, 5, 4):
        x, y, target = _toy_batch(b, 1, seed=b)
        want = _per_example_reference(reference, x, y, target, b, 1)
        _row_losses(gsm, x, y, target).mean().backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad_sample.shape[0] == b and _rel_err(p.grad_sample, want[name]) < 1e-5, name
        if b == 3:
            assert model.conv.weight.grad_sample.data_ptr() == storage  # rows of the batch-4 buffer
        storage = model.conv.weight.grad_sample.data_ptr()
        for p in model.parameters():
            p.grad_sample = None  # what the DP optimizer's zero_grad does


def test_second_backward_is_refused_under_poisson_and_listed_otherwise():
    torch.manual_seed(0)
    model = _Toy().train()
    gsm = _fast(model, 1)
    x, y, target = _toy_batch(2, 1)
    _row_losses(gsm, x, y, target).mean().backward()
    first = model.conv.weight.grad_sample.clone()
    _row_losses(gsm, x * 2, y, target).mean().backward()
    assert isinstance(model.conv.weight.grad_sample, list) and len(model.conv.weight.grad_sample) == 2
    assert torch.equal(model.conv.weight.grad_sample[0], first)  # not overwritten by the second backward
    with pytest.raises(RuntimeError, match="accumulated 2 backward passes"):
        fold_noise_multiplicity(gsm, batch_size=2, multiplicity=1)

    gsm.zero_grad()
    for p in model.parameters():
        p.grad_sample = None
    gsm.forbid_grad_accumulation()
    _row_losses(gsm, x, y, target).mean().backward()
    with pytest.raises(ValueError, match="grad accumulation"):
        _row_losses(gsm, x, y, target).mean().backward()


def test_fold_checks_rows_already_averaged_by_the_hooks():
    torch.manual_seed(0)
    model = _Toy().train()
    gsm = _fast(model, 2)
    x, y, target = _toy_batch(3, 2)
    _row_losses(gsm, x, y, target).mean().backward()
    before = model.conv.weight.grad_sample
    fold_noise_multiplicity(gsm, batch_size=3, multiplicity=2)
    assert model.conv.weight.grad_sample is before  # nothing left to average
    with pytest.raises(RuntimeError, match="average 2 rows per example, noise multiplicity is 4"):
        fold_noise_multiplicity(gsm, batch_size=3, multiplicity=4)
    with pytest.raises(RuntimeError, match="has 3 rows, expected batch 2"):
        fold_noise_multiplicity(gsm, batch_size=2, multiplicity=2)
    with pytest.raises(RuntimeError, match="6 rows, not a multiple of the noise multiplicity 4"):
        gsm2 = GradSampleModule(_Toy().train())
        use_fast_grad_samples(gsm2, noise_multiplicity=4)
        _row_losses(gsm2, x, y, target).mean().backward()


def test_install_is_idempotent_and_removable():
    gsm = _fast(_Toy().train(), 2)
    assert use_fast_grad_samples(gsm, noise_multiplicity=2)
    with pytest.raises(ValueError, match="noise multiplicity 2"):
        use_fast_grad_samples(gsm, noise_multiplicity=1)
    gsm.remove_hooks()  # Opacus' own removal takes ours too
    x, y, target = _toy_batch(2, 2)
    _row_losses(gsm, x, y, target).mean().backward()
    assert all(getattr(p, "grad_sample", None) is None for p in gsm._module.parameters())


def test_unsupported_layer_keeps_opacus_hooks():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x * self.s

    model = nn.Sequential(nn.Linear(3, 3), Scale()).train()
    gsm = GradSampleModule(model)
    assert not use_fast_grad_samples(gsm)
    model(torch.randn(4, 3, requires_grad=True)).sum().backward()
    assert model[1].s.grad_sample.shape == (4, 1)  # Opacus (functorch) still computes it


# ------------------------------------------------------------------------------------------------ shipped UNet


@pytest.mark.parametrize(("name", "k"), [("tiny", 1), ("small", 2)])
def test_unet_through_the_dp_strategy_matches_autograd(name, k):
    """The trainer's path: DP strategy attach, synthgate's hooks (what privacy.dp installs in "hooks" mode),
    `loss.mean()` over B·K rows, fold, clip; against autograd per example (the attention UNet for K=2)."""
    cfg = preset(name)
    b, n = 3, 12
    torch.manual_seed(0)
    unet = build_unet(cfg).train()
    reference = copy.deepcopy(unet)
    strategy = make_strategy(
        DPConfig(target_epsilon=8.0, grad_sample_mode="hooks"), dataset_size=n, noise_multiplicity=k
    )
    data = TensorDataset(
        torch.zeros(n, cfg.channels, cfg.sample_size, cfg.sample_size), torch.zeros(n, dtype=torch.long)
    )
    model, optimizer, _ = strategy.attach(
        unet, torch.optim.SGD(unet.parameters(), lr=0.1), DataLoader(data, batch_size=b), epochs=1
    )
    assert use_fast_grad_samples(model, noise_multiplicity=k)

    g = torch.Generator().manual_seed(1)
    x = (torch.rand(b, cfg.channels, cfg.sample_size, cfg.sample_size, generator=g) * 2 - 1).repeat_interleave(k, 0)
    y = torch.randint(0, cfg.num_conditions, (b,), generator=g).repeat_interleave(k)
    noise = torch.randn(x.shape, generator=g)
    t = torch.randint(0, 1000, (b * k,), generator=g)
    xin = x + 0.5 * noise

    def row_losses(m, rows=slice(None)):
        return ((m(xin[rows], t[rows], class_labels=y[rows]).sample - noise[rows]) ** 2).mean(dim=(1, 2, 3))

    want = []
    for i in range(b):
        reference.zero_grad()
        row_losses(reference, slice(i * k, (i + 1) * k)).mean().backward()
        want.append(torch.cat([p.grad.flatten() for p in reference.parameters()]))
    want = torch.stack(want).double()

    row_losses(model).mean().backward()
    strategy.after_backward(model, b)
    got = torch.cat([p.grad_sample.reshape(b, -1) for p in unet.parameters()], dim=1).double()
    assert ((got - want).norm(dim=1) / want.norm(dim=1)).max() < 1e-5

    c = want.norm(dim=1).median().item()
    optimizer.max_grad_norm, optimizer.noise_multiplier = c, 0.0
    optimizer.step()
    clipped = (want * (c / (want.norm(dim=1) + 1e-6)).clamp(max=1.0)[:, None]).sum(0) / b
    update = torch.cat([p.grad.flatten() for p in unet.parameters()]).double()
    assert ((update - clipped).norm() / clipped.norm()).item() < 1e-5
