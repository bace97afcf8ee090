"""COVID-19 pneumonia severity from one radiograph (Cohen et al. 2020, seed 003).

A torchxrayvision-layout DenseNet121 (:mod:`cxrserve.models.xrv`) sees the image
centre-cropped to a square, 224 px, scaled to [-1024, 1024] (preprocessing ``xrv``).
Its pre-sigmoid "Lung Opacity" output x feeds two linear maps read from the card
(``extra["score_maps"]``), each clamped to its range:

* geographic extent (0-8) = clamp(a_e x + b_e, 0, 8),
* opacity (0-6) = clamp(a_o x + b_o, 0, 6).

With torchxrayvision's published weights the card holds the paper's coefficients
(:mod:`cxrserve.families.severity.xrv_import`); weights trained here carry maps fitted by least
squares (:mod:`cxrserve.families.severity.task`). A map may read several outputs (the
paper's "4 outputs" variant); the served model reads what its card says.

Saliency (``saliency=true``): the gradient of the predicted extent with respect to the
input, squared, Gaussian-blurred (sigma 5, truncated at 3.5 sigma, as the authors'
code) and placed back over the square the model saw, overlaid at half opacity on the
original image as a PNG. The clamp has zero gradient once a score hits a range end,
so the gradient is taken of the unclamped linear score (identical inside the range);
since the map is normalised, the picture is that of the input gradient of the
weighted outputs. The component therefore stays TorchScript
(``autograd_components``).
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch

from cxrserve.core.card import ModelCard
from cxrserve.core.options import Option, parse_bool
from cxrserve.core.overlays import fit_picture, normalise_map, overlay, place_map, png_base64
from cxrserve.core.item import Item
from cxrserve.core.pipeline import Pipeline

SCORES = ("geographic_extent", "opacity")
#: torchxrayvision's published facts for its DenseNet121 (labels, op_threshs, the paper's maps, saliency)
DEFAULT_TEMPLATE = Path(__file__).resolve().parent / "published" / "xrv-densenet121-res224-all.json"
LUNG_OPACITY = "Lung Opacity"


def load_template(path: str | Path | None = None) -> dict:
    return json.loads(Path(path or DEFAULT_TEMPLATE).read_text())


# --------------------------------------------------------------------------- score maps
class ScoreMap:
    """``clamp(intercept + sum_i w_i * logit[input_i], low, high)`` read from a card entry."""

    def __init__(self, spec: dict, labels: list[str]):
        try:
            self.inputs = [labels.index(name) for name in spec["inputs"]]
        except ValueError as err:
            raise ValueError(f"score map reads an output the model lacks: {err}") from None
        self.weights = np.asarray(spec["weights"], dtype=np.float64)
        if self.weights.shape != (len(self.inputs),):
            raise ValueError("score map needs one weight per input")
        self.intercept = float(spec["intercept"])
        self.low, self.high = (float(v) for v in spec["range"])

    def linear(self, logits: np.ndarray) -> np.ndarray:
        """Unclamped score for logits of shape (..., n_outputs)."""
        return logits[..., self.inputs].astype(np.float64) @ self.weights + self.intercept

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        return np.clip(self.linear(logits), self.low, self.high)

    def torch_linear(self, logits: torch.Tensor) -> torch.Tensor:
        w = torch.as_tensor(self.weights, dtype=logits.dtype, device=logits.device)
        return logits[:, self.inputs] @ w + self.intercept


def score_maps(card: ModelCard) -> dict[str, ScoreMap]:
    specs = card.extra.get("score_maps") or {}
    missing = [s for s in SCORES if s not in specs]
    if missing:
        raise ValueError(f"card {card.name!r} has no score map for {missing}: fit them "
                         "(cxrserve train severity) or import published weights (cxrserve import-xrv)")
    return {name: ScoreMap(specs[name], list(card.labels)) for name in SCORES}


# --------------------------------------------------------------------------- saliency
def center_square_box(height: int, width: int) -> list[int]:
    """``[x0, y0, x1, y1]`` of the square :class:`~cxrserve.core.transforms.CenterCropSquare` keeps."""
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return [left, top, left + side, top + side]


def input_gradients(module: torch.nn.Module, inputs: torch.Tensor, score: ScoreMap) -> np.ndarray:
    """d(unclamped score)/d(input) for a batch (N x H x W, channel 0), with autograd.

    Items in a batch do not interact (BatchNorm is in eval mode), so one backward pass
    of the summed scores gives every item's own gradient.
    """
    x = inputs.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = module(x)[0]
        (grad,) = torch.autograd.grad(score.torch_linear(logits).sum(), x)
    return grad[:, 0].float().cpu().numpy()


def blur_saliency(gradient: np.ndarray, sigma: float, truncate: float) -> np.ndarray:
    """Squared gradient, Gaussian-blurred like ``skimage.filters.gaussian`` (edge mode 'nearest')."""
    radius = int(truncate * sigma + 0.5)
    return cv2.GaussianBlur(np.square(gradient, dtype=np.float32), (2 * radius + 1, 2 * radius + 1), sigma,
                            borderType=cv2.BORDER_REPLICATE)


def saliency_on_image(image_size: tuple[int, int], saliency: np.ndarray) -> np.ndarray:
    """Saliency on the model grid -> 0..1 map at ``image_size`` (w, h), over the centre square."""
    w, h = image_size
    return place_map(normalise_map(saliency), (w, h), center_square_box(h, w))


# --------------------------------------------------------------------------- pipeline

class SeverityPipeline(Pipeline):
    name = "cxr-severity"
    components = ("severity",)
    autograd_components = ("severity",)
    OPTIONS = {
        "saliency": Option(parse_bool, False, "return a saliency PNG (gradient of the extent) over the image", picture=True),
    }

    def setup(self) -> None:
        card = self.parts["severity"].card
        self.maps = score_maps(card)
        self.labels = list(card.labels)
        self.lung_opacity = self.labels.index(LUNG_OPACITY)
        # Rendering settings travel in the card; cards without them get the published ones.
        self.saliency_cfg = dict(card.extra.get("saliency") or load_template()["extra"]["saliency"])
        self.transform = self.parts["severity"].transform()

    def _predict(self, items: list[Item]) -> list[dict]:
        with self.timer.stage("preprocess"):
            inputs = [self.transform(it.xray.uint8) for it in items]
        outputs = self.run("severity", inputs)
        wanted = [i for i, it in enumerate(items) if it.options["saliency"]]
        pictures = self._saliency([items[i] for i in wanted], [inputs[i] for i in wanted]) if wanted else []
        pictures_by_item = dict(zip(wanted, pictures))
        results = []
        for i, (item, (logits, probabilities)) in enumerate(zip(items, outputs)):
            out = self.base_response(item)
            out.update({name: round(float(m(logits)), 6) for name, m in self.maps.items()})
            out["lung_opacity_logit"] = round(float(logits[self.lung_opacity]), 6)
            out["lung_opacity_probability"] = round(float(probabilities[self.lung_opacity]), 6)
            if i in pictures_by_item:
                out["saliency_png"] = pictures_by_item[i]
            results.append(out)
        return results

    def saliency_maps(self, items: list[Item], inputs: list[torch.Tensor] | None = None) -> list[np.ndarray]:
        """Per item, the blurred squared extent gradient as a 0..1 map at the decoded image's size."""
        if inputs is None:
            inputs = [self.transform(it.xray.uint8) for it in items]
        module = self.parts["severity"].runtime.module  # TorchScript: see autograd_components
        cfg = self.saliency_cfg
        score = self.maps[cfg["target"]]
        maps: list[np.ndarray] = []
        with self.timer.stage("saliency"):
            for start in range(0, len(inputs), self.limits.max_batch):
                batch = torch.stack(inputs[start : start + self.limits.max_batch]).to(self.device)
                for item, grad in zip(items[start:], input_gradients(module, batch, score)):
                    smooth = blur_saliency(grad, cfg["sigma"], cfg["truncate"])
                    maps.append(saliency_on_image((item.xray.width, item.xray.height), smooth))
        return maps

    def _saliency(self, items: list[Item], inputs: list[torch.Tensor]) -> list[str]:
        alpha = self.saliency_cfg["alpha"]
        return [png_base64(fit_picture(overlay(item.xray.uint8, heat, alpha=alpha), item.xray.full_size))
                for item, heat in zip(items, self.saliency_maps(items, inputs))]
