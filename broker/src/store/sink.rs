//! What the store writer commits into: a leaf, so that every sink's module can name it.

use std::future::Future;

use fleet_registry::Telemetry;

/// Why a sink did not store a batch.
pub(crate) type SinkError = Box<dyn std::error::Error + Send + Sync>;

/// Where acknowledged messages go.
pub(crate) trait Sink: Send + Sync + 'static {
    /// Stores every row of `rows`, or fails (a failed batch may be partly stored: a device's
    /// retransmission of a QoS 1 message must then not be stored twice, which `pkids`, the
    /// rows' MQTT packet ids, 0 for QoS 0, let a sink recognise).
    fn store<'a>(
        &'a self,
        rows: &'a [Telemetry],
        pkids: &'a [u16],
    ) -> impl Future<Output = Result<(), SinkError>> + Send + 'a;
}
