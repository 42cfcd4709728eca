"""Exporter: profile + allocation -> artifact directory with the ONNX decoder graph."""

from baklava.exporter.artifact import Artifact, read_artifact, write_artifact

__all__ = ["Artifact", "read_artifact", "write_artifact"]
