"""One training stage and what keeps it going: the trainer, loss, packing, ZeRO-3, checkpoints, signals, faults."""
