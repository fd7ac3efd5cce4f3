"""Scanner profiles: how one simulated site's scanner differs from another's.

A :class:`ScannerProfile` fixes everything about a site's images that is the scanner's doing
rather than the patient's: the sampling grid (matrix, pixel spacing, slice thickness), the
physics (contrast curve, bias field, k-space truncation, reconstruction kernel, dose, detector
blur, noise, calibration), the vendor header values (Manufacturer, ManufacturerModelName,
MagneticFieldStrength, KVP, ConvolutionKernel) and how intensities are stored in DICOM (bits,
signedness, photometric interpretation, rescale slope/intercept, transfer syntax).

One dataclass serves four modalities; a field that does not apply to a profile's modality must
keep its neutral value (the error says which):

* ``"MR"`` (MR Image Storage, synthetic abdomen phantom): ``field_strength``, ``bias_field``,
  ``gibbs``, ``intensity_scale``, ``contrast_gamma``, ``noise_kind`` ``"rician"`` or
  ``"gaussian"``. ``noise_level`` is the noise sigma as a fraction of the maximum tissue signal.
* ``"CT"`` (CT Image Storage, same phantom, in HU): ``kvp``, ``convolution_kernel``,
  ``kernel_sharpness``, ``hu_offset``, ``hu_scale``; ``noise_level`` is the noise sigma at the
  standard kernel in units of 1000 HU (0.01 = 10 HU); ``noise_kind`` ``"gaussian"``.
* ``"CR"`` / ``"DX"`` (Computed Radiography / Digital X-Ray For Presentation, 2-D images made
  from a labelled image set, see :mod:`simulations.xray`): ``kvp``, ``exposure``, ``blur_mm``,
  ``contrast_gamma`` (the display curve); ``noise_level`` is the detector (electronic) noise
  sigma as a fraction of the unattenuated signal; ``noise_kind`` ``"gaussian"``. The field of
  view is always :data:`XRAY_FOV_MM`, so ``pixel_spacing_mm`` must be ``XRAY_FOV_MM / matrix``;
  stored values fill ``0 .. 2**bits_stored - 1`` with RescaleSlope 1 and RescaleIntercept 0.

MR intensity units: a tissue signal ``s`` in ``[0, 1]`` (after contrast, bias field, k-space
truncation and noise) is reported as the modality value ``v = s * intensity_scale *
SIGNAL_UNITS``. It is stored as ``round((v - rescale_intercept) / rescale_slope)``, so ``stored *
RescaleSlope + RescaleIntercept`` gives ``v`` back. CT stores HU the same way (``v`` = HU). For
MONOCHROME1 the stored value is then inverted inside the BitsStored range: ``stored' = lo + hi -
stored`` (``lo, hi`` = smallest and largest value BitsStored and PixelRepresentation allow).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Modality value of tissue signal 1.0 at ``intensity_scale == 1`` (MR).
SIGNAL_UNITS = 1000.0
#: Largest tissue signal (after bias field and noise) a profile's stored range must hold (MR).
#: Signals above it are clipped to the top of the stored range.
MAX_SIGNAL = 2.0
#: Smallest field of view (matrix * pixel spacing, mm) that holds the whole synthetic body.
MIN_FOV_MM = 210.0
#: HU range a CT profile's stored values must hold (air padding .. dense bone).
CT_HU_RANGE = (-1024.0, 3071.0)
#: Field of view of every CR/DX image, mm (the source image is resampled over it).
XRAY_FOV_MM = 240.0
#: CR/DX: sigma (mm) of the Gaussian whose difference an unsharp mask (``edge_enhance``) adds back.
EDGE_KERNEL_MM = 12.0

NOISE_KINDS = ("rician", "gaussian")
PHOTOMETRICS = ("MONOCHROME2", "MONOCHROME1")
#: All lossless; the compressed ones decode to exactly the stored values.
TRANSFER_SYNTAXES = (
    "ExplicitVRLittleEndian",
    "RLELossless",
    "JPEGLSLossless",
    "JPEG2000Lossless",
    "DeflatedExplicitVRLittleEndian",
)
#: Short names of the transfer syntaxes for options (``--transfer-syntax jpeg-ls``).
TRANSFER_SYNTAX_NAMES = {
    "explicit": "ExplicitVRLittleEndian",
    "rle": "RLELossless",
    "jpeg-ls": "JPEGLSLossless",
    "jpeg2000": "JPEG2000Lossless",
    "deflate": "DeflatedExplicitVRLittleEndian",
}
MODALITIES = ("MR", "CT", "CR", "DX")
#: Modalities of the projection (X-ray) profiles.
XRAY_MODALITIES = ("CR", "DX")
#: What :func:`profile_for_site` accepts: a modality, or ``"auto"`` (the X-ray profiles, CR and DX mixed).
SITE_MODALITIES = (*MODALITIES, "auto")
BITS_STORED = (12, 16)
XRAY_BITS_STORED = (10, 12, 14, 16)

# Fields that apply to some modalities only: field -> (modalities, neutral value).
_ONLY: dict[str, tuple[tuple[str, ...], Any]] = {
    "field_strength": (("MR",), None),
    "bias_field": (("MR",), 0.0),
    "gibbs": (("MR",), 0.0),
    "lesion_contrast": (("MR",), 1.0),
    "intensity_scale": (("MR",), 1.0),
    "contrast_gamma": (("MR", "CR", "DX"), 1.0),
    "kvp": (("CT", "CR", "DX"), None),
    "convolution_kernel": (("CT",), None),
    "kernel_sharpness": (("CT",), 0.0),
    "hu_offset": (("CT",), 0.0),
    "hu_scale": (("CT",), 1.0),
    "exposure": (("CR", "DX"), 1.0),
    "blur_mm": (("CR", "DX"), 0.0),
    "edge_enhance": (("CR", "DX"), 0.0),
}


@dataclass(frozen=True)
class ScannerProfile:
    """One scanner's acquisition and storage settings.

    Attributes:
        name: Profile name, e.g. ``"siemens-1.5T"`` (recorded in ``site.json``).
        manufacturer: DICOM Manufacturer, e.g. ``"SIEMENS"``.
        model_name: DICOM ManufacturerModelName.
        modality: DICOM Modality: ``"MR"``, ``"CT"``, ``"CR"`` or ``"DX"`` (see the module docstring).
        field_strength: MR: MagneticFieldStrength in tesla, or None to omit it.
        matrix: Rows == Columns of every image.
        pixel_spacing_mm: In-plane pixel spacing (square pixels), mm.
        slice_thickness_mm: MR/CT: slice thickness and spacing between slices (contiguous), mm.
            CT slices average the anatomy over their thickness (partial volume).
        noise_kind: ``"rician"`` (magnitude MR noise, MR only) or ``"gaussian"``.
        noise_level: Noise sigma; its unit depends on the modality (see the module docstring).
        bias_field: MR: peak-to-peak strength of a smooth multiplicative field; 0 = none.
        contrast_gamma: MR: contrast curve ``signal -> signal ** gamma``; CR/DX: display curve
            ``value -> value ** gamma`` of the presentation image.
        intensity_scale: MR: overall scale of modality values (see the module docstring).
        bits_stored: BitsStored: 12 or 16 (MR, CT); 10, 12, 14 or 16 (CR, DX). BitsAllocated is 16.
        pixel_representation: 0 unsigned, 1 signed (two's complement; MR and CT only).
        photometric: ``"MONOCHROME2"`` or ``"MONOCHROME1"`` (high stored value = dark).
        rescale_slope: RescaleSlope, > 0 (1 for CR/DX).
        rescale_intercept: RescaleIntercept (0 for CR/DX; e.g. -1024 for CT).
        transfer_syntax: One of :data:`TRANSFER_SYNTAXES` (pydicom UID keywords, all lossless):
            ``"ExplicitVRLittleEndian"``, ``"RLELossless"``, ``"JPEGLSLossless"``,
            ``"JPEG2000Lossless"`` or ``"DeflatedExplicitVRLittleEndian"``.
        gibbs: MR: fraction of k-space kept in each in-plane direction (k-space truncation gives
            Gibbs ringing next to edges); 0 or 1 = full k-space, no ringing. Image only, never
            the mask.
        kvp: CT/CR/DX: tube voltage written as KVP, or None to omit it.
        convolution_kernel: CT: the vendor's kernel name written as ConvolutionKernel, e.g. ``"B30f"``.
        kernel_sharpness: CT: reconstruction kernel, -1 (smooth: blur, less noise) .. 0
            (standard) .. 1 (sharp: edge enhancement, more noise).
        hu_offset: CT: calibration offset, HU (``HU' = hu_offset + hu_scale * HU``).
        hu_scale: CT: calibration scale.
        exposure: CR/DX: relative dose; quantum noise sigma scales as ``1 / sqrt(exposure)``.
        blur_mm: CR/DX: detector blur (MTF), Gaussian sigma in mm; 0 = none.
        edge_enhance: CR/DX: the vendor's image processing, an unsharp mask of gain
            ``edge_enhance`` over a Gaussian of :data:`EDGE_KERNEL_MM` (``p + g * (p - blur(p))``,
            in the log domain, before the display curve); 0 = none. Vendors' processing differs
            more between sites than the detectors do.
        lesion_contrast: MR: tissue contrast of the protocol at this field strength, as a factor on
            the lesion's excess signal over the organ (1 = the phantom's 1.5-1.7x the organ signal;
            0.5 = 1.25-1.35x). T1 lengthens with field strength and vendors' default sequences
            differ, so the same lesion stands out less on one scanner than on another.
    """

    name: str
    manufacturer: str
    model_name: str
    modality: str = "MR"
    field_strength: float | None = 1.5
    matrix: int = 256
    pixel_spacing_mm: float = 1.0
    slice_thickness_mm: float = 5.0
    noise_kind: str = "rician"
    noise_level: float = 0.03
    bias_field: float = 0.0
    contrast_gamma: float = 1.0
    intensity_scale: float = 1.0
    bits_stored: int = 12
    pixel_representation: int = 0
    photometric: str = "MONOCHROME2"
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    transfer_syntax: str = "ExplicitVRLittleEndian"
    gibbs: float = 0.0
    kvp: float | None = None
    convolution_kernel: str | None = None
    kernel_sharpness: float = 0.0
    hu_offset: float = 0.0
    hu_scale: float = 1.0
    exposure: float = 1.0
    blur_mm: float = 0.0
    edge_enhance: float = 0.0
    lesion_contrast: float = 1.0

    def __post_init__(self) -> None:
        for key in ("name", "manufacturer", "model_name"):
            _short_text(key, getattr(self, key))
        _choice("modality", self.modality, MODALITIES)
        for key, (allowed, neutral) in _ONLY.items():
            value = getattr(self, key)
            if self.modality not in allowed and value != neutral:
                raise ValueError(
                    f"ScannerProfile.{key}={value!r} is invalid for modality={self.modality!r}: {key} applies "
                    f"to {'/'.join(allowed)} profiles only; use {neutral!r}"
                )
        if self.field_strength is not None:
            _number("field_strength", self.field_strength, low=0.0, low_open=True, high=20.0)
        if isinstance(self.matrix, bool) or not isinstance(self.matrix, int) or not 32 <= self.matrix <= 1024:
            raise ValueError(f"ScannerProfile.matrix={self.matrix!r} is invalid: use an integer from 32 to 1024")
        _number("pixel_spacing_mm", self.pixel_spacing_mm, low=0.1, high=8.0)
        _number("slice_thickness_mm", self.slice_thickness_mm, low=0.5, high=20.0)
        fov = self.matrix * self.pixel_spacing_mm
        if self.modality in XRAY_MODALITIES:
            if abs(fov - XRAY_FOV_MM) > 0.5:
                raise ValueError(
                    f"ScannerProfile {self.name!r}: a {self.modality} image covers {XRAY_FOV_MM:g} mm, but matrix * "
                    f"pixel_spacing_mm = {self.matrix} * {self.pixel_spacing_mm} = {fov:g} mm: use pixel_spacing_mm = "
                    f"{XRAY_FOV_MM:g} / {self.matrix} = {XRAY_FOV_MM / self.matrix:.4f}"
                )
        elif fov < MIN_FOV_MM:
            raise ValueError(
                f"ScannerProfile {self.name!r}: field of view matrix * pixel_spacing_mm = "
                f"{self.matrix} * {self.pixel_spacing_mm} = {fov:g} mm is too small for the "
                f"synthetic body: raise matrix or pixel_spacing_mm to reach at least {MIN_FOV_MM:g} mm"
            )
        _choice("noise_kind", self.noise_kind, NOISE_KINDS)
        if self.modality != "MR" and self.noise_kind != "gaussian":
            raise ValueError(
                f"ScannerProfile.noise_kind={self.noise_kind!r} is invalid for modality={self.modality!r}: "
                "rician noise is MR magnitude noise; use 'gaussian'"
            )
        _number("noise_level", self.noise_level, low=0.0, high=0.5)
        _number("bias_field", self.bias_field, low=0.0, high=1.0)
        _number("contrast_gamma", self.contrast_gamma, low=0.2, high=5.0)
        _number("intensity_scale", self.intensity_scale, low=0.0, low_open=True, high=1000.0)
        _number("gibbs", self.gibbs, low=0.0, high=1.0)
        if 0.0 < self.gibbs < 0.1:
            raise ValueError(
                f"ScannerProfile.gibbs={self.gibbs!r} is invalid: keep at least 0.1 of k-space, "
                "or use 0 (no truncation)"
            )
        if self.kvp is not None:
            _number("kvp", self.kvp, low=20.0, high=200.0)
        if self.convolution_kernel is not None:
            _short_text("convolution_kernel", self.convolution_kernel, limit=16)
        _number("kernel_sharpness", self.kernel_sharpness, low=-1.0, high=1.0)
        _number("hu_offset", self.hu_offset, low=-200.0, high=200.0)
        _number("hu_scale", self.hu_scale, low=0.8, high=1.25)
        _number("exposure", self.exposure, low=0.05, high=20.0)
        _number("blur_mm", self.blur_mm, low=0.0, high=10.0)
        _number("edge_enhance", self.edge_enhance, low=0.0, high=5.0)
        _number("lesion_contrast", self.lesion_contrast, low=0.1, high=3.0)
        bits_allowed = XRAY_BITS_STORED if self.modality in XRAY_MODALITIES else BITS_STORED
        if self.bits_stored not in bits_allowed or isinstance(self.bits_stored, bool):
            raise ValueError(
                f"ScannerProfile.bits_stored={self.bits_stored!r} is invalid for modality={self.modality!r}: "
                f"use {', '.join(map(str, bits_allowed))}"
            )
        if self.pixel_representation not in (0, 1) or isinstance(self.pixel_representation, bool):
            raise ValueError(
                f"ScannerProfile.pixel_representation={self.pixel_representation!r} is invalid: "
                "use 0 (unsigned) or 1 (signed)"
            )
        _choice("photometric", self.photometric, PHOTOMETRICS)
        _number("rescale_slope", self.rescale_slope, low=0.0, low_open=True, high=1e6)
        _number("rescale_intercept", self.rescale_intercept, low=-1e7, high=1e7)
        _choice("transfer_syntax", self.transfer_syntax, TRANSFER_SYNTAXES)
        if self.modality in XRAY_MODALITIES:
            self._check_xray_storage()
        elif self.modality == "CT":
            self._check_ct_storage()
        else:
            self._check_mr_storage()

    def _check_mr_storage(self) -> None:
        lo, hi = stored_limits(self)
        top = MAX_SIGNAL * self.intensity_scale * SIGNAL_UNITS
        s0 = (0.0 - self.rescale_intercept) / self.rescale_slope
        s1 = (top - self.rescale_intercept) / self.rescale_slope
        if s0 < lo or s1 > hi:
            raise ValueError(
                f"ScannerProfile {self.name!r}: modality values 0..{top:g} (intensity_scale="
                f"{self.intensity_scale:g}) map to stored values {s0:g}..{s1:g} with rescale_slope="
                f"{self.rescale_slope:g} and rescale_intercept={self.rescale_intercept:g}, outside "
                f"the BitsStored range {lo}..{hi}: change intensity_scale, the rescale values, "
                "bits_stored or pixel_representation"
            )
        if s1 - s0 < 100 * MAX_SIGNAL:
            raise ValueError(
                f"ScannerProfile {self.name!r}: signal 0..1 spans only {(s1 - s0) / MAX_SIGNAL:g} "
                "stored values (intensity_scale * 1000 / rescale_slope); raise intensity_scale or "
                "lower rescale_slope to keep at least 100 levels"
            )

    def _check_ct_storage(self) -> None:
        lo, hi = stored_limits(self)
        s0 = (CT_HU_RANGE[0] - self.rescale_intercept) / self.rescale_slope
        s1 = (CT_HU_RANGE[1] - self.rescale_intercept) / self.rescale_slope
        if s0 < lo or s1 > hi:
            raise ValueError(
                f"ScannerProfile {self.name!r}: HU {CT_HU_RANGE[0]:g}..{CT_HU_RANGE[1]:g} map to stored values "
                f"{s0:g}..{s1:g} with rescale_slope={self.rescale_slope:g} and rescale_intercept="
                f"{self.rescale_intercept:g}, outside the BitsStored range {lo}..{hi}: use e.g. 12 bits unsigned "
                "with rescale_intercept=-1024, or 16 bits signed"
            )
        if self.rescale_slope > 2.0:
            raise ValueError(
                f"ScannerProfile.rescale_slope={self.rescale_slope!r} is invalid for modality='CT': use at most 2 "
                "(coarser steps would quantise soft-tissue contrast)"
            )

    def _check_xray_storage(self) -> None:
        if self.pixel_representation != 0:
            raise ValueError(
                f"ScannerProfile.pixel_representation={self.pixel_representation!r} is invalid for "
                f"modality={self.modality!r}: X-ray presentation images are unsigned; use 0"
            )
        if self.rescale_slope != 1.0 or self.rescale_intercept != 0.0:
            raise ValueError(
                f"ScannerProfile {self.name!r}: rescale_slope={self.rescale_slope!r}, rescale_intercept="
                f"{self.rescale_intercept!r} are invalid for modality={self.modality!r}: X-ray presentation "
                "images use the identity (1 and 0)"
            )


def _short_text(key: str, value: Any, *, limit: int = 64) -> None:
    if not isinstance(value, str) or not value.strip() or len(value) > limit or "\\" in value:
        raise ValueError(
            f"ScannerProfile.{key}={value!r} is invalid: use a non-empty string of at most "
            f"{limit} characters without a backslash"
        )


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"ScannerProfile.{key}={value!r} is invalid: use one of {', '.join(map(repr, allowed))}")


def _number(key: str, value: Any, *, low: float, high: float, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"ScannerProfile.{key}={value!r} is invalid: use a number in {bracket}{low:g}, {high:g}]")


def stored_limits(profile: ScannerProfile) -> tuple[int, int]:
    """The smallest and largest stored pixel value the profile's BitsStored allows.

    Args:
        profile: The scanner profile.

    Returns:
        ``(lo, hi)``: ``(0, 2**bits - 1)`` unsigned, ``(-2**(bits-1), 2**(bits-1) - 1)`` signed.
    """
    bits = profile.bits_stored
    if profile.pixel_representation == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


#: The four default MR scanners (sites 0..3 of an MR simulation). Philips and Canon truncate k-space.
MR_PROFILES: tuple[ScannerProfile, ...] = (
    ScannerProfile(
        name="siemens-1.5T",
        manufacturer="SIEMENS",
        model_name="Avanto",
        field_strength=1.5,
        matrix=256,
        pixel_spacing_mm=0.94,
        slice_thickness_mm=5.0,
        noise_kind="rician",
        noise_level=0.03,
        bias_field=0.0,
        contrast_gamma=1.0,
        intensity_scale=1.0,
        bits_stored=12,
        pixel_representation=0,
        photometric="MONOCHROME2",
    ),
    ScannerProfile(
        name="ge-3T",
        manufacturer="GE MEDICAL SYSTEMS",
        model_name="DISCOVERY MR750",
        field_strength=3.0,
        matrix=192,
        pixel_spacing_mm=1.25,
        slice_thickness_mm=5.0,
        noise_kind="rician",
        noise_level=0.05,
        bias_field=0.5,
        contrast_gamma=0.7,
        intensity_scale=3.0,
        bits_stored=16,
        pixel_representation=0,
        photometric="MONOCHROME2",
        rescale_slope=2.0,
        rescale_intercept=-100.0,
        lesion_contrast=0.7,
    ),
    ScannerProfile(
        name="philips-1.5T",
        manufacturer="Philips Medical Systems",
        model_name="Ingenia",
        field_strength=1.5,
        matrix=320,
        pixel_spacing_mm=0.75,
        slice_thickness_mm=5.0,
        noise_kind="gaussian",
        noise_level=0.08,
        bias_field=0.2,
        contrast_gamma=1.4,
        intensity_scale=1.0,
        bits_stored=12,
        pixel_representation=0,
        photometric="MONOCHROME1",
        transfer_syntax="RLELossless",
        gibbs=0.5,
        lesion_contrast=1.6,
    ),
    ScannerProfile(
        name="canon-3T",
        manufacturer="CANON_MEC",
        model_name="Vantage Galan 3T",
        field_strength=3.0,
        matrix=224,
        pixel_spacing_mm=1.1,
        slice_thickness_mm=5.0,
        noise_kind="rician",
        noise_level=0.02,
        bias_field=0.3,
        contrast_gamma=0.85,
        intensity_scale=0.5,
        bits_stored=16,
        pixel_representation=1,
        photometric="MONOCHROME2",
        rescale_slope=0.5,
        rescale_intercept=500.0,
        gibbs=0.7,
        lesion_contrast=0.85,
    ),
)
#: The MR profiles (the name predates the other modalities).
DEFAULT_PROFILES = MR_PROFILES

#: MR scanners for pre-training a start model (:mod:`simulations.pretrain`): no simulated site uses
#: them (sites cycle through :data:`MR_PROFILES` and their ``-vN`` variants), so a start model has
#: seen neither a site's patients nor its scanner.
PRETRAIN_PROFILES: tuple[ScannerProfile, ...] = (
    ScannerProfile(
        name="hitachi-1.2T",
        manufacturer="Hitachi Medical Corporation",
        model_name="Oasis",
        field_strength=1.2,
        matrix=256,
        pixel_spacing_mm=1.0,
        slice_thickness_mm=5.0,
        noise_kind="rician",
        noise_level=0.04,
        bias_field=0.25,
        contrast_gamma=0.9,
        intensity_scale=1.5,
        bits_stored=12,
        lesion_contrast=0.9,
    ),
    ScannerProfile(
        name="siemens-3T",
        manufacturer="SIEMENS",
        model_name="Skyra",
        field_strength=3.0,
        matrix=240,
        pixel_spacing_mm=0.9,
        slice_thickness_mm=5.0,
        noise_kind="rician",
        noise_level=0.04,
        bias_field=0.4,
        contrast_gamma=0.8,
        intensity_scale=2.0,
        bits_stored=16,
        gibbs=0.6,
        lesion_contrast=0.8,
    ),
)

#: The four default CT scanners: different kernels, noise, slice thickness, calibration and storage.
CT_PROFILES: tuple[ScannerProfile, ...] = (
    ScannerProfile(
        name="siemens-ct",
        manufacturer="SIEMENS",
        model_name="SOMATOM Definition AS+",
        modality="CT",
        field_strength=None,
        kvp=120.0,
        convolution_kernel="B30f",
        kernel_sharpness=0.0,
        matrix=512,
        pixel_spacing_mm=0.7,
        slice_thickness_mm=5.0,
        noise_kind="gaussian",
        noise_level=0.010,
        bits_stored=12,
        pixel_representation=0,
        rescale_slope=1.0,
        rescale_intercept=-1024.0,
    ),
    ScannerProfile(
        name="ge-ct",
        manufacturer="GE MEDICAL SYSTEMS",
        model_name="Revolution CT",
        modality="CT",
        field_strength=None,
        kvp=100.0,
        convolution_kernel="SOFT",
        kernel_sharpness=-0.6,
        hu_offset=12.0,
        hu_scale=1.04,
        matrix=512,
        pixel_spacing_mm=0.74,
        slice_thickness_mm=2.5,
        noise_kind="gaussian",
        noise_level=0.018,
        bits_stored=16,
        pixel_representation=1,
        rescale_slope=1.0,
        rescale_intercept=-1024.0,
    ),
    ScannerProfile(
        name="philips-ct",
        manufacturer="Philips",
        model_name="Brilliance 64",
        modality="CT",
        field_strength=None,
        kvp=120.0,
        convolution_kernel="C",
        kernel_sharpness=0.7,
        hu_offset=-8.0,
        matrix=512,
        pixel_spacing_mm=0.68,
        slice_thickness_mm=3.0,
        noise_kind="gaussian",
        noise_level=0.008,
        bits_stored=12,
        pixel_representation=0,
        rescale_slope=1.0,
        rescale_intercept=-1024.0,
        transfer_syntax="RLELossless",
    ),
    ScannerProfile(
        name="canon-ct",
        manufacturer="CANON_MEC",
        model_name="Aquilion ONE",
        modality="CT",
        field_strength=None,
        kvp=135.0,
        convolution_kernel="FC08",
        kernel_sharpness=-0.3,
        hu_offset=-4.0,
        hu_scale=0.97,
        matrix=512,
        pixel_spacing_mm=0.78,
        slice_thickness_mm=1.0,
        noise_kind="gaussian",
        noise_level=0.022,
        bits_stored=16,
        pixel_representation=1,
        rescale_slope=1.0,
        rescale_intercept=0.0,
        photometric="MONOCHROME2",
    ),
)

#: The four default X-ray detectors (CR, DX, CR, DX): dose, detector blur, display curve,
#: resolution, bit depth and photometric interpretation differ.
XRAY_PROFILES: tuple[ScannerProfile, ...] = (
    ScannerProfile(
        name="fujifilm-fcr",
        manufacturer="FUJIFILM Corporation",
        model_name="FCR CAPSULA XLII",
        modality="CR",
        field_strength=None,
        kvp=85.0,
        exposure=0.6,
        blur_mm=2.5,
        edge_enhance=2.0,
        contrast_gamma=1.6,
        matrix=64,
        pixel_spacing_mm=3.75,
        noise_kind="gaussian",
        noise_level=0.01,
        bits_stored=10,
        photometric="MONOCHROME1",
        transfer_syntax="RLELossless",
    ),
    ScannerProfile(
        name="siemens-ysio",
        manufacturer="SIEMENS",
        model_name="Ysio Max",
        modality="DX",
        field_strength=None,
        kvp=90.0,
        exposure=2.5,
        blur_mm=0.8,
        contrast_gamma=1.0,
        matrix=96,
        pixel_spacing_mm=2.5,
        noise_kind="gaussian",
        noise_level=0.003,
        bits_stored=16,
        photometric="MONOCHROME2",
        transfer_syntax="JPEGLSLossless",
    ),
    ScannerProfile(
        name="carestream-directview",
        manufacturer="Carestream Health",
        model_name="DirectView CR 975",
        modality="CR",
        field_strength=None,
        kvp=80.0,
        exposure=0.25,
        blur_mm=1.5,
        edge_enhance=0.8,
        contrast_gamma=0.6,
        matrix=48,
        pixel_spacing_mm=5.0,
        noise_kind="gaussian",
        noise_level=0.025,
        bits_stored=12,
        photometric="MONOCHROME2",
    ),
    ScannerProfile(
        name="philips-digitaldiagnost",
        manufacturer="Philips Medical Systems",
        model_name="DigitalDiagnost C90",
        modality="DX",
        field_strength=None,
        kvp=100.0,
        exposure=1.5,
        blur_mm=2.5,
        edge_enhance=1.2,
        contrast_gamma=0.55,
        matrix=80,
        pixel_spacing_mm=3.0,
        noise_kind="gaussian",
        noise_level=0.006,
        bits_stored=14,
        photometric="MONOCHROME1",
    ),
)


def default_profiles(modality: str = "MR") -> tuple[ScannerProfile, ...]:
    """The default profiles :func:`profile_for_site` cycles through for ``modality``.

    Args:
        modality: ``"MR"``, ``"CT"``, ``"CR"``, ``"DX"`` or ``"auto"``; the X-ray modalities all
            use :data:`XRAY_PROFILES` (``"CR"``/``"DX"`` store every one of them as that modality).

    Returns:
        The profiles, in site order.

    Raises:
        ValueError: If ``modality`` is not one of :data:`SITE_MODALITIES`.
    """
    if modality not in SITE_MODALITIES:
        raise ValueError(f"modality={modality!r} is invalid: use one of {', '.join(map(repr, SITE_MODALITIES))}")
    if modality == "MR":
        return MR_PROFILES
    if modality == "CT":
        return CT_PROFILES
    return XRAY_PROFILES


def profile_for_site(index: int, modality: str = "MR") -> ScannerProfile:
    """The scanner profile of simulated site ``index`` for ``modality``.

    Indices ``0 .. n - 1`` get the ``n`` default profiles of the modality in order
    (:func:`default_profiles`). Higher indices cycle through them again, each time as a
    deterministic variant named ``"<base>-v<cycle + 1>"``, e.g. ``"ge-3T-v2"``: MR perturbs noise
    level, contrast gamma and bias field; CT noise level, kernel sharpness and HU offset; CR/DX
    exposure, display gamma, detector noise and blur. ``"CR"`` and ``"DX"`` store every X-ray
    profile as that modality; ``"auto"`` keeps each profile's own (CR and DX mixed).

    Args:
        index: Site index, 0-based.
        modality: ``"MR"`` (default), ``"CT"``, ``"CR"``, ``"DX"`` or ``"auto"``.

    Returns:
        The profile; the same index and modality always give the same profile.

    Raises:
        ValueError: If ``index`` is not a non-negative integer or ``modality`` is unknown.
    """
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"site index {index!r} is invalid: use an integer >= 0")
    defaults = default_profiles(modality)
    cycle, which = divmod(index, len(defaults))
    base = defaults[which]
    if modality in XRAY_MODALITIES and base.modality != modality:
        base = dataclasses.replace(base, modality=modality)
    if cycle == 0:
        return base
    if modality == "MR":
        rng = np.random.default_rng([0xFED5, index])
        noise = float(np.clip(base.noise_level * rng.uniform(0.7, 1.4), 0.01, 0.3))
        gamma = float(np.clip(base.contrast_gamma * rng.uniform(0.8, 1.25), 0.4, 2.5))
        bias = float(np.clip(base.bias_field + rng.uniform(-0.15, 0.25), 0.0, 0.8))
        changes: dict[str, Any] = {
            "noise_level": round(noise, 4),
            "contrast_gamma": round(gamma, 4),
            "bias_field": round(bias, 4),
        }
    elif modality == "CT":
        rng = np.random.default_rng([0xFED5, index, 0xC7])
        noise = float(np.clip(base.noise_level * rng.uniform(0.75, 1.35), 0.004, 0.05))
        sharp = float(np.clip(base.kernel_sharpness + rng.uniform(-0.25, 0.25), -1.0, 1.0))
        offset = float(np.clip(base.hu_offset + rng.uniform(-10.0, 10.0), -50.0, 50.0))
        changes = {"noise_level": round(noise, 4), "kernel_sharpness": round(sharp, 3), "hu_offset": round(offset, 1)}
    else:
        rng = np.random.default_rng([0xFED5, index, 0x3A])
        exposure = float(np.clip(base.exposure * rng.uniform(0.7, 1.4), 0.1, 10.0))
        gamma = float(np.clip(base.contrast_gamma * rng.uniform(0.85, 1.2), 0.4, 2.5))
        noise = float(np.clip(base.noise_level * rng.uniform(0.7, 1.4), 0.001, 0.1))
        blur = float(np.clip(base.blur_mm * rng.uniform(0.8, 1.25), 0.0, 8.0))
        changes = {
            "exposure": round(exposure, 3),
            "contrast_gamma": round(gamma, 4),
            "noise_level": round(noise, 4),
            "blur_mm": round(blur, 3),
        }
    return dataclasses.replace(
        base, name=f"{base.name}-v{cycle + 1}", model_name=f"{base.model_name} v{cycle + 1}", **changes
    )


def profile_to_dict(profile: ScannerProfile) -> dict[str, Any]:
    """The profile as a JSON-able dict (field name -> value).

    Args:
        profile: The scanner profile.

    Returns:
        A plain dict of str, int, float and None values.
    """
    return dataclasses.asdict(profile)


def profile_from_dict(data: dict[str, Any]) -> ScannerProfile:
    """Rebuild a profile from :func:`profile_to_dict`'s output (e.g. ``site.json["profile"]``).

    Args:
        data: Field name -> value.

    Returns:
        The validated profile.

    Raises:
        ValueError: If a key is unknown, a required key is missing, or a value is invalid.
    """
    known = {f.name for f in dataclasses.fields(ScannerProfile)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"scanner profile has unknown keys {unknown}: allowed keys are {sorted(known)}")
    try:
        return ScannerProfile(**data)
    except TypeError as exc:
        raise ValueError(f"scanner profile is incomplete ({exc}): it needs name, manufacturer and model_name") from None
