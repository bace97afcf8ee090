"""Mortality risk with a Grad-CAM activation overlay (research only).

Pipeline: :mod:`.pipeline`; training (class weights, Platt calibration): :mod:`.task`.
"""
from cxrserve.core.family import Family, Served
from cxrserve.families.mortality import preprocessing  # noqa: F401  registers the pipelines its cards name

FAMILY = Family(
    name="mortality",
    package=__name__,
    presentation="cxrserve.families.mortality.presentation:PRESENTATION",
    rank=40,
    served=(
        Served(name="cxr-mortality", pipeline="cxrserve.families.mortality.pipeline:MortalityPipeline",
               components=("mortality",), headline=("risk", "risk_label"), picture_option="overlay",
               gradcam=("mortality",), title="Mortality risk", seed="seed 004", viewer_options={"overlay": True}),
    ),
    tasks={"mortality": "cxrserve.families.mortality.task"},
)
