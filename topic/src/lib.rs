//! fleet-topic: the one vocabulary of fleetgate's wire (docs/spec/topics.md).
//!
//! Every crate that names a topic takes it from here: the broker (ACL, routing, command
//! delivery and status), the device SDK (its own topics and filters), the station's issuer and
//! fleet-sim. A topic is parsed once where it enters ([`Topic::parse`], [`TopicFilter::parse`]);
//! what it means in the scheme is read by [`Topic::addressed`]; a topic is written from its
//! levels ([`device`], [`command`], [`Root::with`], ...) straight into any [`core::fmt::Write`],
//! so a device builds it in a fixed buffer without allocating and without `core::fmt`'s
//! formatting machinery (only `write_str` is called).
//!
//! The scheme:
//!
//! | topic | who publishes | meaning |
//! |---|---|---|
//! | `devices/<id>/<anything>` (e.g. `telemetry`) | device `<id>` | what the device reports |
//! | `devices/<id>/commands/<name>[/ttl=<secs>]` | services | a command to the device |
//! | `status/devices/<id>/commands/<name>` | the broker | a command's status, services only |
//! | `devices/<id>/certs/{csr,active}` | device `<id>` | rotation: a CSR; "running on the new certificate" |
//! | `devices/<id>/certs/{issued,rejected,rotate}` | the issuer | rotation: the answers |
//! | `claims/<claim>/<nonce>/certs/csr` | a claim session | first boot: asks for an identity |
//! | `claims/<claim>/<nonce>/certs/{issued,rejected}` | the issuer | first boot: the answers |
//!
//! A claim session's client id is its topic root, `claims/<claim>/<nonce>`.
#![no_std]
#![forbid(unsafe_code)]

use core::fmt;

/// The levels of the scheme, each one topic level (no `/`).
pub mod level {
    /// The first level of every device topic: `devices/<id>/...`.
    pub const DEVICES: &str = "devices";
    /// Under `devices/<id>/`: commands to the device.
    pub const COMMANDS: &str = "commands";
    /// Under `devices/<id>/` (and a claim session's root): certificate rotation.
    pub const CERTS: &str = "certs";
    /// `certs/csr`: a certificate signing request from the device or claim session.
    pub const CSR: &str = "csr";
    /// `certs/active`: the device runs on its new certificate (the broker stamps the payload with
    /// the session's serial).
    pub const ACTIVE: &str = "active";
    /// `certs/issued`: the issuer's certificate chain.
    pub const ISSUED: &str = "issued";
    /// `certs/rejected`: the issuer's refusal, with its reason.
    pub const REJECTED: &str = "rejected";
    /// `certs/rotate` (retained): the station asks the device to rotate.
    pub const ROTATE: &str = "rotate";
    /// The first level of the command status topics, `status/devices/<id>/commands/<name>`.
    pub const STATUS: &str = "status";
    /// The first level of a claim session's topics and client id, `claims/<claim>/<nonce>`.
    pub const CLAIMS: &str = "claims";
    /// Where fleet-sim and the example firmware publish their readings.
    pub const TELEMETRY: &str = "telemetry";
    /// Where fleet-sim and the example firmware acknowledge a command: `devices/<id>/acks/<name>`
    /// (an application convention of the examples, not read by the broker).
    pub const ACKS: &str = "acks";
    /// Where answers to a v5 command go: `devices/<id>/responses/<anything>`, the Response Topic
    /// a service sets (the device answers there, the broker publishes the command's statuses).
    pub const RESPONSES: &str = "responses";
    /// The last level of a command topic that sets its time-to-live: `ttl=<secs>`.
    pub const TTL: &str = "ttl=";
    /// Under `devices/<id>/`: firmware updates (docs/spec/ota.md), and the name of the offer
    /// command `commands/ota/offer`.
    pub const OTA: &str = "ota";
    /// `ota/get`: a device's chunk request (answered by the broker, never routed or stored).
    pub const GET: &str = "get";
    /// `ota/chunk`: the broker's answer; no client may publish it.
    pub const CHUNK: &str = "chunk";
    /// `commands/ota/offer`: a campaign's offer (the broker's campaign runner only).
    pub const OFFER: &str = "offer";
}

/// A device's own topics after its root `devices/<id>/`, as the SDK's `publish(suffix, ..)`
/// takes them (each is checked against its levels in the tests).
pub mod suffix {
    /// Telemetry.
    pub const TELEMETRY: &str = "telemetry";
    /// A CSR for rotation (or a claim session's first certificate).
    pub const CERTS_CSR: &str = "certs/csr";
    /// "I run on my new certificate."
    pub const CERTS_ACTIVE: &str = "certs/active";

    /// `acks/<name>`: the examples' acknowledgement of command `name`.
    pub fn ack(name: &str) -> super::Levels<'_, 2> {
        super::Levels([super::level::ACKS, name])
    }
}

/// Filters named by the scheme, written out (each is checked against its levels in the tests).
pub mod filter {
    /// Every device's telemetry (fleet-sim `watch`'s default).
    pub const ALL_TELEMETRY: &str = "devices/+/telemetry";
    /// What the issuer reads: devices' CSRs.
    pub const DEVICE_CSRS: &str = "devices/+/certs/csr";
    /// What the issuer reads: devices' `certs/active` announcements.
    pub const DEVICE_ACTIVE: &str = "devices/+/certs/active";
    /// What the issuer reads: claim sessions' CSRs.
    pub const CLAIM_CSRS: &str = "claims/+/+/certs/csr";
    /// Everything the issuer subscribes to.
    pub const ISSUER: [&str; 3] = [DEVICE_CSRS, DEVICE_ACTIVE, CLAIM_CSRS];
}

/// The SAN URI prefixes that name a fleetgate identity in a certificate (docs/spec/certificate-profile.md).
pub mod uri {
    /// A device.
    pub const DEVICE: &str = "urn:fleetgate:device:";
    /// A backend service.
    pub const SERVICE: &str = "urn:fleetgate:service:";
    /// A certificate issuer (rotation over MQTT).
    pub const ISSUER: &str = "urn:fleetgate:issuer:";
    /// A claim identity: a batch credential a device uses once, at first boot, to ask for its own.
    pub const CLAIM: &str = "urn:fleetgate:claim:";
    /// An operator: the broker's admin API and console, never MQTT.
    pub const OPERATOR: &str = "urn:fleetgate:operator:";
    /// A broker node on the cluster bus (NATS), never an MQTT identity.
    pub const NODE: &str = "urn:fleetgate:node:";
    /// A backend's read-only identity on the cluster bus.
    pub const STREAM_READER: &str = "urn:fleetgate:stream-reader:";
}

/// `devices/`, stripped at once (a device reads its own topics with the least code).
const DEVICES_: &str = "devices/";
/// `/commands/` and `/certs/`, likewise.
const _COMMANDS_: &str = "/commands/";
const _CERTS_: &str = "/certs/";

/// Longest topic or filter the broker takes, bytes.
pub const MAX_LEN: usize = 1024;

/// Why a string is not a topic or filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TopicError {
    /// Empty.
    Empty,
    /// Longer than [`MAX_LEN`].
    TooLong,
    /// Contains NUL.
    Nul,
    /// A wildcard in a topic name, or one not standing alone as a level of a filter (or `#` not
    /// last).
    Wildcard,
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Empty => "empty topic",
            Self::TooLong => "topic longer than 1024 bytes",
            Self::Nul => "topic contains NUL",
            Self::Wildcard => "misplaced wildcard",
        })
    }
}

fn check_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        Err(TopicError::Empty)
    } else if s.len() > MAX_LEN {
        Err(TopicError::TooLong)
    } else if s.contains('\0') {
        Err(TopicError::Nul)
    } else {
        Ok(())
    }
}

/// A topic name (what a PUBLISH carries): 1 to [`MAX_LEN`] bytes, no wildcards, no NUL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Topic<'a>(&'a str);

impl<'a> Topic<'a> {
    /// Parses a topic name.
    pub fn parse(s: &'a str) -> Result<Self, TopicError> {
        check_common(s)?;
        if s.contains(['+', '#']) {
            return Err(TopicError::Wildcard);
        }
        Ok(Self(s))
    }

    /// True if a level is empty (`a//b`, `/a`, `a/`): valid MQTT, but never a topic of the scheme.
    pub fn has_empty_level(self) -> bool {
        self.levels().any(str::is_empty)
    }

    /// What the topic means in the scheme.
    pub fn addressed(self) -> Addressed<'a> {
        Addressed::of(self.0)
    }
}

/// A topic filter (what a SUBSCRIBE carries): as a topic, but `+` may stand as a whole level and
/// `#` as the whole last level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TopicFilter<'a>(&'a str);

impl<'a> TopicFilter<'a> {
    /// Parses a topic filter.
    pub fn parse(s: &'a str) -> Result<Self, TopicError> {
        check_common(s)?;
        let mut levels = s.split('/').peekable();
        while let Some(l) = levels.next() {
            let ok = match l {
                "#" => levels.peek().is_none(),
                "+" => true,
                l => !l.contains(['+', '#']),
            };
            if !ok {
                return Err(TopicError::Wildcard);
            }
        }
        Ok(Self(s))
    }

    /// Does `topic` match this filter?
    pub fn matches(self, topic: Topic<'_>) -> bool {
        matches(self.0, topic.0)
    }

    /// The device-id level of a `devices/<id>/...` filter (which may be a wildcard).
    pub fn device_level(self) -> Option<&'a str> {
        device_level(self.0)
    }
}

/// What a topic and a filter share: the text, its levels, `Display`.
macro_rules! text_newtype {
    ($t:ident) => {
        impl<'a> $t<'a> {
            /// As text.
            pub fn as_str(self) -> &'a str {
                self.0
            }

            /// Its levels.
            pub fn levels(self) -> core::str::Split<'a, char> {
                self.0.split('/')
            }
        }

        impl fmt::Display for $t<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.0)
            }
        }
    };
}

text_newtype!(Topic);
text_newtype!(TopicFilter);

/// Does `topic` match `filter` (MQTT rules; no `$` topics occur in the scheme)? For text already
/// parsed as a [`TopicFilter`] and a [`Topic`] (the broker keeps its subscriptions as text).
pub fn matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The device-id level of `devices/<id>/...` (a filter's may be a wildcard).
pub fn device_level(topic: &str) -> Option<&str> {
    let mut levels = topic.split('/');
    match levels.next() {
        Some(level::DEVICES) => levels.next(),
        _ => None,
    }
}

/// What a topic means in the scheme. Ids are the text of their level, not checked here: the
/// caller parses them with its own id type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addressed<'a> {
    /// `devices/<device>/commands/<name>`; `name` is the rest (one or more levels).
    Command {
        /// The device level.
        device: &'a str,
        /// Everything after `commands/`.
        name: &'a str,
    },
    /// `devices/<device>/certs/<kind>`; `kind` is the rest.
    DeviceCerts {
        /// The device level.
        device: &'a str,
        /// Everything after `certs/`.
        kind: &'a str,
    },
    /// `devices/<device>/<rest>`, not commands or certs: what a device reports.
    DeviceData {
        /// The device level.
        device: &'a str,
        /// Everything after the device level.
        rest: &'a str,
    },
    /// `claims/<claim>/<nonce>/certs/<kind>`; `kind` is the rest.
    ClaimCerts {
        /// The claim level.
        claim: &'a str,
        /// The nonce level.
        nonce: &'a str,
        /// Everything after `certs/`.
        kind: &'a str,
    },
    /// `status/devices/<device>/commands/<name>`.
    Status {
        /// The device level.
        device: &'a str,
        /// Everything after `commands/`.
        name: &'a str,
    },
    /// Anything else (including `devices` or `devices/<id>` alone).
    Other,
}

/// `s` split at its first `/`, both parts non-empty... or not split at all.
fn head(s: &str) -> (&str, Option<&str>) {
    match s.split_once('/') {
        Some((a, b)) => (a, Some(b)),
        None => (s, None),
    }
}

impl<'a> Addressed<'a> {
    fn of(topic: &'a str) -> Self {
        match head(topic) {
            (level::DEVICES, Some(rest)) => Self::under_device(rest),
            (level::CLAIMS, Some(rest)) => {
                let (claim, rest) = head(rest);
                let Some((nonce, rest)) = rest.map(head) else { return Self::Other };
                match rest.map(head) {
                    Some((level::CERTS, Some(kind))) => Self::ClaimCerts { claim, nonce, kind },
                    _ => Self::Other,
                }
            }
            (level::STATUS, Some(rest)) => match head(rest) {
                (level::DEVICES, Some(rest)) => match Self::under_device(rest) {
                    Self::Command { device, name } => Self::Status { device, name },
                    _ => Self::Other,
                },
                _ => Self::Other,
            },
            _ => Self::Other,
        }
    }

    fn under_device(rest: &'a str) -> Self {
        let (device, Some(rest)) = head(rest) else { return Self::Other };
        match head(rest) {
            (level::COMMANDS, Some(name)) => Self::Command { device, name },
            (level::CERTS, Some(kind)) => Self::DeviceCerts { device, kind },
            _ => Self::DeviceData { device, rest },
        }
    }
}

/// A topic (or client id, or filter) written from its levels, joined by `/`, without
/// allocating: [`Levels::write_to`] a buffer, or `to_string()` through [`fmt::Display`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Levels<'a, const N: usize>([&'a str; N]);

impl<const N: usize> Levels<'_, N> {
    /// Writes the topic into `w`, level by level (only `write_str` is called).
    pub fn write_to<W: fmt::Write + ?Sized>(&self, w: &mut W) -> fmt::Result {
        write_joined(w, &self.0)
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        joined_len(&self.0)
    }

    /// True for no levels, or one empty level.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<const N: usize> fmt::Display for Levels<'_, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_to(f)
    }
}

fn write_joined<W: fmt::Write + ?Sized>(w: &mut W, levels: &[&str]) -> fmt::Result {
    for (i, l) in levels.iter().enumerate() {
        if i > 0 {
            w.write_str("/")?;
        }
        w.write_str(l)?;
    }
    Ok(())
}

fn joined_len(levels: &[&str]) -> usize {
    levels.iter().map(|l| l.len()).sum::<usize>() + levels.len().saturating_sub(1)
}

/// `devices/<id>/<rest>` (`rest` may hold several levels).
pub fn device<'a>(id: &'a str, rest: &'a str) -> Levels<'a, 3> {
    Levels([level::DEVICES, id, rest])
}

/// `devices/<id>/commands/<name>`.
pub fn command<'a>(id: &'a str, name: &'a str) -> Levels<'a, 4> {
    Levels([level::DEVICES, id, level::COMMANDS, name])
}

/// `status/devices/<id>/commands/<name>`: a command's status.
pub fn status<'a>(id: &'a str, name: &'a str) -> Levels<'a, 5> {
    Levels([level::STATUS, level::DEVICES, id, level::COMMANDS, name])
}

/// `devices/<id>/certs/<kind>`.
pub fn device_certs<'a>(id: &'a str, kind: &'a str) -> Levels<'a, 4> {
    Levels([level::DEVICES, id, level::CERTS, kind])
}

/// A claim session's client id and topic root, `claims/<claim>/<nonce>`.
pub fn claim_session<'a>(claim: &'a str, nonce: &'a str) -> Levels<'a, 3> {
    Levels([level::CLAIMS, claim, nonce])
}

/// The parts of a claim session's client id `claims/<claim>/<nonce>` (not checked beyond
/// the shape: three levels, the first `claims`, none empty).
pub fn parse_claim_session(client_id: &str) -> Option<(&str, &str)> {
    let rest = client_id.strip_prefix(level::CLAIMS)?.strip_prefix('/')?;
    let (claim, nonce) = rest.split_once('/')?;
    (!claim.is_empty() && !nonce.is_empty() && !nonce.contains('/')).then_some((claim, nonce))
}

/// Where a client's own topics live: a device's `devices/<id>`, or a claim session's client id
/// `claims/<claim>/<nonce>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Root<'a> {
    /// `devices/<id>`.
    Device(&'a str),
    /// A claim session, by its client id (`claims/<claim>/<nonce>`).
    Claim(&'a str),
}

impl<'a> Root<'a> {
    /// The topic `<root>/<tail levels...>`.
    pub fn with<'t>(self, tail: &'t [&'t str]) -> Under<'t>
    where
        'a: 't,
    {
        Under { root: self, tail }
    }

    /// The rest of `topic` after `<root>/`, if the topic is under this root.
    #[inline]
    pub fn strip(self, topic: &str) -> Option<&str> {
        self.after_root(topic)?.strip_prefix('/')
    }

    /// The rest of `topic` after the root, `/` included. (Written for the least code on a device:
    /// each step is one `strip_prefix` of a string.)
    #[inline]
    fn after_root(self, topic: &str) -> Option<&str> {
        let (rest, root) = match self {
            Root::Device(id) => (topic.strip_prefix(DEVICES_)?, id),
            Root::Claim(client_id) => (topic, client_id),
        };
        rest.strip_prefix(root)
    }

    /// The command name of `<root>/commands/<name>` (what follows `commands/`).
    #[inline]
    pub fn command_name(self, topic: &str) -> Option<&str> {
        self.after_root(topic)?.strip_prefix(_COMMANDS_)
    }

    /// The kind of `<root>/certs/<kind>` (one level).
    #[inline]
    pub fn certs_kind(self, topic: &str) -> Option<&str> {
        self.after_root(topic)?.strip_prefix(_CERTS_).filter(|k| !k.contains('/'))
    }
}

impl fmt::Display for Root<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.with(&[]).write_to(f)
    }
}

/// A topic under a [`Root`]: `<root>/<tail...>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Under<'t> {
    root: Root<'t>,
    tail: &'t [&'t str],
}

impl Under<'_> {
    /// Writes the topic into `w` (only `write_str` is called).
    #[inline]
    pub fn write_to<W: fmt::Write + ?Sized>(&self, w: &mut W) -> fmt::Result {
        let (first, root) = match self.root {
            Root::Device(id) => (DEVICES_, id),
            Root::Claim(client_id) => ("", client_id),
        };
        w.write_str(first)?;
        w.write_str(root)?;
        for l in self.tail {
            w.write_str("/")?;
            w.write_str(l)?;
        }
        Ok(())
    }
}

impl fmt::Display for Under<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_to(f)
    }
}

#[cfg(test)]
mod tests;
