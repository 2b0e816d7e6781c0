"""Per-sample gradient plumbing around Opacus: Conv2d grad sampler, contiguity guard, noise-multiplicity fold.

They exist because Opacus' defaults are silently wrong, or slow, for a diffusion UNet trained with DP-SGD:

* Opacus' hooks-mode Conv2d grad sampler unfolds the layer's saved input with `as_strided`, which assumes a
  contiguous NCHW tensor. diffusers' UNet hands channels_last tensors to many convolutions (the mid-block
  attention, which every `UNet2DModel` has by default, returns one, and CPU convolutions then propagate that
  layout), so the per-sample gradients come out 3–8% wrong with no error. A forward pre-hook that makes each
  Conv2d input contiguous fixes it (numerically a no-op for the forward pass).
* That unfold also materialises k×k copies of every activation. `conv2d_grad_sample` instead gets all B
  per-sample weight gradients from one grouped convolution backward (the batch folded into the channel groups),
  which does not depend on the memory layout and was 1.5–10× faster on this CPU for feature maps of 14×14 and
  up; smaller maps keep the unfold, on a contiguous copy of the input.
* With K noise draws per example the batch holds B×K rows. Opacus would clip each row as if it were a separate
  example, so one image could move the model by K·C instead of C and the accountant's guarantee would not hold.
  `fold_noise_multiplicity` averages the K rows of each example's per-sample gradient before the optimizer clips.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

# Below this many output pixels per channel, Opacus' unfold + batched matmul beat the grouped convolution on this
# CPU (grouped convolutions with many groups are slow on small maps with many channels); at 14×14 and up the
# grouped convolution won by 1.5–10×. Measured with batch 64 and 256 rows, 16–128 channels.
GROUPED_CONV_MIN_PIXELS = 196


def conv2d_grad_sample(layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Per-sample gradients of a Conv2d from its input and output gradient (Opacus grad-sampler signature).

    Sample i's weight gradient is the weight gradient of a convolution of x_i alone. Stacking the B samples along
    the channel axis of a single image and using B·groups groups makes them independent convolutions, so one
    `convolution_backward` computes all B weight gradients at once. Any memory layout is fine: the reshape copies
    a channels_last input into the order it describes. Small feature maps, non-CPU devices (not measured here) and
    rare padding modes go to Opacus' unfold sampler, given a contiguous input so its `as_strided` is right.
    """
    from opacus.grad_sample.conv import compute_conv_grad_sample

    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    unusual = isinstance(layer.padding, str) or layer.padding_mode != "zeros"
    small = backprops.shape[2] * backprops.shape[3] < GROUPED_CONV_MIN_PIXELS
    if n == 0 or unusual or small or x.device.type != "cpu":
        return compute_conv_grad_sample(layer, [x.contiguous()], backprops)
    w = layer.weight
    out_ch, in_per_group = w.shape[0], w.shape[1]
    _, grad_w, _ = torch.ops.aten.convolution_backward(
        backprops.reshape(1, n * out_ch, *backprops.shape[2:]),
        x.reshape(1, n * x.shape[1], *x.shape[2:]),
        # Only the weight's shape matters for the weight gradient: a zero-stride stand-in, nothing allocated.
        w.new_empty(()).expand(n * out_ch, in_per_group, *w.shape[2:]),
        None,
        list(layer.stride),
        list(layer.padding),
        list(layer.dilation),
        False,
        [0, 0],
        n * layer.groups,
        [False, True, False],
    )
    ret = {}
    if w.requires_grad:
        ret[w] = grad_w.reshape(n, *w.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.sum(dim=(2, 3))
    return ret


def use_grouped_conv_sampler(grad_sample_module: nn.Module) -> None:
    """Make this Opacus GradSampleModule (hooks mode) use `conv2d_grad_sample` for every nn.Conv2d.

    Set on the instance, so Opacus' class-wide registry and any other wrapped model are untouched.
    """
    samplers = dict(type(grad_sample_module).GRAD_SAMPLERS)
    samplers[nn.Conv2d] = conv2d_grad_sample
    grad_sample_module.GRAD_SAMPLERS = samplers


def _contiguous_inputs(_module: nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


def install_contiguity_guard(model: nn.Module) -> list[RemovableHandle]:
    """Make every `nn.Conv2d` in `model` see a contiguous (NCHW) input; return the hook handles.

    Opacus' forward hook records the input *after* forward pre-hooks ran, so the activations its grad sampler
    unfolds are the contiguous copies. For an input that is already contiguous `.contiguous()` returns it
    unchanged, so the guard costs a copy only where diffusers produced channels_last.
    """
    return [m.register_forward_pre_hook(_contiguous_inputs) for m in model.modules() if isinstance(m, nn.Conv2d)]


def fold_noise_multiplicity(model: nn.Module, *, batch_size: int, multiplicity: int) -> None:
    """Average the `multiplicity` rows of each example in every parameter's `grad_sample` (B·K → B).

    The trainer repeats each of the B examples K times (`repeat_interleave(K)`, so rows i·K … i·K+K-1 belong to
    example i) and backpropagates `loss.mean()` over the B·K rows. Opacus' GradSampleModule undoes the mean by
    multiplying by the number of rows it saw (B·K), so row r's `grad_sample` is ∇ℓ_r, the gradient of that row's
    own loss. The mean over each example's K rows is then ∇((1/K)·Σ_k ℓ_ik): the gradient of the example's
    mean-over-K loss, which is what the optimizer should clip.

    Why the privacy accounting is unchanged: after the fold each example contributes exactly one gradient, which
    the DP optimizer clips to norm ≤ C and sums with the others before adding N(0, σ²C²) noise, and averages by
    Opacus' expected batch size (expected number of *examples*, set from the data loader, not from the rows). That
    is the Poisson-subsampled Gaussian mechanism the accountant analyses, whatever K is: the K draws are
    post-processing inside one example's contribution. Without the fold Opacus clips B·K rows separately and one
    example's influence grows to K·C while the accountant still assumes C.

    Parameters whose `grad_sample` is missing (an empty Poisson batch: the trainer skipped forward/backward) get
    an empty `(0, *shape)` tensor, so the optimizer still takes its noise-only step and the accountant counts it.
    """
    if batch_size < 0 or multiplicity < 1:
        raise ValueError(f"batch_size {batch_size} must be >= 0 and multiplicity {multiplicity} >= 1")
    rows = batch_size * multiplicity
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            if batch_size:
                raise RuntimeError(f"parameter {name} has no grad_sample after backward (model in eval mode?)")
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            continue
        if isinstance(gs, list):
            raise RuntimeError(
                f"parameter {name} accumulated {len(gs)} backward passes; call optimizer.step() and "
                "zero_grad() after every backward (Poisson sampling forbids gradient accumulation)"
            )
        if gs.shape[0] != rows:
            raise RuntimeError(
                f"parameter {name}: grad_sample has {gs.shape[0]} rows, expected batch {batch_size} × "
                f"noise multiplicity {multiplicity} = {rows}"
            )
        if multiplicity > 1:
            p.grad_sample = gs.reshape(batch_size, multiplicity, *gs.shape[1:]).mean(dim=1)
