"""Processes: the supervisor of `cxr-triage run`, process lifetime, profiling."""
