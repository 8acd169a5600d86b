"""Statistics of per-row gradients: moment states, chunk sums, groups, estimates, state files."""
