"""Where the Triton kernel tests run: on a CUDA device, else in Triton's interpreter on the CPU.

``conftest.py`` sets ``TRITON_INTERPRET=1`` on machines without CUDA before anything imports
Triton (the interpreter is chosen when ``triton.language`` is first imported).
"""

import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
