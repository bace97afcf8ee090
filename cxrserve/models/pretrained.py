"""Transfer learning from local weight files: ``init=torchvision`` or ``init=PATH``.

Nothing here downloads. ``init=torchvision`` reads torchvision's own ImageNet weight
file from the local torch hub cache, ``torch.hub.get_dir()/checkpoints/<file>``
(``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/hub/checkpoints``), the
very file ``torchvision.models.resnet34(weights="IMAGENET1K_V1")`` would have
downloaded there; a missing file is a :class:`PretrainedWeightsMissing` naming the
file, its URL and where to put it. ``init=PATH`` takes any compatible state dict or
checkpoint (a bare state dict, cxrserve's ``best.ckpt``, or a dict with
``state_dict`` / ``model`` / ``model_state_dict``; a DataParallel ``module.`` prefix
is stripped), loaded with ``torch.load(weights_only=True)``.

Matching is strict on shapes: every key present in both the file and the model must
have the same shape, with two exceptions that are standard practice:

* a first convolution stored for 3 (RGB) input channels loads into a 1-channel model
  as the sum of its RGB filters (a grey image fed as R=G=B gives the same response);
* for ``init=torchvision`` (and an ``init=PATH`` file in torchvision's layout, e.g. a
  hospital's own ImageNet-style ResNet) the classifier is not loaded when the model's
  head has another shape (it is kept where it fits: the PXS Siamese trunk uses the
  1000-way layer as its embedding, as the seed did). A file in the model's own layout
  gets no such exception: a head of another shape is an error.

Keys of the model the file lacks (``missing``) and keys of the file the model lacks
(``unexpected``) are reported in the card, under ``card.extra["init"]`` with the
source, file name and sha256 of the file. A file matching no parameter is an error.

Architectures with torchvision weights (:data:`ARCHITECTURES`): ``unet_resnet34``
(ResNet34 encoder), ``resnet34_cam``, ``resnet18_cam``, ``siamese_densenet121`` and
``xrv_densenet121`` (DenseNet121). Not applicable: ``gate_cnn`` (a small CNN of its
own) and ``clip``: the zero-shot model's ViT-B/32 is OpenAI CLIP's image tower
(QuickGELU, a pre-norm ``ln_pre``, bias-free patch embedding, a projection), not
torchvision's ``vit_b_32`` (GELU, no ``ln_pre``), so ImageNet ViT weights cannot be
loaded into it faithfully; its ``init=PATH`` takes CLIP / OpenCLIP checkpoints.
"""
from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Callable, Mapping

import torch

log = logging.getLogger(__name__)

#: torchvision backbone -> the weights enum member whose file ``init=torchvision`` reads.
TORCHVISION_WEIGHTS = {
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
    "resnet34": "ResNet34_Weights.IMAGENET1K_V1",
    "densenet121": "DenseNet121_Weights.IMAGENET1K_V1",
    "vit_b_32": "ViT_B_32_Weights.IMAGENET1K_V1",
}

_RESNET_LAYERS = {"conv1.": "features.0.", "bn1.": "features.1.", "layer1.": "features.4.",
                  "layer2.": "features.5.", "layer3.": "features.6.", "layer4.": "features.7."}
_UNET_LAYERS = {"conv1.": "stem.0.", "bn1.": "stem.1.", "layer1.": "layer1.", "layer2.": "layer2.",
                "layer3.": "layer3.", "layer4.": "layer4."}
# torchvision's DenseNet files use the old "norm.1" key names (its own loader renames them).
_DENSENET_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _prefix_map(table: dict[str, str]) -> Callable[[str], str | None]:
    def rename(key: str) -> str | None:
        for old, new in table.items():
            if key.startswith(old):
                return new + key[len(old):]
        return None  # fc.* and anything else the model has no place for
    return rename


def _densenet(prefix: str) -> Callable[[str], str | None]:
    def rename(key: str) -> str | None:
        match = _DENSENET_OLD_KEY.match(key)
        if match:
            key = match.group(1) + match.group(2)
        return prefix + key
    return rename


#: cxrserve architecture -> (torchvision backbone, torchvision key -> model key or None).
ARCHITECTURES: dict[str, tuple[str, Callable[[str], str | None]]] = {
    "resnet34_cam": ("resnet34", _prefix_map({**_RESNET_LAYERS, "fc.": "fc."})),
    "resnet18_cam": ("resnet18", _prefix_map({**_RESNET_LAYERS, "fc.": "fc."})),
    "unet_resnet34": ("resnet34", _prefix_map(_UNET_LAYERS)),
    "siamese_densenet121": ("densenet121", _densenet("trunk.")),
    "xrv_densenet121": ("densenet121", _densenet("")),
}
_HEAD_KEYS = ("fc.", "classifier.", "trunk.classifier.", "heads.")


class PretrainedWeightsMissing(FileNotFoundError):
    """The torchvision weight file is not in the local hub cache (nothing is downloaded)."""


def torchvision_file(backbone: str) -> tuple[str, str]:
    """``(file name, url)`` of torchvision's weight file for ``backbone``, from its weights enum."""
    import torchvision

    url = torchvision.models.get_weight(TORCHVISION_WEIGHTS[backbone]).url
    return url.rsplit("/", 1)[-1], url


def hub_checkpoints() -> Path:
    """Where torchvision keeps (and ``init=torchvision`` reads) weight files."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def torchvision_path(backbone: str) -> Path:
    """The local weight file for ``backbone``; raises :class:`PretrainedWeightsMissing`."""
    name, url = torchvision_file(backbone)
    path = hub_checkpoints() / name
    if not path.is_file():
        raise PretrainedWeightsMissing(
            f"init=torchvision: {name} ({TORCHVISION_WEIGHTS[backbone]}) is not in the torch hub cache; "
            f"expected {path}. cxrserve never downloads weights: on a machine with internet access fetch {url} "
            f"and copy it to {hub_checkpoints()}/ (or point $TORCH_HOME at a folder whose hub/checkpoints/ "
            "holds it); see README 'Pretrained weights'.")
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a state dict or checkpoint file (``weights_only``: no code runs on load)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init={path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"init={path}: not a PyTorch state dict or checkpoint readable with "
                         f"weights_only=True ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"init={path}: holds a {type(obj).__name__}, not a state dict")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if not state:
        raise ValueError(f"init={path}: no tensors in the file")
    return state


def _is_noise(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def _summary(keys: list[str], limit: int = 20) -> dict:
    keys = sorted(k for k in keys if not _is_noise(k))
    return {"count": len(keys), "keys": keys[:limit]}


def load_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, rename=None,
              drop_mismatched_heads: bool = False, what: str = "init") -> dict:
    """Copy ``state`` into ``model`` under the shape rules above; return the load report."""
    target = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        new = rename(key) if rename else key
        if new is None or new not in target:
            unexpected.append(key)
        else:
            mapped[new] = value
    adapted, skipped, mismatched = [], [], []
    for key, value in list(mapped.items()):
        want = target[key].shape
        if value.shape == want:
            continue
        if value.ndim == 4 and want == (value.shape[0], 1, *value.shape[2:]) and value.shape[1] == 3:
            mapped[key] = value.sum(dim=1, keepdim=True)
            adapted.append(f"{key}: RGB filters summed for 1 input channel")
        elif drop_mismatched_heads and key.startswith(_HEAD_KEYS):
            del mapped[key]
            skipped.append(f"{key}: {tuple(value.shape)} in the file, {tuple(want)} in the model (new head)")
        else:
            mismatched.append(f"{key}: {tuple(value.shape)} in the file, {tuple(want)} in the model")
    if mismatched:
        raise ValueError(f"{what}: shapes differ for {len(mismatched)} parameters, e.g. "
                         + "; ".join(mismatched[:5]))
    if not [k for k in mapped if not _is_noise(k)]:
        raise ValueError(f"{what}: no parameter of the file matches the model (file keys e.g. "
                         f"{sorted(state)[:3]}; model keys e.g. {sorted(target)[:3]})")
    merged = {**target, **{k: v.to(target[k].dtype) for k, v in mapped.items()}}
    model.load_state_dict(merged)
    missing = [k for k in target if k not in mapped]
    return {"loaded": len([k for k in mapped if not _is_noise(k)]), "missing": _summary(missing),
            "unexpected": _summary(unexpected), "adapted": adapted, "skipped": skipped}


def initialize(model: torch.nn.Module, architecture: str, init: str | Path | None) -> dict | None:
    """Load ``init`` ("torchvision", a file path, or None/"none"/"scratch") into ``model``.

    Returns the record for ``card.extra["init"]`` (None when training from scratch).
    """
    if init is None or str(init).strip().lower() in ("", "none", "scratch", "random"):
        return None
    if str(init).strip().lower() == "torchvision":
        if architecture not in ARCHITECTURES:
            raise ValueError(f"init=torchvision: torchvision has no pretrained weights for {architecture!r} "
                             f"(it has them for {sorted(ARCHITECTURES)}); use init=PATH with a compatible file")
        backbone, rename = ARCHITECTURES[architecture]
        path = torchvision_path(backbone)
        report = load_into(model, read_state_dict(path), rename=rename, drop_mismatched_heads=True,
                           what=f"init=torchvision ({path.name})")
        name, _ = torchvision_file(backbone)
        digest = sha256_file(path)
        record = {"source": "torchvision", "weights": TORCHVISION_WEIGHTS[backbone], "file": name,
                  "sha256": digest, "sha256_matches_file_name": digest.startswith(name.rsplit("-", 1)[-1].split(".")[0])}
    else:
        path = Path(init).expanduser()
        state = read_state_dict(path)
        direct = len(set(state) & set(model.state_dict()))
        rename = None
        if architecture in ARCHITECTURES:  # a torchvision-layout file (e.g. a hospital's own fine-tuned ResNet)
            _, tv_rename = ARCHITECTURES[architecture]
            via_tv = len({tv_rename(k) for k in state} & set(model.state_dict()))
            rename = tv_rename if via_tv > direct else None
        report = load_into(model, state, rename=rename, drop_mismatched_heads=rename is not None,
                           what=f"init={path}")
        record = {"source": "file", "file": path.name, "sha256": sha256_file(path),
                  "layout": "torchvision" if rename else "model"}
    record.update(report)
    log.info("init %s: %d tensors loaded from %s (sha256 %s), %d missing, %d unexpected", record["source"],
             report["loaded"], record["file"], record["sha256"][:12], report["missing"]["count"],
             report["unexpected"]["count"])
    return record


def apply_init(model: torch.nn.Module, card, init: str | Path | None) -> None:
    """:func:`initialize` and record the result in ``card.extra["init"]`` (tasks call this)."""
    record = initialize(model, card.architecture, init)
    if record is not None:
        card.extra["init"] = record
