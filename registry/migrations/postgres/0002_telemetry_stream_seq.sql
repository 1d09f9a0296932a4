-- A cluster's telemetry comes from its JetStream stream: the stream sequence of each row makes
-- the sink idempotent (a message delivered twice is inserted once). NULL for rows a single
-- node stored directly.
ALTER TABLE telemetry ADD COLUMN stream_seq BIGINT;
CREATE UNIQUE INDEX telemetry_stream_seq ON telemetry(stream_seq);
