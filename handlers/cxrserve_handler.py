"""TorchServe entry point of every cxrserve archive.

The archive's ``pipeline.json`` names the pipeline class this worker serves
(:class:`~cxrserve.core.serving.CXRHandler` reads it), so one thin file serves every model.
"""
import os
import sys

# The archive ships its own cxrserve next to this file; import that one first so the
# code always matches the weights it was built with.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cxrserve.core.serving import CXRHandler  # noqa: E402


class Handler(CXRHandler):
    pass
