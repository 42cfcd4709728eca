# The decode-attention kernel before (two-pass merge, commit ef9c045) and after the one-pass merge,
# timed in one run: the kernel cases of `baklava-bench speed` and the fused decode step
# (BENCHMARKS.md, decode-attention kernel). GPU machine, in a git checkout:
#   python benchmarks/gpu/combine_ab.py      (writes combine_ab.json to $OUT or /tmp)
import importlib.util, json, os, subprocess, sys, tempfile, torch
old_src = subprocess.run(["git", "show", "ef9c045:baklava/kernels/decode_attention.py"],
                         capture_output=True, text=True, check=True).stdout
old_path = os.path.join(tempfile.mkdtemp(), "old_attn.py")
open(old_path, "w").write(old_src)
spec = importlib.util.spec_from_file_location("old_attn", old_path)
old_attn = importlib.util.module_from_spec(spec); spec.loader.exec_module(old_attn)
import baklava.kernels.decode_attention as new_attn
from baklava.bench import kernel_speed as ks
res = {"kernel": [], "e2e": []}
for rep in range(2):
    for case in ks.CASES:
        row = {"case": case}
        for name, mod in (("old", old_attn), ("new", new_attn)):
            ks.packed_decode_attention = mod.packed_decode_attention
            r = ks.measure(*case)
            row[name] = r["packed_vs_dense_same_bandwidth"]; row[name + "_ms"] = r["packed_ms"]
        print(json.dumps(row), flush=True); res["kernel"].append(row)
from baklava.bench.gpu_decode import LLAMA3_8B, random_llama, uneven_capacities, filled_cache, model_shape, median_ms, copy_bandwidth, weight_bytes_read
from baklava.runtime.attention import enable
from baklava.runtime import fused_decode
from baklava.eviction import EvictionConfig
from baklava.runtime.cuda_graph import DecodeGraph
bw = copy_bandwidth(); torch.cuda.empty_cache()
model = random_llama(LLAMA3_8B); enable(model); fused_decode.fuse(model)
W = weight_bytes_read(model); L, H, _, _ = model_shape(model)
for budget in (1.0, 0.3):
    cache = filled_cache(model, uneven_capacities(L, H, 16384, budget), 8, 16384, EvictionConfig())
    for rep in range(2):
        for name, mod in (("old", old_attn), ("new", new_attn)):
            new_attn_fn = mod.packed_decode_attention
            import baklava.kernels.decode_attention as m
            saved = m.packed_decode_attention; m.packed_decode_attention = new_attn_fn
            g = DecodeGraph(model, cache, torch.zeros(8, dtype=torch.long, device="cuda"), 2)
            g.replay(); ms = median_ms(g.replay, 30)
            m.packed_decode_attention = saved
            floor = (W + cache.kv_bytes()) / bw * 1e3
            r = dict(budget=budget, variant=name, rep=rep, step_ms=ms, floor_ms=floor, over=ms / floor)
            print(json.dumps(r), flush=True); res["e2e"].append(r)
            del g; torch.cuda.empty_cache()
    del cache; torch.cuda.empty_cache()
json.dump(res, open(os.environ.get("OUT", "/tmp") + "/combine_ab.json", "w"), indent=1)
