"""TorchServe handler for ``cxr-pxs``: PXS severity against a normal pool; with a ``prior``, the change."""
import os
import sys

# The archive ships its own cxrserve next to this file; import that one first so the
# code always matches the weights (and the reference pool) it was built with.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cxrserve.pxs import PXSPipeline  # noqa: E402
from cxrserve.serving import CXRHandler  # noqa: E402


class PXSHandler(CXRHandler):
    pipeline_class = PXSPipeline
