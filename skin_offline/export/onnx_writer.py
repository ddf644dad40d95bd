"""A small ONNX graph builder whose weights stream straight into an external-data file.

Why hand-written: the torch exporters hold ~4x the fp32 model in RAM (29 GB at 7B -> >100 GB), and
optimum cannot export LLaVA (FINDINGS.md). Writing nodes with onnx.helper and appending each weight to
the `.data` file as soon as it is read keeps export memory at one tensor, and the graph stays small
enough (a few hundred standard ops) to read and to hand to TensorRT.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ALIGN = 4096  # page-aligned offsets let onnxruntime memory-map external data


class ExternalData:
    """Appends raw tensor bytes to one file and returns initializers that point into it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fh = open(self.path, "wb")
        self.offset = 0

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)  # (a LazyTensor is read here)
        pad = (-self.offset) % ALIGN
        if pad:
            self._fh.write(b"\0" * pad)
            self.offset += pad
        self._fh.write(memoryview(array.reshape(-1)).cast("B"))  # the array's own buffer: no tobytes() copy
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        t.dims.extend(array.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(array.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.offset += array.nbytes
        return t

    def close(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()


class LazyTensor:
    """A checkpoint tensor not read yet: its shape and how to read it (fp32). `.T` stays lazy, so a builder can
    describe a weight (`tensor(name).T`) for a graph's structure before a byte is read."""

    def __init__(self, shape: tuple[int, ...], read, dtype=np.float32):
        self.shape, self._read, self.dtype = tuple(int(d) for d in shape), read, np.dtype(dtype)

    @property
    def T(self) -> "LazyTensor":
        return LazyTensor(self.shape[::-1], lambda: self._read().T, self.dtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def reshape(self, *shape) -> "LazyTensor":
        return LazyTensor(
            np.empty(self.shape, np.bool_).reshape(*shape).shape, lambda: self._read().reshape(*shape), self.dtype
        )

    def __array__(self, dtype=None, copy=None):
        a = np.asarray(self._read(), self.dtype)
        return a if dtype is None else a.astype(dtype)


class LazyData:
    """ExternalData's stand-in while a graph's structure is built: each big tensor becomes an initializer that
    names it (no bytes), and `read(initializer)` produces it later, one at a time (quantize_graph streams them
    through their codecs into the real files: export --precision writes no fp32 copy)."""

    LOCATION = "<lazy>"

    def __init__(self):
        self.sources: dict[str, object] = {}

    def add(self, name: str, array) -> TensorProto:
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(np.dtype(array.dtype))
        t.dims.extend(array.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.LOCATION), ("offset", "0"), ("length", str(array.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.sources[name] = array
        return t

    def read(self, t: TensorProto) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(self.sources[t.name]), helper.tensor_dtype_to_np_dtype(t.data_type))

    def close(self) -> None:
        pass


class GraphBuilder:
    """Collects nodes/initializers; `w()` streams big weights out, `c()` keeps small constants inline."""

    def __init__(
        self, data: ExternalData | None, min_external_bytes: int = 1024, shared: dict[str, TensorProto] | None = None
    ):
        self.data = data
        self.shared = shared or {}  # initializers already written by a sibling graph (same bytes, same file)
        self.min_external = min_external_bytes
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._n = 0
        self.metadata: dict[str, str] = {}  # model metadata_props (e.g. names.GRAPH_LAYERS_KEY)

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def w(self, name: str, array: np.ndarray) -> str:
        if self.data is not None and array.nbytes >= self.min_external:
            self.inits.append(self.data.add(name, array))
        else:
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def w_shared(self, name: str, array_fn) -> str:
        """Like w(), but reuse a sibling graph's external tensor of that name: no read, no extra bytes."""
        if name in self.shared:
            t = TensorProto()
            t.CopyFrom(self.shared[name])
            self.inits.append(t)
            return name
        return self.w(name, array_fn())

    def c(self, array, dtype=np.int64, hint: str = "const") -> str:
        return self.w(self.fresh(hint), np.asarray(array, dtype=dtype))

    def op(self, op_type: str, *inputs: str, hint: str | None = None, n_out: int = 1, domain: str = "", **attrs):
        outs = [self.fresh(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(
            helper.make_node(op_type, list(inputs), outs, name=self.fresh("n_" + op_type), domain=domain, **attrs)
        )
        return outs[0] if n_out == 1 else outs

    def op_named(self, op_type: str, inputs: list[str], output: str, domain: str = "", **attrs) -> str:
        self.nodes.append(
            helper.make_node(op_type, inputs, [output], name=self.fresh("n_" + op_type), domain=domain, **attrs)
        )
        return output

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, name: str, elem_type: int, shape: list) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def model(self, graph_name: str, opset: int, extra_opsets: dict[str, int] | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.inits)
        opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
        m = helper.make_model(graph, opset_imports=opsets, producer_name="skin-offline")
        if self.metadata:
            helper.set_model_props(m, self.metadata)
        m.ir_version = 8  # readable by onnxruntime >= 1.14 and TensorRT 8.6 (Jetson JetPack 5/6)
        return m


def external_initializers(path: Path) -> dict[str, TensorProto]:
    """The external-data initializers of a saved graph (structure only; no weight bytes are read)."""
    model = onnx.load(str(path), load_external_data=False)
    return {t.name: t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL}


def save(model: onnx.ModelProto, path: Path) -> None:
    """Serialise a model whose big initializers already live in external data (proto stays small)."""
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
        f.flush()
        os.fsync(f.fileno())
