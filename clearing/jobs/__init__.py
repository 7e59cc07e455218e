"""Scheduled jobs: margin sweep, risk parameters, mark-to-market, funding, liquidation,
settlement, and the scheduler that runs them."""
