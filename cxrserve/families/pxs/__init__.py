"""Seed 000: the PXS score, a Siamese network against a pool of normal radiographs, and change.

Pipeline and pool maths: :mod:`.pipeline`; building pools (``cxrserve pool``):
:mod:`.pool`; training (contrastive pre-training, then severity pairs): :mod:`.task_pretrain`,
:mod:`.task`, sharing :mod:`.training`; cross-validation (``cxrserve pxs crossval``): :mod:`.crossval`.
"""
from cxrserve.core.family import Family, Served
from cxrserve.families.pxs import preprocessing  # noqa: F401  registers the pipelines its cards name

FAMILY = Family(
    name="pxs",
    package=__name__,
    presentation="cxrserve.families.pxs.presentation:PRESENTATION",
    rank=20,
    served=(
        Served(name="cxr-pxs", pipeline="cxrserve.families.pxs.pipeline:PXSPipeline",
               components=("pxs",), headline=("pxs", "pxs_percentile", "prior.pxs", "change.distance", "change.direction"), title="PXS severity score", seed="seed 000",
               viewer_inputs=("prior",), bench_growth="cxrserve.families.pxs.bench:pool_growth"),
    ),
    tasks={"pxs_pretrain": "cxrserve.families.pxs.task_pretrain", "pxs": "cxrserve.families.pxs.task"},
    cli=("cxrserve.families.pxs.pool", "cxrserve.families.pxs.crossval"),
)
