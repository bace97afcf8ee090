"""``cxr-study``: one request, every other family, one decode (issue 11).

Composed from the registry (``Served(compose=True)``): its archive ships every other
served model's components and serving code, and :mod:`.pipeline` answers each of them in
its own section. Its benchmark against the naive six-call loop: :mod:`.bench`.
"""
from cxrserve.core.family import Family, Served

FAMILY = Family(
    name="study",
    package=__name__,
    presentation="cxrserve.families.study.presentation:PRESENTATION",
    rank=1,
    served=(
        Served(name="cxr-study", pipeline="cxrserve.families.study.pipeline:StudyPipeline", components=(),
               compose=True, title="Study: every model on one upload", seed="all seeds",
               viewer_options={"pictures": True, "lungseg.mask": False}, viewer_inputs=("prior", "labels"),
               bench_suite="cxrserve.families.study.bench:suite_section"),
    ),
    cli=("cxrserve.families.study.bench",),
)
