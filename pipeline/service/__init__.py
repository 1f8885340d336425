"""Processes: the supervisor of `cxr-triage run`, the embedded Redis, process lifetime, the recovery passes, the log format."""
