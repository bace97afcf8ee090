"""TorchServe handler for ``cxr-lungseg``: lung mask (PNG), lung box and lung area fraction."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the archive's own cxrserve first

from cxrserve.serving import CXRHandler  # noqa: E402
from cxrserve.triage import LungSegPipeline  # noqa: E402


class LungSegHandler(CXRHandler):
    pipeline_class = LungSegPipeline
