"""hvctl's curation filters (hvctl curate)."""
