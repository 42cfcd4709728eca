"""Serving: Triton Inference Server model repository, the Python-backend model, the launcher."""
