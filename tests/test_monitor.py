"""The drift monitor (cxrserve.core.monitor): statistics, reference and threshold, the observer's
safety (never raises, bounded), state files without identifiers, and the exported gauges."""
from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest

from cxrserve.core import monitor as M
from cxrserve.core.errors import MalformedInput, NotFrontalCXR
from cxrserve.core.imageio import decode
from cxrserve.core.item import Item
from cxrserve.core.servemetrics import monitor_metrics


def fake_records(n, rng, *, shift=0.0, model="m", version="1", site="default", fmt="png"):
    out = []
    for _ in range(n):
        p = float(np.clip(rng.beta(2, 5) + shift, 0, 1))
        emb = rng.normal(shift * 3, 1, M.EMBED_SIDE ** 2)
        out.append(M.Record(site=site, model=model, version=version, status="200",
                            header={"format": fmt, "modality": "-", "photometric": "L", "view": "-",
                                    "bits": "8", "size": "<=512"},
                            stats=[0.5 + shift + rng.normal(0, .05), 0.2 + rng.normal(0, .02), 0.05, 0.95, 0.8],
                            embedding=emb.tolist(), gate=0.9,
                            scores={"probabilities.a": p, "probabilities.b": 1 - p},
                            label="a" if p > .5 else "b", probs={"a": p, "b": 1 - p}))
    return out


def test_statistics_hand_values():
    assert M.psi({"a": 10}, {"a": 10}) == pytest.approx(0.0)
    assert M.psi({"a": 10, "b": 10}, {"a": 20}) > 0.5
    ref = np.sort(np.arange(100.0))
    assert M.ks(ref, np.arange(100.0)) == pytest.approx(0.0, abs=0.011)
    assert M.ks(ref, np.arange(200.0, 300.0)) == pytest.approx(1.0)
    x = np.random.default_rng(0).normal(size=(50, 3))
    k_rr = float(np.exp(-0.5 * ((x[:, None] - x[None]) ** 2).sum(-1)).mean())
    assert M.mmd2(x, x, 0.5, k_rr) == pytest.approx(0.0, abs=1e-9)
    assert M.mmd2(x, x + 5, 0.5, k_rr) == pytest.approx(2 * k_rr, rel=0.01)


def test_reference_threshold_alerts_on_shift_not_on_same_distribution(tmp_path):
    rng = np.random.default_rng(1)
    ref = M.fit_reference(fake_records(300, rng), window=50, target_rate=1e-3, resamples=400)
    assert math.isfinite(ref.threshold) and ref.threshold > 0
    same = sum(ref.scores(fake_records(50, rng))["combined"] > ref.threshold for _ in range(40))
    assert same <= 2
    shifted = ref.scores(fake_records(50, rng, shift=0.3))
    assert shifted["combined"] > ref.threshold
    assert {"embedding", "image.mean", "score.probabilities.a", "output.label", "header.format"} <= set(shifted)
    # a format change alone is caught by the header mix
    fmt = ref.scores(fake_records(50, rng, fmt="dicom"))
    assert fmt["header.format"] > ref.threshold
    back = M.Reference.load(ref.save(tmp_path / "r.json"))
    assert back.scores(fake_records(50, np.random.default_rng(5)))["combined"] == pytest.approx(
        ref.scores(fake_records(50, np.random.default_rng(5)))["combined"])


def test_label_free_estimate_matches_expectation():
    rng = np.random.default_rng(2)
    recs = fake_records(2000, rng)
    est = M.estimate(recs, ["a", "b"])
    # simulate labels from the (calibrated) probabilities: realised sensitivity near the estimate
    truth = np.asarray([rng.random() < r.probs["a"] for r in recs])
    pred = np.asarray([r.label == "a" for r in recs])
    realised = (truth & pred).sum() / truth.sum()
    assert est["a"]["sensitivity"] == pytest.approx(realised, abs=0.05)


class FakePipeline:
    name = "cxr-fake"
    version = "9"
    score_maps = ("probabilities",)
    model_dir = None

    def __init__(self):
        self.observers = []


def phantom_item(seed: int, site=None):
    img = np.random.default_rng(seed).integers(0, 255, (300, 240), dtype=np.uint8)
    item = Item(xray=decode(cv2.imencode(".png", img)[1].tobytes()))
    item.gate = {"verdict": "frontal_cxr", "score": 0.8, "threshold": 0.5, "enforced": False}
    if site is not None:
        item.site = site
    return item


def test_observer_records_windows_without_identifiers(tmp_path):
    mon = M.Monitor(tmp_path / "state", window=10, step=5, sync=True)
    pipe = FakePipeline()
    assert M.attach(pipe, {"monitor_dir": str(tmp_path / "other")}) is not None and pipe.observers
    rng = np.random.default_rng(3)
    ref = M.fit_reference(fake_records(100, rng, model="cxr-fake", version="9"), window=10, resamples=200)
    ref.save(tmp_path / "state" / "default" / "cxr-fake" / "reference.json")
    for i in range(4):
        items = [phantom_item(10 * i + j) for j in range(5)]
        results = [{"model": "cxr-fake", "probabilities": {"a": 0.3, "b": 0.7}} for _ in items]
        results[0] = NotFrontalCXR("gate", detail={"input_gate": {"verdict": "other", "score": 0.1}})
        items.append(MalformedInput("bad"))
        results.append(MalformedInput("bad"))
        mon(pipe, items, results)
    (snap,) = mon.snapshot()
    assert snap["site"] == "default" and snap["seen"] == 24 and snap["threshold"] is not None
    assert "combined" in snap["scores"] and "output.status" in snap["scores"]
    assert snap["estimate"]["b"]["sensitivity"] > 0
    files = list((tmp_path / "state").rglob("*.jsonl"))
    assert {f.name for f in files} == {"windows.jsonl", "predictions.jsonl"}
    preds = M.read_log(next(f for f in files if f.name == "predictions.jsonl"))
    assert len(preds) == 20 and all(len(p["key"]) == 24 for p in preds)  # keyed hashes, not identifiers
    assert (tmp_path / "state" / "secret").stat().st_mode & 0o077 == 0
    recs = monitor_metrics([mon])
    names = {(r.name, tuple(k for k, _ in r.dims)) for r in recs}
    assert ("cxrserve_drift_score", ("site", "model", "signal")) in names
    assert ("cxrserve_drift_alert", ("site", "model")) in names


def test_observer_never_raises_and_bounds_its_queue():
    mon = M.Monitor(None, window=5, queue_size=2)
    mon.consume = lambda records: (_ for _ in ()).throw(RuntimeError("boom"))  # every window fails
    pipe = FakePipeline()
    mon(pipe, [object()], [{"probabilities": "not a map"}])  # odd inputs: recorded or counted, never raised
    mon(pipe, None, None)
    assert mon.errors >= 1
    blocked = M.Monitor(None, window=5, queue_size=2)
    blocked._ensure_thread = lambda: None  # nobody drains the queue
    for i in range(5):
        blocked(pipe, [phantom_item(i)], [{"probabilities": {"a": .5}}])
    assert blocked.queue.qsize() == 2 and blocked.dropped == 3


def test_sites_are_separate_streams():
    class Site:
        def __init__(self, name):
            self.name, self.path = name, None

    mon = M.Monitor(None, window=5, sync=True)
    pipe = FakePipeline()
    mon(pipe, [phantom_item(1, Site("stmary")), phantom_item(2)], [{"probabilities": {"a": .5}}] * 2)
    assert {s["site"] for s in mon.snapshot()} == {"stmary", "default"}


def test_kserve_metrics_export_drift_gauges():
    from prometheus_client import CollectorRegistry, generate_latest

    from cxrserve.tools.kserve.metrics import Metrics

    mon = M.Monitor(None, window=10, step=5, sync=True)
    rng = np.random.default_rng(4)
    ref = M.fit_reference(fake_records(100, rng, model="cxr-fake", version="9"), window=10, resamples=200)
    mon.references[("default", "cxr-fake")] = None
    mon.streams[("default", "cxr-fake", "9")] = M.Stream("default", "cxr-fake", "9", __import__("collections").deque(maxlen=10), ref)
    mon.consume(fake_records(10, rng, model="cxr-fake", version="9", shift=0.5))
    M.MONITORS.append(mon)
    try:
        registry = CollectorRegistry()
        metrics = Metrics(registry)
        metrics.observe("cxr-fake", [{"probabilities": {"a": .5}}], {})
        text = generate_latest(registry).decode()
    finally:
        M.MONITORS.remove(mon)
    assert 'cxrserve_drift_alert{model="cxr-fake",site="default"} 1.0' in text
    assert 'cxrserve_drift_score{model="cxr-fake",signal="combined",site="default"}' in text
    assert "cxrserve_performance_estimate" in text


def test_feedback_and_report(tmp_path):
    from cxrserve.tools.monitor.cli import main
    from cxrserve.tools.monitor.feedback import feedback

    state = tmp_path / "state"
    rng = np.random.default_rng(6)
    ref = M.fit_reference(fake_records(100, rng, model="cxr-fake", version="9"), window=10, resamples=200)
    ref.save(state / "default" / "cxr-fake" / "reference.json")
    mon = M.Monitor(state, window=10, step=5, sync=True)
    pipe = FakePipeline()
    truth = {}
    for i in range(30):
        item = phantom_item(100 + i)
        p = float(rng.random())
        mon(pipe, [item], [{"model": "cxr-fake", "probabilities": {"a": p, "b": 1 - p}}])
        key = mon.streams[("default", "cxr-fake", "9")].window[-1].key
        truth[key] = "a" if rng.random() < p else "b"
    (tmp_path / "labels.csv").write_text("key,label\n" + "".join(f"{k},{v}\n" for k, v in truth.items()))
    result = feedback(tmp_path / "labels.csv", state, window=10)
    (blocks,) = result["blocks"].values()
    assert len(blocks) == 3 and all(b["labelled"] == 10 for b in blocks)
    sens, lo, hi = blocks[0]["labels"]["a"]["sensitivity"]
    assert sens is None or lo <= sens <= hi
    # the report: a page with embedded plots; exit code 1 only while an alert is active
    rc = main(["monitor", "report", "--state", str(state), "--site", "default", "--out", str(tmp_path / "rep")])
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "data:image/png;base64," in page and "Realised performance" in page
    last = M.read_log(next(state.rglob("windows.jsonl")))[-1]
    assert rc == (1 if last["alert"] else 0)
    # a file path in the labels works too (rasters matched by their pixels)
    img = tmp_path / "x.png"
    img.write_bytes(cv2.imencode(".png", np.random.default_rng(101).integers(0, 255, (300, 240), dtype=np.uint8))[1].tobytes())
    from cxrserve.tools.monitor.scoring import file_key

    assert file_key(img, M.monitor_secret(state)) in truth


def test_shadow_records_both_answers_and_switches_with_an_audit(tmp_path):
    from cxrserve.core.shadow import Shadow
    from cxrserve.tools.monitor.cli import main
    from cxrserve.tools.monitor.shadow import compare

    class Candidate(FakePipeline):
        version = "10"

        def predict(self, items):
            assert all(i.gate is None for i in items)  # copies: the active answer's items untouched
            return [{"model": "cxr-fake", "probabilities": {"a": 0.8, "b": 0.2}} for _ in items]

    state = tmp_path / "state"
    shadow = Shadow(Candidate(), state, sync=True)
    active = FakePipeline()
    items = [phantom_item(i) for i in range(4)] + [MalformedInput("bad")]
    results = [{"model": "cxr-fake", "probabilities": {"a": 0.3 if i % 2 else 0.7, "b": 0.7 if i % 2 else 0.3}}
               for i in range(4)] + [MalformedInput("bad")]
    shadow(active, items, results)
    assert items[0].gate is not None and results[0]["probabilities"]["a"] == 0.7  # answers unchanged
    report = compare(state, "default", "cxr-fake")["10"]
    assert report["studies"] == 5 and report["both_answered"] == 4 and report["agreement"] == 0.5
    assert report["flips"] == {"b->a": 2}
    # promote and roll back, each in the audit log
    store, cand = tmp_path / "store", tmp_path / "cand"
    store.mkdir()
    cand.mkdir()
    (store / "cxr-fake.mar").write_bytes(b"old")
    (cand / "cxr-fake.mar").write_bytes(b"new")
    assert main(["monitor", "promote", "--model", "cxr-fake", "--store", str(store), "--candidate", str(cand),
                 "--state", str(state)]) == 0
    assert (store / "cxr-fake.mar").read_bytes() == b"new"
    assert main(["monitor", "rollback", "--model", "cxr-fake", "--store", str(store), "--state", str(state)]) == 0
    assert (store / "cxr-fake.mar").read_bytes() == b"old"
    actions = [json.loads(line)["action"] for line in (state / "audit.jsonl").read_text().splitlines()]
    assert actions == ["promote", "rollback"]


def test_reference_beside_the_site_profile(tmp_path):
    class Site:
        name, path = "stmary", tmp_path / "sites" / "stmary" / "profile.json"

    rng = np.random.default_rng(7)
    M.fit_reference(fake_records(60, rng, model="cxr-fake", version="9", site="stmary"), window=5,
                    resamples=100).save(tmp_path / "sites" / "stmary" / "monitor" / "cxr-fake.json")
    mon = M.Monitor(None, sync=True)
    mon(FakePipeline(), [phantom_item(i, Site()) for i in range(5)], [{"probabilities": {"a": .5, "b": .5}}] * 5)
    (snap,) = mon.snapshot()
    assert snap["site"] == "stmary" and snap["threshold"] is not None and "combined" in snap["scores"]


def test_a_new_detector_moves_the_header_mix():
    """Manufacturer, model and pixel spacing come from the DICOM header into the header mix (never into
    a response), so a site that swaps a detector alerts on them even when the images look alike."""
    from cxrserve.synthetic.dicomwrite import to_dicom
    from cxrserve.synthetic.phantoms import render, sample_spec

    img = render(sample_spec(3, height=256, width=256)).image
    old = decode(to_dicom(img, tags={"Manufacturer": "Acme", "ManufacturerModelName": "DR-1",
                                     "ImagerPixelSpacing": [0.139, 0.139]}))
    new = decode(to_dicom(img, tags={"Manufacturer": "Other", "ManufacturerModelName": "X9",
                                     "ImagerPixelSpacing": [0.2, 0.2]}))
    assert (old.manufacturer, old.device_model, old.pixel_spacing_mm) == ("ACME", "DR-1", 0.139)  # header text, upper case
    assert "manufacturer" not in json.dumps(old.info())
    h_old, h_new = M.image_features(old)[0], M.image_features(new)[0]
    assert (h_old["manufacturer"], h_old["device_model"], h_old["spacing"]) == ("ACME", "DR-1", "<0.15")
    assert (h_new["manufacturer"], h_new["device_model"], h_new["spacing"]) == ("OTHER", "X9", "<0.3")
    rng = np.random.default_rng(7)

    def records(header, n):
        recs = fake_records(n, rng)
        for r in recs:
            r.header = {**r.header, **{k: header[k] for k in ("manufacturer", "device_model", "spacing")}}
        return recs

    ref = M.fit_reference(records(h_old, 300), window=50, target_rate=1e-3, resamples=300)
    swapped = ref.scores(records(h_new, 50))
    assert swapped["header.manufacturer"] > ref.threshold and swapped["combined"] > ref.threshold
    assert ref.scores(records(h_old, 50))["combined"] <= ref.threshold


def test_embedding_comes_from_the_gate_network(pipeline):
    """The image embedding is the features the archive's gate classifier reads (its ONNX graph's
    pooled layer), the same in the observer's thread and in the reference tools; a reference of
    another kind of embedding skips that signal instead of comparing unlike vectors."""
    from cxrserve.core.drift_embedding import THUMBNAIL, gate_embedder
    from cxrserve.synthetic.phantoms import render, sample_spec
    from tsutil import png

    p = pipeline("cxr-triage")
    films = [png(render(sample_spec(i, height=256, width=256)).image) for i in range(6)]
    items = p.make_items([({"image": f}, {}) for f in films])
    results = p.predict(items)
    recs = M.make_records(p, items, results)
    assert gate_embedder(p) is not None and recs[0].embedding_source.startswith("gate:")
    assert len(recs[0].embedding) == 64 and np.std(recs[0].embedding) > 0
    # what the observer's thread computes later equals what the tools compute now
    mon = M.Monitor(sync=True)
    later = M.make_records(p, items, results, embed=False)
    assert {r.embedding_source for r in later} == {THUMBNAIL}
    mon._embed_and_consume(later, M.pending_embeddings(p, items, later))
    assert [r.embedding for r in later] == [r.embedding for r in recs]
    thumb = M.fit_reference(fake_records(200, np.random.default_rng(2)), window=50, resamples=100)
    assert thumb.embedding["source"] == THUMBNAIL
    assert "embedding" not in thumb.statistics(recs)  # gate features are not compared with thumbnails
