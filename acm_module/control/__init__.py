"""The control plane: the MI server (JSON-RPC 2.0) and its commands, authentication, audit,
the repositories (store-backed and PostgreSQL), the whitelist sync and the live config changes
the workers apply. Changes desired state; decide/ applies it. Never imports write/.
"""
