"""Ground truth and watching the model: reviews, labels, performance, calibration, drift."""
