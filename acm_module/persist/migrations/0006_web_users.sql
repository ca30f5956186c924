-- acm schema v6: users and API tokens of the REST API and console (acm_module/web/users.py).
-- Portable between PostgreSQL 15 and YugabyteDB YSQL; every statement is re-runnable.

CREATE TABLE IF NOT EXISTS web_users (
    name VARCHAR(64) PRIMARY KEY,
    role VARCHAR(16) NOT NULL CHECK (role IN ('viewer', 'analyst', 'admin')),
    -- argon2id, encoded (PHC string)
    password_hash VARCHAR(255) NOT NULL,
    disabled BOOLEAN NOT NULL DEFAULT FALSE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

-- Only the SHA-256 of a token is kept; a session token (a console login) expires.
CREATE TABLE IF NOT EXISTS web_tokens (
    token_hash CHAR(64) PRIMARY KEY,
    user_name VARCHAR(64) NOT NULL REFERENCES web_users(name),
    kind VARCHAR(16) NOT NULL CHECK (kind IN ('api', 'session')),
    name VARCHAR(128),
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    expires_at TIMESTAMPTZ
);

CREATE INDEX IF NOT EXISTS idx_web_tokens_user ON web_tokens(user_name);
