"""Model-free input checks (cxrserve.core.input_checks): colour, size, blank, DICOM type.

Decode-only except one test that sends files through a served pipeline in process to
check the 422 reaches the client with its own code. pydicom's bundled test files are
read from its package folder (``pydicom.data``'s ``test_files``), never downloaded.
"""
from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest

from cxrserve.synthetic.dicomwrite import to_dicom
from cxrserve.core.errors import (ColourImage, ConstantImage, CXRInputError, ImageTooSmall, NotFrontalCXR,
                             NotProjectionRadiograph)
from cxrserve.core.imageio import decode, read_file
from cxrserve.core.input_checks import MIN_SIDE, check_input, strong_colour_share
from cxrserve.synthetic.phantoms import render, sample_spec


def _pydicom_files(*names: str) -> list[Path]:
    from pydicom.data.data_manager import DATA_ROOT

    root = Path(DATA_ROOT) / "test_files"
    return [root / n for n in names]


#: pydicom's colour test patterns (RGB, YBR_FULL, YBR_FULL_422; raw, RLE, JPEG, JPEG-LS).
COLOUR_FILES = [
    "SC_rgb_rle.dcm", "SC_rgb_rle_16bit.dcm", "SC_rgb_rle_32bit.dcm", "SC_rgb_gdcm_KY.dcm",
    "SC_rgb_jpeg_gdcm.dcm", "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_jpeg_lossy_gdcm.dcm", "SC_rgb_jpeg.dcm",
    "SC_rgb_dcmtk_+eb+cr.dcm", "SC_rgb_dcmtk_+eb+cy+n1.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm",
    "SC_rgb_dcmtk_+eb+cy+s4.dcm", "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_jls_lossy_line.dcm",
    "SC_jpeg_no_color_transform.dcm", "ExplVR_BigEnd.dcm", "examples_rgb_color.dcm", "examples_palette.dcm",
]


def _png(arr: np.ndarray) -> bytes:
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    return cv2.imencode(".png", arr)[1].tobytes()


def _rejects(data: bytes, kind: type[CXRInputError]) -> CXRInputError:
    with pytest.raises(kind) as err:
        check_input(decode(data))
    assert err.value.status == 422 and isinstance(err.value, NotFrontalCXR)
    return err.value


@pytest.fixture(scope="module")
def film() -> np.ndarray:
    return render(sample_spec(31, label="covid19", height=384, width=320)).image


# --------------------------------------------------------------------------- colour
@pytest.mark.parametrize("name", COLOUR_FILES)
def test_pydicom_colour_files_are_refused(name):
    path = _pydicom_files(name)[0]
    with pytest.raises(NotFrontalCXR) as err:
        check_input(read_file(path))
    assert err.value.status == 422
    # Ultrasound ones are refused for their SOP class first; Secondary Captures for colour.
    expected = NotProjectionRadiograph if name.startswith(("examples_", "ExplVR")) else ColourImage
    assert isinstance(err.value, expected), err.value.to_dict()


def test_pydicom_colour_patterns_as_png_are_refused_by_their_pixels():
    """The same test patterns re-encoded as RGB PNGs: the pixel rule alone refuses them."""
    import pydicom

    shares = {}
    for path in _pydicom_files("SC_rgb_rle.dcm", "SC_rgb_dcmtk_+eb+cy+n1.dcm", "SC_ybr_full_422_uncompressed.dcm",
                               "SC_rgb_gdcm_KY.dcm"):
        ds = pydicom.dcmread(path)
        rgb = pydicom.pixels.convert_color_space(ds.pixel_array, ds.PhotometricInterpretation, "RGB") \
            if ds.PhotometricInterpretation.startswith("YBR") else ds.pixel_array
        rgb = cv2.resize(rgb.astype(np.uint8), (256, 256), interpolation=cv2.INTER_NEAREST)  # past MIN_SIDE
        err = _rejects(_png(rgb), ColourImage)
        assert err.code == "colour_image" and err.detail["strong_colour_share"] > 0.25
        shares[path.name] = err.detail["strong_colour_share"]
    assert len(shares) == 4


def _annotated(film: np.ndarray) -> np.ndarray:
    """A screenshot of a radiograph: a red arrow and a yellow caption drawn on it."""
    rgb = np.repeat(film[..., None], 3, axis=2).copy()
    h, w = film.shape
    cv2.arrowedLine(rgb, (w // 2 + 90, h // 2 - 80), (w // 2 + 20, h // 2 - 10), (230, 20, 20), 4,
                    cv2.LINE_AA, tipLength=0.3)
    cv2.putText(rgb, "Fig. 2  R lower zone", (8, h - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255, 230, 0), 2, cv2.LINE_AA)
    return rgb


def test_radiograph_with_red_arrow_and_yellow_caption_passes(film):
    rgb = _annotated(film)
    share = strong_colour_share(rgb)
    assert 0.002 < share < 0.05  # the annotation is really there and strongly coloured
    for data in (_png(rgb), cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()):
        xray = decode(data)
        assert xray.colour_sample is not None
        check_input(xray)


def test_phantom_screenshots_with_coloured_arrows_pass():
    for seed in range(6):
        ph = render(dataclasses.replace(sample_spec(500 + seed, height=320, width=320), style="screenshot"))
        check_input(decode(_png(ph.image_rgb)))


def test_a_mostly_coloured_raster_is_refused(film):
    rgb = _annotated(film)
    rgb[: film.shape[0] // 3] = (40, 90, 255)  # a blue banner over the top third
    err = _rejects(_png(rgb), ColourImage)
    assert "strongly coloured" in err.message


# --------------------------------------------------------------------------- size / blank
@pytest.mark.parametrize("shape", [(MIN_SIDE - 1, 400), (300, 40), (16, 16)])
def test_tiny_images_are_refused(film, shape):
    small = cv2.resize(film, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    err = _rejects(_png(small), ImageTooSmall)
    assert err.code == "image_too_small" and f"{shape[1]} x {shape[0]}" in err.message
    _rejects(to_dicom(small), ImageTooSmall)


def test_pydicom_thumbnail_radiographs_are_too_small():
    for path in _pydicom_files("dicomdirtests/77654033/CR1/6154", "JPEGLSNearLossless_08.dcm"):
        with pytest.raises(ImageTooSmall):
            check_input(read_file(path))


@pytest.mark.parametrize("value", [0, 128, 255])
def test_constant_images_are_refused(value):
    flat = np.full((256, 256), value, np.uint8)
    _rejects(_png(flat), ConstantImage)
    _rejects(to_dicom(flat), ConstantImage)


def test_nearly_constant_noise_is_refused_but_a_low_contrast_film_passes(film):
    rng = np.random.default_rng(0)
    noise = np.clip(120 + rng.normal(0, 1.0, (256, 256)), 0, 255).astype(np.uint8)
    _rejects(_png(noise), ConstantImage)
    faint = (film.astype(np.float32) * 0.3 + 90).astype(np.uint8)  # a third of the contrast
    check_input(decode(_png(faint)))


# --------------------------------------------------------------------------- DICOM type
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "693_J2KI.dcm",
                                  "liver_1frame.dcm", "rtdose_1frame.dcm", "JPEG2000.dcm"])
def test_pydicom_non_radiograph_objects_are_refused(name):
    with pytest.raises(NotProjectionRadiograph) as err:
        check_input(read_file(_pydicom_files(name)[0]))
    assert err.value.code == "not_projection_radiograph" and err.value.status == 422


@pytest.mark.parametrize("sop,modality,ok", [
    ("1.2.840.10008.5.1.4.1.1.2", "CT", False),      # CT Image Storage
    ("1.2.840.10008.5.1.4.1.1.4", "MR", False),      # MR Image Storage
    ("1.2.840.10008.5.1.4.1.1.6.1", "US", False),    # Ultrasound Image Storage
    ("1.2.840.10008.5.1.4.1.1.1.2", "MG", False),    # Digital Mammography: never a chest film
    ("1.2.840.10008.5.1.4.1.1.7", "CT", False),      # a Secondary Capture of a CT
    ("1.2.840.10008.5.1.4.1.1.1", "CR", True),
    ("1.2.840.10008.5.1.4.1.1.1.1", "DX", True),
    ("1.2.840.10008.5.1.4.1.1.1.1.1", "DX", True),   # DX for processing
    ("1.2.840.10008.5.1.4.1.1.7", "OT", True),       # greyscale Secondary Capture of a film
    ("1.2.840.10008.5.1.4.1.1.7", "", True),
])
def test_sop_class_and_modality(film, sop, modality, ok):
    data = to_dicom(film, sop_class="sc", modality=modality or "OT",
                    tags={"SOPClassUID": sop, **({} if modality else {"Modality": ""})})
    xray = decode(data)
    assert xray.sop_class_uid == sop
    if ok:
        check_input(xray)
    else:
        with pytest.raises(NotProjectionRadiograph) as err:
            check_input(xray)
        assert err.value.detail["field"] in ("SOPClassUID", "Modality")


def test_rgb_secondary_capture_of_a_film_is_refused(film):
    err = _rejects(to_dicom(film, sop_class="sc", modality="OT", photometric_rgb=True), ColourImage)
    assert err.detail["field"] == "PhotometricInterpretation"


def test_pydicom_greyscale_secondary_capture_reaches_the_gate():
    """``image_dfl.dcm`` (OT, greyscale SC, 512 x 512) is the one pydicom image these rules pass."""
    check_input(read_file(_pydicom_files("image_dfl.dcm")[0]))


# --------------------------------------------------------------------------- served
def test_served_pipeline_answers_each_rule_with_its_own_code(pipeline, film):
    handler_pipe = pipeline("cxr-lungseg")
    bodies = {
        "ok": _png(_annotated(film)),
        "colour_image": Path(_pydicom_files("SC_rgb_rle.dcm")[0]).read_bytes(),
        "not_projection_radiograph": Path(_pydicom_files("CT_small.dcm")[0]).read_bytes(),
        "image_too_small": _png(np.full((20, 20), 7, np.uint8)),
        "constant_image": _png(np.zeros((300, 300), np.uint8)),
    }
    items = [handler_pipe.make_item({"image": b}, {}) for b in bodies.values()]
    results = handler_pipe.predict(items)
    assert isinstance(results[0], dict) and results[0]["model"] == "cxr-lungseg"
    for code, result in zip(list(bodies)[1:], results[1:]):
        assert isinstance(result, NotFrontalCXR) and result.status == 422, result
        assert result.to_dict()["error"] == code
    from schemas import validate

    for result in results[1:]:
        validate(result.to_dict(), "error")


def test_prior_image_is_checked_too(pipeline, film):
    pipe = pipeline("cxr-lungseg")
    item = pipe.make_item({"image": _png(film)}, {})
    item.images["prior"] = decode(_png(np.zeros((300, 300), np.uint8)))
    with pytest.raises(ConstantImage):
        pipe.screen(item)


# --------------------------------------------------------------------------- real films
def _frontal_rows(root: Path):
    for folder in sorted(p for p in root.iterdir() if (p / "labels.csv").exists()):
        with open(folder / "labels.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                if folder.name == "ieee8023_jun2020" and row.get("is_frontal") != "1":
                    continue
                if folder.name == "dicom_samples" and row["label"] != "chest":
                    continue
                yield folder.name, folder / row["filename"]
    for path in sorted((root / "fullres").glob("*.png")):
        yield "fullres", path


def test_every_shared_frontal_film_passes(shared_data, capsys):
    refused: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for source, path in _frontal_rows(shared_data):
        counts[source] = counts.get(source, 0) + 1
        try:
            check_input(read_file(path))
        except NotFrontalCXR as err:
            refused.setdefault(source, []).append(f"{path.name}: {err.code}")
    with capsys.disabled():
        print(f"\ninput checks on shared frontal films: {sum(counts.values())} films, {counts}")
    assert sum(counts.values()) > 1500
    assert not refused, refused
