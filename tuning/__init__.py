"""Ray Tune sweeps whose trials are whole multi-worker training runs."""
