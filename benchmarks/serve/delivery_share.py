"""How much a client-facing thread slows the engine thread inside Triton's Python backend stub.

    python benchmarks/serve/delivery_share.py [ROWS] [OPS]

Starts a real tritonserver (the nvidia-pytriton wheel) with a throwaway decoupled model whose one
request runs, inside the stub, an :class:`~baklava.serving.engine_loop.EngineLoop` over a fake
engine: each step makes OPS small torch calls (the engine thread's host work, each releasing and
retaking the GIL as real torch calls do) and one event for each of ROWS requests. Each request's
callback is (a) nothing, or (b) a real ``InferenceResponseSender.send`` (an IPC round trip to the
server), with the delivery thread allowed ``delivery_share`` 1.0, 0.25 and 0.1 of the time. It
prints the engine's steps a second and the callbacks (sends) a second in each case, 2 s each, one run.
"""

from __future__ import annotations

import json
import sys
import tempfile
import urllib.request
from pathlib import Path

from baklava.serving.server import TritonServer

CONFIG = """name: "probe"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "text_output" data_type: TYPE_STRING dims: [ -1 ] },
         { name: "num_tokens" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""

MODEL = """
import itertools, json, sys, threading, time
import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from baklava.runtime.engine import Event
from baklava.serving.engine_loop import EngineLoop

ROWS, OPS, SECONDS = {rows}, {ops}, 2.0
SWITCH_S = (0.005, 0.0005)  # Python's default GIL switch interval, and a tenth of it


class FakeEngine:
    phase_seconds, prefill_tokens = {{}}, 0

    def __init__(self):
        self.x, self.steps, self.ids, self.until = torch.zeros(16), 0, [], None

    def submit(self, prompt, params, request_id, context=None):
        self.ids.append(request_id)

    def has_work(self):
        return len(self.ids) == ROWS and (self.until is None or time.monotonic() < self.until)

    def step(self):
        self.until = self.until or time.monotonic() + SECONDS
        for _ in range(OPS):
            self.x.add_(1)
        self.steps += 1
        done = time.monotonic() >= self.until
        return [Event(r, "x", [1], finished=done, finish_reason="length" if done else None) for r in self.ids]

    def cancel(self, request_id):
        pass

    def abort_all(self, reason):
        return []


class TritonPythonModel:
    def initialize(self, args):
        torch.set_num_threads(1)

    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self._run, args=(request,), daemon=True).start()

    def _run(self, request):
        sender = request.get_response_sender()

        def send(event):
            text = pb_utils.Tensor("text_output", np.array([event.text.encode()], dtype=np.object_))
            count = pb_utils.Tensor("num_tokens", np.array([len(event.token_ids)], dtype=np.int32))
            sender.send(pb_utils.InferenceResponse(output_tensors=[text, count]))

        cases = [("no client", lambda e: None, 1.0)] + [
            (f"send, share {{share}}", send, share) for share in (1.0, 0.25, 0.1)
        ]
        result = {{}}
        default = sys.getswitchinterval()
        for (name, callback, share), switch in itertools.product(cases, SWITCH_S):
            name += f", switch {{switch * 1e3:g}} ms"
            sys.setswitchinterval(switch)
            engine, sends = FakeEngine(), [0]

            def counted(event, callback=callback):
                sends[0] += 1
                callback(event)

            with EngineLoop(engine, delivery_share=share) as loop:
                for _ in range(ROWS):
                    loop.submit([1], None, counted)
                while engine.until is None or time.monotonic() < engine.until + 0.5:
                    time.sleep(0.05)
            result[name] = {{"steps_per_s": round(engine.steps / SECONDS), "sends_per_s": round(sends[0] / SECONDS)}}
        sys.setswitchinterval(default)
        out = pb_utils.Tensor("text_output", np.array([json.dumps(result).encode()], dtype=np.object_))
        sender.send(pb_utils.InferenceResponse(output_tensors=[out]),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
"""


def main(rows: int = 140, ops: int = 1000) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        version = Path(tmp, "repo", "probe", "1")
        version.mkdir(parents=True)
        (version.parent / "config.pbtxt").write_text(CONFIG)
        (version / "model.py").write_text(MODEL.format(rows=rows, ops=ops))
        with TritonServer(Path(tmp, "repo"), 0, 0, 0, log_path=Path(tmp, "log")).start(probe=False) as server:
            req = urllib.request.Request(
                f"http://{server.http_url}/v2/models/probe/generate_stream",
                data=json.dumps({"text_input": "go"}).encode(),
            )
            lines = urllib.request.urlopen(req, timeout=120).read().decode().splitlines()
    last = [line for line in lines if line.startswith("data:")][-1]
    return json.loads(json.loads(last[5:])["text_output"])


if __name__ == "__main__":
    result = main(*(int(a) for a in sys.argv[1:3]))
    base = result["no client, switch 5 ms"]["steps_per_s"]
    print("| delivery | engine steps/s | vs no client | callbacks/s |\n|---|---|---|---|")
    for name, r in result.items():
        print(f"| {name} | {r['steps_per_s']} | {r['steps_per_s'] / base:.2f}x | {r['sends_per_s']} |")
