"""dcm2niix, the field's reference DICOM converter, as an outside oracle for fedsite's volumes.

Generated series are converted by dcm2niix and read by fedsite; both are brought to the closest
canonical (RAS) orientation and must agree on shape, voxel spacing, orientation, position and voxels.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from client.discovery import read_series, scan_images
from client.geometry import ras_affine
from tests.dicom_fixtures import write_multivolume, write_series

nib = pytest.importorskip("nibabel")
pytestmark = pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix not installed: pip install dcm2niix")


def _dcm2niix(src: Path, out: Path) -> list[tuple[Path, object]]:
    out.mkdir(parents=True)
    proc = subprocess.run(
        ["dcm2niix", "-z", "n", "-b", "n", "-f", "%s_%e", "-o", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    return [(p, nib.load(p)) for p in sorted(out.glob("*.nii"))]


def _volumes(image) -> list:
    """A 3D or 4D NIfTI as canonical 3D images."""
    data = np.asanyarray(image.dataobj).astype(np.float32) * 1.0
    slope, inter = image.header.get_slope_inter()
    data = data * (1.0 if slope is None else slope) + (0.0 if inter is None else inter)
    stack = data[..., None] if data.ndim == 3 else data
    return [nib.as_closest_canonical(nib.Nifti1Image(stack[..., t], image.affine)) for t in range(stack.shape[-1])]


def _fedsite(series) -> object:
    volume = read_series(series)  # (Z, Y, X)
    return nib.as_closest_canonical(nib.Nifti1Image(volume.transpose(2, 1, 0), ras_affine(series)))


def _same(ours, theirs) -> bool:
    return (
        ours.shape == theirs.shape
        and np.allclose(ours.affine, theirs.affine, atol=1e-3)
        and np.array_equal(ours.get_fdata(), theirs.get_fdata())
    )


def _oblique(rng: np.random.Generator, z: int) -> dict:
    c, s = np.cos(0.3), np.sin(0.3)
    return {
        "volume": rng.integers(0, 1000, (z, 6, 7)).astype(np.uint16),
        "iop": (c, s, 0, 0, 0, -1),  # an oblique coronal stack
        "origin": (10.0, -20.0, 30.0),
        "spacing": (0.8, 1.2),
        "gap": 2.5,
    }


def test_a_single_oblique_stack_matches_dcm2niix_in_shape_spacing_orientation_and_voxels(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    spec = _oblique(rng, 5)
    write_series(tmp_path / "in", spec.pop("volume"), extra={"SeriesNumber": 1, "EchoTime": 10}, **spec)
    ((_, theirs),) = _dcm2niix(tmp_path / "in", tmp_path / "out")
    (series,) = scan_images(tmp_path / "in").series
    ours = _fedsite(series)
    (theirs_3d,) = _volumes(theirs)
    assert ours.shape == theirs_3d.shape
    np.testing.assert_allclose(ours.header.get_zooms(), theirs_3d.header.get_zooms(), atol=1e-4)
    assert nib.aff2axcodes(ours.affine) == nib.aff2axcodes(theirs_3d.affine)
    assert _same(ours, theirs_3d)


def test_each_diffusion_volume_fedsite_splits_off_is_one_of_dcm2niix_volumes_with_its_b_value(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    directions = [(0, None), (1000, [1, 0, 0]), (1000, [0, 1, 0]), (2000, [0, 0, 1])]
    write_multivolume(
        tmp_path / "in",
        [
            (
                {"DiffusionBValue": b, **({"DiffusionGradientOrientation": d} if d else {})},
                rng.integers(0, 1000, (4, 6, 7)).astype(np.uint16),
            )
            for b, d in directions
        ],
        extra={"SeriesNumber": 2, "EchoTime": 80, "Manufacturer": "Philips"},
        gap=3.0,
    )
    ((path, theirs),) = _dcm2niix(tmp_path / "in", tmp_path / "out")
    bvals = (
        [float(v) for v in path.with_suffix(".bval").read_text().split()] if path.with_suffix(".bval").exists() else []
    )
    theirs_3d = _volumes(theirs)
    assert len(theirs_3d) == len(directions)
    series = scan_images(tmp_path / "in", volume="all").series
    assert len(series) == len(directions)
    for s in series:
        ours = _fedsite(s)
        matches = [t for t, their in enumerate(theirs_3d) if _same(ours, their)]
        assert len(matches) == 1, s.volume
        if bvals:
            assert f"b-value {bvals[matches[0]]:g}" in s.volume


def test_each_echo_of_a_multi_echo_series_matches_dcm2niix_echo_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    spec = _oblique(rng, 4)
    spec.pop("volume")
    echoes = {
        1: rng.integers(0, 1000, (4, 6, 7)).astype(np.uint16),
        2: rng.integers(0, 1000, (4, 6, 7)).astype(np.uint16),
    }
    write_multivolume(
        tmp_path / "in",
        [({"EchoNumbers": e, "EchoTime": 10.0 * e}, pixels) for e, pixels in echoes.items()],
        extra={"SeriesNumber": 3},
        **spec,
    )
    converted = _dcm2niix(tmp_path / "in", tmp_path / "out")
    theirs = [v for _, image in converted for v in _volumes(image)]
    assert len(theirs) == 2
    series = scan_images(tmp_path / "in", volume="all").series
    assert sorted(s.volume for s in series) == ["echo 1", "echo 2"]
    for s in series:
        assert sum(_same(_fedsite(s), t) for t in theirs) == 1, s.volume
