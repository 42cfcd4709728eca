"""Programmatic dependent launch: which devices may overlap a kernel's launch with the previous one."""

from __future__ import annotations

import functools

import torch


def dependent_launch(device) -> bool:
    """Whether kernels on ``device`` may use programmatic dependent launch (Hopper and later): a
    kernel is launched while the previous one drains and waits for it (``gdc_wait``) before it
    touches memory, hiding the launch gap (1-2 us a kernel inside a CUDA graph)."""
    device = torch.device(device)
    return device.type == "cuda" and _capability(device.index) >= 9


@functools.cache
def _capability(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]
