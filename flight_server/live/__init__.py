"""Live streams: producers DoPut during acquisition, consumers subscribe; durable segment log."""
