"""Model configs, Flax modules and checkpoint conversion."""
