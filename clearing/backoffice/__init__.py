"""The back office's tools: file imports, queries, reconciliation, replay and verification."""
