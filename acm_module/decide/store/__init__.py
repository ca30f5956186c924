"""The store as decide/ writes it: the pipelined RESP connection, the key schema, the live runtime
config and the Lua scripts that decide in one atomic step. write/ and control/ read it through
these same modules."""
