"""Datasets, training, leave-one-source-out and evaluation."""
