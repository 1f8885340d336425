"""The reliability and security suite: real processes, injected faults, one table of figures.

Run with ``cxr-triage reliability`` (``--quick`` for the CI version) or ``make reliability``.
"""
