"""Allocators: scores -> integer per-head capacities. One small module each, one registry."""

from baklava.profiles.allocators.baklava_allocator import BaklavaAllocator
from baklava.profiles.allocators.base import Allocator, water_fill
from baklava.profiles.allocators.layer_allocator import LayerAllocator
from baklava.profiles.allocators.pyramid_allocator import PyramidAllocator
from baklava.profiles.allocators.uniform_allocator import UniformAllocator

ALLOCATORS: dict[str, type[Allocator]] = {
    cls.name: cls for cls in (UniformAllocator, BaklavaAllocator, LayerAllocator, PyramidAllocator)
}


def make_allocator(name: str, **params) -> Allocator:
    """Build an allocator by its registry name (``uniform``, ``baklava``, ``layer``, ``pyramid``)."""
    if name not in ALLOCATORS:
        raise ValueError(f"unknown allocator {name!r}; known: {', '.join(sorted(ALLOCATORS))}")
    return ALLOCATORS[name](**params)


__all__ = [
    "ALLOCATORS",
    "Allocator",
    "BaklavaAllocator",
    "LayerAllocator",
    "PyramidAllocator",
    "UniformAllocator",
    "make_allocator",
    "water_fill",
]
