//! The broker's message: what a PUBLISH carries from a client of either protocol to the router,
//! the other nodes, the store and every subscriber.
//!
//! MQTT 5 properties ride along (`props`, shared by every copy; `None` for 3.1.1 publishers and
//! for v5 ones that set none): a v5 subscriber gets them, a 3.1.1 subscriber gets the topic and
//! payload as before. Message Expiry is kept as an instant on the wall clock, so each delivery
//! carries what remains of it and an expired message is not delivered at all.

use std::sync::Arc;

use bytes::Bytes;
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::QoS;

use crate::clock::now_millis;

/// MQTT 5 properties of a message (docs/spec/mqtt5.md).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Props {
    /// Payload Format Indicator (1: UTF-8 text).
    pub(crate) payload_format: Option<u8>,
    /// Content Type.
    pub(crate) content_type: Option<String>,
    /// User Properties, in order.
    pub(crate) user: Vec<(String, String)>,
    /// Response Topic.
    pub(crate) response_topic: Option<String>,
    /// Correlation Data.
    pub(crate) correlation: Option<Bytes>,
    /// When the message expires (unix milliseconds), from its Message Expiry Interval.
    pub(crate) expires_at_ms: Option<i64>,
}

impl Props {
    /// Seconds left before it expires (at least 1 while it has not), `None` if it never does.
    pub(crate) fn expiry_left(&self, now_ms: i64) -> Option<u32> {
        self.expires_at_ms
            .map(|at| u32::try_from(((at - now_ms).max(0) + 999) / 1000).unwrap_or(u32::MAX).max(1))
    }

    /// True once its Message Expiry has passed.
    pub(crate) fn expired(&self, now_ms: i64) -> bool {
        self.expires_at_ms.is_some_and(|at| now_ms >= at)
    }

    /// Bytes it holds: its strings and correlation data, and each user property's own room in
    /// memory besides its text (thousands of empty ones fit in one packet, and are not free).
    pub(crate) fn size(&self) -> usize {
        let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        let user: usize =
            self.user.iter().map(|(k, v)| std::mem::size_of::<(String, String)>() + k.len() + v.len()).sum();
        user + text(&self.content_type)
            + text(&self.response_topic)
            + self.correlation.as_ref().map_or(0, Bytes::len)
    }

    /// True if there is nothing to carry.
    pub(crate) fn is_empty(&self) -> bool {
        *self == Props::default()
    }

    /// As one line of ASCII JSON (docs/spec/mqtt5.md): the `Mqtt-Properties` header on the
    /// cluster bus and in the stream, and the `properties` column of stored telemetry.
    pub(crate) fn to_json(&self) -> String {
        let mut v = serde_json::Map::new();
        if let Some(f) = self.payload_format {
            v.insert("payload_format".into(), f.into());
        }
        if let Some(t) = &self.content_type {
            v.insert("content_type".into(), t.as_str().into());
        }
        if !self.user.is_empty() {
            let pairs = self.user.iter().map(|(k, v)| serde_json::json!([k, v])).collect();
            v.insert("user".into(), serde_json::Value::Array(pairs));
        }
        if let Some(t) = &self.response_topic {
            v.insert("response_topic".into(), t.as_str().into());
        }
        if let Some(c) = &self.correlation {
            v.insert("correlation".into(), hex::encode(c).into());
        }
        if let Some(at) = self.expires_at_ms {
            v.insert("expires_at_ms".into(), at.into());
        }
        ascii_json(&serde_json::Value::Object(v).to_string())
    }

    /// Reads [`Props::to_json`]'s form (`None`: not that form).
    pub(crate) fn from_json(s: &str) -> Option<Props> {
        let v: serde_json::Value = serde_json::from_str(s).ok()?;
        let o = v.as_object()?;
        let text = |k: &str| o.get(k).and_then(|x| x.as_str()).map(str::to_owned);
        let user = match o.get("user") {
            None => Vec::new(),
            Some(u) => u
                .as_array()?
                .iter()
                .map(|pair| match pair.as_array().map(Vec::as_slice) {
                    Some([k, v]) => Some((k.as_str()?.to_owned(), v.as_str()?.to_owned())),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()?,
        };
        Some(Props {
            payload_format: o
                .get("payload_format")
                .and_then(|x| x.as_u64())
                .and_then(|x| u8::try_from(x).ok()),
            content_type: text("content_type"),
            user,
            response_topic: text("response_topic"),
            correlation: match text("correlation") {
                Some(h) => Some(Bytes::from(hex::decode(h).ok()?)),
                None => None,
            },
            expires_at_ms: o.get("expires_at_ms").and_then(|x| x.as_i64()),
        })
    }
}

/// `json` with every non-ASCII character escaped (`\uXXXX`, surrogate pairs beyond the BMP):
/// still the same JSON, and safe as a NATS header value.
fn ascii_json(json: &str) -> String {
    if json.is_ascii() {
        return json.to_owned();
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    out
}

/// A message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Message {
    pub(crate) dup: bool,
    pub(crate) qos: QoS,
    pub(crate) retain: bool,
    pub(crate) topic: String,
    pub(crate) pkid: u16,
    pub(crate) payload: Bytes,
    /// MQTT 5 properties, if any.
    pub(crate) props: Option<Arc<Props>>,
    /// The router id of the session that published it here (a subscription with No Local skips
    /// it); `None` from another node or from the broker.
    pub(crate) from_conn: Option<u64>,
    /// A delivery's Subscription Identifiers (the receiving session's matching subscriptions).
    pub(crate) sub_ids: Vec<u32>,
    /// A delivery through a shared subscription: its group, for another member should this one
    /// leave without acknowledging it.
    pub(crate) shared: Option<GroupKey>,
    /// The `Fleet-Origin` another node relayed a shared subscription's message with: kept so
    /// that the message can be handed on to a member on another node as it came.
    pub(crate) origin: Option<Arc<str>>,
}

/// A shared subscription's group and filter (`$share/<group>/<filter>`).
pub(crate) type GroupKey = Arc<(String, String)>;

/// MQTT 5 subscription options (3.1.1 subscriptions have the defaults).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SubOpts {
    /// Not the subscriber's own messages.
    pub(crate) no_local: bool,
    /// Deliveries keep the retain flag they were published with.
    pub(crate) retain_as_published: bool,
    /// Retained messages at subscribe: 0 always, 1 only for a new subscription, 2 never.
    pub(crate) retain_handling: u8,
    /// Subscription Identifier, put on every delivery it matches.
    pub(crate) id: Option<u32>,
}

impl Message {
    /// A message without properties.
    pub(crate) fn new(topic: impl Into<String>, qos: QoS, payload: impl Into<Bytes>) -> Self {
        Self {
            dup: false,
            qos,
            retain: false,
            topic: topic.into(),
            pkid: 0,
            payload: payload.into(),
            props: None,
            from_conn: None,
            sub_ids: Vec::new(),
            shared: None,
            origin: None,
        }
    }

    /// As a 3.1.1 client gets it (the properties stay behind).
    pub(crate) fn into_v4(self) -> v4::Publish {
        let mut p = v4::Publish::from_bytes(self.topic, self.qos, self.payload);
        p.dup = self.dup;
        p.retain = self.retain;
        p.pkid = self.pkid;
        p
    }

    /// A 3.1.1 client's PUBLISH.
    pub(crate) fn from_v4(p: v4::Publish) -> Self {
        let mut m = Self::new(p.topic, p.qos, p.payload);
        (m.dup, m.retain, m.pkid) = (p.dup, p.retain, p.pkid);
        m
    }

    /// Bytes it carries: topic, payload and properties (what the publish byte rate and the
    /// retained budget count).
    pub(crate) fn size(&self) -> usize {
        self.topic.len() + self.payload.len() + self.props.as_ref().map_or(0, |p| p.size())
    }

    /// True once its Message Expiry has passed (never for a message without one).
    pub(crate) fn expired(&self) -> bool {
        self.props.as_ref().is_some_and(|p| p.expired(now_millis()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_round_trip_through_their_json_and_it_is_ascii() {
        let p = Props {
            payload_format: Some(1),
            content_type: Some("application/json; schema=t1".into()),
            user: vec![
                ("unit".into(), "°C".into()),
                ("k\n=".into(), "v\"".into()),
                ("unit".into(), "2".into()),
            ],
            response_topic: Some("devices/dev-1/responses/7".into()),
            correlation: Some(Bytes::from_static(&[0, 0xff, 7])),
            expires_at_ms: Some(1_700_000_000_123),
        };
        let json = p.to_json();
        assert!(json.is_ascii() && !json.contains('\n'), "{json}");
        assert_eq!(Props::from_json(&json), Some(p));
        assert_eq!(Props::from_json(&Props::default().to_json()), Some(Props::default()));
        assert_eq!(Props::from_json("[1]"), None);
        assert_eq!(Props::from_json(r#"{"user":[["a"]]}"#), None);
        assert_eq!(Props::from_json(r#"{"correlation":"zz"}"#), None);
    }

    #[test]
    fn properties_count_in_a_messages_size() {
        let mut m = Message::new("devices/d/t", QoS::AtMostOnce, "x");
        assert_eq!(m.size(), 12);
        let empty = (String::new(), String::new());
        m.props = Some(Arc::new(Props { user: vec![empty; 1000], ..Props::default() }));
        assert!(m.size() >= 12 + 1000 * 48, "empty user properties take room: {}", m.size());
        let p = Props {
            content_type: Some("abc".into()),
            response_topic: Some("devices/d/r".into()),
            correlation: Some(Bytes::from_static(b"12")),
            ..Props::default()
        };
        assert_eq!(p.size(), 3 + 11 + 2);
    }

    #[test]
    fn expiry_counts_down_and_ends() {
        let p = Props { expires_at_ms: Some(10_000), ..Props::default() };
        assert_eq!(p.expiry_left(0), Some(10));
        assert_eq!(p.expiry_left(9_001), Some(1));
        assert_eq!(p.expiry_left(9_999), Some(1), "never 0 while it has not expired");
        assert!(!p.expired(9_999) && p.expired(10_000));
        assert_eq!(Props::default().expiry_left(0), None);
    }
}
