"""Datasets on disk: the HDF5 layout and readers, conversion, masks, splits, synthetic CT."""
