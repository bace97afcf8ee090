"""Seed 003: geographic extent (0-8) and opacity (0-6) from a torchxrayvision DenseNet, with saliency.

Pipeline: :mod:`.pipeline`; importing torchxrayvision's weights (``cxrserve import-xrv``):
:mod:`.xrv_import`; training: :mod:`.task`.
"""
from cxrserve.core.family import Family, Served
from cxrserve.families.severity import preprocessing  # noqa: F401  registers the pipelines its cards name

FAMILY = Family(
    name="severity",
    package=__name__,
    presentation="cxrserve.families.severity.presentation:PRESENTATION",
    rank=30,
    served=(
        Served(name="cxr-severity", pipeline="cxrserve.families.severity.pipeline:SeverityPipeline",
               components=("severity",), headline=("geographic_extent", "opacity"), picture_option="saliency",
               title="Geographic extent and opacity", seed="seed 003", viewer_options={"saliency": True}),
    ),
    tasks={"severity": "cxrserve.families.severity.task"},
    cli=("cxrserve.families.severity.xrv_import",),
)
