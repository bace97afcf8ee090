"""The monitor's image embedding from a network every archive already carries: the input gate.

The gate (:mod:`cxrserve.models.gate`) ends in a global-average-pooled convolutional block
(64 values for the shipped width) before its classifier. Those features describe what an image
looks like to a network trained to tell frontal chest films from everything else, so a new
detector, a paediatric ward or screenshots move them; they are cheaper than any clinical model
(a 128 x 128 input, well under a millisecond per image on one CPU core) and the same in every archive of a store.

The archive's ONNX gate (``gate/model.onnx``) is loaded once more with the input of its final
Gemm (the pooled features) as an extra output, on one thread, by the monitor's thread only; an
archive without it (no gate, a TorchScript-only gate, a graph without a final Gemm) falls back to
the block-mean thumbnail of :func:`cxrserve.core.drift_record.image_features`. Each
record says which it has (``Record.embedding_source``), and a reference only compares like with like.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

#: ``Record.embedding_source`` of the fallback thumbnail.
THUMBNAIL = "thumbnail"
_CACHE: dict[str, "GateEmbedder | None"] = {}
_LOCK = threading.Lock()


class GateEmbedder:
    """``embed(list of gate inputs) -> (N, D) float32``: the features the gate's classifier reads."""

    def __init__(self, session, feature: str, transform: Callable, source: str):
        self.session, self.feature, self.transform, self.source = session, feature, transform, source
        self.input = session.get_inputs()[0].name

    def inputs(self, xrays) -> list:
        """The gate's own preprocessing of each image (done on the request path: a 128 px resize)."""
        return [np.asarray(self.transform(x.uint8), dtype=np.float32) for x in xrays]

    def embed(self, inputs: list) -> np.ndarray:
        if not inputs:
            return np.zeros((0, 0), np.float32)
        x = np.stack([a if a.ndim == 3 else a[0] for a in inputs]).astype(np.float32)
        (feats,) = self.session.run([self.feature], {self.input: x})
        return np.asarray(feats, np.float32).reshape(len(inputs), -1)


def _features_session(onnx_path: Path):
    """An ONNX Runtime session of the gate that also answers the input of its final Gemm/MatMul
    (the pooled features), or ``(None, "")`` when the graph has no such node."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    last = next((n for n in reversed(model.graph.node) if n.op_type in ("Gemm", "MatMul")), None)
    if last is None:
        return None, ""
    feature = last.input[0]
    if feature not in {o.name for o in model.graph.output}:
        model.graph.output.append(onnx.helper.make_tensor_value_info(feature, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the monitor's thread must not compete with serving for cores
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session, feature


def gate_embedder(pipeline) -> GateEmbedder | None:
    """The embedder of ``pipeline``'s gate (cached per gate file), or None to use the thumbnail."""
    gate = getattr(pipeline, "gate", None)
    path = Path(getattr(gate, "path", "") or "") / "model.onnx" if gate is not None else None
    if path is None or not path.is_file():
        return None
    key = str(path.resolve())
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        embedder = None
        try:
            session, feature = _features_session(path)
            if session is not None:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
                embedder = GateEmbedder(session, feature, gate.transform(), f"gate:{digest}")
        except Exception:  # an archive whose gate cannot be read this way: the thumbnail stands
            log.warning("monitor: gate features unavailable, using the image thumbnail", exc_info=True)
        _CACHE[key] = embedder
        return embedder


def pending_embeddings(pipeline, items: list, records: list) -> tuple:
    """``(embedder, gate inputs, record indices)`` for the records of decoded items (no network run yet)."""
    embedder = gate_embedder(pipeline)
    if embedder is None:
        return None, [], []
    index = [i for i, item in enumerate(items) if getattr(item, "xray", None) is not None and records[i].stats is not None]
    return embedder, embedder.inputs([items[i].xray for i in index]), index


def apply_embeddings(records, embedder: GateEmbedder | None, inputs: list, index: list[int]) -> None:
    """Replace the thumbnails of ``records[index[k]]`` by the gate features of ``inputs[k]``."""
    if embedder is None or not index:
        return
    feats = embedder.embed(inputs)
    for k, i in enumerate(index):
        records[i].embedding = [round(float(v), 5) for v in feats[k]]
        records[i].embedding_source = embedder.source
