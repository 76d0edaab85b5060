"""The jobs API: ``/v1/jobs`` (read, list, cancel, delete, follow the events of a durable job)."""
