"""The request path: OpenSIPS -> ZMTP -> a pool of workers -> the decision engine -> the store.

The supervisor (the pool's arbiter, with the sidecars cli.py hands in), the workers and their
wire (zmtp, access, stats), the engine twins (engine/), the store client, keys, live config and
Lua scripts (store/), the gateway context (gateway/) and the Python client. Imports only core/:
what the other rooms need of the store they import from here.
"""
