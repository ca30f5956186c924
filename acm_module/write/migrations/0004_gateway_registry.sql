-- acm schema v4: the carrier registry (docs/GATEWAY.md), the system of record behind the
-- document the control plane publishes to the store ({acm.cfg}:gw).
-- Portable between PostgreSQL 15 and YugabyteDB YSQL; every statement is re-runnable.
--
-- Written only by the control plane (MI acm_carrier_* / acm_gateway_* / acm_route_*), which
-- validates the whole document first and replaces it in one transaction. The CHECKs repeat
-- the rules a single row can check; the rest (an address on two gateways, a route's gateway of
-- another carrier) is acm_module.core.registry.validate's.

CREATE TABLE IF NOT EXISTS carriers (
    id VARCHAR(64) PRIMARY KEY,
    name VARCHAR(200) NOT NULL,
    licence VARCHAR(32) NOT NULL CHECK (licence IN (
        'international_gateway', 'interconnect_clearinghouse', 'pnl', 'leo', 'mno', 'other')),
    contact VARCHAR(200),
    -- NULL: inherit the cli_origin_rule setting
    cli_rule VARCHAR(16) CHECK (cli_rule IN ('enforce', 'monitor', 'off')),
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

CREATE TABLE IF NOT EXISTS carrier_gateways (
    id VARCHAR(64) PRIMARY KEY,
    carrier_id VARCHAR(64) NOT NULL REFERENCES carriers(id),
    -- canonical IP addresses and CIDR networks, as published
    addresses TEXT[] NOT NULL DEFAULT '{}',
    trunks TEXT[] NOT NULL DEFAULT '{}',
    -- calls per second admitted from the gateway; 0 = no limit
    rate_limit_cps INTEGER NOT NULL DEFAULT 0 CHECK (rate_limit_cps BETWEEN 0 AND 100000),
    rate_window_s DOUBLE PRECISION NOT NULL DEFAULT 1.0
        CHECK (rate_window_s >= 0.1 AND rate_window_s <= 60),
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

CREATE INDEX IF NOT EXISTS idx_carrier_gateways_carrier ON carrier_gateways(carrier_id);

CREATE TABLE IF NOT EXISTS carrier_routes (
    id VARCHAR(64) PRIMARY KEY,
    carrier_id VARCHAR(64) NOT NULL REFERENCES carriers(id),
    -- NULL gateway / trunk: the route applies to any of the carrier's gateways / trunks
    gateway_id VARCHAR(64) REFERENCES carrier_gateways(id),
    trunk VARCHAR(128),
    direction VARCHAR(16) NOT NULL CHECK (direction IN ('international', 'national')),
    cli_rule VARCHAR(16) CHECK (cli_rule IN ('enforce', 'monitor', 'off')),
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

CREATE INDEX IF NOT EXISTS idx_carrier_routes_carrier ON carrier_routes(carrier_id);
CREATE INDEX IF NOT EXISTS idx_carrier_routes_gateway ON carrier_routes(gateway_id);
