"""The result objects of a response's declared pictures: a SEG per mask, an RGB SC per other picture."""
from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from cxrserve.core.family import Picture
from cxrserve.tools.dicom_results.codes import CODES, MANUFACTURER, RESEARCH_NOTICE, code
from cxrserve.tools.dicom_results.identity import result_uid
from cxrserve.tools.dicom_results.response import decode_png, is_demo, mask_from_png, result_pictures
from cxrserve.tools.dicom_results.source import orientation


def build_segs(source: Dataset, response: dict) -> list[Dataset]:
    """One binary Segmentation at the source geometry per mask picture present in the response."""
    return [_seg(source, response, kind, key, section, picture)
            for kind, key, section, picture in result_pictures(response, segmentations=True)]


def _seg(source: Dataset, response: dict, kind: str, key: str, section: dict, picture: Picture) -> Dataset:
    import highdicom as hd

    segment = picture.segment
    mask = mask_from_png(section[picture.field])
    rows, cols = int(source.Rows), int(source.Columns)
    if mask.shape != (rows, cols):
        raise ValueError(f"{segment.label} mask is {mask.shape[1]}x{mask.shape[0]}, the source image {cols}x{rows}")
    sop = str(source.SOPInstanceUID)
    version = str(response.get("model_version", "unknown"))
    algorithm = hd.AlgorithmIdentificationSequence(
        name=section.get("model", key), family=CODES["ai"],
        version=str(section.get("model_version", "unknown"))[:64],
        parameters={"weights": "demo" if is_demo(section) else "trained", "research_use_only": "yes"})
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=segment.label, segmented_property_category=code(segment.category),
        segmented_property_type=code(segment.type), algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=result_uid(sop, version, kind, "track"), tracking_id=segment.tracking_id)
    geometry = source
    if "PixelSpacing" in source and "SliceThickness" not in source:
        # highdicom turns a projection film's PixelSpacing into a Pixel Measures item without
        # the SliceThickness that item needs (its own reader and segread refuse it): the mask is
        # at the source's rows x columns, so the SEG needs no spacing of its own
        import copy

        geometry = copy.copy(source)
        del geometry.PixelSpacing
    seg = hd.seg.Segmentation(
        source_images=[geometry], pixel_array=mask[None].astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[description],
        series_instance_uid=result_uid(sop, version, kind, "series"), series_number=picture.series_number,
        sop_instance_uid=result_uid(sop, version, kind), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=str(section.get("model", key)), software_versions=str(section.get("model_version", "unknown"))[:64],
        device_serial_number="0", content_label=segment.content_label, omit_empty_frames=False,
        content_description=segment.content_description, series_description=segment.series_description)
    if "PatientOrientation" not in seg:
        seg.PatientOrientation = list(orientation(source))
    return seg


# --------------------------------------------------------------------------- SC
def build_heatmaps(source: Dataset, response: dict) -> list[Dataset]:
    """One Secondary Capture per declared picture (not a mask) present in the response."""
    import highdicom as hd

    out = []
    sop = str(source.SOPInstanceUID)
    version = str(response.get("model_version", "unknown"))
    facing = orientation(source)
    for kind, key, section, picture in result_pictures(response, segmentations=False):
        label = picture.label
        pixels = decode_png(section[picture.field])
        if pixels.ndim == 2:
            pixels = np.stack([pixels] * 3, axis=-1)
        pixels = np.ascontiguousarray(pixels[..., :3].astype(np.uint8))
        what = f"{label} ({section.get('model', key)} {section.get('model_version', '')})".strip()
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT", series_instance_uid=result_uid(sop, version, kind, "series"),
            series_number=picture.series_number, sop_instance_uid=result_uid(sop, version, kind), instance_number=1,
            manufacturer=MANUFACTURER, patient_orientation=facing, transfer_syntax_uid="1.2.840.10008.1.2.1",
            series_description=f"AI {label} - RESEARCH USE ONLY"[:64])
        sc.ImageComments = f"{what}. {RESEARCH_NOTICE}"[:10240]
        sc.DerivationDescription = f"{label}: AI explanation map over the source image"[:1024]
        sc.BurnedInAnnotation = "NO"
        sc.BodyPartExamined = str(source.get("BodyPartExamined", "") or "CHEST")  # unpaired: no Laterality
        sc.ImageType = ["DERIVED", "SECONDARY"]
        sc.ConversionType = "WSD"
        src = Dataset()
        src.ReferencedSOPClassUID = source.SOPClassUID
        src.ReferencedSOPInstanceUID = source.SOPInstanceUID
        sc.SourceImageSequence = DicomSequence([src])
        out.append(sc)
    return out
