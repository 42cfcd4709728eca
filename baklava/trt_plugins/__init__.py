"""Kernels and TensorRT plugin glue for the ``baklava`` custom ops.

* :mod:`~baklava.trt_plugins.reference` - plain PyTorch contracts of the kernels (the oracle);
* :mod:`~baklava.trt_plugins.triton_decode_attention` - decode attention over the packed, ragged
  cache (flash-decoding over a static tile table);
* :mod:`~baklava.trt_plugins.triton_cache_update` - one decode token's commit: H2O scores from the
  attention kernel's logits, append or in-place eviction;
* :mod:`~baklava.trt_plugins.triton_prefill_select` - a prefill chunk's compression: each head's
  top-priority candidates in arrival order, every head of a layer in one launch.

All are Triton (they import ``triton``; they run on a CUDA device, or in Triton's CPU interpreter
for the tests). Still to come (issue 7): the TensorRT plugins that launch them, and a prefill
attention kernel (prefill attention is still the per-head PyTorch loop).
"""
