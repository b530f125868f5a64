"""Online merging of per-frame instances into global instances."""
