"""Orchestration: the options of one call, the loop over chunks, a batch's statistics."""
