"""Where training runs: `--device auto|cpu|cuda[:N]` resolved to a `torch.device`, and the matching autocast.

`auto` takes CUDA when torch sees a GPU and the CPU otherwise. On CUDA the forward pass runs under bf16 autocast
(the loss and optimizer stay in fp32); on the CPU everything is fp32: bf16 is slower than fp32 on CPUs without AMX.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from synth.errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """'auto' → cuda when available, else cpu; 'cpu', 'cuda' or 'cuda:N' as given (ConfigError if unusable)."""
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if text != "cpu" and not text.startswith("cuda"):
        raise ConfigError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N")
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {name!r} is not a torch device (try auto, cpu, cuda, cuda:0)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but torch {torch.__version__} sees no CUDA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA GPUs that support it; a no-op elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def describe_device(device: torch.device) -> str:
    """A short human description for model cards: 'cpu (2 threads)' or 'cuda:0 (NVIDIA H100 …, bf16 autocast)'."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        amp = ", bf16 autocast" if torch.cuda.is_bf16_supported() else ""
        return f"cuda:{index} ({torch.cuda.get_device_name(index)}{amp})"
    return f"{device.type} ({torch.get_num_threads()} threads)"
