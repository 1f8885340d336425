"""The Celery side: the app, the batched classification task, and its reconnect-safe batching."""
