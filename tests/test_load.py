"""Load test: concurrent clients over every served model, loopback only, bounded.

Prints throughput and latency percentiles per model and overall; passes only with zero
errors. Sized to a few dozen requests so it stays within a minute or two on 2 cores
(``CXRSERVE_LOAD_REQUESTS`` raises it for a real soak).
"""
from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from cxrserve.tools.client import CXRClient, CXRServeError
from cxrserve.synthetic.phantoms import render, sample_spec

pytestmark = [pytest.mark.serve, pytest.mark.slow]

CLIENTS = 4


def test_concurrent_clients_all_models(served, capsys):
    images = [cv2.imencode(".png", render(sample_spec(900 + i, kind="frontal", height=320, width=320)).image)[1]
              .tobytes() for i in range(8)]
    total = int(os.environ.get("CXRSERVE_LOAD_REQUESTS", "24"))
    per_model = max(3, total // len(served.models))
    jobs = [(m, images[i % len(images)]) for m in served.models for i in range(per_model)]
    random.Random(0).shuffle(jobs)
    client = CXRClient(served.inference, key_file=served.workdir / "key_file.json", timeout=300)
    latencies: dict[str, list[float]] = {m: [] for m in served.models}
    errors: list[str] = []

    def call(job):
        model, image = job
        start = time.perf_counter()
        try:
            client.predict(model, image)
        except CXRServeError as err:
            errors.append(f"{model}: {err.status} {err.code} {err.message[:80]}")
            return
        latencies[model].append(time.perf_counter() - start)

    # warm every model once (first requests pay lazy initialisation)
    for model in served.models:
        call((model, images[0]))
    latencies = {m: [] for m in served.models}
    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(call, jobs))
    wall = time.perf_counter() - start
    client.close()

    lines = [f"load test: {len(jobs)} requests, {CLIENTS} concurrent clients, {len(served.models)} models, "
             f"{wall:.1f} s, {len(jobs) / wall:.2f} req/s, errors {len(errors)}",
             f"{'model':<16}{'n':>4}{'p50 s':>9}{'p99 s':>9}{'max s':>9}"]
    every = []
    for model, lat in sorted(latencies.items()):
        every += lat
        if lat:
            lines.append(f"{model:<16}{len(lat):>4}{np.percentile(lat, 50):>9.2f}{np.percentile(lat, 99):>9.2f}"
                         f"{max(lat):>9.2f}")
    lines.append(f"{'all':<16}{len(every):>4}{np.percentile(every, 50):>9.2f}{np.percentile(every, 99):>9.2f}"
                 f"{max(every):>9.2f}")
    with capsys.disabled():  # the numbers belong in the CI log even when the test passes
        print("\n" + "\n".join(lines))
    assert not errors, errors
    assert len(every) == len(jobs)
