"""Results back to the PACS: the outbox, claims, senders, SR and CAM objects, the viewer's objects, destinations."""
