"""clearing: an event-sourced clearing-house ledger for crypto derivatives."""

__version__ = "0.1.0"
