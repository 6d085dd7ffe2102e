"""The training loop and its parts: loss, optimiser, distributed context, run log and RNG state."""
