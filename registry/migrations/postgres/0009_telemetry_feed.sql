-- How far each broker's telemetry log (broker/src/store/log.rs) is copied into `telemetry`: the
-- highest log sequence number stored, written in the same transaction as the rows it covers, so
-- a broker that restarts copies every acknowledged message exactly once. One row per log
-- directory (`log_id`, a random number the log keeps in its `id` file).
CREATE TABLE telemetry_feed (
    log_id BIGINT PRIMARY KEY,
    fed_seq BIGINT NOT NULL
);
