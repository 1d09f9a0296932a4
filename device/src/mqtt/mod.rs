//! MQTT 3.1.1, sans-IO: a codec that decodes from `&[u8]` and encodes into `&mut [u8]`.
//!
//! Independent of the broker's codec (rumqttc's `mqttbytes`) on purpose: the tests cross-check
//! the two, so a bug in either shows up as a disagreement.

pub mod codec;
pub mod session;
#[cfg(feature = "mqtt5")]
pub mod v5;

pub use codec::{decode, decode_publish_head, DecodeError, EncodeError, Packet, Publish, PublishHead, QoS};
pub use session::{Event, Millis, Overflow, Session, SessionConfig, SessionError};
#[cfg(feature = "mqtt5")]
pub use session::{Mqtt5, MAX_SERVER_REFERENCE};
