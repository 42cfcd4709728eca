"""Kernels and TensorRT plugin glue for the ``baklava`` custom ops.

Not built yet: the Triton GPU kernels (decode attention over the packed cache, cache update,
prefill compression) arrive with issue 6 and the TensorRT plugins with issue 7. Their reference
semantics are :mod:`baklava.runtime.packed_cache` and :mod:`baklava.runtime.selection`.
"""
