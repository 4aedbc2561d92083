"""``make bench``: the project's benchmark. Figures are printed, never asserted."""
