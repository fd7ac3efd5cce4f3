"""Synthetic abdomen phantoms and how an MR or CT scanner images them.

Anatomy in physical millimetres, independent of any scanner's grid (:func:`draw_phantom`): a body
with a subcutaneous fat ring, soft tissue, an organ, a spine, vessels and 1-3 ellipsoidal lesions
inside the organ. :func:`render` and :func:`render_ct` turn it into tissue values on a grid with the
lesion mask; :func:`acquire_mr` and :func:`acquire_ct` turn those into a scanner profile's stored
pixel values (contrast curve, bias field, Gibbs ringing, noise; or partial volume, kernel,
calibration, noise). The formulas are in :mod:`simulations.synth`'s module docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from simulations.profiles import SIGNAL_UNITS, ScannerProfile, stored_limits

__all__ = [
    "CT_TISSUES",
    "MR_TISSUES",
    "Phantom",
    "Tissues",
    "acquire_ct",
    "acquire_mr",
    "draw_phantom",
    "lesion_mask",
    "render",
    "render_ct",
]

# MR tissue signals in [0, 1] before the scanner's contrast curve.
_FAT = 0.62
_SOFT = 0.30
_ORGAN = 0.48
_SPINE = 0.12
_VESSEL = 0.95

# CT tissue values, HU.
_AIR_HU = -1000.0
_FAT_HU = -100.0
_SOFT_HU = 40.0
_ORGAN_HU = 60.0
_SPINE_HU = 550.0
_VESSEL_HU = 180.0
#: Sub-slices averaged across a CT slice's thickness (partial volume).
_CT_SUBSLICES = 3
#: Gaussian sigma (mm) of the CT system blur at the standard kernel.
_CT_SYSTEM_BLUR_MM = 0.5


@dataclass(frozen=True)
class _Ellipse:
    """An axis-rotated ellipse in the axial plane (mm); ``theta`` in radians."""

    cx: float
    cy: float
    a: float
    b: float
    theta: float

    def inside(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        if np.ndim(x) == 2 and np.ndim(y) == 2 and x.shape[0] == 1 and y.shape[1] == 1:
            # A grid (row of x, column of y): evaluate only the ellipse's bounding box (same result, faster).
            reach = max(self.a, self.b) + 1e-3
            xs, ys = x[0], y[:, 0]
            cols = np.flatnonzero(np.abs(xs - self.cx) <= reach)
            rows = np.flatnonzero(np.abs(ys - self.cy) <= reach)
            out = np.zeros((len(ys), len(xs)), dtype=bool)
            if len(cols) and len(rows):
                box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
                out[box] = self._formula(xs[None, box[1]], ys[box[0], None])
            return out
        return self._formula(x, y)

    def _formula(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        c, s = math.cos(self.theta), math.sin(self.theta)
        dx, dy = x - self.cx, y - self.cy
        u = (dx * c + dy * s) / self.a
        v = (dy * c - dx * s) / self.b
        return u * u + v * v <= 1.0


@dataclass(frozen=True)
class _Vessel:
    cx: float
    cy: float
    r: float
    tx: float  # in-plane drift per mm of z
    ty: float


@dataclass(frozen=True)
class _Lesion:
    cx: float
    cy: float
    cz: float  # relative to the slab centre
    rx: float
    ry: float
    rz: float
    theta: float
    signal: float

    def section(self, z: float) -> _Ellipse | None:
        k = 1.0 - ((z - self.cz) / self.rz) ** 2
        if k <= 0.0:
            return None
        f = math.sqrt(k)
        return _Ellipse(self.cx, self.cy, self.rx * f, self.ry * f, self.theta)


@dataclass(frozen=True)
class Phantom:
    """One patient's anatomy (mm): body, fat-free interior, organ, spine, vessels, lesions, organ signal."""

    body: _Ellipse
    interior: _Ellipse
    organ: _Ellipse
    spine: _Ellipse
    vessels: tuple[_Vessel, ...]
    lesions: tuple[_Lesion, ...]
    organ_signal: float


def _rotate(theta: float, x: float, y: float) -> tuple[float, float]:
    c, s = math.cos(theta), math.sin(theta)
    return x * c - y * s, x * s + y * c


def draw_phantom(
    rng: np.random.Generator, z_rel: np.ndarray, thickness: float, *, lesion_scale: float = 1.0
) -> Phantom:
    """Draw one patient's anatomy; ``z_rel`` are the slice positions relative to the slab centre.

    ``lesion_scale`` multiplies the lesion radii (label skew); 1.0 draws exactly what it always did.
    """
    theta = float(rng.uniform(-0.15, 0.15))
    bx, by = (float(v) for v in rng.uniform(-8.0, 8.0, 2))
    ba, bb = float(rng.uniform(75.0, 100.0)), float(rng.uniform(55.0, 80.0))
    fat = float(rng.uniform(8.0, 14.0))
    body = _Ellipse(bx, by, ba, bb, theta)
    ia, ib = ba - fat, bb - fat
    interior = _Ellipse(bx, by, ia, ib, theta)

    # Organ: anterior (-y) part of the interior.
    oa, ob = ia * float(rng.uniform(0.6, 0.8)), ib * float(rng.uniform(0.65, 0.85))
    ox = float(rng.uniform(-1.0, 1.0)) * (ia - oa) * 0.6
    oy = -float(rng.uniform(0.0, 1.0)) * (ib - ob) * 0.6
    dx, dy = _rotate(theta, ox, oy)
    organ = _Ellipse(bx + dx, by + dy, oa, ob, theta + float(rng.uniform(-0.3, 0.3)))

    # Spine: dark disk at the posterior (+y) edge of the interior.
    rs = float(rng.uniform(10.0, 14.0))
    dx, dy = _rotate(theta, 0.0, ib - rs - 3.0)
    spine = _Ellipse(bx + dx, by + dy, rs, rs, 0.0)

    vessels: list[_Vessel] = []
    for _ in range(int(rng.integers(2, 6))):
        r = float(rng.uniform(2.5, 5.0))
        tx, ty = (float(v) for v in rng.uniform(-0.15, 0.15, 2))
        for _attempt in range(50):
            rho, phi = 0.85 * math.sqrt(float(rng.random())), float(rng.uniform(0.0, 2.0 * math.pi))
            px, py = _rotate(theta, ia * rho * math.cos(phi), ib * rho * math.sin(phi))
            cx, cy = bx + px, by + py
            grown = _Ellipse(organ.cx, organ.cy, organ.a + r + 3.0, organ.b + r + 3.0, organ.theta)
            near_spine = math.hypot(cx - spine.cx, cy - spine.cy) < rs + r + 3.0
            if not grown.inside(np.float64(cx), np.float64(cy)) and not near_spine:
                vessels.append(_Vessel(cx, cy, r, tx, ty))
                break

    organ_signal = _ORGAN * float(rng.uniform(0.93, 1.07))
    lesions = _draw_lesions(rng, organ, organ_signal, z_rel, thickness, scale=lesion_scale)
    return Phantom(body, interior, organ, spine, tuple(vessels), lesions, organ_signal)


def _draw_lesions(
    rng: np.random.Generator,
    organ: _Ellipse,
    organ_signal: float,
    z_rel: np.ndarray,
    thickness: float,
    *,
    scale: float = 1.0,
) -> tuple[_Lesion, ...]:
    """1-3 ellipsoids inside the organ, spread in z so most slices of the slab show lesion."""
    slab = len(z_rel) * thickness
    n = int(rng.integers(1, 4))
    r_max = 0.7 * min(organ.a, organ.b)
    rx = np.minimum(rng.uniform(10.0, 22.0, n) * scale, r_max)
    ry = np.minimum(rng.uniform(10.0, 22.0, n) * scale, r_max)
    rz = rng.uniform(10.0, 22.0, n) * scale
    # Elongate in z when the lesions together would not span ~85% of the slab.
    rz *= max(1.0, 0.85 * slab / float(np.sum(2.0 * rz)))
    jitter = float(rng.uniform(-0.08, 0.08)) * slab
    if float(np.sum(2.0 * rz)) <= slab:
        edges = np.concatenate([[0.0], np.cumsum(2.0 * rz)])
        cz = edges[:-1] + rz - edges[-1] / 2.0 + jitter
    else:
        cz = np.linspace(-0.3 * slab, 0.3 * slab, n) if n > 1 else np.zeros(1)
        cz = cz + jitter
    lesions = []
    for i in range(n):
        rho, phi = 0.75 * math.sqrt(float(rng.random())), float(rng.uniform(0.0, 2.0 * math.pi))
        reach = max(rx[i], ry[i])
        px, py = _rotate(organ.theta, (organ.a - reach) * rho * math.cos(phi), (organ.b - reach) * rho * math.sin(phi))
        lesions.append(
            _Lesion(
                cx=organ.cx + px,
                cy=organ.cy + py,
                cz=float(cz[i]),
                rx=float(rx[i]),
                ry=float(ry[i]),
                rz=float(rz[i]),
                theta=float(rng.uniform(0.0, math.pi)),
                signal=organ_signal * float(rng.uniform(1.5, 1.7)),
            )
        )
    return tuple(lesions)


@dataclass(frozen=True)
class Tissues:
    """Value of each tissue in a rendered map: MR signal in [0, 1] or CT HU."""

    background: float
    fat: float
    soft: float
    spine: float
    vessel: float
    hu: bool  # organ and lesion values: from the phantom's MR signals (False) or mapped to HU (True)
    lesion_contrast: float = 1.0  # MR: scales the lesion's excess signal over the organ (the profile's)

    def organ(self, ph: Phantom) -> float:
        if not self.hu:
            return ph.organ_signal
        return _ORGAN_HU + (ph.organ_signal / _ORGAN - 1.0) * 150.0  # about 50..70 HU

    def lesion(self, ph: Phantom, lesion: _Lesion) -> float:
        if not self.hu:
            return ph.organ_signal + (lesion.signal - ph.organ_signal) * self.lesion_contrast
        # MR lesions are 1.5-1.7x the organ signal; in CT they are hypodense, 30-60 HU below the organ.
        return self.organ(ph) - 30.0 - (lesion.signal / ph.organ_signal - 1.5) * 150.0


MR_TISSUES = Tissues(background=0.0, fat=_FAT, soft=_SOFT, spine=_SPINE, vessel=_VESSEL, hu=False)
CT_TISSUES = Tissues(background=_AIR_HU, fat=_FAT_HU, soft=_SOFT_HU, spine=_SPINE_HU, vessel=_VESSEL_HU, hu=True)


def render(
    ph: Phantom, x: np.ndarray, y: np.ndarray, z_rel: np.ndarray, tissues: Tissues = MR_TISSUES
) -> tuple[np.ndarray, np.ndarray]:
    """Tissue values ``(Z, Y, X)`` float32 (MR signal in [0, 1] or CT HU) and lesion mask ``(Z, Y, X)`` uint8."""
    xx, yy = x[None, :], y[:, None]
    n_z = len(z_rel)
    signal = np.full((n_z, len(y), len(x)), tissues.background, dtype=np.float32)
    mask = np.zeros(signal.shape, dtype=np.uint8)
    body = ph.body.inside(xx, yy)
    interior = ph.interior.inside(xx, yy)
    spine = ph.spine.inside(xx, yy)
    organ = ph.organ.inside(xx, yy) & interior & ~spine
    organ_value = tissues.organ(ph)
    for k, z in enumerate(z_rel):
        s = signal[k]
        s[body] = tissues.fat
        s[interior] = tissues.soft
        s[spine] = tissues.spine
        s[organ] = organ_value
        for v in ph.vessels:
            disk = _Ellipse(v.cx + v.tx * z, v.cy + v.ty * z, v.r, v.r, 0.0).inside(xx, yy)
            s[disk & interior & ~organ & ~spine] = tissues.vessel
        for lesion in ph.lesions:
            sec = lesion.section(float(z))
            if sec is None:
                continue
            inside = sec.inside(xx, yy) & organ
            s[inside] = tissues.lesion(ph, lesion)
            mask[k][inside] = 1
    return signal, mask


def render_ct(
    ph: Phantom, x: np.ndarray, y: np.ndarray, z_rel: np.ndarray, thickness: float
) -> tuple[np.ndarray, np.ndarray]:
    """HU ``(Z, Y, X)`` float32 averaged over each slice's thickness, and the mask at the slice centres."""
    hu, mask = render(ph, x, y, z_rel, CT_TISSUES)
    offsets = (np.arange(_CT_SUBSLICES) - (_CT_SUBSLICES - 1) / 2.0) * (thickness / _CT_SUBSLICES)
    total = np.zeros(hu.shape, dtype=np.float64)
    for off in offsets:
        part = hu if off == 0.0 else render(ph, x, y, z_rel + off, CT_TISSUES)[0]
        total += part
    return (total / len(offsets)).astype(np.float32), mask


def lesion_mask(ph: Phantom, x: np.ndarray, y: np.ndarray, z_rel: np.ndarray) -> np.ndarray:
    """The lesion mask ``(Z, Y, X)`` bool alone (what :func:`render` marks), without rendering the tissues."""
    xx, yy = x[None, :], y[:, None]
    organ = ph.organ.inside(xx, yy) & ph.interior.inside(xx, yy) & ~ph.spine.inside(xx, yy)
    out = np.zeros((len(z_rel), len(y), len(x)), dtype=bool)
    for k, z in enumerate(z_rel):
        for lesion in ph.lesions:
            sec = lesion.section(float(z))
            if sec is not None:
                out[k] |= sec.inside(xx, yy) & organ
    return out


def _truncate_kspace(s: np.ndarray, keep: float) -> np.ndarray:
    """Keep the central ``keep`` fraction of each slice's in-plane k-space (Gibbs ringing)."""
    n_y, n_x = s.shape[-2:]
    fy = np.abs(np.fft.fftfreq(n_y))[:, None]
    fx = np.abs(np.fft.rfftfreq(n_x))[None, :]
    window = (fy <= keep * 0.5) & (fx <= keep * 0.5)
    k = np.fft.rfft2(s.astype(np.float64), axes=(-2, -1))
    return np.fft.irfft2(k * window, s=(n_y, n_x), axes=(-2, -1)).astype(np.float32)


def acquire_mr(
    signal: np.ndarray,
    profile: ScannerProfile,
    rng: np.random.Generator,
    x: np.ndarray,
    y: np.ndarray,
    z_rel: np.ndarray,
) -> np.ndarray:
    """MR tissue signal -> stored pixel values ``(Z, Y, X)`` (uint16 or int16) for ``profile``."""
    s = np.power(signal, np.float32(profile.contrast_gamma), dtype=np.float32)

    # Smooth multiplicative bias field with a random orientation; drawn even when unused so
    # the noise that follows is the same whatever the profile's bias strength.
    phi = float(rng.uniform(0.0, 2.0 * math.pi))
    c2, cz = float(rng.uniform(-0.5, 0.5)), float(rng.uniform(-0.3, 0.3))
    if profile.bias_field > 0:
        u = (x[None, None, :] * math.cos(phi) + y[None, :, None] * math.sin(phi)) / 120.0
        p = u + c2 * u * u + cz * (z_rel[:, None, None] / 120.0)
        p = (p - p.min()) / max(float(p.max() - p.min()), 1e-9) - 0.5
        s = s * (1.0 + profile.bias_field * p).astype(np.float32)

    # The object's k-space sampled only up to a fraction of the grid's Nyquist frequency.
    if 0.0 < profile.gibbs < 1.0:
        s = _truncate_kspace(s, profile.gibbs)

    noise = rng.standard_normal((2, *s.shape), dtype=np.float32) * np.float32(profile.noise_level)
    s = np.sqrt((s + noise[0]) ** 2 + noise[1] ** 2) if profile.noise_kind == "rician" else s + noise[0]

    value = s.astype(np.float64) * (profile.intensity_scale * SIGNAL_UNITS)
    return _store(value, profile)


def _store(value: np.ndarray, profile: ScannerProfile) -> np.ndarray:
    """Modality values -> stored values: rescale, round, clip to BitsStored, invert for MONOCHROME1."""
    lo, hi = stored_limits(profile)
    stored = np.clip(np.rint((value - profile.rescale_intercept) / profile.rescale_slope), lo, hi)
    if profile.photometric == "MONOCHROME1":
        stored = (lo + hi) - stored
    return stored.astype(np.int16 if profile.pixel_representation == 1 else np.uint16)


def _ct_kernel(n: int, dx: float, sharpness: float, *, full: bool = False) -> np.ndarray:
    """Transfer function of system blur times reconstruction kernel on the (r)fft grid of an n x n slice."""
    fy = np.fft.fftfreq(n, d=dx)[:, None]
    fx = (np.fft.fftfreq(n, d=dx) if full else np.fft.rfftfreq(n, d=dx))[None, :]
    f2 = fy * fy + fx * fx
    h = np.exp(-2.0 * math.pi**2 * _CT_SYSTEM_BLUR_MM**2 * f2)
    if sharpness < 0:  # smooth kernel: a further Gaussian blur, sigma up to 1.5 mm
        h = h * np.exp(-2.0 * math.pi**2 * (1.5 * -sharpness) ** 2 * f2)
    elif sharpness > 0:  # sharp kernel: boost frequencies above ~0.2 cycles/mm, up to 2.5x
        h = h * (1.0 + 1.5 * sharpness * (1.0 - np.exp(-2.0 * math.pi**2 * 1.0**2 * f2)))
    return h


def acquire_ct(hu: np.ndarray, profile: ScannerProfile, rng: np.random.Generator) -> np.ndarray:
    """True HU ``(Z, Y, X)`` -> stored pixel values for a CT ``profile`` (see the module docstring)."""
    n = hu.shape[-1]
    dx = profile.pixel_spacing_mm
    h = _ct_kernel(n, dx, profile.kernel_sharpness)
    # Noise: white noise through the same kernel, scaled so the standard kernel gives noise_level * 1000 HU.
    white = rng.standard_normal(hu.shape, dtype=np.float32).astype(np.float64)
    standard = math.sqrt(float(np.mean(_ct_kernel(n, dx, 0.0, full=True) ** 2)))
    # One filtering pass for both (linear): calibrated anatomy, as deviation from air so the periodic
    # FFT sees a zero background, plus noise.
    before = profile.hu_scale * (hu.astype(np.float64) - _AIR_HU) + white * (profile.noise_level * 1000.0 / standard)
    filtered = np.fft.irfft2(np.fft.rfft2(before, axes=(-2, -1)) * h, s=(n, n), axes=(-2, -1))
    value = profile.hu_offset + profile.hu_scale * _AIR_HU + filtered
    return _store(value, profile)
