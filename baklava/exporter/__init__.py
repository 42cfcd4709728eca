"""Exporter: profile + allocation -> deployable artifact directory (ONNX graph in a later issue)."""

from baklava.exporter.artifact import Artifact, read_artifact, write_artifact

__all__ = ["Artifact", "read_artifact", "write_artifact"]
