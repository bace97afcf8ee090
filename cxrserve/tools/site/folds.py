"""Patient-grouped cross-validation folds: every film of a patient is in one fold, so nothing is
scored by a step fitted on the same patient's other films."""
from __future__ import annotations

import warnings

import numpy as np


def patient_folds(groups, strata, k: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(train_idx, test_idx), ...]`` grouped by ``groups`` and stratified by ``strata`` (as far as
    the groups allow: scikit-learn's StratifiedGroupKFold). ``k`` is lowered to the number of
    patients; fewer than 2 patients is a ValueError (nothing can be held out)."""
    from sklearn.model_selection import StratifiedGroupKFold

    g = np.asarray(groups)
    n_groups = np.unique(g).size
    if n_groups < 2:
        raise ValueError("cross-validation needs films of at least 2 patients")
    k = max(2, min(int(k), n_groups))
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # "least populated class has fewer members than n_splits" is expected with small site samples
        warnings.simplefilter("ignore", UserWarning)
        folds = [(np.asarray(tr), np.asarray(te)) for tr, te in cv.split(np.zeros(g.size), np.asarray(strata), g)]
    return [f for f in folds if f[1].size]
