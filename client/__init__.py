"""The site client: runs inside a hospital and is the only code that touches DICOM."""
