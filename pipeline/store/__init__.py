"""The instance store (every accepted DICOM kept as received) and the DICOMweb read side over it."""
