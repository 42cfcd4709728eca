"""The Triton Python-backend model (decoupled): one BaKlaVa runtime per instance.

A model repository's ``1/model.py`` re-exports :class:`TritonPythonModel` from here. Each
instance loads the artifact once (``parameters.artifact`` in ``config.pbtxt``); every request gets
a fresh :class:`~baklava.runtime.packed_cache.BudgetedCache`, so no cache is shared between
requests. Requests follow Triton's LLM conventions:

========================  =====================  ==========================================
tensor                    type                   meaning
========================  =====================  ==========================================
``text_input``            BYTES [1]              the prompt (required)
``max_tokens``            INT32 [1]              tokens to generate (default 64)
``stream``                BOOL [1]               one response per text piece (default false)
``temperature``           FP32 [1]               0 = greedy (default)
``top_p`` / ``top_k``     FP32 [1] / INT32 [1]   nucleus / top-k sampling
``seed``                  UINT64 [1]             sampling seed
``text_output``           BYTES [1]              generated text (a piece when streaming)
========================  =====================  ==========================================

Bad requests get an error response; the instance keeps serving.
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
    if name == "text_input":
        return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
    return value.item() if isinstance(value, np.generic) else value


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import torch

        from baklava.exporter import read_artifact
        from baklava.model_zoo import load_model

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        artifact = Path(params.get("artifact", "artifact"))
        if not artifact.is_absolute():
            artifact = Path(args["model_repository"]) / args["model_version"] / artifact
        torch.set_num_threads(int(params.get("threads", os.cpu_count() or 1)))
        self.chat = params.get("chat_template", "true").lower() == "true"
        self.artifact = read_artifact(artifact)
        device = params.get("device", "cpu")
        self.lm = load_model(self.artifact.model_spec, progress=False)
        self.lm.model.to(device)
        from baklava.runtime import enable

        enable(self.lm.model)

    def _params(self, request):
        from baklava.runtime.streaming import SamplingParams

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
        return prompt, bool(_scalar(request, "stream")), sampling

    @staticmethod
    def _text_response(text: str):
        out = pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))
        return pb_utils.InferenceResponse(output_tensors=[out])

    def _serve(self, request) -> None:
        from baklava.errors import BaklavaError
        from baklava.runtime import BudgetedCache
        from baklava.runtime.streaming import stream_generate

        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            prompt, stream, sampling = self._params(request)
            cache = BudgetedCache.from_profile(self.artifact.profile)  # fresh per request
            pieces = stream_generate(
                self.lm.model, self.lm.tokenizer, cache, prompt, sampling, chat=self.chat
            )
            if stream:
                for piece in pieces:
                    sender.send(self._text_response(piece))
                sender.send(flags=final)
            else:
                sender.send(self._text_response("".join(pieces)), flags=final)
        except (RequestError, BaklavaError, ValueError, TypeError) as e:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))), flags=final)
        except Exception as e:  # noqa: BLE001 - one failed request must not take the instance down
            msg = f"internal error: {type(e).__name__}: {e}"
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(msg)), flags=final)

    def execute(self, requests):
        for request in requests:
            self._serve(request)
        return None  # decoupled: responses went through each request's sender

    def finalize(self) -> None:
        self.lm = None
