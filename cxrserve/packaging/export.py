"""Checkpoints -> TorchScript + ONNX components -> self-contained ``.mar`` archives.

One interface for every model (TorchScript is deprecated upstream in favour of
``torch.export``; keeping export behind these functions makes that swap local):

1. :func:`export_component` loads a checkpoint, traces it to ``model.pt``, exports
   ``model.onnx`` (opset 17, dynamic batch axis, TorchScript-based exporter), checks
   both against eager on the same inputs (max |diff| on every output, scaled by the
   output's magnitude where that exceeds 1, must stay within ``PARITY_ATOL``) and writes ``metadata.json`` + ``parity.json``.
2. :func:`build_archive` stages the components, ``pipeline.json`` and the modules
   serving imports (:func:`archive_files`: the serving core, the family, the
   architectures it uses; never training, tools or phantoms), then calls
   torch-model-archiver's Python API with the one handler and ``model-config.yaml``.
   The archive needs no checkout of this repository: the handler imports the bundled
   package first.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from cxrserve.core.card import ModelCard
from cxrserve.core.loading import write_pipeline_spec
from cxrserve.models.checkpoint import load_model

log = logging.getLogger(__name__)

PARITY_ATOL = 1e-4
FORMATS = ("torchscript", "onnx")


class ParityError(AssertionError):
    pass


def example_input(card: ModelCard, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A deterministic input in the card's documented value range."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = _value_range(card)
    x = torch.rand(batch, card.channels, card.input_size, card.input_size, generator=g)
    return x * (hi - lo) + lo


def _value_range(card: ModelCard) -> tuple[float, float]:
    from cxrserve.core.preprocessing import get_preprocessing

    return get_preprocessing(card.preprocessing).value_range


class _TupleOutputs(torch.nn.Module):
    """Make every output a tuple of tensors (ONNX and tracing want fixed structures)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        out = self.model(x)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path, card: ModelCard) -> Path:
    wrapped = _TupleOutputs(model).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(wrapped, example, check_trace=False)
    # The card travels inside the program too (MONAI's save_net_with_metadata idea).
    torch.jit.save(traced, str(path), _extra_files={"metadata.json": json.dumps(card.to_dict())})
    return path


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    wrapped = _TupleOutputs(model).eval()
    with torch.no_grad():
        n_out = len(wrapped(example))
    names = [f"output_{i}" for i in range(n_out)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped, (example,), str(path), dynamo=False, opset_version=17,
            input_names=["input"], output_names=names,
            dynamic_axes={"input": {0: "batch"}, **{n: {0: "batch"} for n in names}},
        )
    return path


def parity(model: torch.nn.Module, component_dir: Path, inputs: torch.Tensor,
           formats: tuple[str, ...] = FORMATS) -> dict:
    """Max difference of every output, each exported format vs eager, on the output's scale.

    Probabilities and logits (magnitude <= 1) are held to the absolute tolerance; an
    output with larger values (an untrained network's CAM map reaches ~50, where float32
    rounding alone is ~1e-5) is divided by its largest magnitude first, so the check
    fails on a wrong graph and not on float32 arithmetic order.
    """
    from cxrserve.core.runtime import OnnxRuntime, TorchRuntime

    cpu = torch.device("cpu")
    eager = TorchRuntime(_TupleOutputs(model), cpu)(inputs)
    report = {}
    for backend in formats:
        if backend == "torchscript":
            runtime = TorchRuntime(torch.jit.load(str(component_dir / "model.pt")), cpu, "torchscript")
        else:
            runtime = OnnxRuntime(component_dir / "model.onnx", cpu)
        outs = runtime(inputs)
        report[backend] = [float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(a))))) if a.size else 0.0
                           for a, b in zip(eager, outs)]
    return report


def export_component(checkpoint: str | Path, out_dir: str | Path, *, formats: tuple[str, ...] = FORMATS,
                     atol: float = PARITY_ATOL, parity_batch: int = 3) -> Path:
    """Export one checkpoint into ``out_dir``: ``model.pt`` and/or ``model.onnx``, card, parity.

    Parity runs on a batch size the trace never saw, so a batch axis that is not
    really dynamic fails here rather than in production.
    """
    unknown = set(formats) - set(FORMATS)
    if unknown or not formats:
        raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {formats}")
    model, card = load_model(checkpoint)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    example = example_input(card, batch=2)
    if "torchscript" in formats:
        export_torchscript(model, example, out / "model.pt", card)
    if "onnx" in formats:
        export_onnx(model, example, out / "model.onnx")
    report: dict = {"atol": atol, **parity(model, out, example_input(card, batch=parity_batch, seed=1), formats)}
    worst = max(max(v) for k, v in report.items() if k != "atol")
    report["max_abs_diff"] = worst
    if worst > atol:
        raise ParityError(f"{card.name}: exported outputs differ from eager by {worst:.2e} > {atol:.0e}")
    card.save(out / "metadata.json")
    (out / "parity.json").write_text(json.dumps(report, indent=2))
    log.info("exported %s (%s) to %s, max |diff| vs eager %.1e", card.name, "+".join(formats), out, worst)
    return out


# --------------------------------------------------------------------------- archives
#: File kinds a shipped package may carry beside its modules (cards' templates, vocabularies).
DATA_SUFFIXES = (".json", ".gz", ".xml", ".txt")
#: Folders of a package that are never shipped data.
NOT_DATA = ("__pycache__", "tests")


@dataclass
class ArchiveSpec:
    """What goes into one served model's ``.mar``."""

    name: str  # served name, e.g. "cxr-triage"
    pipeline_class: str  # "module:Class" of the Pipeline it serves
    handler: Path  # the TorchServe entry file (handlers/cxrserve_handler.py)
    components: dict[str, Path]  # component name -> exported folder
    model_config: dict  # model-config.yaml contents
    version: str = "0.1.0"
    extra: dict[str, Path] | None = None  # further files/folders to ship (e.g. pools)
    composed: tuple[str, ...] = ()  # pipeline classes a composed model (cxr-study) also serves


def serving_modules(pipeline_class: str, composed: tuple[str, ...] = ()) -> dict[str, Path]:
    """Module name -> source file of everything serving ``pipeline_class`` imports.

    The roots are the TorchServe adapter, the pipeline's module and, for a composed model,
    the modules of the pipelines it composes; the closure stays inside the top-level
    packages of those roots (cxrserve, or a family's own package).
    """
    from cxrserve.packaging.closure import import_closure

    roots = ["cxrserve.core.serving", *(p.partition(":")[0] for p in (pipeline_class, *composed))]
    return import_closure(roots, sorted({r.split(".")[0] for r in roots}))


def archive_files(pipeline_class: str, composed: tuple[str, ...] = ()) -> dict[str, Path]:
    """Relative path inside the archive -> source file: serving modules plus their packages' data."""
    files: dict[str, Path] = {}
    for name, path in serving_modules(pipeline_class, composed).items():
        parts = name.split(".")
        rel = Path(*parts[:-1], path.name) if path.name != "__init__.py" else Path(*parts, "__init__.py")
        files[str(rel)] = path
        if path.name == "__init__.py":  # package data: data files and non-package folders (templates)
            for item in sorted(path.parent.iterdir()):
                if item.is_file() and item.suffix in DATA_SUFFIXES:
                    files[str(rel.parent / item.name)] = item
                elif item.is_dir() and not (item / "__init__.py").exists() and item.name not in NOT_DATA:
                    for sub in sorted(item.rglob("*")):
                        if sub.is_file() and "__pycache__" not in sub.parts:
                            files[str(rel.parent / sub.relative_to(path.parent))] = sub
    return dict(sorted(files.items()))


def build_archive(spec: ArchiveSpec, store: str | Path, *, force: bool = True) -> Path:
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"cxrserve-{spec.name}-") as tmp:
        payload = Path(tmp) / "payload"
        payload.mkdir()
        for rel, source in archive_files(spec.pipeline_class, spec.composed).items():
            (payload / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, payload / rel)
        for name, folder in spec.components.items():
            shutil.copytree(folder, payload / name)
        for name, path in (spec.extra or {}).items():
            (shutil.copytree if Path(path).is_dir() else shutil.copy2)(path, payload / name)
        write_pipeline_spec(payload, spec.pipeline_class, name=spec.name, version=spec.version,
                            handler=spec.model_config.get("handler", {}))
        config_path = Path(tmp) / "model-config.yaml"
        config_path.write_text(yaml.safe_dump(spec.model_config, sort_keys=False))
        config = ModelArchiverConfig(
            model_name=spec.name, handler=str(spec.handler), version=spec.version,
            extra_files=str(payload), export_path=str(store), force=force, config_file=str(config_path),
            # Weights do not compress: storing skips minutes of deflate here and at load.
            archive_format="zip-store",
        )
        # The archiver stages files in tempfile.gettempdir()/<model name> and deletes
        # whatever is there first: point it at our private folder while it runs.
        saved, tempfile.tempdir = tempfile.tempdir, tmp
        try:
            generate_model_archive(config)
        finally:
            tempfile.tempdir = saved
    path = store / f"{spec.name}.mar"
    log.info("built %s (%.1f MiB)", path, path.stat().st_size / 2**20)
    return path
