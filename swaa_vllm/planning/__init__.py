"""Plan search: calibrate which layers of a model keep full attention, propose and validate SWAA plans."""
