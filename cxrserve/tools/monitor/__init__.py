"""``cxrserve monitor``: what the in-serving drift monitor (:mod:`cxrserve.core.monitor`) needs
offline: references (:mod:`~cxrserve.tools.monitor.cli`), returned labels
(:mod:`~cxrserve.tools.monitor.feedback`), the HTML report (:mod:`~cxrserve.tools.monitor.report`),
stream simulations (:mod:`~cxrserve.tools.monitor.simulate`) and its cost (:mod:`~cxrserve.tools.monitor.bench`).
"""
from cxrserve.tools.monitor.cli import register_cli  # noqa: F401
