"""How the embedded model and its judge were made: training and evaluation scripts (not part of the
runtime package, which keeps what loads the model and judges its samples)."""
