-- Certificate lifecycle (docs/spec/rotation.md): rotations over MQTT, operator-forced rotation
-- requests, and claim certificates for claim-based first boot. Times are unix seconds.

-- One row per certificate the online issuer issued for a device's own CSR. The old
-- certificates of the device are revoked (superseded) `grace` seconds after the broker saw the
-- device use the new one (`activated_at`); `superseded_at` records that it was done.
CREATE TABLE rotations (
    serial        TEXT PRIMARY KEY NOT NULL REFERENCES certificates(serial),
    device_id     TEXT NOT NULL REFERENCES devices(device_id),
    issued_at     BIGINT NOT NULL,
    forced        BIGINT NOT NULL,          -- 1 if an operator's request allowed it
    activated_at  BIGINT,
    superseded_at BIGINT
);
CREATE INDEX rotations_device ON rotations(device_id);

-- Operator-forced rotations not yet fulfilled (`fleet-provision rotate`).
CREATE TABLE rotation_requests (
    device_id    TEXT PRIMARY KEY NOT NULL REFERENCES devices(device_id),
    requested_at BIGINT NOT NULL,
    requested_by TEXT NOT NULL
);

-- A claim identity (role 'claim' in devices) and what it may still mint.
CREATE TABLE claims (
    claim_id  TEXT PRIMARY KEY NOT NULL REFERENCES devices(device_id),
    id_prefix TEXT NOT NULL,                -- devices it creates are named <id_prefix>-...
    quota     BIGINT NOT NULL,
    used      BIGINT NOT NULL
);
