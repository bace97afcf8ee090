"""The predictor's ``cxrserve_*`` Prometheus metrics, beside the SDK's own request latencies.

The same records TorchServe's handler emits (:func:`cxrserve.core.servemetrics.batch_metrics`:
stage timings, requests by status, gate rejections, score histograms), plus the size of
each ``pipeline.predict`` call, and the drift monitor's gauges
(:func:`cxrserve.core.servemetrics.monitor_metrics`: ``cxrserve_drift_score{site,model,signal}``,
``cxrserve_drift_alert{site,model}``, ...), refreshed after every batch. One :class:`Metrics` per process: ``cxrserve kserve``
makes it and hands it to every model.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class Metrics:
    """``cxrserve_*`` Prometheus metrics from :func:`cxrserve.core.servemetrics.batch_metrics` records.

    ``registry``: where they are registered (default: prometheus_client's, which the SDK's
    ``/metrics`` serves); a metric name can be registered once per registry.
    """

    def __init__(self, registry=None):
        from prometheus_client import REGISTRY, Histogram

        self.registry = REGISTRY if registry is None else registry
        self._made: dict[tuple, Any] = {}
        self.batch_size = Histogram("cxrserve_batch_size", "requests per pipeline.predict call", ["model"],
                                    buckets=(1, 2, 4, 8, 16, 32), registry=self.registry)

    def _gauge(self, record):
        from prometheus_client import Gauge

        key = (record.name, tuple(k for k, _ in record.dims))
        metric = self._made.get(key)
        if metric is None:
            metric = Gauge(record.name, f"{record.name} (see cxrserve.core.servemetrics)", list(key[1]),
                           registry=self.registry)
            self._made[key] = metric
        return metric.labels(*(v for _, v in record.dims)) if record.dims else metric

    def observe_monitors(self) -> None:
        """Refresh the drift gauges from every monitor of this process (:data:`cxrserve.core.monitor.MONITORS`)."""
        from cxrserve.core.monitor import MONITORS
        from cxrserve.core.servemetrics import monitor_metrics

        try:
            for record in monitor_metrics(MONITORS):
                self._gauge(record).set(record.value)
        except Exception:  # metrics never fail an answered request
            log.exception("could not record drift metrics")

    def _metric(self, record, model: str):
        from prometheus_client import Counter, Histogram

        dims = tuple(k.lower() for k, _ in record.dims)
        if record.kind == "time":
            key = ("cxrserve_stage_seconds", ("model", "stage"))
        else:
            snake = "".join(("_" + c.lower()) if c.isupper() else c for c in record.name).lstrip("_")
            key = (f"cxrserve_{snake.replace('c_x_r_', '')}", ("model", *dims))
        metric = self._made.get(key)
        if metric is None:
            name, labels = key
            if record.kind == "time":
                metric = Histogram(name, "seconds per pipeline stage and batch", labels,
                                   buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=self.registry)
            elif record.kind == "counter":
                metric = Counter(name, f"{record.name} (see cxrserve.core.servemetrics)", labels,
                                 registry=self.registry)
            else:
                metric = Histogram(name, f"{record.name} (see cxrserve.core.servemetrics)", labels,
                                   buckets=(.05, .1, .2, .3, .4, .5, .6, .7, .8, .9, .95, 1.0, 2, 5, 10),
                                   registry=self.registry)
            self._made[key] = metric
        return metric

    def observe_batch(self, model: str, size: int) -> None:
        self.batch_size.labels(model).observe(size)

    def observe(self, model: str, results: list, timings: dict[str, float], score_maps: tuple[str, ...] = ()) -> None:
        from cxrserve.core.servemetrics import batch_metrics

        try:
            for record in batch_metrics(results, timings, score_maps):
                metric = self._metric(record, model)
                if record.kind == "time":
                    metric.labels(model, record.name[len("Stage_"):]).observe(record.value / 1000.0)
                    continue
                child = metric.labels(model, *(v for _, v in record.dims))
                if record.kind == "counter":
                    child.inc(record.value)
                else:
                    child.observe(record.value)
        except Exception:  # metrics never fail an answered request
            log.exception("could not record metrics")
        self.observe_monitors()
