-- acm schema v2: actions and compliance (alert lifecycle, NCC incident ids, daily report).
-- Portable between PostgreSQL 15 and YugabyteDB YSQL; every statement is re-runnable.

-- NCC-<operator>-<YYYYMMDD>-<seq>: one counter per operator code and report day.
CREATE TABLE IF NOT EXISTS ncc_incident_seq (
    operator_code VARCHAR(16) NOT NULL,
    day DATE NOT NULL,
    last_seq INTEGER NOT NULL,
    PRIMARY KEY (operator_code, day)
);

-- An incident id names one alert (NULLs: alerts without one yet).
CREATE UNIQUE INDEX IF NOT EXISTS idx_alerts_ncc_incident_id ON fraud_alerts(ncc_incident_id);
CREATE INDEX IF NOT EXISTS idx_alerts_resolved_at ON fraud_alerts(resolved_at);
-- The daily report counts actions and transitions by action name within a day.
CREATE INDEX IF NOT EXISTS idx_audit_action_at ON audit_log(action, at);
