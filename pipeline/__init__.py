"""Everything that is not a web page or a Celery task: decoding, ingest, the queue, the model, results, the store, the command line."""
