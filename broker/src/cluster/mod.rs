//! What the broker needs to be one node of a cluster on NATS JetStream (issue 12): first the
//! mapping of MQTT topics and filters to NATS subjects, so that nodes route device messages to
//! each other on subjects derived from their topics.

pub(crate) mod subject;
