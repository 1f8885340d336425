"""Work in flight: payloads and task messages in Redis, and re-sending what is unfinished."""
