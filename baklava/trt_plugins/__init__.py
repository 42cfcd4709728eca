"""TensorRT glue for the ``baklava`` custom ops: the plugins and the engine build.

The plugins (one kernel launch per op, TensorRT's ahead-of-time ABI):

* :mod:`~baklava.trt_plugins.aot_attention`, :mod:`~baklava.trt_plugins.aot_cache_update` - the
  two ops for any number of new tokens, one launch each, cache updated in place (the one-launch
  variants of :mod:`baklava.kernels`' kernels);
* :mod:`~baklava.trt_plugins.aot` - their launch plans (signature, constants, grid, PTX);
* :mod:`~baklava.trt_plugins.tensorrt_plugins` - registration with ``tensorrt.plugin``;
* :mod:`~baklava.trt_plugins.cuda_launch` - the PTX launched through the CUDA driver, as TensorRT
  launches it (GPU tests);
* :mod:`~baklava.trt_plugins.engine_build` - ``model.onnx`` -> ``model.engine`` with the plugins
  (``baklava-export --engine``).

The kernels the PyTorch runtime runs are in :mod:`baklava.kernels`.
"""
