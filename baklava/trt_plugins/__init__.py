"""Kernels and TensorRT plugin glue for the ``baklava`` custom ops.

* :mod:`~baklava.trt_plugins.reference` - plain PyTorch contracts of the kernels (the oracle);
* :mod:`~baklava.trt_plugins.triton_decode_attention` - decode attention over the packed, ragged
  cache (flash-decoding over a static tile table);
* :mod:`~baklava.trt_plugins.triton_cache_update` - one decode token's commit: H2O scores from the
  attention kernel's logits, append or in-place eviction;
* :mod:`~baklava.trt_plugins.triton_prefill_select` - a prefill chunk's compression: each head's
  top-priority candidates in arrival order, every head of a layer in one launch.

The TensorRT plugins (one kernel launch per op, TensorRT's ahead-of-time ABI):

* :mod:`~baklava.trt_plugins.aot_attention`, :mod:`~baklava.trt_plugins.aot_cache_update` - the
  two ops for any number of new tokens, one launch each, cache updated in place;
* :mod:`~baklava.trt_plugins.aot` - their launch plans (signature, constants, grid, PTX);
* :mod:`~baklava.trt_plugins.tensorrt_plugins` - registration with ``tensorrt.plugin``;
* :mod:`~baklava.trt_plugins.cuda_launch` - the PTX launched through the CUDA driver, as TensorRT
  launches it (GPU tests).

All kernels are Triton (they run on a CUDA device, or in Triton's CPU interpreter for the tests).
"""
