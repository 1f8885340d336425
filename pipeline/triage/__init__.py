"""Probabilities to a call and a priority, the site policy, the reading order, the worklist."""
