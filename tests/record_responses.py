"""Record every served model's responses to a fixed set of phantom requests, keyed by the weights.

``tests/test_layout_responses.py`` compares today's responses with a recording made by
code that was trusted at the time (before a refactor, say), so a change that should keep
every answer is checked to keep every byte of it. The demo store's weights are trained
on this machine and need not be bit-identical elsewhere, so a recording is kept under
``build/expected_responses/<digest>.json`` (never committed), where ``digest`` hashes every
component file of every archive; the test skips where no recording matches the store::

    .venv/bin/python tests/record_responses.py            # record (refuses to overwrite)
    .venv/bin/python tests/record_responses.py --force    # re-record after an intended change

What is recorded, in process and on CPU, for every served model (``cxr-study`` included):
the answers to a batch of phantom requests (PNG and DICOM, with and without pictures, a
prior, a knee, a bad prior, undecodable bytes), once more with the input gate enforced for
the models that read a prior, and for the DICOM request the bytes of the study's DICOM
result objects (SR, SEG, SC). Per-run values (``timings_ms``; in the DICOM objects, dates,
times and the SEG's random DimensionOrganizationUID) are left out; pictures are kept as the
sha256 of their base64 text.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
RECORDINGS = REPO / "build" / "expected_responses"
#: What differs between two builds of the same DICOM result objects, blanked before hashing:
#: dates and times (highdicom stamps now()) and the SEG's DimensionOrganizationUID (random).
PER_RUN_VRS = ("DA", "TM", "DT")
PER_RUN_KEYWORDS = ("DimensionOrganizationUID",)


def phantom_files() -> dict[str, bytes]:
    """The inputs, by name: deterministic phantoms (same seed, same bytes on any machine)."""
    import cv2

    from cxrserve.synthetic.dicomwrite import to_dicom
    from cxrserve.synthetic.phantoms import render, sample_spec

    def png(seed: int, **kw) -> bytes:
        return cv2.imencode(".png", render(sample_spec(seed, **kw)).image)[1].tobytes()

    return {
        "pneumonia": png(5, label="pneumonia"),
        "normal": png(6, label="normal"),
        "covid19": png(7, label="covid19"),
        # a DICOM takes the header path and gives the study's DICOM result objects
        "dicom": to_dicom(render(sample_spec(11, label="pneumonia")).image, modality="CR", view_position="PA",
                          patient_name="Record^Phantom", patient_id="REC-0011"),
        "knee": png(12, kind="knee"),  # the gate's other verdicts
        "garbage": b"this is not an image " * 8,
    }


#: (request name, {field: input name}, pictures on?)
REQUESTS = (
    ("pneumonia", {"image": "pneumonia"}, True),
    ("normal", {"image": "normal"}, False),
    ("covid19+prior", {"image": "covid19", "prior": "normal"}, True),
    ("dicom", {"image": "dicom"}, True),
    ("knee", {"image": "knee"}, False),
    ("normal+knee-prior", {"image": "normal", "prior": "knee"}, False),
    ("normal+garbage-prior", {"image": "normal", "prior": "garbage"}, False),
    ("garbage", {"image": "garbage"}, False),
)
#: models that read a prior: answered a second time with the input gate enforced (its 422s),
#: recorded under ``<name><STRICT>``
GATED = ("cxr-pxs", "cxr-study")
STRICT = " gate_enforce=true"


def picture_options(pipe, on: bool) -> dict:
    """The request options that turn every picture of ``pipe`` on (or off)."""
    from cxrserve.families.study.pipeline import StudyPipeline

    if isinstance(pipe, StudyPipeline):
        return {"pictures": "true"} if on else {}
    return {name: on for name, option in pipe.OPTIONS.items() if option.picture}


def canonical(response) -> dict:
    """A response as it is compared: error bodies as sent, no timings, pictures by their sha256."""
    from cxrserve.core.errors import CXRInputError

    if isinstance(response, CXRInputError):
        return response.to_dict()

    def walk(value, key=""):
        if isinstance(value, dict):
            return {k: walk(v, k) for k, v in value.items() if k != "timings_ms"}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, str) and key.endswith("_png"):
            return "sha256:" + hashlib.sha256(value.encode()).hexdigest()
        return value

    return walk(response)


def answer(pipe, files: dict[str, bytes]) -> dict:
    """Every request of :data:`REQUESTS` in one batch, as the server's worker scores a batch."""
    requests = [({field: files[name] for field, name in fields.items()}, picture_options(pipe, pictures))
                for _, fields, pictures in REQUESTS]
    return dict(zip((name for name, _, _ in REQUESTS), pipe.predict(pipe.make_items(requests))))


def dicom_objects(source: bytes, response: dict) -> list[dict]:
    """The study's DICOM result objects for ``source``: kind and sha256 of the bytes as written,
    with the per-run values blanked (every other value is derived from the inputs)."""
    import pydicom

    from cxrserve.tools import dicom_results

    def blank(dataset, element):
        if element.VR in PER_RUN_VRS or element.keyword in PER_RUN_KEYWORDS:
            element.value = ""

    out = []
    for ds in dicom_results.build_results(pydicom.dcmread(io.BytesIO(source)), response):
        ds.walk(blank)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append({"kind": dicom_results.kind_of(ds), "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()})
    return out


def weights_digest(model_dir: Path) -> str:
    """sha256 over every file of every component folder (one holding ``metadata.json``) of an
    unpacked archive: the weights, cards, pools. Code and model configs are not hashed."""
    h = hashlib.sha256()
    for card in sorted(Path(model_dir).glob("*/metadata.json")):
        for path in sorted(p for p in card.parent.rglob("*") if p.is_file()):
            h.update(str(path.relative_to(model_dir)).encode() + b"\0")
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def store_digest(digests: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(sorted(digests.items()))).encode()).hexdigest()[:16]


def served_names() -> list[str]:
    from cxrserve import families

    return list(families.served())


def gate_enforced(pipe):
    """``pipe`` again, with the same settings but the input gate enforced."""
    import torch

    return type(pipe)(pipe.model_dir, device=torch.device("cpu"), config={**pipe.config, "gate_enforce": "true"})


def record(load: Callable[[str], object], names: list[str] | None = None) -> dict:
    """The answers of the served models ``names`` (default: all); ``load(name)`` gives one's pipeline."""
    files = phantom_files()
    digests, responses, dicom = {}, {}, {}
    for name in names or served_names():
        pipe = load(name)
        digests[name] = weights_digest(pipe.model_dir)
        raw = answer(pipe, files)
        responses[name] = {request: canonical(r) for request, r in raw.items()}
        if isinstance(raw["dicom"], dict) and "results" in raw["dicom"]:  # a composed model: its DICOM objects
            dicom[name] = dicom_objects(files["dicom"], raw["dicom"])
        if name in GATED:
            strict = answer(gate_enforced(pipe), files)
            responses[name + STRICT] = {request: canonical(r) for request, r in strict.items()}
    return {"store_digest": store_digest(digests), "digests": digests, "responses": responses, "dicom": dicom}


def recording_path(digest: str) -> Path:
    return RECORDINGS / f"{digest}.json"


def code_version() -> str:
    """The commit of the code that answered (``+dirty`` when its tree had changes)."""
    import cxrserve

    tree = Path(cxrserve.__file__).resolve().parents[1]  # a worktree of older code via PYTHONPATH, say
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=tree,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default=str(REPO / "model_store"), help="folder of .mar archives")
    parser.add_argument("--force", action="store_true", help="overwrite a recording for the same weights")
    args = parser.parse_args(argv)
    from cxrserve.core.loading import load_pipeline

    store = Path(args.store)
    cache: dict = {}

    def load(name: str):
        if name not in cache:
            cache[name] = load_pipeline(store / f"{name}.mar", device="cpu")
        return cache[name]

    result = record(load)
    path = recording_path(result["store_digest"])
    if path.exists() and not args.force:
        print(f"{path} exists (same weights); --force to overwrite", file=sys.stderr)
        return 1
    result["recorded_with"] = code_version()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
