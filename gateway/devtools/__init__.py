"""Development and test helpers: nothing here runs in production."""
