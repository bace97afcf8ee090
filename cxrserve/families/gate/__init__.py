"""The input gate: a small CNN that screens every request (frontal CXR / inverted / other).

It has no endpoint of its own: its component rides in every archive
(``chained_into_all``) and :class:`cxrserve.core.pipeline.Pipeline` runs it before any
model. Training: :mod:`.task`.
"""
from cxrserve.core.family import Family

FAMILY = Family(
    name="gate",
    package=__name__,
    rank=0,
    tasks={"gate": "cxrserve.families.gate.task"},
    chained_into_all=("gate",),
)
