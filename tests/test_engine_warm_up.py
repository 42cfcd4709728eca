"""The engine's warm-up builds every prefill kernel variant a served workload launches.

Triton compiles a kernel once per variant: its argument types, constexprs and, for ints and
pointers, whether they divide by 16. An argument that changes with a prompt's length (a chunk's
length, a stride it sets) makes a new variant for other lengths, compiled while requests wait:
seconds on a GPU per kernel. On the CPU the interpreter runs the kernels, so this serves prompts
of many lengths after :meth:`Engine.warm_up`, records each launch
(``tests/launch_recorder.launch_spec``) and asks ``tests/gpu_compile.py --keys`` (without the
interpreter) for their variant keys. Decode kernels are left out: on the GPU the CUDA-graph
captures build those for every batch bucket before the warm-up.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from baklava.bench.serve_engine import workload
from baklava.eviction import EvictionConfig
from baklava.runtime.engine import Engine
from baklava.runtime.packed_cache import BudgetedLayer
from baklava.runtime.sampling import SamplingParams
from tests import gpu_compile
from tests.conftest import _tiny_tokenizer, tiny_config
from tests.launch_recorder import launch_spec

pytest.importorskip("triton", reason="Triton is not installed")
PREFILL_MODULES = ("baklava.kernels.prefill_attention", "baklava.kernels.prefill_select")


@pytest.mark.skipif(torch.cuda.is_available(), reason="records the interpreter's launches")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter")
@pytest.mark.parametrize("caps", [[[40, 90], [70, 50]], [[264, 264], [264, 264]]], ids=["evicting", "full"])
def test_a_served_workload_launches_no_prefill_variant_the_warm_up_did_not(caps, monkeypatch, tmp_path):
    from triton.runtime.interpreter import InterpretedFunction

    launches, phase, run = {}, ["warm-up"], InterpretedFunction.run  # each distinct launch: when first made

    def recording_run(self, *args, grid, warmup, **kwargs):
        if self.fn.__module__ in PREFILL_MODULES:
            spec = launch_spec(self, args, kwargs)
            launches.setdefault(json.dumps(spec, sort_keys=True), (phase[0], spec))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    monkeypatch.setattr(BudgetedLayer, "decode_kernels", "triton")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(max_position_embeddings=512)).eval()
    eviction = EvictionConfig(sink=2, window=4, obs_window=4)
    engine = Engine.from_capacities(
        model,
        _tiny_tokenizer(),
        caps,
        eviction,
        max_batch=6,
        prefill_chunk=64,
        max_prefill_tokens=256,
        chat=False,
    )
    work = workload(24, (16, 256), (2, 4), np.arange(4, 90), seed=0)  # last chunks of every length mod 16
    lengths = [len(w.prompt) for w in work]
    assert len({n % 64 % 16 for n in lengths}) >= 12
    engine.warm_up([min(lengths), max(lengths)])  # what the engine bench and a served instance do
    phase[0] = "served"
    for w in work:
        engine.submit(w.prompt, SamplingParams(max_tokens=w.max_tokens, ignore_eos=True))
    while engine.has_work():
        engine.step()

    made = list(launches.values())
    path = tmp_path / "launches.json"
    path.write_text(json.dumps([spec for _, spec in made]))
    keys = gpu_compile.run(path, "--keys", timeout=600)
    warm = {key for key, (when, _) in zip(keys, made, strict=True) if when == "warm-up"}
    served = [spec["name"] for key, (when, spec) in zip(keys, made, strict=True) if key not in warm]
    assert {spec["name"] for when, spec in made if when == "served"} >= {"_attention_kernel"}
    assert served == [], f"variants compiled after the warm-up: {sorted(set(served))}"
