"""Seed 001: lung segmentation chained into COVID-19 / normal / pneumonia triage with Grad-CAM.

Served as ``cxr-lungseg`` (mask, box, area) and ``cxr-triage`` (the chain, optional
heatmap). Pipelines: :mod:`.pipeline`; lung rules: :mod:`.lungs`; training:
:mod:`.task_lungseg`, :mod:`.task_triage`.
"""
from cxrserve.core.family import Family, Served
from cxrserve.families.triage import preprocessing  # noqa: F401  registers the pipelines its cards name

FAMILY = Family(
    name="triage",
    package=__name__,
    presentation="cxrserve.families.triage.presentation:PRESENTATION",
    rank=10,
    served=(
        Served(name="cxr-lungseg", pipeline="cxrserve.families.triage.pipeline:LungSegPipeline",
               components=("lungseg",), headline=("lung_area_fraction", "segmentation_confidence", "lung_bbox"),
               title="Lung segmentation", seed="seed 001",
               viewer_options={"overlay": True, "mask": False}),
        Served(name="cxr-triage", pipeline="cxrserve.families.triage.pipeline:TriagePipeline",
               components=("lungseg", "triage_classifier"),
               headline=("label", "probabilities.covid19", "probabilities.normal", "probabilities.pneumonia", "crop_used"),
               picture_option="heatmap", gradcam=("triage_classifier",),
               title="Triage: COVID-19 / normal / pneumonia", seed="seed 001", viewer_options={"heatmap": True}),
    ),
    tasks={"lungseg": "cxrserve.families.triage.task_lungseg", "triage": "cxrserve.families.triage.task_triage"},
)
