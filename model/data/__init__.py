"""Datasets: loaders per format -> one Interactions table; the protocol -> Samples; prepared storage."""
