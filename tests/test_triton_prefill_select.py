"""The prefill-compression kernels against the per-head reference (``BudgetedLayer._commit_head``).

Random cache states and chunks (left padding, ties in the scores, heads with room and full ones,
capacity 1); every live slot must match slot for slot: the kernels keep arrival order like the
reference. Runs on a CUDA device, or in Triton's interpreter on the CPU.
"""

import copy

import numpy as np
import pytest
import torch

from baklava.eviction import EvictionConfig
from baklava.runtime import kv_slots
from baklava.runtime.packed_cache import BudgetedLayer
from tests.triton_env import DEVICE

pytest.importorskip("triton", reason="Triton is not installed")

from baklava.kernels.prefill_select import packed_prefill_select  # noqa: E402

D = 32


def _state(caps, batch, seed, policy, tie_scores):
    gen = torch.Generator().manual_seed(seed)
    layer = BudgetedLayer(caps, EvictionConfig(sink=2, window=3, policy=policy, pool_kernel=1))
    empty = torch.empty(batch, len(caps), 0, D, dtype=torch.float16, device=DEVICE)
    layer.lazy_initialization(empty, empty)
    seen = torch.randint(max(caps), 3 * max(caps), (batch,), generator=gen)
    for b in range(batch):
        for h, (off, cap) in enumerate(zip(layer.offsets, caps, strict=True)):
            n = int(torch.randint(0, cap + 1, (1,), generator=gen))
            pos = torch.randperm(int(seen[b]), generator=gen)[:n].sort().values
            layer.positions[b, off : off + n] = pos.to(DEVICE)
            layer.fill[b, h] = n
    score = torch.rand(batch, layer.total, generator=gen) * 1e-2
    if tie_scores == "wide":  # scores over 32 orders of magnitude: the search's range is all of it
        score = 10.0 ** (torch.rand(batch, layer.total, generator=gen) * 32 - 30)
    elif tie_scores:  # SnapKV pooling makes neighbours tie: coarse scores give many equal ones
        score = (score * 1e3).round() / 1e5
    layer.scores.copy_(score.to(DEVICE))
    layer.keys.copy_(torch.randn(batch, layer.total, D, generator=gen).half().to(DEVICE))
    layer.values.copy_(torch.randn(batch, layer.total, D, generator=gen).half().to(DEVICE))
    layer.valid_seen.copy_(seen.to(DEVICE))
    return layer, gen


@pytest.mark.parametrize("policy", ["h2o", "ring"])
@pytest.mark.parametrize(
    ("caps", "batch", "chunk", "tie_scores"),
    [
        ([1, 6, 40], 2, 9, False),
        ([5, 17, 120, 2], 2, 33, True),  # one head keeps everything, others evict; ties
        ([24], 1, 70, False),  # chunk longer than the capacity
        ([3, 9, 50, 31], 2, 40, "wide"),  # priorities spread over the whole float range
    ],
)
def test_select_keeps_what_the_reference_keeps(policy, caps, batch, chunk, tie_scores):
    ref, gen = _state(caps, batch, len(caps) * 10 + chunk, policy, tie_scores)
    heads = len(caps)
    valid = torch.ones(batch, chunk, dtype=torch.bool)
    valid[-1, : chunk // 3] = False  # the last row is left-padded
    valid = valid.to(DEVICE)
    k_new = torch.randn(batch, heads, chunk, D, generator=gen).half().to(DEVICE)
    v_new = torch.randn(batch, heads, chunk, D, generator=gen).half().to(DEVICE)
    # attention mass of each head's candidates (its live slots, then the chunk), as attend() has it
    mass = []
    for h in range(heads):
        m = torch.rand(batch, int(ref.fill[:, h].max()) + chunk, generator=gen) * 1e-2
        if tie_scores == "wide":
            m = 10.0 ** (m * 3200 - 30)
        elif tie_scores:
            m = (m * 1e3).round() / 1e5
        mass.append(m.to(DEVICE))

    # the kernel's inputs, built as attend() builds them before committing
    scores = ref.scores.clone()
    for h, off in enumerate(ref.offsets):
        n = mass[h].shape[1] - chunk
        scores[:, off : off + n] += mass[h][:, :n]
    new_pos = ref.valid_seen[:, None] + valid.cumsum(1) - 1
    new_scores = torch.stack([m[:, -chunk:] for m in mass], 1).masked_fill(~valid[:, None], 0).contiguous()
    seen_after = ref.valid_seen + valid.sum(1)
    offsets = torch.tensor(ref.offsets, dtype=torch.int32, device=DEVICE)
    ev = ref.eviction
    want, before = copy.deepcopy(ref), copy.deepcopy(ref)  # the kernels write into ref's tensors
    got = packed_prefill_select(
        [(ref.keys, ref.values, k_new, v_new)], ref.positions, scores, ref.fill, new_pos, new_scores, valid,
        seen_after, caps, offsets, sink=ev.sink, window=ev.window, policy=ev.policy, block=32,
    )  # fmt: skip
    assert all(
        g is t for g, t in zip(got, (ref.keys, ref.values, ref.positions, scores, ref.fill), strict=True)
    )
    for h in range(heads):
        n = mass[h].shape[1] - chunk
        new = {"keys": k_new[:, h], "values": v_new[:, h]}
        want._commit_head(h, n, new, valid, mass[h] if policy == "h2o" else None)
    keys, values, positions, new_scores_out, fill = got
    assert torch.equal(fill, want.fill)
    evicted = 0
    for b in range(batch):
        for h, off in enumerate(ref.offsets):
            live = slice(off, off + int(want.fill[b, h]))
            where = f"row {b}, head {h}"
            assert torch.equal(positions[b, live], want.positions[b, live]), where
            assert torch.equal(keys[b, live], want.keys[b, live]), where
            assert torch.equal(values[b, live], want.values[b, live]), where
            if policy == "h2o":
                assert torch.equal(new_scores_out[b, live], want.scores[b, live]), where
            evicted += int(before.fill[b, h]) + int(valid[b].sum()) - int(want.fill[b, h])
            rest = slice(off + int(want.fill[b, h]), off + caps[h])  # past the new fill: untouched
            assert torch.equal(keys[b, rest], before.keys[b, rest]), where
            assert torch.equal(positions[b, rest], before.positions[b, rest]), where
    assert evicted > 0


def test_no_candidates_and_capacity_one():
    caps = [1, 3]
    ref, gen = _state(caps, 2, 0, "h2o", False)
    ref.fill.zero_()
    valid = torch.zeros(2, 4, dtype=torch.bool, device=DEVICE)
    valid[1, 2:] = True  # row 0: only padding; row 1: two tokens
    z = torch.zeros(2, 2, 4, D, dtype=torch.float16, device=DEVICE)
    new_pos = (ref.valid_seen[:, None] + valid.cumsum(1) - 1).clamp(min=0)
    new_scores = torch.tensor([[0.0, 0.0, 0.5, 0.1]] * 2, device=DEVICE)[:, None].expand(2, 2, 4).contiguous()
    out = packed_prefill_select(
        [(ref.keys, ref.values, z, z)], ref.positions, ref.scores, ref.fill, new_pos, new_scores, valid,
        ref.valid_seen + valid.sum(1), caps, torch.tensor(np.cumsum([0, 1]), dtype=torch.int32, device=DEVICE),
        sink=0, window=0, policy="h2o",
    )  # fmt: skip
    assert out[4].tolist() == [[0, 0], [1, 2]]
    first_new = int(ref.valid_seen[1])  # capacity 1 keeps the higher-scored (older) of the two
    assert int(out[2][1, 0]) == first_new and out[2][1, 1:3].tolist() == [first_new, first_new + 1]


@pytest.mark.parametrize(
    ("policy", "kv_format"),
    [("h2o", None), ("ring", None), ("h2o", "int8"), ("h2o", "fp8"), ("ring", "int4")],
)
def test_chunked_prefill_through_attend_matches_the_reference(policy, kv_format, monkeypatch):
    """``BudgetedLayer.attend`` with the kernels attending and committing each chunk (what it
    does on CUDA; padding masked in the kernels) against its per-head loop: two chunks, the
    second evicting, left padding in one row. Quantized slots: payload and scales kept together,
    byte for byte."""
    caps, batch, q_heads = [3, 11, 20], 2, 6
    gen = torch.Generator().manual_seed(7)
    rand = lambda *s: torch.randn(*s, generator=gen).half().to(DEVICE)  # noqa: E731
    eviction = EvictionConfig(sink=1, window=2, policy=policy, obs_window=4, pool_kernel=3)
    layers = {kind: BudgetedLayer(caps, eviction, kv_format) for kind in ("torch", "triton")}
    for kind, layer in layers.items():
        layer.decode_kernels = kind
    for chunk, pad in ((12, 5), (16, 0)):
        k, v, q = rand(batch, 3, chunk, D), rand(batch, 3, chunk, D), rand(batch, q_heads, chunk, D)
        keep = torch.ones(batch, chunk, dtype=torch.bool)
        keep[1, :pad] = False
        causal = torch.ones(chunk, chunk, dtype=torch.bool).tril()
        mask = (causal[None] & keep[:, None, :])[:, None].to(DEVICE)
        outs = []
        for layer in layers.values():
            layer.update(k, v)
            outs.append(layer.attend(q, mask, D**-0.5)[0])
        real = keep.to(DEVICE)  # a padded query's output is no token's: the kernels give 0
        torch.testing.assert_close(outs[1][real], outs[0][real], atol=2e-3, rtol=0)
        assert torch.isfinite(outs[1]).all()
    ref, got = layers["torch"], layers["triton"]
    assert torch.equal(ref.fill, got.fill)
    for b in range(batch):
        for h, off in enumerate(ref.offsets):
            live = slice(off, off + int(ref.fill[b, h]))
            assert torch.equal(ref.positions[b, live], got.positions[b, live])
            for name in ref.slot_names:  # keys, values (+ their scales when quantized)
                assert torch.equal(getattr(ref, name)[b, live], getattr(got, name)[b, live]), name
            torch.testing.assert_close(got.scores[b, live], ref.scores[b, live], rtol=0, atol=1e-3)
    assert ref.slot_names == (("keys", "values") if kv_format is None else kv_slots.QUANTIZED)


# run without the interpreter (its jit functions cannot be compiled): both launches of the in-place
# move, with positions and scores (bf16 slots) and without (int8 scales, int4's 3-word ones), for sm_90
_COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from baklava.kernels.prefill_select import _move_kernel

for slot, width, meta in (("*bf16", 128, True), ("*fp16", 1, False), ("*fp16", 3, False)):
    pointers = dict(K=slot, V=slot, POS="*i64", SCORE="*fp32", KN=slot, VN=slot, NEW_POS="*i64",
                    NEW_SCORE="*fp32", KEEP="*i32", NEW_FILL="*i64", CAPS="*i32", OFFSETS="*i32",
                    K_S=slot, V_S=slot, POS_S="*i64", SCORE_S="*fp32")
    for stage in (True, False):
        consts = dict(D=width, D_PAD=triton.next_power_of_2(width), BLOCK=64, META=meta, STAGE=stage)
        signature = {n: "constexpr" if n in consts else pointers.get(n, "i32") for n in _move_kernel.arg_names}
        source = triton.compiler.ASTSource(fn=_move_kernel, signature=signature, constexprs=consts)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        assert compiled.asm["cubin"], (slot, stage)
"""


def test_the_move_kernel_compiles_for_hopper():
    """The interpreter runs what the compiler refuses: compile both launches for sm_90 with
    Triton's own ptxas (no GPU needed)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
