"""Several nodes behind one plan: the shared state in PostgreSQL (nodes, key fingerprints, live
streams' owners), and where endpoints go."""
