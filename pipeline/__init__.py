"""Precompute frozen-teacher targets into Zarr v3 target stores and feed them to student training."""
