"""acm's test suite: one directory per room, shared helpers and fixtures in tests.support."""
