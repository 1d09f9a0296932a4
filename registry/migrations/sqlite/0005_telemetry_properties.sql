-- MQTT 5 properties of a stored message (content type, payload format, user properties, ...) as
-- one line of JSON (docs/spec/mqtt5.md); NULL for messages without any (every 3.1.1 message).
ALTER TABLE telemetry ADD COLUMN properties TEXT;
