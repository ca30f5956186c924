"""The REST API (/api/v1, described at /openapi.json) for integrations, and the web process that
serves it (`web_http`) in `acm serve`'s pool. Rooms above mount their pages on its app (cli.py
hands in the console's); this room imports none of them."""
