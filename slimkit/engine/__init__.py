"""Training: the loop, the run directory, DDP, the epoch runner, accuracy, and `slimkit train`."""
