"""TorchServe handler for ``cxr-zeroshot``: CheXzero-style zero-shot probabilities per finding."""
import os
import sys

# The archive ships its own cxrserve next to this file; import that one first so the
# code always matches the weights it was built with.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cxrserve.serving import CXRHandler  # noqa: E402
from cxrserve.zeroshot import ZeroShotPipeline  # noqa: E402


class ZeroShotHandler(CXRHandler):
    pipeline_class = ZeroShotPipeline
