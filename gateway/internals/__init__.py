"""The gateway's only doors into other libraries' private parts, one small module per library.

Each holds what the gateway relies on beyond a library's public API, says
why it pays for itself, and has a contract test (``tests/test_internals.py``)
that pins exactly that behaviour, so that an upgrade fails loudly there
instead of quietly changing framing, accounting or timeouts.
"""
