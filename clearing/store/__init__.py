"""The event store: tables, append, read, hash chain and the locking that keeps readers whole.

The store knows events as typed, catalogued facts; it knows nothing of margin or ledger rules.
"""
