-- Durable per-device command queue (docs/spec/commands.md). Times are unix milliseconds.
CREATE TABLE commands (
    id           BIGSERIAL PRIMARY KEY,
    device_id    TEXT NOT NULL,
    name         TEXT NOT NULL,
    payload      BYTEA NOT NULL,
    sender       TEXT NOT NULL,
    status       TEXT NOT NULL,      -- queued | delivered | acknowledged | expired | dropped
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL,
    attempts     BIGINT NOT NULL,
    delivered_at BIGINT,
    done_at      BIGINT
);
CREATE INDEX commands_open ON commands(device_id, status, id);
CREATE INDEX commands_expiry ON commands(status, expires_at);
