"""The instance store (every accepted DICOM kept as received), its retention, and the DICOMweb read side over it."""
