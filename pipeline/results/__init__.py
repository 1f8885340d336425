"""Results back to the PACS: the outbox, senders, SR and CAM objects, destinations."""
