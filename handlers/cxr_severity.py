"""TorchServe handler for ``cxr-severity``: geographic extent (0-8), opacity (0-6), optional saliency PNG."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the archive's own cxrserve first

from cxrserve.serving import CXRHandler  # noqa: E402
from cxrserve.severity import SeverityPipeline  # noqa: E402


class SeverityHandler(CXRHandler):
    pipeline_class = SeverityPipeline
