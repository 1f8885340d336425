"""Watching the model: labels from the RIS, live performance, calibration, drift, live against shadow."""
