"""Several nodes behind one plan: the shared state in PostgreSQL, and where endpoints go."""
