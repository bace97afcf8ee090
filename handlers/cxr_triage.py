"""TorchServe handler for ``cxr-triage``: lung segmentation -> lung crop -> COVID-19 / normal / pneumonia."""
import os
import sys

# The archive ships its own cxrserve next to this file; import that one first so the
# code always matches the weights it was built with.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cxrserve.serving import CXRHandler  # noqa: E402
from cxrserve.triage import TriagePipeline  # noqa: E402


class TriageHandler(CXRHandler):
    pipeline_class = TriagePipeline
