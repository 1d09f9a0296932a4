-- fleetgate registry, PostgreSQL dialect. Times are unix seconds; serials are lowercase hex.
CREATE TABLE devices (
    device_id         TEXT PRIMARY KEY NOT NULL,
    role              TEXT NOT NULL,             -- 'device' | 'service'
    status            TEXT NOT NULL,             -- 'active' | 'revoked'
    created_at        BIGINT NOT NULL,
    revoked_at        BIGINT,
    revocation_reason TEXT
);
CREATE TABLE certificates (
    serial            TEXT PRIMARY KEY NOT NULL,
    device_id         TEXT NOT NULL REFERENCES devices(device_id),
    not_before        BIGINT NOT NULL,
    not_after         BIGINT NOT NULL,
    key_source        TEXT NOT NULL,             -- 'station' | 'csr'
    status            TEXT NOT NULL,             -- 'active' | 'revoked'
    issued_at         BIGINT NOT NULL,
    revoked_at        BIGINT,
    revocation_reason TEXT,
    revoked_seq       BIGINT,                    -- issuance_log.seq of the revocation
    cert_der          BYTEA NOT NULL
);
CREATE INDEX certificates_device ON certificates(device_id);
CREATE INDEX certificates_revoked_seq ON certificates(revoked_seq);
-- Append-only, hash-chained: hash = SHA-256(prev_hash | seq | at | event | device_id | serial | detail).
CREATE TABLE issuance_log (
    seq        BIGINT PRIMARY KEY NOT NULL,
    at         BIGINT NOT NULL,
    event      TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    serial     TEXT NOT NULL,
    detail     TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);
CREATE TABLE crl_state (
    id         BIGINT PRIMARY KEY NOT NULL,
    crl_number BIGINT NOT NULL,
    issued_at  BIGINT NOT NULL
);
CREATE TABLE telemetry (
    id          BIGSERIAL PRIMARY KEY,
    device_id   TEXT NOT NULL,
    topic       TEXT NOT NULL,
    payload     BYTEA NOT NULL,
    qos         BIGINT NOT NULL,
    received_at BIGINT NOT NULL
);
CREATE INDEX telemetry_device ON telemetry(device_id, id);
-- The newest log entry, updated in the same transaction as each append, so that removing
-- entries from the end of the log is detected too.
CREATE TABLE log_anchor (
    id   BIGINT PRIMARY KEY NOT NULL,
    seq  BIGINT NOT NULL,
    hash TEXT NOT NULL
);
