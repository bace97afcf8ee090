"""Seed 002: CheXzero-style zero-shot findings from an image-text (CLIP) model.

Pipeline: :mod:`.pipeline`; importing CheXzero checkpoints and ``cxrserve zeroshot``:
:mod:`.importer`; contrastive training: :mod:`.task`.
"""
from cxrserve.core.family import Family, Served
from cxrserve.families.zeroshot import preprocessing  # noqa: F401  registers the pipelines its cards name
from cxrserve.families.zeroshot.labels import CHEXPERT_LABELS

FAMILY = Family(
    name="zeroshot",
    package=__name__,
    presentation="cxrserve.families.zeroshot.presentation:PRESENTATION",
    rank=50,
    served=(
        Served(name="cxr-zeroshot", pipeline="cxrserve.families.zeroshot.pipeline:ZeroShotPipeline",
               components=("zeroshot",), headline=tuple(f"probabilities.{label}" for label in CHEXPERT_LABELS), title="Zero-shot findings", seed="seed 002",
               viewer_inputs=("labels",)),
    ),
    tasks={"zeroshot": "cxrserve.families.zeroshot.task"},
    cli=("cxrserve.families.zeroshot.importer",),
)
