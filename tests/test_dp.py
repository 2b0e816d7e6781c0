"""DP-SGD strategy: config checks, and per-example gradients/clipping checked against an autograd loop.

The reference for every DP test is plain autograd over one example at a time (its K rows: same inputs, noise and
timesteps as the batched DP step), with that example's loss = mean over its K rows of the per-pixel MSE.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from privacy import grad_sample
from privacy.dp import DPConfig, DPStrategy, default_delta, make_strategy
from privacy.grad_sample import install_contiguity_guard
from privacy.ledger import DPSGDEvent, epsilon_for_events
from synth.errors import ConfigError
from synth.model import build_unet, preset


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("eps", [0, -1.0, float("inf"), float("nan")])
def test_target_epsilon_must_be_positive(eps):
    with pytest.raises(ConfigError, match=f"target_epsilon {eps!r}"):
        DPConfig(target_epsilon=eps)


def test_config_is_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        DPConfig(8.0)  # type: ignore[misc]
    cfg = DPConfig(target_epsilon=8.0)
    with pytest.raises(AttributeError):
        cfg.target_epsilon = 1.0  # type: ignore[misc]
    assert DPConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"poisson_sampling": False}, "Poisson"),
        ({"grad_sample_mode": "ghost"}, "ghost"),
        ({"grad_sample_mode": "ew"}, "ew"),
        ({"grad_sample_mode": "magic"}, "magic"),
        ({"accountant": "gdp"}, "gdp"),
        ({"noise_multiplicity": 0}, "noise_multiplicity 0"),
        ({"max_grad_norm": 0.0}, "max_grad_norm 0.0"),
        ({"max_physical_batch_size": 0}, "max_physical_batch_size 0"),
        ({"target_delta": 1.5}, "target_delta 1.5"),
    ],
)
def test_bad_config_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DPConfig(target_epsilon=8.0, **kwargs)


def test_from_dict_refuses_unknown_keys():
    with pytest.raises(ConfigError, match="epsilon_target"):
        DPConfig.from_dict({"target_epsilon": 8.0, "epsilon_target": 1})


def test_default_delta_is_below_one_over_n():
    assert default_delta(4708) == 1e-5  # PneumoniaMNIST train
    assert default_delta(100) == 1e-3  # exactly 1/(10N) stays
    assert default_delta(64) == 1e-3
    assert make_strategy(DPConfig(target_epsilon=8.0), dataset_size=4708).target_delta == 1e-5
    assert make_strategy(DPConfig(target_epsilon=8.0, target_delta=1e-6), dataset_size=4708).target_delta == 1e-6
    with pytest.raises(ConfigError, match=r"target_delta 0\.01 >= 1/N"):
        make_strategy(DPConfig(target_epsilon=8.0, target_delta=0.01), dataset_size=100)


# ------------------------------------------------------------------------------------------------ helpers


def _loader(n: int, batch: int, cfg) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, cfg.channels, cfg.sample_size, cfg.sample_size, generator=g) * 2 - 1
    y = torch.randint(0, cfg.num_conditions, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, generator=g)


def _attached(cfg, *, k: int, mode: str = "hooks", batch: int = 4, n: int = 16, **extra):
    """A fresh UNet wrapped by a DP strategy; loader batch `batch` over `n` examples (expected batch = batch).

    Returns (strategy, unet inside the wrapper, wrapped model, DP optimizer, DP loader, hook-free copy of the
    initial UNet for reference gradients)."""
    torch.manual_seed(0)
    unet = build_unet(cfg).train()
    reference = copy.deepcopy(unet)
    opt = torch.optim.SGD(unet.parameters(), lr=0.1)
    strategy = make_strategy(
        DPConfig(target_epsilon=8.0, grad_sample_mode=mode, **extra), dataset_size=n, noise_multiplicity=k
    )
    model, optimizer, loader = strategy.attach(unet, opt, _loader(n, batch, cfg), epochs=1)
    return strategy, unet, model, optimizer, loader, reference


def _rows(cfg, b: int, k: int, seed: int = 1):
    """A batch as the trainer builds it: B examples repeated K times, each row with its own noise and timestep."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, cfg.channels, cfg.sample_size, cfg.sample_size, generator=g) * 2 - 1
    y = torch.randint(0, cfg.num_conditions, (b,), generator=g)
    xr, yr = x.repeat_interleave(k, 0), y.repeat_interleave(k)
    noise = torch.randn(xr.shape, generator=g)
    t = torch.randint(0, 1000, (b * k,), generator=g)
    return xr + 0.5 * noise, yr, t, noise


def _row_losses(model, xin, y, t, noise):
    return ((model(xin, t, class_labels=y).sample - noise) ** 2).mean(dim=(1, 2, 3))


def _reference_grads(unet, xin, y, t, noise, b: int, k: int) -> torch.Tensor:
    """B × P matrix: per-example gradients of the mean-over-K loss, one example at a time with plain autograd."""
    out = []
    for i in range(b):
        rows = slice(i * k, (i + 1) * k)
        unet.zero_grad()
        _row_losses(unet, xin[rows], y[rows], t[rows], noise[rows]).mean().backward()
        out.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
    unet.zero_grad()
    return torch.stack(out)


def _dp_backward(strategy, model, xin, y, t, noise, b: int) -> torch.Tensor:
    """The trainer's step up to the optimizer; returns the folded per-example gradients as B × P."""
    _row_losses(model, xin, y, t, noise).mean().backward()
    strategy.after_backward(model, b)
    return torch.cat([p.grad_sample.reshape(b, -1) for p in strategy.unwrap(model).parameters()], dim=1)


# Norms in float64: a float32 `.norm()` over a ~1M-parameter row drifts by ~5e-5 relative on CPU, while Opacus
# sums per-parameter norms (accurate to ~1e-7).


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


def _clipped_sum(ref: torch.Tensor, c: float) -> torch.Tensor:
    ref = ref.double()
    norms = ref.norm(dim=1)
    return (ref * (c / (norms + 1e-6)).clamp(max=1.0)[:, None]).sum(0)  # Opacus' flat clipping formula


# ------------------------------------------------------------------------------------------- correctness

# The shipped CPU presets; "small" has attention levels. (Every UNet2DModel also has a mid-block attention.)
MODELS = [
    pytest.param(("tiny", 28), id="tiny28"),
    pytest.param(("small", 28), id="small28-attn"),
    pytest.param(("small", 64), id="small64-attn"),
]


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("mode", ["hooks", "hooks_unfold", "functorch"])
@pytest.mark.parametrize("model_key", MODELS)
def test_per_example_gradients_and_clipping_match_autograd(model_key, mode, k):
    name, size = model_key
    cfg = preset(name, sample_size=size)
    b = 3
    strategy, unet, model, optimizer, _, reference = _attached(cfg, k=k, mode=mode, batch=b, n=4 * b)
    xin, y, t, noise = _rows(cfg, b, k)
    ref = _reference_grads(reference, xin, y, t, noise, b, k)

    got = _dp_backward(strategy, model, xin, y, t, noise, b)
    assert got.shape == ref.shape  # B rows, not B·K: one gradient per example
    assert _rel_err(got, ref) < 1e-5

    # Clip at the median per-example norm so both branches of the clip factor are exercised.
    c = ref.double().norm(dim=1).median().item()
    optimizer.max_grad_norm = c
    optimizer.noise_multiplier = 0.0  # isolate clipping and averaging from the noise
    optimizer.step()
    # Averaged over the expected number of *examples* (loader batch b), not over the B·K rows.
    assert optimizer.expected_batch_size == b
    expected = _clipped_sum(ref, c) / b
    update = torch.cat([p.grad.flatten() for p in unet.parameters()])
    assert _rel_err(update, expected) < 1e-5
    assert strategy.is_real_step(optimizer)


def test_without_guard_attention_unet_gets_wrong_per_example_gradients():
    """Proves the Conv2d contiguity guard necessary: Opacus' stock hooks mode is silently wrong without it."""
    cfg = preset("small")
    b, k = 3, 1
    strategy, unet, model, _, _, reference = _attached(cfg, k=k, mode="hooks_unfold", batch=b, n=4 * b)
    xin, y, t, noise = _rows(cfg, b, k)
    ref = _reference_grads(reference, xin, y, t, noise, b, k)

    # The cause: diffusers hands channels_last tensors to some convolutions.
    seen = []
    probes = [
        m.register_forward_pre_hook(lambda _m, a: seen.append(a[0].is_contiguous()))
        for m in reference.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    with torch.no_grad():
        reference(xin, t, class_labels=y)
    for h in probes:
        h.remove()
    assert not all(seen)

    for h in strategy._guard_handles:
        h.remove()
    unguarded = _dp_backward(strategy, model, xin, y, t, noise, b)
    assert _rel_err(unguarded, ref) > 1e-3  # measured ~3–8%: far above float error

    model.zero_grad()
    for p in unet.parameters():
        p.grad_sample = None
    strategy._guard_handles = install_contiguity_guard(unet)
    guarded = _dp_backward(strategy, model, xin, y, t, noise, b)
    assert _rel_err(guarded, ref) < 1e-5


@pytest.mark.parametrize(
    "conv",
    [
        dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
        dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1),  # diffusers' downsampler
        dict(in_channels=4, out_channels=6, kernel_size=1),  # resnet shortcut
        dict(in_channels=4, out_channels=6, kernel_size=(3, 2), padding=(2, 0), dilation=(2, 1), groups=2),
        dict(in_channels=4, out_channels=6, kernel_size=3, padding="same", bias=False),  # Opacus' fallback
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("path", ["grouped", "unfold"])
def test_conv_grad_sampler_matches_autograd(conv, channels_last, path, monkeypatch):
    monkeypatch.setattr(grad_sample, "GROUPED_CONV_MIN_PIXELS", 0 if path == "grouped" else 10**9)
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(**conv)
    x = torch.randn(5, 4, 9, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = layer(x)
    backprops = torch.randn_like(out)
    got = grad_sample.conv2d_grad_sample(layer, [x], backprops)
    for i in range(5):
        layer.zero_grad()
        (layer(x[i : i + 1]) * backprops[i : i + 1]).sum().backward()
        for p in layer.parameters():
            assert torch.allclose(got[p][i], p.grad, rtol=1e-5, atol=1e-5)


def test_after_backward_refuses_row_count_mismatch():
    cfg = preset("tiny")
    strategy, _, model, _, _, _ = _attached(cfg, k=2, batch=2, n=8)
    xin, y, t, noise = _rows(cfg, 2, 2)
    _row_losses(model, xin, y, t, noise).mean().backward()
    with pytest.raises(RuntimeError, match="expected batch 3"):
        strategy.after_backward(model, 3)


def test_batch_memory_manager_accumulates_one_logical_batch():
    """Physical batches of 2 from logical batches of ~6: one real step per logical batch, equal to the clipped
    sum over all its examples."""
    cfg = preset("tiny")
    k, n, batch = 2, 12, 6
    strategy, unet, model, optimizer, loader, reference = _attached(
        cfg, k=k, batch=batch, n=n, max_physical_batch_size=2
    )
    optimizer.noise_multiplier = 0.0
    optimizer.max_grad_norm = 0.05
    g = torch.Generator().manual_seed(3)
    xs, ys, ts, noises, flags = [], [], [], [], []
    for xb, yb in loader:
        b = xb.shape[0]
        assert b <= 2
        xr, yr = xb.repeat_interleave(k, 0), yb.repeat_interleave(k)
        noise = torch.randn(xr.shape, generator=g)
        t = torch.randint(0, 1000, (b * k,), generator=g)
        if b:
            _row_losses(model, xr + noise, yr, t, noise).mean().backward()
        strategy.after_backward(model, b)
        xs.append(xr + noise), ys.append(yr), ts.append(t), noises.append(noise)
        optimizer.step()
        flags.append(strategy.is_real_step(optimizer))
        if flags[-1]:
            break  # first logical batch complete
        optimizer.zero_grad()
    assert flags[-1] and not any(flags[:-1]) and len(flags) >= 2
    assert len(strategy.accountant) == 1 and strategy.accountant.history[0][2] == 1

    xin, y, t, noise = (torch.cat(v) for v in (xs, ys, ts, noises))
    update = torch.cat([p.grad.flatten() for p in unet.parameters()])  # what SGD applied
    ref = _reference_grads(reference, xin, y, t, noise, len(xin) // k, k)
    assert _rel_err(update, _clipped_sum(ref, 0.05) / optimizer.expected_batch_size) < 1e-5


def test_physical_batches_stay_aligned_after_a_fast_forward():
    """A resumed trainer draws (and discards) the batches it already used; no stale "skip" signal may remain, so
    real steps still fall exactly on the last physical batch of each logical batch."""
    cfg = preset("tiny")
    strategy, _, model, optimizer, loader, _ = _attached(cfg, k=1, batch=6, n=24, max_physical_batch_size=2)
    sampler_gen = loader.loader.batch_sampler.generator
    start = sampler_gen.get_state()
    expected = []  # per physical batch: does it end its logical batch?
    for xb, _ in loader.loader:
        chunks = max(1, -(-len(xb) // 2))
        expected += [False] * (chunks - 1) + [True]
    sampler_gen.set_state(start)

    batches = iter(loader)
    skip = 3
    for _ in range(skip):
        next(batches)
    assert not optimizer._step_skip_queue
    flags = []
    for xb, yb in batches:
        b = len(xb)
        if b:
            t = torch.zeros(b, dtype=torch.long)
            _row_losses(model, xb, yb, t, torch.zeros_like(xb)).mean().backward()
        strategy.after_backward(model, b)
        optimizer.step()
        optimizer.zero_grad()
        flags.append(strategy.is_real_step(optimizer))
    assert flags == expected[skip:]
    assert len(strategy.accountant) == 1 and strategy.accountant.history[0][2] == sum(flags)


def test_empty_poisson_batch_takes_a_counted_noise_only_step():
    cfg = preset("tiny")
    strategy, unet, model, optimizer, _, _ = _attached(cfg, k=2, batch=4, n=16)
    before = [p.detach().clone() for p in unet.parameters()]
    strategy.after_backward(model, 0)  # trainer skipped forward/backward: nothing was sampled
    optimizer.step()
    assert strategy.is_real_step(optimizer)
    assert strategy.accountant.history == [(strategy.noise_multiplier, 0.25, 1)]
    assert any(not torch.equal(b, p) for b, p in zip(before, unet.parameters(), strict=True))
    assert strategy.epsilon() > 0


# ------------------------------------------------------------------------------------- lifecycle and resume


def _noise_only_steps(strategy, model, optimizer, steps: int) -> None:
    for _ in range(steps):
        strategy.after_backward(model, 0)
        optimizer.step()
        optimizer.zero_grad()


def test_attach_checks_arguments_and_calibrates_sigma():
    cfg = preset("tiny")
    unet = build_unet(cfg).train()
    opt = torch.optim.SGD(unet.parameters(), lr=0.1)
    strategy = make_strategy(DPConfig(target_epsilon=4.0), dataset_size=16)
    with pytest.raises(ConfigError, match="exactly one of epochs"):
        strategy.attach(unet, opt, _loader(16, 4, cfg), epochs=1, steps=4)
    with pytest.raises(ConfigError, match="data loader has 12 examples"):
        strategy.attach(unet, opt, _loader(12, 4, cfg), epochs=1)
    model, _, _ = strategy.attach(unet, opt, _loader(16, 4, cfg), steps=6)
    assert strategy.unwrap(model) is unet
    assert strategy.sample_rate == 0.25 and strategy.planned_steps == 6
    planned = [DPSGDEvent(noise_multiplier=strategy.noise_multiplier, sample_rate=0.25, steps=6)]
    assert 3.95 < epsilon_for_events(planned, delta=strategy.target_delta) <= 4.0
    assert strategy.epsilon() == 0.0
    with pytest.raises(RuntimeError, match="twice"):
        strategy.attach(unet, opt, _loader(16, 4, cfg), steps=6)


def test_resume_keeps_the_ledger_whole():
    cfg = preset("tiny")
    first, _, model, optimizer, _, _ = _attached(cfg, k=2, batch=4, n=16)
    _noise_only_steps(first, model, optimizer, 2)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint

    resumed, _, model2, optimizer2, _, _ = _attached(cfg, k=2, batch=4, n=16)
    resumed.load_state_dict(state)
    assert resumed.epsilon() == pytest.approx(first.epsilon(), rel=1e-12)
    _noise_only_steps(resumed, model2, optimizer2, 1)
    assert resumed.accountant.history == [(first.noise_multiplier, 0.25, 3)]
    assert resumed.ledger()["steps"] == 3
    assert resumed.epsilon() > first.epsilon()


def test_resume_refuses_a_different_dp_setup():
    cfg = preset("tiny")
    first, _, model, optimizer, _, _ = _attached(cfg, k=2, batch=4, n=16)
    _noise_only_steps(first, model, optimizer, 1)
    state = first.state_dict()
    other_k: DPStrategy = make_strategy(DPConfig(target_epsilon=8.0), dataset_size=16, noise_multiplicity=1)
    with pytest.raises(ConfigError, match="noise_multiplicity 2"):
        other_k.load_state_dict(state)
    # Same K but a different ε target: σ recalibrates differently, so the original ε claim would not hold.
    unet = build_unet(cfg).train()
    other_eps = make_strategy(DPConfig(target_epsilon=2.0), dataset_size=16, noise_multiplicity=2)
    other_eps.load_state_dict(state)
    with pytest.raises(ConfigError, match="noise_multiplier"):
        other_eps.attach(unet, torch.optim.SGD(unet.parameters(), lr=0.1), _loader(16, 4, cfg), epochs=1)
    with pytest.raises(ConfigError, match="malformed"):
        first.load_state_dict({"history": "nonsense"})
