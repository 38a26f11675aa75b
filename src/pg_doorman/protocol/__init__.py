"""Sans-IO PostgreSQL wire protocol: framing, message builders and parsers.

Nothing in this package performs I/O or imports asyncio.
"""
