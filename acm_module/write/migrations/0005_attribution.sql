-- acm schema v5: gateway attribution and fan-out alerts (docs/GATEWAY.md).
-- Portable between PostgreSQL 15 and YugabyteDB YSQL; every statement is re-runnable.
--
-- Decisions (call records) live in QuestDB call_events, not here: its carrier_id/gateway_id
-- columns are added by the QuestDB sink. This database holds the alerts.
--
-- The new columns are nullable with a default, and nothing backfills them: YSQL has not
-- always applied an ADD COLUMN default to existing rows (yugabyte-db#4415), so readers take
-- NULL as the default (COALESCE(carrier_id, '')). A NOT NULL added to a table with rows is
-- not portable either.

-- The carrier and gateway of the call that opened or last updated the alert ('' unknown).
ALTER TABLE fraud_alerts ADD COLUMN IF NOT EXISTS carrier_id VARCHAR(64) DEFAULT '';
ALTER TABLE fraud_alerts ADD COLUMN IF NOT EXISTS gateway_id VARCHAR(64) DEFAULT '';
-- A fan-out alert (alert_type MULTICALL_FANOUT) is about one A-number calling many B-numbers:
-- a_number is that A-number (a_numbers holds it too), b_numbers the B-numbers it called, and
-- b_number is ''. Both are NULL for a masking alert.
ALTER TABLE fraud_alerts ADD COLUMN IF NOT EXISTS a_number VARCHAR(20);
ALTER TABLE fraud_alerts ADD COLUMN IF NOT EXISTS b_numbers JSONB;
-- alert_type exists since 0001 ('MULTICALL_MASKING'); a row inserted without one is masking.
ALTER TABLE fraud_alerts ALTER COLUMN alert_type SET DEFAULT 'MULTICALL_MASKING';

-- Per-carrier reports: one carrier's alerts within a period (YSQL: hash on the carrier,
-- range on the time), and the alerts of a type within a period.
CREATE INDEX IF NOT EXISTS idx_alerts_carrier_detected_at ON fraud_alerts(carrier_id, detected_at);
CREATE INDEX IF NOT EXISTS idx_alerts_type_detected_at ON fraud_alerts(alert_type, detected_at);
-- The fan-out alerts of one A-number.
CREATE INDEX IF NOT EXISTS idx_alerts_a_number ON fraud_alerts(a_number);
