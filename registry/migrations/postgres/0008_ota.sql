-- Firmware update campaigns and their per-device jobs (docs/spec/ota.md, "Campaigns"), written
-- by `fleet-provision ota start` with an `ota-campaign` and one `ota-job` issuance-log entry per
-- job; the brokers' campaign runner and chunk server read them and move the jobs' states.
-- Times are unix milliseconds.
CREATE TABLE ota_campaigns (
    id           TEXT PRIMARY KEY NOT NULL,  -- `ota-<16 hex>`; offers carry sender `ota:<id>`
    board        TEXT NOT NULL,              -- the release (a row of `releases`)
    version      TEXT NOT NULL,
    sha512       TEXT NOT NULL,              -- the release image's SHA-512, hex: its tag is the first 8 bytes
    devices      TEXT NOT NULL,              -- the --devices selector, as given
    waves        TEXT NOT NULL,              -- cumulative percentages, e.g. `1,10,100`
    abort_bp     BIGINT NOT NULL,            -- --abort-if-failed, in basis points (2% = 200)
    offer_ttl    BIGINT NOT NULL,            -- the offers' time-to-live, seconds
    state        TEXT NOT NULL,              -- 'running' | 'completed' | 'aborted'
    wave         BIGINT NOT NULL,            -- the wave offered last (0-based); -1 before the first
    reason       TEXT,                       -- why it was aborted
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL
);
CREATE TABLE ota_jobs (
    campaign     TEXT NOT NULL REFERENCES ota_campaigns(id),
    device_id    TEXT NOT NULL REFERENCES devices(device_id),
    wave         BIGINT NOT NULL,
    -- 'pending' (its wave has not started) | 'queued' (offer in the command queue) | 'offered'
    -- (delivered) | 'downloading' | 'verified' | 'rebooted' | final: 'confirmed' | 'rolled_back'
    -- | 'failed' | 'cancelled' (its campaign stopped before its wave)
    state        TEXT NOT NULL,
    reason       TEXT,                       -- for 'failed'
    progress     BIGINT NOT NULL,            -- the last offset the device reported
    size         BIGINT NOT NULL,            -- the image size
    command_id   BIGINT,                     -- the offer in `commands`
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    PRIMARY KEY (campaign, device_id)
);
CREATE INDEX ota_jobs_device ON ota_jobs (device_id, state);
CREATE INDEX ota_jobs_state ON ota_jobs (state, updated_at);
