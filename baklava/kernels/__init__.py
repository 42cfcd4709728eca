"""The GPU kernels (Triton), shared by the PyTorch runtime and the TensorRT plugins.

* :mod:`~baklava.kernels.reference` - plain PyTorch contracts of the kernels (the oracle);
* :mod:`~baklava.kernels.decode_attention` - decode attention over the packed, ragged cache
  (flash-decoding over a static tile table);
* :mod:`~baklava.kernels.cache_update` - one decode token's commit: H2O scores from the
  attention kernel's logits, append or in-place eviction;
* :mod:`~baklava.kernels.prefill_select` - a prefill chunk's compression: each head's
  top-priority candidates in arrival order, every head of a layer at once, written in place;
* :mod:`~baklava.kernels.decode_gemv` - the fused one-token layer's matmuls (norm prologue,
  SiLU and residual epilogues);
* :mod:`~baklava.kernels.rope` - RoPE on the fused q/k/v projection;
* :mod:`~baklava.kernels.launch` - programmatic dependent launch (Hopper and later).

They run on a CUDA device, or in Triton's CPU interpreter for the tests.
"""
