"""Kernels and TensorRT plugin glue for the ``baklava`` custom ops.

* :mod:`~baklava.trt_plugins.reference` - plain PyTorch contracts of the kernels (the oracle);
* :mod:`~baklava.trt_plugins.triton_decode_attention` - decode attention over the packed, ragged
  cache (Triton, GPU; imports ``triton``, so import it only where a GPU is).

Still to come (issue 6): the cache-update and prefill-compression kernels and the GPU runtime
path; (issue 7) the TensorRT plugins that call these kernels.
"""
