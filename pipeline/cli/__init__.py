"""The `cxr-triage` command."""
