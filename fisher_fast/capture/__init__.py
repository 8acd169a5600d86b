"""Per-row gradients from one batched backward: the plan, the hooks, the rules per module kind."""
