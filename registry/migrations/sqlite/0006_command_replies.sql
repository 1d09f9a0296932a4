-- MQTT 5 request/response (docs/spec/mqtt5.md): where a v5 service asked for a command's
-- answers and statuses, and the correlation data it set. NULL for every other command.
ALTER TABLE commands ADD COLUMN response_topic TEXT;
ALTER TABLE commands ADD COLUMN correlation BLOB;
