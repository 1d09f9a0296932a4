-- Only a cluster's rows carry a stream sequence: a single node's rows (all NULL there) no longer
-- each add an entry to the unique index, one B-tree insert less per stored message. The index
-- still refuses a stream sequence stored twice (`ON CONFLICT DO NOTHING` in the cluster's sink).
DROP INDEX telemetry_stream_seq;
CREATE UNIQUE INDEX telemetry_stream_seq ON telemetry(stream_seq) WHERE stream_seq IS NOT NULL;
