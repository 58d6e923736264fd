"""DICOM reading: headers, the raw fast path, multi-frame geometry and series checks."""
