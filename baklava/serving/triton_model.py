"""The Triton Python-backend model (decoupled) on the batching engine: one engine per instance.

A model repository's ``1/model.py`` re-exports :class:`TritonPythonModel` from here. Each
instance loads the artifact once (``parameters.artifact`` in ``config.pbtxt``), on CUDA in bf16 on
the GPU Triton placed it on (``model_instance_device_id``), and serves every request from one
:class:`~baklava.runtime.engine.Engine`, whose pool rows are sequence slots: a row is emptied
before each request, so no cache is shared between requests. ``execute()`` only parses and
enqueues; a background :class:`~baklava.serving.engine_loop.EngineLoop` owns the engine and
answers through each request's response sender, stopping a request whose client has gone
(``is_cancelled()``). Requests follow Triton's LLM conventions:

========================  =====================  ==========================================
tensor                    type                   meaning
========================  =====================  ==========================================
``text_input``            BYTES [1]              the prompt (required)
``context``               BYTES [1]              a document read before the prompt, compressed as
                                                 the quality benchmark measures it (optional)
``max_tokens``            INT32 [1]              tokens to generate (default 64)
``stream``                BOOL [1]               one response per text piece (default false)
``temperature``           FP32 [1]               0 = greedy (default)
``top_p`` / ``top_k``     FP32 [1] / INT32 [1]   nucleus / top-k sampling
``seed``                  UINT64 [1]             sampling seed
``text_output``           BYTES [1]              generated text (a piece when streaming)
``num_tokens``            INT32 [1]              tokens generated for it (a piece may hold several:
                                                 pieces a client has not taken yet merge)
========================  =====================  ==========================================

Bad requests get an error response; the instance keeps serving. Pool size (``config.pbtxt``
parameters): ``max_batch`` rows, or as many as ``kv_memory`` bytes hold; neither: 8 rows on the
CPU, 80% of the GPU memory left after loading the model on CUDA.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

MAX_TOKENS_LIMIT = 4096
_DEFAULTS = {"max_tokens": 64, "stream": False, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None}


class RequestError(ValueError):
    """A request the model refuses (reported to the client, never raised to Triton)."""


def _scalar(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return _DEFAULTS.get(name)
    arr = tensor.as_numpy()
    if arr.size != 1:
        raise RequestError(f"{name} must hold exactly one value, got shape {list(arr.shape)}")
    value = arr.reshape(-1)[0]
    if name in ("text_input", "context"):
        return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
    return value.item() if isinstance(value, np.generic) else value


def _log_stats(stats: dict) -> None:
    """Where the engine's time went, every 10 s of activity, into the server's log (the stub's
    stderr is the server's)."""
    import sys

    from baklava.serving.engine_loop import format_stats

    print(format_stats(stats), file=sys.stderr, flush=True)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import sys

        import torch

        from baklava.exporter import read_artifact
        from baklava.model_zoo import load_model
        from baklava.runtime.chat_split import ChatSplit
        from baklava.runtime.engine import Engine
        from baklava.serving.engine_loop import EngineLoop, format_ready
        from baklava.serving.triton_repo import pool_size

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        artifact = Path(params.get("artifact", "artifact"))
        if not artifact.is_absolute():
            artifact = Path(args["model_repository"]) / args["model_version"] / artifact
        torch.set_num_threads(int(params.get("threads", os.cpu_count() or 1)))
        self.artifact = read_artifact(artifact)
        device = params.get("device", "cpu")
        if device.startswith("cuda") and args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args.get('model_instance_device_id', 0)}"  # where Triton placed this instance
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device).index or 0)
        self.lm = load_model(self.artifact.model_spec, dtype=dtype, progress=False)
        self.lm.model.to(device)
        kv_memory, max_batch = pool_size(params, device)
        self.engine = Engine.from_profile(
            self.lm.model,
            self.lm.tokenizer,
            self.artifact.profile,
            kv_memory=kv_memory,
            max_batch=max_batch,
            prefill_chunk=int(params.get("prefill_chunk", 8192)),
            chat=params.get("chat_template", "true").lower() == "true",
        )
        self.engine.step_fn.capture_all()  # CUDA graphs recorded before the first request
        if device.startswith("cuda"):
            self.engine.warm_up()  # and the prefill / commit kernels compiled (CPU: no kernels)
        self.split = ChatSplit(self.lm.tokenizer, self.engine.chat)  # where a context ends
        self.loop = EngineLoop(self.engine, on_stats=_log_stats).start()
        print(format_ready(self.engine), file=sys.stderr, flush=True)  # the pool, into the server's log

    def _params(self, request):
        from baklava.runtime.sampling import SamplingParams

        prompt = _scalar(request, "text_input")
        if prompt is None:
            raise RequestError("missing input 'text_input'")
        if not prompt.strip():
            raise RequestError("text_input is empty")
        max_tokens = int(_scalar(request, "max_tokens"))
        if not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
            raise RequestError(f"max_tokens must be in [1, {MAX_TOKENS_LIMIT}], got {max_tokens}")
        seed = _scalar(request, "seed")
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=float(_scalar(request, "temperature")),
            top_p=float(_scalar(request, "top_p")),
            top_k=int(_scalar(request, "top_k")),
            seed=None if seed is None else int(seed),
        )
        context = _scalar(request, "context")
        # Tokenized here, on Triton's thread, not on the engine's: a 16k-token prompt takes 15-30 ms
        # (mostly outside the GIL), which the engine thread would otherwise spend between steps.
        if context is not None:  # one chat message cut after the document, as baklava-run cuts it
            if not context.strip():
                raise RequestError("context is empty")
            prompt, context = self.split.question_ids(prompt), self.split.context_ids(context)
        else:
            prompt = self.engine.encode(prompt)
        return prompt, bool(_scalar(request, "stream")), sampling, context

    @staticmethod
    def _text_response(text: str, tokens: int):
        out = pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))
        count = pb_utils.Tensor("num_tokens", np.array([tokens], dtype=np.int32))
        return pb_utils.InferenceResponse(output_tensors=[out, count])

    @staticmethod
    def _error_response(message: str):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))

    def _enqueue(self, request) -> None:
        from baklava.errors import BaklavaError

        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            prompt, stream, sampling, context = self._params(request)
        except (RequestError, BaklavaError, ValueError, TypeError) as e:
            sender.send(self._error_response(str(e)), flags=final)
            return
        parts: list[str] = []
        tokens = [0]  # generated, not yet reported (a token whose text is incomplete waits for the next)

        def on_event(event) -> None:  # on the engine loop's delivery thread
            tokens[0] += len(event.token_ids)
            if event.error is not None:
                sender.send(self._error_response(event.error), flags=final)
            elif stream:
                if event.text or (event.finished and tokens[0]):
                    sender.send(
                        self._text_response(event.text, tokens[0]), flags=final if event.finished else 0
                    )
                    tokens[0] = 0
                elif event.finished:
                    sender.send(flags=final)
            else:
                parts.append(event.text)
                if event.finished:
                    sender.send(self._text_response("".join(parts), tokens[0]), flags=final)

        is_cancelled = getattr(request, "is_cancelled", None)
        self.loop.submit(prompt, sampling, on_event, is_cancelled, context=context)

    def execute(self, requests):
        for request in requests:
            self._enqueue(request)
        return None  # decoupled: responses go through each request's sender, from the engine's thread

    def finalize(self) -> None:
        if getattr(self, "loop", None) is not None:
            self.loop.stop()
        self.lm = self.engine = self.loop = None
