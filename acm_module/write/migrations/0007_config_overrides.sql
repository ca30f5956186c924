-- acm schema v7: the runtime overrides (MI acm_set, E_ACM_RELOAD) of each deployment, the
-- shared live configuration of every acm node started with the same `deployment` setting
-- (docs/SCALING.md). Portable between PostgreSQL 15 and YugabyteDB YSQL; every statement is
-- re-runnable.
--
-- Written only by the control plane, by compare-and-set on `generation` (UPDATE ... WHERE
-- generation = the one read; INSERT ... ON CONFLICT DO NOTHING for the first), so two nodes
-- changing settings at once never lose an update. A reset (acm_reload reset=true) empties
-- `overrides` and moves the generation on: a row is never deleted, a generation never reused.

CREATE TABLE IF NOT EXISTS config_overrides (
    deployment VARCHAR(64) PRIMARY KEY,
    generation BIGINT NOT NULL CHECK (generation > 0),
    -- {"threshold": 3, "mode": "monitor", ...}: runtime settings only, validated on read
    overrides JSONB NOT NULL DEFAULT '{}',
    updated_by VARCHAR(255) NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
