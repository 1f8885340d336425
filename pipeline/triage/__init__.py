"""Probabilities to a call and a priority, the site policy, the reading order, reviews, the worklist."""
