"""Sites: ``cxrserve site audit`` (acceptance test on a hospital's labelled films) and
``cxrserve site calibrate`` (a profile of operating points, calibration and prior shift, fitted
with patient-grouped cross-validation). What serving applies lives in
:mod:`cxrserve.core.site_profile`; one module per idea here:

* :mod:`~cxrserve.tools.site.config`: the site file; :mod:`~cxrserve.tools.site.models`: what
  each served family answers; :mod:`~cxrserve.tools.site.scoring`: scoring a folder in process;
* :mod:`~cxrserve.tools.site.stats`: metrics with patient-bootstrap intervals;
  :mod:`~cxrserve.tools.site.folds`: patient-grouped folds; :mod:`~cxrserve.tools.site.fitting`:
  temperature / Platt, EM priors, thresholds, gate threshold;
* :mod:`~cxrserve.tools.site.audit`, :mod:`~cxrserve.tools.site.calibrate`: the two commands'
  outputs; :mod:`~cxrserve.tools.site.plots`, :mod:`~cxrserve.tools.site.html`: the reports.
"""
from cxrserve.tools.site.cli import register_cli  # noqa: F401
