"""Decoding a film: bytes to a display image, DICOM header checks, the model's input, CAM rendering."""
