"""TorchServe handler for ``cxr-mortality``: calibrated mortality risk (research only), optional Grad-CAM PNG."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the archive's own cxrserve first

from cxrserve.mortality import MortalityPipeline  # noqa: E402
from cxrserve.serving import CXRHandler  # noqa: E402


class MortalityHandler(CXRHandler):
    pipeline_class = MortalityPipeline
