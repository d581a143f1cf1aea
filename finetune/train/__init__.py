"""The one run path: preflight, methods, checkpoints, interrupts, divergence, the `--num-processes` launcher."""
