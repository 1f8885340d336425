"""Work in flight: payloads and task messages in Redis, opening and finding Redis, re-sending what is unfinished."""
