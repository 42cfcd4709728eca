"""A small builder for ONNX function bodies: ``b.op("Add", x, y)`` returns the output name."""

from __future__ import annotations

import numpy as np
from onnx import FunctionProto, NodeProto, TensorProto, helper, numpy_helper

from baklava.exporter.ops.spec import DOMAIN, ONNX_OPSET, OpSpec


class Body:
    """Collects nodes with unique local names; ``function()`` wraps them into a FunctionProto."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, hint: str | None = None, **attrs):
        names = [self._name(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=names[0], **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value, dtype=np.int64, hint: str = "c") -> str:
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), name=self._name(hint))
        return self.op("Constant", value=tensor, hint=hint)

    def ints(self, *values: int) -> str:
        return self.const(list(values))

    def slice(self, x: str, start: int, end: int, axis: int) -> str:
        return self.op("Slice", x, self.ints(start), self.ints(end), self.ints(axis))

    def rename(self, src: str, dst: str) -> None:
        self.nodes.append(helper.make_node("Identity", [src], [dst], name=f"{self.prefix}{dst}"))

    def function(self, spec: OpSpec, overload: str, doc: str) -> FunctionProto:
        return helper.make_function(
            DOMAIN,
            spec.name,
            list(spec.inputs),
            list(spec.outputs),
            self.nodes,
            opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
            attributes=list(spec.attributes),
            doc_string=doc,
            overload=overload,
        )


FLOAT_MIN = float(np.finfo(np.float32).min)
BOOL, INT64, FLOAT, DOUBLE = TensorProto.BOOL, TensorProto.INT64, TensorProto.FLOAT, TensorProto.DOUBLE


def make_op_node(
    spec: OpSpec, inputs: list[str], outputs: list[str], name: str, overload: str, attrs: dict
) -> NodeProto:
    """A ``baklava`` node calling the function overload ``overload`` (one per layer)."""
    node = helper.make_node(spec.name, inputs, outputs, name=name, domain=DOMAIN, **attrs)
    node.overload = overload
    return node
