"""Mortality risk from one radiograph (seed 004), research use only.

A ResNet18 (:func:`~cxrserve.models.classifiers.resnet18_cam`, preprocessing
``mortality``: squash to 224, ImageNet mean/std, 3 channels) outputs the two-class
probabilities (survived / died) and class activation maps in one pass. The pipeline

* turns the probabilities into the log-odds ``z = log(p_died / p_survived)`` and
  calibrates them with the card's Platt map, ``risk = sigmoid(a z + b)``
  (``extra["calibration"]``, fitted on patient-held-out validation images: class
  weights in training inflate raw probabilities, Platt's intercept undoes that);
* labels the study ``high`` when ``risk >= thresholds["high_risk"]`` (chosen on
  validation for a stated sensitivity, see the card's ``extra["threshold_rule"]``);
* on ``overlay=true`` returns the Grad-CAM of the predicted class over the image (CAM
  equals Grad-CAM for this head; see :mod:`cxrserve.models.classifiers`);
* writes a research-only statement, with the size of the training data, into every
  response.
"""
from __future__ import annotations

import numpy as np
from scipy.special import expit

from cxrserve.core.card import ModelCard
from cxrserve.core.overlays import heatmap_png
from cxrserve.core.item import Item
from cxrserve.core.pipeline import Pipeline
from cxrserve.core.sites import SiteOutput
from cxrserve.core.options import Option, parse_bool

RISK_LABELS = ("low", "high")
#: Output order of the classifier: index 1 is death.
OUTCOMES = ("survived", "died")


def log_odds(probabilities: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """``log(p1 / p0)`` of two-class probabilities (..., 2), safe at saturation."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), eps, 1.0)
    return np.log(p[..., 1]) - np.log(p[..., 0])


def calibrate(z: np.ndarray, calibration: dict) -> np.ndarray:
    """Platt map of log-odds: ``sigmoid(a z + b)``."""
    if calibration.get("method") != "platt":
        raise ValueError(f"unknown calibration {calibration.get('method')!r}")
    return expit(calibration["a"] * np.asarray(z, dtype=np.float64) + calibration["b"])


def research_statement(card: ModelCard) -> str:
    """Research-only notice naming how little data the score comes from."""
    data = card.extra.get("data_summary", "")
    text = ("Research use only: this mortality risk is not a medical device, is not validated for "
            "clinical decisions and must not guide care.")
    return f"{text} {data}".strip()



class MortalityPipeline(Pipeline):
    name = "cxr-mortality"
    components = ("mortality",)
    #: a site's Platt scaling, prior and threshold decide the risk and its call (cxrserve.core.sites)
    SITE_OUTPUT = SiteOutput("binary", scores="risk", answer="risk_label", threshold="threshold")
    OPTIONS = {
        "overlay": Option(parse_bool, False, "return the Grad-CAM of the predicted class over the image (PNG)", picture=True),
    }

    def setup(self) -> None:
        card = self.parts["mortality"].card
        if "calibration" not in card.extra or "high_risk" not in card.thresholds:
            raise ValueError(f"card {card.name!r} lacks calibration or the high_risk threshold: "
                             "train it with `cxrserve train mortality`")
        if list(card.labels) != list(OUTCOMES):
            raise ValueError(f"card {card.name!r} labels {card.labels} are not {list(OUTCOMES)}")
        self.calibration = card.extra["calibration"]
        self.threshold = float(card.thresholds["high_risk"])
        self.statement = research_statement(card)
        self.transform = self.parts["mortality"].transform()

    def _predict(self, items: list[Item]) -> list[dict]:
        with self.timer.stage("preprocess"):
            inputs = [self.transform(it.xray.uint8) for it in items]
        outputs = self.run("mortality", inputs)
        results = []
        for item, (probs, cams) in zip(items, outputs):
            risk = float(calibrate(log_odds(probs), self.calibration))
            label = RISK_LABELS[int(risk >= self.threshold)]
            out = self.base_response(item)
            out.update(risk=round(risk, 6), risk_label=label, threshold=self.threshold,
                       research_only=self.statement)
            if item.options["overlay"]:
                with self.timer.stage("overlay"):
                    out["overlay_png"] = heatmap_png(item.xray.uint8, cams[RISK_LABELS.index(label)],
                                                       full_size=item.xray.full_size)
            results.append(out)
        return results

