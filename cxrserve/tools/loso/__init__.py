"""``cxrserve loso``: leave-one-site-out evaluation and before / after site calibration with N films.

:mod:`.run` trains and scores the folds through the family module that declares them (a family's
``loso`` module, found through its training task), :mod:`.curve` fits the site steps on N films,
:mod:`.summary` writes ``loso.json``, ``loso.md`` and the curve's PNG. Nothing here names a family.
"""
