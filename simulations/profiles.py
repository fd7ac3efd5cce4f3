"""Scanner profiles: how one simulated site's scanner differs from another's.

A :class:`ScannerProfile` fixes everything about a site's images that is the scanner's doing
rather than the patient's: the sampling grid (matrix, pixel spacing, slice thickness), the
contrast curve, the bias field, the noise, and how intensities are stored in DICOM (bits,
signedness, photometric interpretation, rescale slope/intercept, transfer syntax).

Intensity units: a tissue signal ``s`` in ``[0, 1]`` (after contrast, bias field and noise) is
reported as the modality value ``v = s * intensity_scale * SIGNAL_UNITS``. It is stored as
``round((v - rescale_intercept) / rescale_slope)``, so ``stored * RescaleSlope + RescaleIntercept``
gives ``v`` back. For MONOCHROME1 the stored value is then inverted inside the BitsStored range:
``stored' = lo + hi - stored`` (``lo, hi`` = smallest and largest value BitsStored and
PixelRepresentation allow).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Modality value of tissue signal 1.0 at ``intensity_scale == 1``.
SIGNAL_UNITS = 1000.0
#: Largest tissue signal (after bias field and noise) a profile's stored range must hold.
#: Signals above it are clipped to the top of the stored range.
MAX_SIGNAL = 2.0
#: Smallest field of view (matrix * pixel spacing, mm) that holds the whole synthetic body.
MIN_FOV_MM = 210.0

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
MODALITIES = ("MR",)
BITS_STORED = (12, 16)


@dataclass(frozen=True)
class ScannerProfile:
    """One scanner's acquisition and storage settings.

    Attributes:
        name: Profile name, e.g. ``"siemens-1.5T"`` (recorded in ``site.json``).
        manufacturer: DICOM Manufacturer, e.g. ``"SIEMENS"``.
        model_name: DICOM ManufacturerModelName.
        modality: DICOM Modality; only ``"MR"`` (files are MR Image Storage).
        field_strength: MagneticFieldStrength in tesla, or None to omit it.
        matrix: Rows == Columns of every slice.
        pixel_spacing_mm: In-plane pixel spacing (square pixels), mm.
        slice_thickness_mm: Slice thickness and spacing between slices (contiguous), mm.
        noise_kind: ``"rician"`` (magnitude MR noise) or ``"gaussian"``.
        noise_level: Noise sigma as a fraction of the maximum tissue signal (1.0).
        bias_field: Peak-to-peak strength of a smooth multiplicative field; 0 = none.
        contrast_gamma: Contrast curve ``signal -> signal ** gamma``.
        intensity_scale: Overall scale of modality values (see module docstring).
        bits_stored: BitsStored, 12 or 16 (BitsAllocated is always 16).
        pixel_representation: 0 unsigned, 1 signed (two's complement).
        photometric: ``"MONOCHROME2"`` or ``"MONOCHROME1"`` (high stored value = dark).
        rescale_slope: RescaleSlope, > 0.
        rescale_intercept: RescaleIntercept.
        transfer_syntax: One of :data:`TRANSFER_SYNTAXES` (pydicom UID keywords, all lossless):
            ``"ExplicitVRLittleEndian"``, ``"RLELossless"``, ``"JPEGLSLossless"``,
            ``"JPEG2000Lossless"`` or ``"DeflatedExplicitVRLittleEndian"``.
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

    def __post_init__(self) -> None:
        for key in ("name", "manufacturer", "model_name"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value.strip() or len(value) > 64 or "\\" in value:
                raise ValueError(
                    f"ScannerProfile.{key}={value!r} is invalid: use a non-empty string of at most "
                    "64 characters without a backslash"
                )
        _choice("modality", self.modality, MODALITIES)
        if self.field_strength is not None:
            _number("field_strength", self.field_strength, low=0.0, low_open=True, high=20.0)
        if isinstance(self.matrix, bool) or not isinstance(self.matrix, int) or not 32 <= self.matrix <= 1024:
            raise ValueError(f"ScannerProfile.matrix={self.matrix!r} is invalid: use an integer from 32 to 1024")
        _number("pixel_spacing_mm", self.pixel_spacing_mm, low=0.1, high=5.0)
        _number("slice_thickness_mm", self.slice_thickness_mm, low=0.5, high=20.0)
        fov = self.matrix * self.pixel_spacing_mm
        if fov < MIN_FOV_MM:
            raise ValueError(
                f"ScannerProfile {self.name!r}: field of view matrix * pixel_spacing_mm = "
                f"{self.matrix} * {self.pixel_spacing_mm} = {fov:g} mm is too small for the "
                f"synthetic body: raise matrix or pixel_spacing_mm to reach at least {MIN_FOV_MM:g} mm"
            )
        _choice("noise_kind", self.noise_kind, NOISE_KINDS)
        _number("noise_level", self.noise_level, low=0.0, high=0.5)
        _number("bias_field", self.bias_field, low=0.0, high=1.0)
        _number("contrast_gamma", self.contrast_gamma, low=0.2, high=5.0)
        _number("intensity_scale", self.intensity_scale, low=0.0, low_open=True, high=1000.0)
        if self.bits_stored not in BITS_STORED or isinstance(self.bits_stored, bool):
            raise ValueError(f"ScannerProfile.bits_stored={self.bits_stored!r} is invalid: use 12 or 16")
        if self.pixel_representation not in (0, 1) or isinstance(self.pixel_representation, bool):
            raise ValueError(
                f"ScannerProfile.pixel_representation={self.pixel_representation!r} is invalid: "
                "use 0 (unsigned) or 1 (signed)"
            )
        _choice("photometric", self.photometric, PHOTOMETRICS)
        _number("rescale_slope", self.rescale_slope, low=0.0, low_open=True, high=1e6)
        _number("rescale_intercept", self.rescale_intercept, low=-1e7, high=1e7)
        _choice("transfer_syntax", self.transfer_syntax, TRANSFER_SYNTAXES)

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


DEFAULT_PROFILES: tuple[ScannerProfile, ...] = (
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
    ),
)


def profile_for_site(index: int) -> ScannerProfile:
    """The scanner profile of simulated site ``index``.

    Indices ``0 .. len(DEFAULT_PROFILES) - 1`` get the default profiles in order. Higher indices
    cycle through them again, each time as a deterministic variant (noise level, contrast
    gamma and bias field perturbed) named ``"<base>-v<cycle + 1>"``, e.g. ``"ge-3T-v2"``.

    Args:
        index: Site index, 0-based.

    Returns:
        The profile; the same index always gives the same profile.

    Raises:
        ValueError: If ``index`` is not a non-negative integer.
    """
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"site index {index!r} is invalid: use an integer >= 0")
    cycle, which = divmod(index, len(DEFAULT_PROFILES))
    base = DEFAULT_PROFILES[which]
    if cycle == 0:
        return base
    rng = np.random.default_rng([0xFED5, index])
    noise = float(np.clip(base.noise_level * rng.uniform(0.7, 1.4), 0.01, 0.3))
    gamma = float(np.clip(base.contrast_gamma * rng.uniform(0.8, 1.25), 0.4, 2.5))
    bias = float(np.clip(base.bias_field + rng.uniform(-0.15, 0.25), 0.0, 0.8))
    return dataclasses.replace(
        base,
        name=f"{base.name}-v{cycle + 1}",
        model_name=f"{base.model_name} v{cycle + 1}",
        noise_level=round(noise, 4),
        contrast_gamma=round(gamma, 4),
        bias_field=round(bias, 4),
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
