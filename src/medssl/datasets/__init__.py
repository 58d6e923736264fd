"""Datasets on disk: the HDF5 layout and its readers, conversion, masks, splits, the synthetic cohort."""
