"""Synthetic scanner sites: DICOM series with lesion masks that differ the way scanners differ."""
