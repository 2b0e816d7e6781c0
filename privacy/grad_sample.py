"""Per-sample gradient plumbing around Opacus: fast per-sample hooks, Conv2d/Linear/GroupNorm grad samplers,
contiguity guard, noise-multiplicity fold.

They exist because Opacus' defaults are silently wrong, or slow, for a diffusion UNet trained with DP-SGD:

* Opacus' hooks-mode Conv2d grad sampler unfolds the layer's saved input with `as_strided`, which assumes a
  contiguous NCHW tensor. diffusers' UNet hands channels_last tensors to many convolutions (the mid-block
  attention, which every `UNet2DModel` has by default, returns one, and CPU convolutions then propagate that
  layout), so the per-sample gradients come out 3–8% wrong with no error. A forward pre-hook that makes each
  Conv2d input contiguous fixes it (numerically a no-op for the forward pass).
* That unfold also materialises k×k copies of every activation. `conv2d_grad_sample` instead gets all B
  per-sample weight gradients from one grouped convolution backward (the batch folded into the channel groups),
  which does not depend on the memory layout and was 1.5–10× faster on this CPU.
* Opacus' hooks leave the parameters' ordinary gradients on, so every backward pass also computes the batch
  weight gradients, which DP-SGD throws away (the optimizer replaces `p.grad` with the clipped, noised sum):
  for the `small` UNet that was 45% of the backward pass. `use_fast_grad_samples` swaps Opacus' hooks for ones
  that switch those gradients off inside each layer's forward and compute the per-sample gradients from the
  layer's input and output gradient, writing them once, into buffers reused from step to step (Opacus multiplies
  every output gradient by the batch size, zero-fills a fresh buffer and copies into it, every step).
* With K noise draws per example the batch holds B×K rows. Opacus would clip each row as if it were a separate
  example, so one image could move the model by K·C instead of C and the accountant's guarantee would not hold.
  `fold_noise_multiplicity` averages the K rows of each example's per-sample gradient before the optimizer clips.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

# Feature maps with fewer output pixels than this go to Opacus' unfold sampler. 0 (never): the grouped convolution
# won at every map size of the shipped UNets, e.g. a 64→64 3×3 conv on 7×7 maps, batch 64: 2.8 vs 5.0 ms; with
# K=4 draws per example summed inside the convolution, 18 vs 97 ms (1 thread).
GROUPED_CONV_MIN_PIXELS = 0


def _scaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    # In place: every caller passes a tensor it has just created.
    return t.mul_(scale) if scale != 1.0 else t


def _sum_rows(t: torch.Tensor, k: int) -> torch.Tensor:
    """Sum each run of k consecutive rows (one example's K noise draws): (B·K, ...) → (B, ...)."""
    return t.reshape(t.shape[0] // k, k, *t.shape[1:]).sum(dim=1) if k > 1 else t


def _examples_first(t: torch.Tensor, k: int) -> torch.Tensor:
    """(B·K, C, ...) → (K, B·C, ...): draw k of every example in one batch row, examples side by side in the
    channels (a copy unless k = 1)."""
    b = t.shape[0] // k
    return t.reshape(b, k, *t.shape[1:]).transpose(0, 1).reshape(k, b * t.shape[1], *t.shape[2:])


def conv2d_grad_sample(
    layer: nn.Conv2d,
    activations: list[torch.Tensor],
    backprops: torch.Tensor,
    *,
    scale: float = 1.0,
    rows_per_example: int = 1,
) -> dict:
    """Per-example gradients of a Conv2d from its input and output gradient (Opacus' grad-sampler signature).

    Returns, for each trainable parameter, a (B, *shape) tensor: `scale` × the sum of the gradients of each run
    of `rows_per_example` consecutive rows (B = rows / rows_per_example; with the defaults, Opacus' per-row
    gradients).

    Sample i's weight gradient is the weight gradient of a convolution of x_i alone. Stacking the B examples
    along the channel axis and using B·groups groups makes them independent convolutions, so one
    `convolution_backward` computes all B weight gradients at once; an example's K rows go in the batch
    dimension, over which the weight gradient sums. A 1×1 convolution (the resnet shortcuts) is a batched matmul
    instead. Any memory layout is fine: the reshapes copy a channels_last input into the order they describe.
    Non-CPU devices (not measured here) and rare padding modes go to Opacus' unfold sampler, given a contiguous
    input so its `as_strided` is right.
    """
    from opacus.grad_sample.conv import compute_conv_grad_sample

    x = activations[0].to(backprops.dtype)
    n, k = x.shape[0], rows_per_example
    b = n // k
    unusual = isinstance(layer.padding, str) or layer.padding_mode != "zeros"
    small = backprops.shape[2] * backprops.shape[3] < GROUPED_CONV_MIN_PIXELS
    if n == 0 or unusual or small or x.device.type != "cpu":
        ret = compute_conv_grad_sample(layer, [x.contiguous()], backprops)
        return {p: _sum_rows(g, k) * scale if (k > 1 or scale != 1.0) else g for p, g in ret.items()}
    w = layer.weight
    out_ch, in_per_group = w.shape[0], w.shape[1]
    ret = {}
    if w.requires_grad:
        pointwise = (
            w.shape[2:] == (1, 1)
            and layer.groups == 1
            and tuple(layer.stride) == (1, 1)
            and tuple(layer.padding) == (0, 0)
        )
        if pointwise:
            # (B, O, K·HW) @ (B, K·HW, C): each example's rows and pixels are the contracted dimension.
            g = backprops.reshape(b, k, out_ch, -1).transpose(1, 2).reshape(b, out_ch, -1)
            xs = x.reshape(b, k, x.shape[1], -1).transpose(1, 2).reshape(b, x.shape[1], -1)
            grad_w = torch.bmm(g, xs.transpose(1, 2))
        else:
            _, grad_w, _ = torch.ops.aten.convolution_backward(
                _examples_first(backprops, k),
                _examples_first(x, k),
                # Only the weight's shape matters for the weight gradient: a zero-stride stand-in, nothing allocated.
                w.new_empty(()).expand(b * out_ch, in_per_group, *w.shape[2:]),
                None,
                list(layer.stride),
                list(layer.padding),
                list(layer.dilation),
                False,
                [0, 0],
                b * layer.groups,
                [False, True, False],
            )
        ret[w] = _scaled(grad_w.reshape(b, *w.shape), scale)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = _scaled(_sum_rows(backprops.sum(dim=(2, 3)), k), scale)
    return ret


def linear_grad_sample(
    layer: nn.Linear,
    activations: list[torch.Tensor],
    backprops: torch.Tensor,
    *,
    scale: float = 1.0,
    rows_per_example: int = 1,
) -> dict:
    """Per-example gradients of an nn.Linear fed (B·K, in) or (B·K, ..., in) inputs; same contract as
    `conv2d_grad_sample`.

    One batched matmul per parameter: an example's K rows (and, for more than 2 dimensions, its tokens) are the
    contracted dimension. Strided inputs (the transposed feature maps diffusers' attention feeds to_q/to_k/to_v)
    are read in place where a view allows. The results are fresh tensors, never views of `backprops`.
    """
    x = activations[0].to(backprops.dtype)
    k = rows_per_example
    b = x.shape[0] // k
    ret = {}
    if backprops.dim() == 2 and k == 1:
        if layer.weight.requires_grad:
            ret[layer.weight] = _scaled(torch.bmm(backprops.unsqueeze(2), x.unsqueeze(1)), scale)
        if layer.bias is not None and layer.bias.requires_grad:
            ret[layer.bias] = backprops * scale
        return ret
    g = backprops.reshape(b, -1, backprops.shape[-1])
    if layer.weight.requires_grad:
        ret[layer.weight] = _scaled(torch.bmm(g.transpose(1, 2), x.reshape(b, -1, x.shape[-1])), scale)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = _scaled(g.sum(dim=1), scale)
    return ret


def group_norm_grad_sample(
    layer: nn.GroupNorm,
    activations: list[torch.Tensor],
    backprops: torch.Tensor,
    *,
    scale: float = 1.0,
    rows_per_example: int = 1,
) -> dict:
    """Per-example gradients of an nn.GroupNorm (weight Σ_spatial x̂·g, bias Σ_spatial g, with x̂ the input
    normalised again without the affine); same contract as `conv2d_grad_sample`."""
    x = activations[0].to(backprops.dtype)
    n, c = x.shape[:2]
    g = backprops.reshape(n, c, -1)
    ret = {}
    if layer.weight is not None and layer.weight.requires_grad:
        normed = F.group_norm(x, layer.num_groups, eps=layer.eps).reshape(n, c, -1)
        ret[layer.weight] = _scaled(_sum_rows(torch.linalg.vecdot(normed, g), rows_per_example), scale)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = _scaled(_sum_rows(g.sum(dim=2), rows_per_example), scale)
    return ret


# Samplers that take `scale` and `rows_per_example` and return fresh tensors.
FAST_GRAD_SAMPLERS: dict[type, Callable[..., dict]] = {
    nn.Conv2d: conv2d_grad_sample,
    nn.Linear: linear_grad_sample,
    nn.GroupNorm: group_norm_grad_sample,
}
# Batch-first layer types left to Opacus' registered per-row sampler (given contiguous inputs: its conv samplers
# assume them), summed over each example's rows by the hooks. Anything else keeps Opacus' own hooks.
OPACUS_SAMPLED = (nn.Embedding, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.Conv1d)


def use_grouped_conv_sampler(grad_sample_module: nn.Module) -> None:
    """Make this Opacus GradSampleModule (hooks mode) use `conv2d_grad_sample` for every nn.Conv2d.

    Set on the instance, so Opacus' class-wide registry and any other wrapped model are untouched.
    """
    samplers = dict(type(grad_sample_module).GRAD_SAMPLERS)
    samplers[nn.Conv2d] = conv2d_grad_sample
    grad_sample_module.GRAD_SAMPLERS = samplers


class _PerSampleHooks:
    """Forward/backward hooks computing `p.grad_sample` for every trainable layer of one GradSampleModule.

    Per layer call, in training mode with autograd on:
      pre-forward   if an input requires grad, switch the layer's trainable parameters' `requires_grad` off, so
                    the ops record no weight gradient (the input gradient still flows through);
      post-forward  (always, even if the forward raised) switch them back on; save the detached inputs and hook
                    the output tensor;
      backward      the output's gradient arrives (summed over all its consumers): compute each example's
                    gradient from the saved inputs, mean over its K consecutive rows, with Opacus' convention
                    for `loss_reduction="mean"` (rows × the gradient of the mean loss: row r's gradient of its own
                    loss), and add it to this backward pass' running sums;
      end of backward  (an autograd engine callback) move the sums to `p.grad_sample`, where Opacus' DP optimizer
                    reads them. A layer called several times in one forward gets the sum over its calls, like
                    Opacus; a second backward before `optimizer.zero_grad()` is refused under Poisson sampling
                    (Opacus' rule), or appended as a list otherwise.
    The sums are written into per-parameter buffers kept across steps (see `_buffer`): a `p.grad_sample` tensor
    is overwritten by a later backward once the optimizer's `zero_grad()` has dropped it, never before.
    A layer whose inputs need no gradient (the first conv, the time and class embeddings) keeps its ordinary
    weight gradient on: its output needs one for the hook to fire. Those few `p.grad` are overwritten by the DP
    optimizer like all others.
    """

    def __init__(self, gsm: nn.Module, rows_per_example: int):
        self.gsm = gsm
        self.rows_per_example = rows_per_example
        self.switched_off: dict[nn.Module, list[nn.Parameter]] = {}
        self.pending: dict[nn.Parameter, torch.Tensor] = {}
        self.buffers: dict[nn.Parameter, torch.Tensor] = {}

    def _capturing(self, module: nn.Module) -> bool:
        return self.gsm.hooks_enabled and module.training and torch.is_grad_enabled()

    def pre_forward(self, module: nn.Module, args: tuple) -> None:
        if not self._capturing(module):
            return
        if any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            params = [p for p in module.parameters(recurse=False) if p.requires_grad]
            for p in params:
                p.requires_grad_(False)
            self.switched_off[module] = params

    def post_forward(self, module: nn.Module, args: tuple, output) -> None:
        for p in self.switched_off.pop(module, ()):
            p.requires_grad_(True)
        if not isinstance(output, torch.Tensor) or not output.requires_grad or not self._capturing(module):
            return
        inputs = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        output.register_hook(functools.partial(self.backward, module, inputs))

    def backward(self, module: nn.Module, inputs: list, grad: torch.Tensor) -> None:
        grad = grad.detach()
        rows, k = grad.shape[0], self.rows_per_example
        if rows % k:
            raise RuntimeError(
                f"{type(module).__name__} got a batch of {rows} rows, not a multiple of the noise multiplicity {k}"
            )
        scale = (rows if self.gsm.loss_reduction == "mean" else 1) / k
        fast = FAST_GRAD_SAMPLERS.get(type(module))
        if fast is not None:
            samples = fast(module, inputs, grad, rows_per_example=k)
        else:
            inputs = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in inputs]
            samples = self.gsm.GRAD_SAMPLERS[type(module)](module, inputs, grad.contiguous())
            samples = {p: _sum_rows(g, k) for p, g in samples.items()}
        for p, g in samples.items():
            prev = self.pending.get(p)
            if prev is not None:  # the layer's second call in this forward
                prev.add_(g, alpha=scale)
            else:
                self.pending[p] = torch.mul(g, scale, out=self._buffer(p, g))
        # Queued on every call (cheap): the first callback to run at the end of this backward moves all sums.
        torch.autograd.Variable._execution_engine.queue_callback(self.flush)

    def _buffer(self, p: nn.Parameter, like: torch.Tensor) -> torch.Tensor:
        """Where p's per-example gradients go: rows of a buffer kept across steps, once the optimizer has consumed
        (and `zero_grad` dropped) the previous ones; a new tensor while those are still on `p.grad_sample`.

        Why: a fresh `grad_sample` every step (285 MB for the `small` UNet, batch 64) is memory the C allocator
        hands back to the system when `zero_grad` frees it and maps again on the next backward. That cost 10–16%
        of a non-private step (A/B in one process, CPU time; glibc tuning that keeps freed memory did as well).
        Scaling into the buffer costs nothing extra: the samplers' results need the scaling pass anyway.
        """
        if getattr(p, "grad_sample", None) is not None:
            return torch.empty_like(like)
        buf = self.buffers.get(p)
        rows = like.shape[0]
        if buf is None or buf.shape[0] < rows or buf.shape[1:] != like.shape[1:] or buf.dtype != like.dtype:
            buf = self.buffers[p] = torch.empty_like(like)
        return buf[:rows]

    def flush(self) -> None:
        pending, self.pending = self.pending, {}
        for p, g in pending.items():
            if getattr(p, "grad_sample", None) is None:
                p.grad_sample = g
            elif not self.gsm.grad_accumulation_allowed:
                raise ValueError(
                    "Poisson sampling is not compatible with grad accumulation: call optimizer.step() and "
                    "zero_grad() after every forward/backward pass (or use physical batches)"
                )
            elif isinstance(p.grad_sample, list):
                p.grad_sample.append(g)
            else:
                p.grad_sample = [p.grad_sample, g]


# Attribute of a GradSampleModule using `_PerSampleHooks`: the rows its grad samples already average per example.
_ROWS_ATTR = "synthgate_rows_per_example"


def use_fast_grad_samples(grad_sample_module: nn.Module, *, noise_multiplicity: int = 1) -> bool:
    """Replace the per-module hooks of an Opacus hooks-mode GradSampleModule by synthgate's (`_PerSampleHooks`).

    What changes: the batch weight gradients that DP-SGD discards are no longer computed; Conv2d, Linear and
    GroupNorm use this module's samplers (the types in `OPACUS_SAMPLED` Opacus' registered ones); and with
    `noise_multiplicity` K > 1 each example's K consecutive rows are averaged as the per-example gradients are
    computed, so `p.grad_sample` holds B rows, never B·K (`fold_noise_multiplicity` then only checks them);
    they are written into buffers reused from step to step (copy a `grad_sample` to keep it past `zero_grad()`).
    The per-example gradients are those of Opacus' hooks followed by the fold (checked against autograd per
    example in tests/test_dp.py and tests/test_grad_sample_fast.py). Opacus' `disable_hooks()`/`enable_hooks()`,
    `remove_hooks()` and `forbid_grad_accumulation()` keep working.

    Returns True once installed (also if already installed with the same K), or False, leaving Opacus' hooks in
    place, when the model has a trainable layer of another type (e.g. one Opacus would hand to functorch) or the
    module is not batch-first.
    """
    if isinstance(noise_multiplicity, bool) or not isinstance(noise_multiplicity, int) or noise_multiplicity < 1:
        raise ValueError(f"noise_multiplicity {noise_multiplicity!r} must be an integer >= 1")
    gsm = grad_sample_module
    installed = gsm.__dict__.get(_ROWS_ATTR)
    if installed is not None:
        if installed != noise_multiplicity:
            raise ValueError(f"fast grad samples already installed with noise multiplicity {installed}")
        return True
    layers = [m for m in gsm._module.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    supported = all(
        type(m) in FAST_GRAD_SAMPLERS or (type(m) in OPACUS_SAMPLED and type(m) in gsm.GRAD_SAMPLERS) for m in layers
    )
    if not supported or not gsm.batch_first or gsm.loss_reduction not in ("mean", "sum"):
        return False
    accumulation_allowed = gsm.grad_accumulation_allowed
    gsm.remove_hooks()  # also disables hooks
    gsm.grad_accumulation_allowed = accumulation_allowed
    hooks = _PerSampleHooks(gsm, noise_multiplicity)
    handles = []
    for m in layers:
        handles.append(m.register_forward_pre_hook(hooks.pre_forward))
        # Prepended and always called: parameters get requires_grad back before any other hook runs, even when
        # the forward raises.
        handles.append(m.register_forward_hook(hooks.post_forward, prepend=True, always_call=True))
    # Where Opacus keeps its own handles, so its remove_hooks() removes these.
    gsm._module.autograd_grad_sample_hooks = handles
    gsm.autograd_grad_sample_hooks = handles
    gsm.__dict__[_ROWS_ATTR] = noise_multiplicity
    gsm.enable_hooks()
    return True


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

    With `use_fast_grad_samples(model, noise_multiplicity=K)` the hooks already averaged the K rows: then this
    only checks that every `grad_sample` has B rows.

    Parameters whose `grad_sample` is missing (an empty Poisson batch: the trainer skipped forward/backward) get
    an empty `(0, *shape)` tensor, so the optimizer still takes its noise-only step and the accountant counts it.
    """
    if batch_size < 0 or multiplicity < 1:
        raise ValueError(f"batch_size {batch_size} must be >= 0 and multiplicity {multiplicity} >= 1")
    averaged = model.__dict__.get(_ROWS_ATTR, 1)  # rows per example `use_fast_grad_samples` already averaged
    if averaged not in (1, multiplicity):
        raise RuntimeError(f"grad samples average {averaged} rows per example, noise multiplicity is {multiplicity}")
    to_average = 1 if averaged == multiplicity else multiplicity
    rows = batch_size * to_average
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
                f"noise multiplicity {multiplicity} = {batch_size * multiplicity}"
                + (" (averaged by the hooks: one row per example)" if to_average != multiplicity else "")
            )
        if to_average > 1:
            p.grad_sample = gs.reshape(batch_size, to_average, *gs.shape[1:]).mean(dim=1)
