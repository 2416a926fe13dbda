"""The foundations: registries, errors, checkpoints, atomic files, processes, images (nothing above)."""
