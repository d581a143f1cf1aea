"""What a run records and shows: sinks, callbacks, console, samples, routing panels, the report and the card."""
