"""Prometheus metrics a handler emits after each batch, through TorchServe's metrics API.

With ``metrics_mode=prometheus`` and ``model_metrics_auto_detect=true``
(``config.properties``) every metric a handler adds appears on the metrics address
(``/metrics``, port 8082), labelled with ``ModelName``:

===========================  =========  ==========================================
``Stage_<stage>``            gauge, ms  last batch's time per stage: decode, preprocess,
                                        model_<component>, preprocess_gate, heatmap, ...
``CXRRequests``              counter    requests by ``Status`` (200/400/413/415/422/500)
                                        and ``Outcome`` (ok / rejected)
``CXRGateVerdicts``          counter    every gated image by ``Verdict`` (frontal_cxr,
                                        inverted_cxr, other) and ``Enforced`` (true/false)
``CXRGateRejections``        counter    422s from the input gate, by ``Verdict``
``CXRGateScore``             histogram  the gate's P(frontal CXR) for every screened image
``CXRScore``                 histogram  each response's scores by ``Output``: every
                                        score of a declared map (``<map>.<label>``,
                                        ``Pipeline.score_maps``) and every top-level
                                        float
===========================  =========  ==========================================

The drift monitor's gauges (:mod:`cxrserve.core.monitor`, :func:`monitor_metrics`), under the
same names on TorchServe's and the KServe-native server's ``/metrics``:

=====================================  =====  ===============================================
``cxrserve_drift_score``               gauge  latest window's standardised drift score by
                                              ``site``, ``model``, ``signal`` (``combined``:
                                              the largest; ``header.<field>``, ``image.<stat>``,
                                              ``embedding``, ``output.<status|label|gate>``,
                                              ``score.<output>``)
``cxrserve_drift_threshold``           gauge  the combined score's alert threshold
``cxrserve_drift_alert``               gauge  1 while ``combined`` > threshold, by ``site``, ``model``
``cxrserve_monitor_studies``           gauge  studies seen by ``site``, ``model``
``cxrserve_performance_estimate``      gauge  label-free expected ``metric`` (sensitivity,
                                              specificity, prevalence) by ``site``, ``model``,
                                              ``label``
``cxrserve_monitor_dropped``           gauge  records dropped (full queue), per process
``cxrserve_monitor_errors``            gauge  exceptions the monitor swallowed, per process
=====================================  =====  ===============================================

:func:`batch_metrics` is pure (results in, metric records out) so it is tested
without TorchServe; :func:`emit` writes the records to a TorchServe metrics cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from cxrserve.core.errors import CXRInputError

#: Top-level float fields that are facts about the input, not model scores.
NOT_SCORES = {"seconds"}


@dataclass(frozen=True)
class MetricRecord:
    name: str
    kind: str  # "counter" | "histogram" | "time" | "gauge"
    value: float
    dims: tuple[tuple[str, str], ...] = ()


def _scores(result: dict, score_maps: tuple[str, ...]) -> Iterable[tuple[str, float]]:
    for key, value in result.items():
        if isinstance(value, float) and key not in NOT_SCORES:
            yield key, value
        elif key in score_maps and isinstance(value, dict):
            for label, p in value.items():
                if isinstance(p, (int, float)) and not isinstance(p, bool):
                    yield f"{key}.{label}", float(p)
        elif key == "results" and isinstance(value, dict):  # cxr-study: each family's section
            for family, section in value.items():
                if isinstance(section, dict) and "error" not in section:
                    yield from ((f"{family}.{k}", v) for k, v in _scores(section, score_maps))


def _gate(gate: dict) -> list[MetricRecord]:
    return [MetricRecord("CXRGateVerdicts", "counter", 1, (("Verdict", str(gate["verdict"])),
                                                            ("Enforced", str(bool(gate.get("enforced"))).lower()))),
            MetricRecord("CXRGateScore", "histogram", float(gate["score"]))]


def batch_metrics(results: list, timings: dict[str, float], score_maps: tuple[str, ...] = ()) -> list[MetricRecord]:
    """Metric records for one handled batch (``results``: response dicts or input errors).

    ``score_maps``: the response fields that hold ``{label: score}`` maps, as the served
    pipeline declares them (``Pipeline.score_maps``; a composed one's are its families').
    """
    out = [MetricRecord(f"Stage_{stage}", "time", seconds * 1000.0) for stage, seconds in timings.items()]
    for result in results:
        if isinstance(result, CXRInputError):
            out.append(MetricRecord("CXRRequests", "counter", 1,
                                    (("Status", str(result.status)), ("Outcome", "rejected"))))
            gate = (result.detail or {}).get("input_gate")
            if gate:
                out.append(MetricRecord("CXRGateRejections", "counter", 1, (("Verdict", str(gate["verdict"])),)))
                out.extend(_gate(gate))
            continue
        out.append(MetricRecord("CXRRequests", "counter", 1, (("Status", "200"), ("Outcome", "ok"))))
        gate = result.get("input_gate")
        if gate:
            out.extend(_gate(gate))
        for output, value in _scores(result, tuple(score_maps)):
            out.append(MetricRecord("CXRScore", "histogram", value, (("Output", output),)))
    return out


def monitor_metrics(monitors) -> list[MetricRecord]:
    """Gauge records of drift monitors (:class:`cxrserve.core.monitor.Monitor`), latest window each."""
    out: list[MetricRecord] = []
    dropped = errors = 0
    for monitor in monitors:
        dropped += monitor.dropped
        errors += monitor.errors
        for s in monitor.snapshot():
            sm = (("site", s["site"]), ("model", s["model"]))
            out.append(MetricRecord("cxrserve_monitor_studies", "gauge", float(s["seen"]), sm))
            if s["threshold"] is not None:
                out.append(MetricRecord("cxrserve_drift_threshold", "gauge", float(s["threshold"]), sm))
                out.append(MetricRecord("cxrserve_drift_alert", "gauge", 1.0 if s["alert"] else 0.0, sm))
            for signal, value in s["scores"].items():
                out.append(MetricRecord("cxrserve_drift_score", "gauge", float(value), sm + (("signal", signal),)))
            for label, est in s["estimate"].items():
                for metric, value in est.items():
                    if value == value:  # not NaN
                        out.append(MetricRecord("cxrserve_performance_estimate", "gauge", float(value),
                                                sm + (("label", label), ("metric", metric))))
    if monitors:
        out.append(MetricRecord("cxrserve_monitor_dropped", "gauge", float(dropped)))
        out.append(MetricRecord("cxrserve_monitor_errors", "gauge", float(errors)))
    return out


def emit(metrics, records: list[MetricRecord]) -> None:
    """Write ``records`` to a TorchServe metrics cache (``context.metrics``)."""
    from ts.metrics.dimension import Dimension
    from ts.metrics.metric_type_enum import MetricTypes

    for rec in records:
        dims = [Dimension(k, v) for k, v in rec.dims]
        if rec.kind == "time":
            metrics.add_time(rec.name, rec.value, None, "ms", dims)
        elif rec.kind == "counter":
            metrics.add_counter(rec.name, rec.value, None, dims)
        elif rec.kind == "gauge":
            metrics.add_metric(rec.name, rec.value, "value", None, dims, MetricTypes.GAUGE)
        else:
            metrics.add_metric(rec.name, rec.value, "value", None, dims, MetricTypes.HISTOGRAM)
