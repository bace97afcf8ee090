"""What ``cxr-study`` adds to its families' presentations: the client's ``--pictures`` flag.

Its sections are shown and coded by each family's own presentation (the SR, the CSV
columns, the viewer's cards); ``Served.viewer_inputs`` names the inputs it passes on.
"""
from __future__ import annotations

from cxrserve.core.family import Flag, Presentation

PRESENTATION = Presentation(flags=(Flag("pictures", "cxr-study: every family's pictures"),))
