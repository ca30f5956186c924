-- acm schema v1: alerts, whitelist (source of truth), audit log.
-- Portable between PostgreSQL 15 and YugabyteDB YSQL: no LISTEN/NOTIFY, no exclusion
-- constraints, no inheritance; every statement is re-runnable (IF NOT EXISTS).

CREATE TABLE IF NOT EXISTS fraud_alerts (
    alert_id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    alert_type VARCHAR(50) NOT NULL,
    severity VARCHAR(20) NOT NULL,
    b_number VARCHAR(20) NOT NULL,
    a_numbers JSONB NOT NULL,
    detection_window_ms INTEGER NOT NULL,
    detected_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    status VARCHAR(20) NOT NULL DEFAULT 'NEW',
    ncc_incident_id VARCHAR(64),
    assigned_to VARCHAR(255),
    resolved_at TIMESTAMPTZ,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    notes TEXT,
    -- Written by the writer from the stream: the change version guards against a replayed
    -- older change overwriting a newer one.
    version INTEGER NOT NULL DEFAULT 1,
    distinct_count INTEGER NOT NULL DEFAULT 0,
    last_detected_at TIMESTAMPTZ,
    block_ttl_ms BIGINT NOT NULL DEFAULT 0
);

CREATE INDEX IF NOT EXISTS idx_alerts_b_number ON fraud_alerts(b_number);
CREATE INDEX IF NOT EXISTS idx_alerts_detected_at ON fraud_alerts(detected_at);
CREATE INDEX IF NOT EXISTS idx_alerts_status ON fraud_alerts(status);

CREATE TABLE IF NOT EXISTS whitelist (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    b_number VARCHAR(20) NOT NULL UNIQUE,
    reason VARCHAR(255) NOT NULL,
    created_by VARCHAR(255) NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    expires_at TIMESTAMPTZ
);

CREATE INDEX IF NOT EXISTS idx_whitelist_b_number ON whitelist(b_number);

CREATE TABLE IF NOT EXISTS audit_log (
    id BIGSERIAL PRIMARY KEY,
    at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    actor VARCHAR(255) NOT NULL,
    action VARCHAR(64) NOT NULL,
    target VARCHAR(255) NOT NULL DEFAULT '',
    old JSONB,
    new JSONB,
    outcome VARCHAR(20) NOT NULL DEFAULT 'ok',
    details TEXT
);

CREATE INDEX IF NOT EXISTS idx_audit_at ON audit_log(at);
CREATE INDEX IF NOT EXISTS idx_audit_target ON audit_log(target);
