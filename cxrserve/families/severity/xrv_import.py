"""Import torchxrayvision's published DenseNet weights without torchxrayvision, safely.

torchxrayvision publishes ``densenet121-res224-all`` as a *pickled whole model*: its
training script ran ``torch.save(model)`` on an ``xrv.models.DenseNet`` (torch < 1.6,
so usually the legacy, non-zip container), and the library reads it back with
``torch.load(file).state_dict()``. Unpickling a whole model normally imports its
classes and may run any callable the file names, so a downloaded file is code.

:func:`read_xrv_weights` loads such a file through ``torch.load`` with a restricted
pickle module: the only globals it resolves are torch's tensor/parameter rebuilders,
``OrderedDict``/``set``, and classes under ``torch.nn.modules`` / ``torchxrayvision``,
which become inert stand-ins (:class:`PickledObject`) that keep their state and run
none of the class's code. Any other global (``os.system``, ``builtins.eval``, ...) is
refused with :class:`UnsafeWeightsFile` before it is called. Parameters and
persistent buffers are then collected from the stand-in tree exactly as
``nn.Module.state_dict`` would name them. Plain state-dict files load with
``weights_only=True``.

:func:`import_checkpoint` puts the weights into :class:`~cxrserve.models.xrv.XRVDenseNet`
(identical key layout, checked strictly) and writes a cxrserve checkpoint whose card
carries the published facts from ``published/xrv-densenet121-res224-all.json``:
labels, torchxrayvision's operating points, and Cohen et al.'s coefficients
``extent = clamp(0.8705248 x + 3.4137437, 0, 8)``,
``opacity = clamp(0.5484423 x + 2.5535977, 0, 6)`` on the "Lung Opacity" logit x.

Command line (one step from the downloaded file to a served archive)::

    cxrserve import-xrv nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt \\
        --store model_store
"""
from __future__ import annotations

import _compat_pickle
import json
import logging
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from cxrserve.core.card import ModelCard
from cxrserve.core.files import sha256_file
from cxrserve.families.severity.pipeline import load_template
from cxrserve.models.checkpoint import save_checkpoint
from cxrserve.models import build_model

log = logging.getLogger(__name__)


#: Functions a weights file may call: torch's tensor rebuilders and plain containers.
_ALLOWED_CALLABLES = {
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("torch", "Size"),
}
#: Modules whose classes may appear in a pickled model; they become inert stand-ins.
_MODULE_CLASS_PREFIXES = ("torch.nn.modules.", "torchxrayvision.", "torchvision.models.")


class UnsafeWeightsFile(pickle.UnpicklingError):
    """The file names a callable that a weights file has no reason to contain."""


class PickledObject:
    """Inert stand-in for a pickled class instance: holds its state, runs none of its code."""

    pickled_as = ""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, __slots__ state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected state of type {type(state).__name__} for {self.pickled_as}")
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"<pickled {self.pickled_as}>"


_STAND_INS: dict[str, type] = {}


def _stand_in(module: str, name: str) -> type:
    qualified = f"{module}.{name}"
    cls = _STAND_INS.get(qualified)
    if cls is None:
        cls = type(name, (PickledObject,), {"pickled_as": qualified, "__module__": __name__})
        _STAND_INS[qualified] = cls
    return cls


class RestrictedUnpickler(pickle.Unpickler):
    """``find_class`` resolves only tensor rebuilders, containers and module stand-ins."""

    def find_class(self, module: str, name: str):
        # Protocol 2 writes Python 2 names (``__builtin__.set``); map them as pickle does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _ALLOWED_CALLABLES:
            return super().find_class(module, name)
        if module.startswith(_MODULE_CLASS_PREFIXES) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            return _stand_in(module, name)
        raise UnsafeWeightsFile(
            f"refusing to load {module}.{name}: a weights file should hold tensors and "
            "torch.nn / torchxrayvision modules only (the file may be corrupt or malicious)"
        )


#: What ``torch.load(pickle_module=...)`` needs: ``Unpickler``, ``load``, ``__name__``.
restricted_pickle = SimpleNamespace(
    __name__="cxrserve.families.severity.xrv_import.restricted_pickle",
    Unpickler=RestrictedUnpickler,
    load=lambda f, **kw: RestrictedUnpickler(f, **kw).load(),
    UnpicklingError=pickle.UnpicklingError,
)


@dataclass
class XRVWeights:
    """What a torchxrayvision weights file holds, without torchxrayvision."""

    state_dict: dict[str, torch.Tensor]
    pickled_class: str = ""  # e.g. "torchxrayvision.models.DenseNet"; "" for a plain state dict
    pathologies: list[str] | None = None
    op_threshs: list[float] | None = None
    sha256: str = ""
    attributes: dict = field(default_factory=dict)  # other plain attributes of the model object


def _tensor_state(obj: PickledObject, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Collect parameters and persistent buffers with ``nn.Module.state_dict`` names."""
    state = obj.__dict__
    for name, value in (state.get("_parameters") or {}).items():
        if value is not None:
            out[prefix + name] = value.detach()
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for name, value in (state.get("_buffers") or {}).items():
        if value is not None and name not in skip:
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, PickledObject):
            raise pickle.UnpicklingError(f"submodule {prefix + name} is a {type(child).__name__}, not a module")
        _tensor_state(child, f"{prefix}{name}.", out)


def _as_floats(value: Any) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return [float(v) for v in value.flatten().tolist()]
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return None


def read_xrv_weights(path: str | Path) -> XRVWeights:
    """Read a torchxrayvision DenseNet weights file (pickled model or state dict) safely.

    Raises:
        UnsafeWeightsFile: the file names a callable outside the allowed set.
        ValueError: the file holds something other than a DenseNet or a state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    with warnings.catch_warnings():
        # Legacy files carry each module class's source; stand-ins have none to compare.
        warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
        obj = torch.load(path, map_location="cpu", pickle_module=restricted_pickle, weights_only=False)
    sha = sha256_file(path)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return XRVWeights(state_dict={k: v.detach() for k, v in obj.items()}, sha256=sha)
    if not isinstance(obj, PickledObject):
        raise ValueError(f"{path}: expected a pickled torchxrayvision DenseNet or a state dict, "
                         f"found {type(obj).__name__}")
    if not obj.pickled_as.endswith(".DenseNet"):
        raise ValueError(f"{path}: holds a {obj.pickled_as}, expected torchxrayvision's DenseNet")
    state: dict[str, torch.Tensor] = {}
    _tensor_state(obj, "", state)
    attrs = obj.__dict__
    # Old files keep op_threshs as a plain attribute (often None), newer ones as a buffer.
    op_threshs = _as_floats(state.pop("op_threshs", None))
    if op_threshs is None:
        op_threshs = _as_floats(attrs.get("op_threshs"))
    pathologies = attrs.get("targets") or attrs.get("pathologies")
    plain = {k: v for k, v in attrs.items()
             if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))}
    return XRVWeights(state_dict=state, pickled_class=obj.pickled_as,
                      pathologies=[str(p) for p in pathologies] if pathologies else None,
                      op_threshs=op_threshs, sha256=sha, attributes=plain)


# Very old torchvision-style DenseNet checkpoints wrote "norm.1" for "norm1".
_OLD_DENSE_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key  # DataParallel prefix
        m = _OLD_DENSE_KEY.match(key)
        out[m.group(1) + m.group(2) if m else key] = value
    return out


def build_card(weights: XRVWeights, template: dict, *, num_classes: int, version: str, source_name: str) -> ModelCard:
    """The cxrserve card for imported weights: template facts plus what the file says."""
    labels = list(weights.pathologies or template["labels"])
    if len(labels) != num_classes:
        raise ValueError(f"the file has {num_classes} outputs but {len(labels)} labels are known for it")
    extra = json.loads(json.dumps(template.get("extra", {})))
    for name, score_map in extra.get("score_maps", {}).items():
        missing = [label for label in score_map["inputs"] if label not in labels]
        if missing:
            raise ValueError(f"score map {name!r} reads {missing}, which this model does not output")
    extra["source"] = {**extra.get("source", {}), "file": source_name, "sha256": weights.sha256,
                       "pickled_class": weights.pickled_class or "state_dict",
                       "op_threshs_from": "file" if weights.op_threshs else "template"}
    return ModelCard(
        name=template.get("name", "severity"), architecture=template.get("architecture", "xrv_densenet121"),
        task=template.get("task", "regression"), preprocessing=template.get("preprocessing", "xrv"),
        labels=labels, arch_kwargs={"num_classes": num_classes, "in_channels": 1, "op_threshs": True},
        version=version, extra=extra, demo=False, trained_on=template.get("trained_on", ""),
        data_fingerprint=weights.sha256[:16], license=template.get("license", ModelCard.license),
    )


def import_checkpoint(weights_file: str | Path, out: str | Path, *, template: str | Path | None = None,
                      version: str = "1.0.0-xrv-all") -> Path:
    """Published torchxrayvision weights -> cxrserve checkpoint (card with Cohen et al.'s maps).

    Returns:
        the checkpoint path ``out``.
    """
    weights = read_xrv_weights(weights_file)
    facts = load_template(template)
    state = _normalise_keys(weights.state_dict)
    if "classifier.weight" not in state or "features.conv0.weight" not in state:
        raise ValueError(f"{weights_file}: no DenseNet parameters (keys start {sorted(state)[:3]})")
    num_classes, in_channels = state["classifier.weight"].shape[0], state["features.conv0.weight"].shape[1]
    if in_channels != 1:
        raise ValueError(f"{weights_file}: first convolution takes {in_channels} channels; torchxrayvision uses 1")
    card = build_card(weights, facts, num_classes=num_classes, version=version, source_name=Path(weights_file).name)
    model = build_model(card.architecture, **card.arch_kwargs)
    op = weights.op_threshs or facts.get("op_threshs")
    if op is None or len(op) != num_classes:
        raise ValueError(f"operating points for {num_classes} outputs are neither in the file nor in the template")
    state["op_threshs"] = torch.tensor([float("nan") if v is None else v for v in op], dtype=torch.float32)
    # Files from torch < 0.4.1 lack BatchNorm's step counter; it does not affect inference.
    expected = model.state_dict()
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights_file}: key layout differs from torchxrayvision's DenseNet121 "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    model.eval()
    with torch.no_grad():
        logits, _ = model(torch.zeros(1, 1, card.input_size, card.input_size))
    if not torch.isfinite(logits).all():
        raise ValueError(f"{weights_file}: the imported model produces non-finite outputs")
    path = save_checkpoint(out, model, card)
    log.info("imported %s (%s, sha256 %s) -> %s", Path(weights_file).name, weights.pickled_class or "state dict",
             weights.sha256[:12], path)
    return path


def build_severity_archive(weights_file: str | Path, store: str | Path = "model_store",
                           work: str | Path = "build/xrv-import", *, reuse: str | Path | None = "build",
                           with_gate: bool = True, archive: str = "cxr-severity") -> Path:
    """Import, export (with parity check) and archive ``cxr-severity`` into ``store``.

    The archive's other components (the input gate) come from ``reuse``'s checkpoints
    when the default store was built there, else they are trained as ``make store``
    would; ``with_gate=False`` leaves the gate out.
    """
    from cxrserve.packaging.store import StoreBuilder

    work = Path(work)
    ckpt = import_checkpoint(weights_file, work / "checkpoints" / "severity.ckpt")
    builder = StoreBuilder(store, work, checkpoints={"severity": str(ckpt)},
                           leave_out=() if with_gate else ("gate",))
    given = {"severity": ckpt}
    for name in builder.archive_components(archive):
        reused = Path(reuse) / "checkpoints" / name / "best.ckpt" if reuse else None
        if name != "severity" and reused is not None and reused.exists():
            given[name] = reused
    builder.given = given
    (mar,) = builder.build([archive])
    return mar


# --------------------------------------------------------------------------- CLI
def cmd_import_xrv(args) -> int:
    if args.checkpoint_only:
        path = import_checkpoint(args.weights, args.checkpoint_only)
        print(f"checkpoint: {path}")
        return 0
    mar = build_severity_archive(args.weights, args.store, args.work, reuse=args.reuse, with_gate=not args.no_gate)
    print(f"{mar}  ({mar.stat().st_size / 2**20:.0f} MiB): cxr-severity with torchxrayvision densenet121-res224-all")
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "import-xrv",
        help="build the cxr-severity archive from torchxrayvision's downloaded densenet121-res224-all file",
        description="Read torchxrayvision's published DenseNet121 'all' weights (the .pt file from its v1 "
                    "release) without torchxrayvision and without running pickled code, attach Cohen et al.'s "
                    "published severity maps, export with a parity check and write cxr-severity.mar.",
    )
    p.add_argument("weights", help="the downloaded .pt file (torch.save of xrv.models.DenseNet, or a state dict)")
    p.add_argument("--store", default="model_store", help="model store to write cxr-severity.mar into")
    p.add_argument("--work", default="build/xrv-import", help="folder for the checkpoint and exported component")
    p.add_argument("--reuse", default="build", help="build folder of the default store, whose input gate is reused")
    p.add_argument("--no-gate", action="store_true", help="archive without the input gate")
    p.add_argument("--checkpoint-only", metavar="OUT", help="only write a cxrserve checkpoint to OUT")
    p.set_defaults(func=cmd_import_xrv)
