"""What only PXS has to measure in ``cxrserve bench``: scoring cost against the pool size."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from cxrserve.families.pxs.pipeline import ReferencePool


def pool_growth(model_dir: Path, sizes: Sequence[int], seconds: float, device: str = "cpu") -> dict:
    """The served pool's size, and PXS cost per study for pools of ``sizes`` random embeddings."""
    pool = ReferencePool.load(Path(model_dir) / "pxs")
    rows = growth_pool(sizes, int(pool.embeddings.shape[1]), seconds, device=device)
    table = {"title": f"PXS pool size (scoring {rows[0]['batch'] if rows else '-'} embeddings; "
                      f"served pool: {pool.size} images)",
             "columns": ["pool size", "ms per study", "pool MB"],
             "rows": [[g["pool_size"], f"{g['ms_per_study']:.3f}", g["pool_mb"]] for g in rows]}
    return {"served_pool_size": pool.size, "pool": rows, "tables": [table]}


def growth_pool(sizes: Sequence[int], dim: int, seconds: float, batch: int = 8, device: str = "cpu") -> list[dict]:
    """PXS scoring cost (distances to every pool embedding, median, percentile) vs pool size."""
    import torch

    from cxrserve.families.pxs.pipeline import leave_one_out_scores, percentiles, pxs_scores
    from cxrserve.tools.bench.costs import _median_ms

    rng = np.random.default_rng(0)
    rows = []
    for size in sizes:
        pool = torch.from_numpy(rng.normal(size=(size, dim)).astype(np.float32)).to(device)
        loo = leave_one_out_scores(pool) if size <= 4096 else pxs_scores(pool[:64], pool)
        emb = torch.from_numpy(rng.normal(size=(batch, dim)).astype(np.float32)).to(device)
        ms = _median_ms(lambda: percentiles(pxs_scores(emb, pool), loo).cpu(), seconds / max(1, len(sizes)))
        rows.append({"pool_size": size, "embedding_dim": dim, "batch": batch, "ms_per_batch": ms,
                     "ms_per_study": round(ms / batch, 3),
                     "pool_mb": round(pool.numel() * 4 / 2**20, 2),
                     "distance_matrix_mb": round(batch * size * 4 / 2**20, 3)})
    return rows
