"""The request path: OpenSIPS -> ZMTP -> a pool of workers -> the decision engine -> the store.

The supervisor (the pool's arbiter, with the sidecars cli.py hands in), the workers and their
wire (zmtp, access), the engine twins (engine/), the pipelined store client and the Lua scripts
(store/), the gateway context (gateway/) and the Python client. Imports only core/; control/
and write/ never import it (they reach the store through core/'s schema and redis-py).
"""
