"""The DICOM objects fedsite writes for a PACS: a Segmentation (SEG) and a Structured Report (SR).

* Segmentation: a binary **DICOM SEG** (highdicom) with one segment, "lesion", on the source
  series' own frames: it references every source instance (ReferencedSeriesSequence and, per
  frame, the source image), shares their Frame of Reference, and names the algorithm
  (``fedsite``) and its version (the run id) in the segment description's Algorithm
  Identification. Empty frames are kept, so the SEG covers the whole series.
* Classification: a **Comprehensive 3D SR** holding a TID 1500 Measurement Report with the
  finding (a qualitative evaluation: the most probable class) and the model's probability of it
  (and of the positive class), the algorithm name and version, and the evaluated images as
  evidence. An SR is a standard object every PACS stores and most viewers render as text; its
  content is coded, so another program can read the probability back (a burnt-in Secondary
  Capture would show it but could not be read by software).

Both copy the patient and study of their source (they belong in the same study) and get new
series and instance UIDs. Nothing is logged here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from client.predict import ALGORITHM_NAME

__all__ = ["SEG_SERIES_NUMBER", "SR_SERIES_NUMBER", "make_seg", "make_sr", "source_datasets"]

SEG_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902
_MANUFACTURER = "fedsite"
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "AccessionNumber",
    "StudyID",
)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("fedsite")
    except Exception:
        return "0"


def source_datasets(series) -> list[Dataset]:
    """The series' source instances (headers only), in the series' slice order, one per file."""
    from client.dicom_header import quiet_dicom

    with quiet_dicom():
        out = [pydicom.dcmread(str(p), stop_before_pixels=True) for p in series.files]
    for ds in out:  # Type 2 patient/study attributes the outputs copy: empty when the source lacks them
        for keyword in _TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
    return out


def _algorithm(run_id: str):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, version=str(run_id)[:64], family=codes.cid7162.ArtificialIntelligence
    )


def _sr_algorithm(run_id: str):
    import highdicom as hd

    return hd.sr.AlgorithmIdentification(name=ALGORITHM_NAME, version=str(run_id)[:64])


def make_seg(
    series, mask: np.ndarray, *, run_id: str, sources: list[Dataset] | None = None, manual: bool = False
) -> Dataset:
    """A binary DICOM SEG of ``mask`` on the series' own frames.

    Args:
        series: The source :class:`client.dicom.SeriesRecord` (DICOM, with patient geometry).
        mask: ``(Z, Y, X)`` 0/1 in the series' slice order (:func:`client.predict.segment_series`).
        run_id: The model's version (its run id), written as the algorithm version.
        sources: The source instances (:func:`source_datasets`), if already read.
        manual: A reference (annotator's) mask rather than the model's: algorithm type MANUAL.

    Returns:
        The SEG dataset (not yet written).

    Raises:
        ValueError: If the series is not one instance per slice or one multi-frame instance.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = source_datasets(series) if sources is None else sources
    frames = mask.astype(np.uint8)
    if len(sources) not in (1, len(series.slices)):
        raise ValueError(
            f"series {series.series_hash}: {len(sources)} files for {len(series.slices)} slices; "
            "a SEG needs one file per slice or one multi-frame file"
        )
    if len(sources) == 1 and len(series.slices) > 1:
        order = [ref.frame for ref in series.slices]  # frames of the multi-frame file, by position
        frames = np.zeros_like(frames)
        frames[order] = mask
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL
        if manual
        else hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=None if manual else _algorithm(run_id),
    )
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=_MANUFACTURER,
        manufacturer_model_name=ALGORITHM_NAME,
        software_versions=_version(),
        device_serial_number=str(run_id)[:64] or "0",
        series_description="reference lesion mask" if manual else f"{ALGORITHM_NAME} lesion segmentation",
        omit_empty_frames=False,
        content_label="LESION",
    )


def make_sr(
    series, probabilities: dict[str, float], *, positive: str, run_id: str, sources: list[Dataset] | None = None
) -> Dataset:
    """A Comprehensive 3D SR (TID 1500) with the model's finding and probability for the series.

    Args:
        series: The source :class:`client.dicom.SeriesRecord`.
        probabilities: Class name -> probability (:func:`client.predict.classify_series`).
        positive: The positive class (the run's last class).
        run_id: The model's version.
        sources: The source instances, if already read.

    Returns:
        The SR dataset (not yet written).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = source_datasets(series) if sources is None else sources
    finding = max(probabilities, key=probabilities.__getitem__)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(),
            name=ALGORITHM_NAME,
            manufacturer_name=_MANUFACTURER,
            model_name=str(run_id)[:64],
        ),
    )
    context = hd.sr.ObservationContext(observer_device_context=observer)
    finding_code = hd.sr.CodedConcept(value=f"FS-{finding}"[:16], scheme_designator="99FEDSITE", meaning=finding[:64])
    unit = hd.sr.CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")
    measurements = [
        hd.sr.Measurement(
            name=hd.sr.CodedConcept(
                value=f"FS-P-{name}"[:16], scheme_designator="99FEDSITE", meaning=f"Probability of {name}"[:64]
            ),
            value=round(float(p), 6),
            unit=unit,
            algorithm_id=_sr_algorithm(run_id),
        )
        for name, p in probabilities.items()
    ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{ALGORITHM_NAME} classification"),
        measurements=measurements,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources],
        algorithm_id=_sr_algorithm(run_id),
        finding_type=finding_code,  # TID 1501 "Finding": the most probable class
    )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=hd.sr.CodedConcept(
            value="18748-4", scheme_designator="LN", meaning="Diagnostic imaging study"
        ),
        imaging_measurements=[group],
        title=codes.cid7021.ImagingMeasurementReport,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=sources,
        content=report,
        series_instance_uid=hd.UID(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=_MANUFACTURER,
        series_description=f"{ALGORITHM_NAME} classification ({positive} {probabilities[positive]:.2f})"[:64],
        is_complete=True,
        is_final=False,
        is_verified=False,
    )


def write(ds: Dataset, path: Path) -> Path:
    """Write a dataset as a DICOM file (with its file meta), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    ds.save_as(str(tmp), enforce_file_format=True)
    tmp.replace(path)
    return path
