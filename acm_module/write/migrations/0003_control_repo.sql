-- acm schema v3: the MI control plane reads PostgreSQL/YugabyteDB (acm_alert_list).
-- Portable between PostgreSQL 15 and YugabyteDB YSQL; every statement is re-runnable.

-- acm_alert_list: newest last detection first, LIMIT n. DESC makes the index range-sharded
-- on YSQL (a first column without ASC/DESC is hash-sharded there and cannot serve ORDER BY);
-- PostgreSQL scans it in order too.
CREATE INDEX IF NOT EXISTS idx_alerts_last_seen
    ON fraud_alerts ((COALESCE(last_detected_at, detected_at)) DESC);
