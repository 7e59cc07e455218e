"""Pure domain: money, instruments, events, ledger rules, pricing and margin models.

Nothing in this package imports SQLAlchemy, psycopg, APScheduler, typer or reads the clock.
"""
