"""What a run records and shows: sinks, secret scrubbing, console, samples, routing panels, report, card."""
