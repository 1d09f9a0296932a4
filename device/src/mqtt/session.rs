//! The MQTT session state machine, sans-IO: it is told the time, fed the bytes that arrived and
//! the transport's ups and downs, and says what to send. It never reads a clock or an RNG.
//!
//! - **Outbox**: telemetry is queued (bounded, `N` messages of up to `M` bytes) and sent in order;
//!   it survives disconnects and drains after the next CONNACK. When full, the configured
//!   [`Overflow`] policy decides: drop the oldest queued message, or refuse the new one.
//! - **QoS 1**: one message in flight at a time (small devices), retransmitted with DUP after
//!   `ack_timeout_ms`, and after a reconnect.
//! - **Keep-alive**: PINGREQ when nothing was sent for `keep_alive`; if no PINGRESP arrives
//!   within another `keep_alive`, the session reports [`SessionError::KeepAliveTimeout`] and the
//!   caller drops the transport.
//! - **Reconnect**: exponential back-off from `backoff_min_ms` to `backoff_max_ms` with jitter
//!   drawn from the caller's random number (`[d/2, d]`), reset after a successful CONNACK.

use heapless::{Deque, String, Vec};

/// How many recent command packet ids a session remembers for de-duplication.
const SEEN: usize = 16;
/// Topic filters a device subscribes to.
#[cfg(not(feature = "_ota"))]
const FILTERS: usize = 4;
#[cfg(feature = "_ota")]
const FILTERS: usize = 5;
/// The longest Server Reference a session keeps (fleet-broker's `moved_to` is at most this).
#[cfg(feature = "mqtt5")]
pub const MAX_SERVER_REFERENCE: usize = 96;
/// Failed attempts at a server the broker sent the device to before it goes back to the
/// bundle's broker (a reference that leads nowhere must not strand the device).
#[cfg(feature = "mqtt5")]
const MOVED_ATTEMPTS: u8 = 3;

/// The topic scheme (`fleet-topic`): a device publishes under `devices/<id>/<suffix>` and
/// receives commands on `devices/<id>/commands/<name>`; a claim session's root is its client id.
use fleet_topic::{level, Root};

use super::codec::{
    decode, decode_publish_head, DecodeError, EncodeError, Packet, Publish, PublishHead, QoS,
    SubscribeFilters,
};

/// A PUBLISH: 3.1.1, or (`alias_set` given) MQTT 5 with telemetry named by its alias once set.
fn encode_publish(
    p: &Publish<'_>,
    alias_set: Option<&mut bool>,
    telemetry: bool,
    out: &mut [u8],
) -> Result<usize, SessionError> {
    #[cfg(feature = "mqtt5")]
    if let Some(set) = alias_set {
        let alias = match (telemetry, *set) {
            (false, _) => super::v5::Alias::None,
            (true, false) => super::v5::Alias::Set(1),
            (true, true) => super::v5::Alias::Use(1),
        };
        let n = super::v5::encode_publish(p, alias, out).map_err(SessionError::Encode)?;
        *set |= telemetry;
        return Ok(n);
    }
    let _ = (alias_set, telemetry);
    Packet::Publish(*p).encode(out).map_err(SessionError::Encode)
}

/// Milliseconds on the caller's monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Millis(pub u64);

impl Millis {
    pub(crate) fn plus(self, ms: u64) -> Millis {
        Millis(self.0.saturating_add(ms))
    }
}

/// What to do when the outbox is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Discard the oldest message not yet in flight (fresh telemetry matters most).
    DropOldest,
    /// Refuse the new message (`publish` returns `OutboxFull`).
    RejectNew,
}

/// Session settings.
#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    /// Keep-alive, seconds (0 disables).
    pub keep_alive_secs: u16,
    /// Retransmit an unacknowledged QoS 1 message after this long.
    pub ack_timeout_ms: u64,
    /// First reconnect delay.
    pub backoff_min_ms: u64,
    /// Largest reconnect delay.
    pub backoff_max_ms: u64,
    /// Outbox overflow policy.
    pub overflow: Overflow,
    /// MQTT clean session. `false` asks the broker to keep the session (subscriptions, queued
    /// QoS 1 messages) while the device sleeps (docs/spec/commands.md).
    pub clean_session: bool,
    /// Speak MQTT 5 instead of 3.1.1 (feature `mqtt5`).
    #[cfg(feature = "mqtt5")]
    pub mqtt5: Option<Mqtt5>,
}

/// An MQTT 5 session's terms (feature `mqtt5`).
#[cfg(feature = "mqtt5")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mqtt5 {
    /// How long the broker keeps the session after the connection ends, seconds (used when
    /// `clean_session` is `false`; the broker may grant less).
    pub session_expiry_secs: u32,
    /// QoS 1 deliveries the device takes unacknowledged at once (it handles one at a time).
    pub receive_max: u16,
}

#[cfg(feature = "mqtt5")]
impl Default for Mqtt5 {
    fn default() -> Self {
        Self { session_expiry_secs: 86_400, receive_max: 1 }
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            keep_alive_secs: 30,
            ack_timeout_ms: 5_000,
            backoff_min_ms: 500,
            backoff_max_ms: 60_000,
            overflow: Overflow::DropOldest,
            clean_session: true,
            #[cfg(feature = "mqtt5")]
            mqtt5: None,
        }
    }
}

/// Something the application should know about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// CONNACK accepted.
    Connected,
    /// A QoS 1 message was acknowledged (stored by the broker).
    Delivered {
        /// Its packet id.
        pkid: u16,
    },
    /// The command subscription is active.
    Subscribed,
    /// A command arrived on `devices/<id>/commands/<name>`.
    Command {
        /// The command name (topic level after `commands/`).
        name: &'a str,
        /// Its payload.
        payload: &'a [u8],
    },
    /// MQTT 5: the broker refused a QoS 1 message (it is not retried).
    #[cfg(feature = "mqtt5")]
    Refused {
        /// Its packet id.
        pkid: u16,
        /// The reason code (0x87 not authorized, 0x97 quota exceeded, ...).
        reason: u8,
    },
    /// A chunk of a firmware image arrived on `devices/<id>/ota/chunk` (feature `ota`,
    /// docs/spec/ota.md).
    #[cfg(feature = "_ota")]
    OtaChunk {
        /// Its payload: tag, offset, status, data.
        payload: &'a [u8],
    },
    /// A rotation message arrived on `<root>/certs/<kind>` (`issued`, `rejected`, `rotate`;
    /// docs/spec/rotation.md).
    Certs {
        /// The level after `certs/`.
        kind: &'a str,
        /// Its payload.
        payload: &'a [u8],
    },
}

/// Why the session cannot go on over this transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionError {
    /// The broker refused CONNECT with this return code (5: not authorized, e.g. revoked).
    Refused(u8),
    /// The broker sent something that is not MQTT 3.1.1.
    Protocol(DecodeError),
    /// The broker refused the command subscription.
    SubscriptionRefused,
    /// No PINGRESP in time.
    KeepAliveTimeout,
    /// No CONNACK in time.
    ConnectTimeout,
    /// The outbox is full and the policy is `RejectNew`.
    OutboxFull,
    /// Topic or payload does not fit the configured sizes.
    TooLarge,
    /// Encoding failed (output buffer too small).
    Encode(EncodeError),
    /// Sending needs an accepted session.
    NotConnected,
    /// MQTT 5: the broker ended the session with this reason code (0x98: the device was
    /// revoked; 0x8E: another connection took the session over; 0x8B: the broker stops).
    #[cfg(feature = "mqtt5")]
    Disconnected(u8),
    /// MQTT 5: the broker sent the device to another server (0x9C use another server, 0x9D
    /// server moved, in a CONNACK or DISCONNECT); [`Session::server_reference`] says where, and
    /// the next attempt goes there.
    #[cfg(feature = "mqtt5")]
    Moved(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting until `retry_at` to open a transport.
    Disconnected { retry_at: Millis },
    /// Transport up; CONNECT not yet sent (false) or sent at the time.
    Connecting { sent_at: Option<Millis> },
    /// CONNACK received.
    Connected,
}

#[derive(Debug, Clone)]
struct Message<const M: usize> {
    suffix: String<32>,
    payload: Vec<u8, M>,
    qos: QoS,
    /// Packet id once assigned (QoS 1).
    pkid: Option<u16>,
}

/// An MQTT 3.1.1 client session for one device: `N` queued messages of up to `M` bytes.
#[derive(Debug)]
pub struct Session<'a, const N: usize, const M: usize> {
    cfg: SessionConfig,
    /// The device id, or a claim session's client id `claims/<claim>/<nonce>`.
    device_id: &'a str,
    /// A claim session: topics are `<client id>/...`, and only `certs/+` is subscribed.
    claim: bool,
    state: State,
    outbox: Deque<Message<M>, N>,
    in_flight_since: Option<Millis>,
    next_pkid: u16,
    last_sent: Millis,
    ping_sent: Option<Millis>,
    subscribe_pending: Option<u16>,
    subscribed: bool,
    /// The last CONNACK said the broker kept this client's session (clean session = 0).
    session_present: bool,
    pending_puback: Option<u16>,
    attempt: u32,
    dropped: u32,
    /// Packet ids of the last commands received (kept across reconnects): a retransmission
    /// (DUP) of one of them is acknowledged again but not reported twice.
    seen: [u16; SEEN],
    seen_at: usize,
    /// MQTT 5: the telemetry topic alias is set on this connection.
    #[cfg(feature = "mqtt5")]
    alias_set: bool,
    /// MQTT 5: the broker said this identity is not welcome (banned, not authorized, revoked):
    /// the next attempt waits `backoff_max_ms`.
    #[cfg(feature = "mqtt5")]
    hold_off: bool,
    /// MQTT 5: the server the broker sent the device to (empty: the bundle's broker).
    #[cfg(feature = "mqtt5")]
    moved_to: String<MAX_SERVER_REFERENCE>,
    /// MQTT 5: attempts at `moved_to` that failed since it was set or last admitted the device.
    #[cfg(feature = "mqtt5")]
    moved_failures: u8,
}

impl<'a, const N: usize, const M: usize> Session<'a, N, M> {
    /// A disconnected session for `device_id` (ready to connect at once).
    pub fn new(device_id: &'a str, cfg: SessionConfig) -> Self {
        Self {
            cfg,
            device_id,
            claim: false,
            state: State::Disconnected { retry_at: Millis(0) },
            outbox: Deque::new(),
            in_flight_since: None,
            next_pkid: 0,
            last_sent: Millis(0),
            ping_sent: None,
            subscribe_pending: None,
            subscribed: false,
            session_present: false,
            pending_puback: None,
            attempt: 0,
            dropped: 0,
            seen: [0; SEEN],
            seen_at: 0,
            #[cfg(feature = "mqtt5")]
            alias_set: false,
            #[cfg(feature = "mqtt5")]
            hold_off: false,
            #[cfg(feature = "mqtt5")]
            moved_to: String::new(),
            #[cfg(feature = "mqtt5")]
            moved_failures: 0,
        }
    }

    /// A claim session for first boot: `client_id` is `claims/<claim-id>/<nonce>` (the nonce 16
    /// to 64 characters of `[0-9a-z]`); the session publishes under it and subscribes only to
    /// its `certs/+` answers.
    pub fn new_claim(client_id: &'a str, cfg: SessionConfig) -> Self {
        Self { claim: true, ..Self::new(client_id, cfg) }
    }

    /// The topic root: `devices/<id>` or a claim session's client id.
    fn root(&self) -> Root<'a> {
        if self.claim {
            Root::Claim(self.device_id)
        } else {
            Root::Device(self.device_id)
        }
    }

    /// A PUBLISH of `payload` on `<root>/<suffix>` written straight into `out` (not queued, not
    /// retransmitted by the session): for requests that their caller repeats itself, such as a
    /// CSR larger than the outbox's messages. QoS 1 gets a fresh packet id; its PUBACK is
    /// ignored.
    pub fn encode_now(
        &mut self,
        suffix: &str,
        payload: &[u8],
        qos: QoS,
        out: &mut [u8],
    ) -> Result<usize, SessionError> {
        if self.state != State::Connected {
            return Err(SessionError::NotConnected);
        }
        let mut t: String<192> = String::new();
        self.root().with(&[suffix]).write_to(t.as_mut_view()).map_err(|_| SessionError::TooLarge)?;
        let pkid = if qos == QoS::AtMostOnce { None } else { Some(self.take_pkid()) };
        let qos = if qos == QoS::AtMostOnce { QoS::AtMostOnce } else { QoS::AtLeastOnce };
        let p = Publish { topic: &t, payload, qos, retain: false, dup: false, pkid };
        self.encode_publish(&p, false, out)
    }

    /// A PUBLISH in the session's protocol; `telemetry`: on MQTT 5 it names its topic by alias.
    fn encode_publish(
        &mut self,
        p: &Publish<'_>,
        telemetry: bool,
        out: &mut [u8],
    ) -> Result<usize, SessionError> {
        #[cfg(feature = "mqtt5")]
        let alias = self.cfg.mqtt5.map(|_| &mut self.alias_set);
        #[cfg(not(feature = "mqtt5"))]
        let alias = None;
        encode_publish(p, alias, telemetry, out)
    }

    /// True once CONNACK was accepted on the current transport.
    pub fn is_connected(&self) -> bool {
        self.state == State::Connected
    }

    /// Messages waiting (including the one in flight).
    pub fn queued(&self) -> usize {
        self.outbox.len()
    }

    /// Messages discarded by the `DropOldest` policy so far.
    pub fn dropped(&self) -> u32 {
        self.dropped
    }

    /// Queues `payload` for `devices/<id>/<suffix>`.
    pub fn publish(&mut self, suffix: &str, payload: &[u8], qos: QoS) -> Result<(), SessionError> {
        let msg = Message {
            suffix: String::try_from(suffix).map_err(|_| SessionError::TooLarge)?,
            payload: Vec::from_slice(payload).map_err(|_| SessionError::TooLarge)?,
            qos: if qos == QoS::AtMostOnce { QoS::AtMostOnce } else { QoS::AtLeastOnce },
            pkid: None,
        };
        if self.outbox.is_full() {
            match self.cfg.overflow {
                Overflow::RejectNew => return Err(SessionError::OutboxFull),
                Overflow::DropOldest => {
                    // Keep the message in flight (its ack may be on the way): drop the next one.
                    let keep_head = self.in_flight_since.is_some();
                    let head = if keep_head { self.outbox.pop_front() } else { None };
                    let _ = self.outbox.pop_front();
                    if let Some(h) = head {
                        let _ = self.outbox.push_front(h);
                    }
                    self.dropped = self.dropped.saturating_add(1);
                }
            }
        }
        self.outbox.push_back(msg).map_err(|_| SessionError::OutboxFull)
    }

    /// Whether the broker resumed a kept session at the last connect (CONNACK session present,
    /// with [`SessionConfig::clean_session`] false): messages sent while the device was away
    /// follow without a new SUBSCRIBE.
    pub fn session_present(&self) -> bool {
        self.session_present
    }

    /// MQTT 5: the server the broker sent this device to (a CONNACK or DISCONNECT 0x9C/0x9D
    /// with a Server Reference, `host:port` or `host`), while the device follows it: the next
    /// connection goes there ([`crate::client::Device::broker`]). Forgotten after 3 failed
    /// attempts there (back to the bundle's broker).
    #[cfg(feature = "mqtt5")]
    pub fn server_reference(&self) -> Option<&str> {
        (!self.moved_to.is_empty()).then_some(self.moved_to.as_str())
    }

    /// The caller should open a transport now (or at the returned time).
    pub fn reconnect_at(&self) -> Option<Millis> {
        match self.state {
            State::Disconnected { retry_at } => Some(retry_at),
            _ => None,
        }
    }

    /// The transport (TCP + TLS) is up: start the MQTT handshake.
    pub fn transport_up(&mut self, _now: Millis) {
        self.state = State::Connecting { sent_at: None };
        self.ping_sent = None;
        self.subscribed = false;
        self.subscribe_pending = None;
        self.pending_puback = None;
        self.in_flight_since = None; // retransmitted (DUP) after CONNACK
        #[cfg(feature = "mqtt5")]
        {
            self.alias_set = false;
        }
    }

    /// The transport failed or closed: back off before the next attempt. `random` is any random
    /// number from the caller's RNG (for jitter).
    pub fn transport_down(&mut self, now: Millis, random: u32) {
        let exp = self.cfg.backoff_min_ms.saturating_mul(1u64 << self.attempt.min(20));
        #[allow(unused_mut)]
        let mut delay = exp.min(self.cfg.backoff_max_ms);
        #[cfg(feature = "mqtt5")]
        if core::mem::take(&mut self.hold_off) {
            delay = self.cfg.backoff_max_ms;
        }
        #[cfg(feature = "mqtt5")]
        if !self.moved_to.is_empty() {
            self.moved_failures = self.moved_failures.saturating_add(1);
            if self.moved_failures > MOVED_ATTEMPTS {
                self.moved_to.clear();
                self.moved_failures = 0;
            }
        }
        let jittered = delay / 2 + u64::from(random) % (delay / 2 + 1);
        self.attempt = self.attempt.saturating_add(1);
        self.state = State::Disconnected { retry_at: now.plus(jittered) };
        self.in_flight_since = None;
    }

    /// The next time `poll_transmit` may have something to do.
    pub fn poll_at(&self) -> Option<Millis> {
        match self.state {
            State::Disconnected { retry_at } => Some(retry_at),
            State::Connecting { sent_at: None } => Some(Millis(0)),
            State::Connecting { sent_at: Some(t) } => Some(t.plus(self.keep_alive_ms().max(10_000))),
            State::Connected => {
                let mut t = self
                    .ping_sent
                    .map_or(self.last_sent.plus(self.keep_alive_ms()), |p| p.plus(self.keep_alive_ms()));
                if let Some(s) = self.in_flight_since {
                    t = t.min(s.plus(self.cfg.ack_timeout_ms));
                }
                Some(t)
            }
        }
    }

    fn keep_alive_ms(&self) -> u64 {
        if self.cfg.keep_alive_secs == 0 {
            u64::MAX / 4
        } else {
            u64::from(self.cfg.keep_alive_secs) * 1000
        }
    }

    fn take_pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
        self.next_pkid
    }

    /// Writes the next packet to send into `out` and returns its length, or `None` if there is
    /// nothing to send now. Call until it returns `None`.
    pub fn poll_transmit(&mut self, now: Millis, out: &mut [u8]) -> Result<Option<usize>, SessionError> {
        let n = match self.state {
            State::Disconnected { .. } => return Ok(None),
            State::Connecting { sent_at: None } => {
                self.state = State::Connecting { sent_at: Some(now) };
                self.encode_connect(out)?
            }
            State::Connecting { sent_at: Some(t) } => {
                if now >= t.plus(self.keep_alive_ms().max(10_000)) {
                    return Err(SessionError::ConnectTimeout);
                }
                return Ok(None);
            }
            State::Connected => match self.next_connected_packet(now, out)? {
                Some(n) => n,
                None => return Ok(None),
            },
        };
        self.last_sent = now;
        Ok(Some(n))
    }

    fn encode_connect(&self, out: &mut [u8]) -> Result<usize, SessionError> {
        let (client_id, keep_alive, clean) =
            (self.device_id, self.cfg.keep_alive_secs, self.cfg.clean_session);
        #[cfg(feature = "mqtt5")]
        if let Some(v5) = self.cfg.mqtt5 {
            // A clean session ends with its connection (expiry 0); a kept one lasts as asked.
            let expiry = if clean { 0 } else { v5.session_expiry_secs };
            return super::v5::encode_connect(client_id, keep_alive, clean, expiry, v5.receive_max, out)
                .map_err(SessionError::Encode);
        }
        Packet::Connect { client_id, keep_alive, clean_session: clean }
            .encode(out)
            .map_err(SessionError::Encode)
    }

    fn next_connected_packet(&mut self, now: Millis, out: &mut [u8]) -> Result<Option<usize>, SessionError> {
        if let Some(pkid) = self.pending_puback.take() {
            return Packet::PubAck { pkid }.encode(out).map(Some).map_err(SessionError::Encode);
        }
        if !self.subscribed && self.subscribe_pending.is_none() {
            let pkid = self.take_pkid();
            self.subscribe_pending = Some(pkid);
            // Commands (devices only) and the issuer's answers, by name: `certs/+` would echo
            // the device's own CSRs back to it.
            // With `ota`, also the broker's chunks, by name: `ota/+` would echo the device's
            // own requests.
            let mut f: [String<160>; FILTERS] = Default::default();
            let tails: [&[&str]; FILTERS] = [
                &[level::COMMANDS, "#"],
                &[level::CERTS, level::ISSUED],
                &[level::CERTS, level::REJECTED],
                &[level::CERTS, level::ROTATE],
                #[cfg(feature = "_ota")]
                &[level::OTA, level::CHUNK],
            ];
            for i in 0..f.len() {
                // One copy of the writer for every buffer size: through the string's view.
                self.root()
                    .with(tails[i])
                    .write_to(f[i].as_mut_view())
                    .map_err(|_| SessionError::TooLarge)?;
            }
            let all = [
                (f[0].as_str(), QoS::AtLeastOnce),
                (f[1].as_str(), QoS::AtLeastOnce),
                (f[2].as_str(), QoS::AtLeastOnce),
                (f[3].as_str(), QoS::AtLeastOnce),
                #[cfg(feature = "_ota")]
                (f[4].as_str(), QoS::AtMostOnce),
            ];
            // A claim session has no commands and no operator requests.
            let filters = SubscribeFilters::List(if self.claim { &all[1..3] } else { &all[..] });
            #[cfg(feature = "mqtt5")]
            if self.cfg.mqtt5.is_some() {
                return super::v5::encode_subscribe(pkid, filters, out)
                    .map(Some)
                    .map_err(SessionError::Encode);
            }
            return Packet::Subscribe { pkid, filters }.encode(out).map(Some).map_err(SessionError::Encode);
        }
        if let Some(p) = self.ping_sent {
            if now >= p.plus(self.keep_alive_ms()) {
                return Err(SessionError::KeepAliveTimeout);
            }
        }
        // The head of the outbox: send it if nothing is in flight, or retransmit on timeout.
        let retransmit = self.in_flight_since.is_some_and(|t| now >= t.plus(self.cfg.ack_timeout_ms));
        if self.in_flight_since.is_none() || retransmit {
            let fresh_pkid =
                if self.outbox.front().is_some_and(|m| m.qos == QoS::AtLeastOnce && m.pkid.is_none()) {
                    Some(self.take_pkid())
                } else {
                    None
                };
            let root = self.root();
            #[cfg(feature = "mqtt5")]
            let alias = self.cfg.mqtt5.map(|_| &mut self.alias_set);
            #[cfg(not(feature = "mqtt5"))]
            let alias = None;
            if let Some(msg) = self.outbox.front_mut() {
                if let Some(id) = fresh_pkid {
                    msg.pkid = Some(id);
                }
                let mut topic: String<192> = String::new();
                let _ = root.with(&[msg.suffix.as_str()]).write_to(topic.as_mut_view());
                let dup = msg.qos == QoS::AtLeastOnce && fresh_pkid.is_none();
                let p = Publish {
                    topic: &topic,
                    payload: &msg.payload,
                    qos: msg.qos,
                    retain: false,
                    dup,
                    pkid: msg.pkid,
                };
                let telemetry = msg.suffix.as_str() == fleet_topic::suffix::TELEMETRY;
                let qos = msg.qos;
                let n = encode_publish(&p, alias, telemetry, out)?;
                if qos == QoS::AtMostOnce {
                    let _ = self.outbox.pop_front();
                } else {
                    self.in_flight_since = Some(now);
                }
                return Ok(Some(n));
            }
        }
        if self.ping_sent.is_none() && now >= self.last_sent.plus(self.keep_alive_ms()) {
            self.ping_sent = Some(now);
            return Packet::PingReq.encode(out).map(Some).map_err(SessionError::Encode);
        }
        Ok(None)
    }

    /// The start of a packet too large for the caller's input buffer (`head` is that full
    /// buffer). A PUBLISH is acknowledged per its QoS and returned so the caller can report it and
    /// discard its `total` bytes as they arrive; anything else that large is a protocol error
    /// (the broker caps what it sends far below any inbox that holds a CONNACK).
    pub fn skip_oversized<'b>(&mut self, head: &'b [u8]) -> Result<PublishHead<'b>, SessionError> {
        let p = decode_publish_head(head).map_err(SessionError::Protocol)?;
        if p.qos == QoS::ExactlyOnce {
            // The session subscribes at QoS 1: a QoS 2 delivery is the broker's error.
            return Err(SessionError::Protocol(DecodeError::Malformed("QoS 2 delivery")));
        }
        if let Some(id) = p.pkid {
            self.pending_puback = Some(id);
        }
        Ok(p)
    }

    /// The command name of a topic addressed to this device, if it is one.
    pub fn command_name<'t>(&self, topic: &'t str) -> Option<&'t str> {
        if self.claim {
            return None;
        }
        self.root().command_name(topic)
    }

    /// The rotation message kind of a topic addressed to this session (`<root>/certs/<kind>`).
    #[inline(never)] // one copy for every caller: the smallest image
    pub fn certs_kind<'t>(&self, topic: &'t str) -> Option<&'t str> {
        self.root().certs_kind(topic)
    }

    /// Consumes one packet from `input`. Returns the bytes used (0: need more input) and any
    /// event. Call again with the rest until it uses 0 bytes.
    pub fn handle<'b>(
        &mut self,
        now: Millis,
        input: &'b [u8],
    ) -> Result<(usize, Option<Event<'b>>), SessionError> {
        #[cfg(feature = "mqtt5")]
        let decoded = match self.cfg.mqtt5 {
            Some(_) => super::v5::decode(input, usize::MAX),
            None => decode(input, usize::MAX),
        };
        #[cfg(not(feature = "mqtt5"))]
        let decoded = decode(input, usize::MAX);
        let (packet, used) = match decoded {
            Ok(x) => x,
            Err(DecodeError::Incomplete { .. }) => return Ok((0, None)),
            Err(e) => return Err(SessionError::Protocol(e)),
        };
        let _ = now;
        let event = match packet {
            Packet::ConnAck { code: 0, session_present } => {
                self.state = State::Connected;
                self.attempt = 0;
                #[cfg(feature = "mqtt5")]
                {
                    self.moved_failures = 0;
                }
                // A kept session keeps its subscriptions (MQTT 3.1.1 §3.2.2.2): no SUBSCRIBE,
                // the broker goes on with the commands at once. Only on a session we asked for.
                self.session_present = session_present && !self.cfg.clean_session;
                if self.session_present {
                    self.subscribed = true;
                }
                Some(Event::Connected)
            }
            Packet::ConnAck { code, .. } => {
                #[cfg(feature = "mqtt5")]
                {
                    self.hold_off = super::v5::Retry::after(code) == super::v5::Retry::MuchLater;
                }
                return Err(SessionError::Refused(code));
            }
            #[cfg(feature = "mqtt5")]
            Packet::ServerDisconnect { reason } => {
                self.hold_off = super::v5::Retry::after(reason) == super::v5::Retry::MuchLater;
                return Err(SessionError::Disconnected(reason));
            }
            #[cfg(feature = "mqtt5")]
            Packet::Moved { code, reference } => {
                // Followed at once (the broker asked for it), unless it cannot be kept.
                self.moved_to.clear();
                if self.moved_to.push_str(reference).is_err() {
                    self.moved_to.clear();
                }
                // The transport_down that follows counts as the first attempt's start, not a failure.
                self.moved_failures = 0;
                self.attempt = 0;
                return Err(SessionError::Moved(code));
            }
            #[cfg(feature = "mqtt5")]
            Packet::PubRefused { pkid, reason } => {
                // Refused for good: retrying the same message changes nothing.
                let head = self.outbox.front().and_then(|m| m.pkid);
                if head == Some(pkid) && self.in_flight_since.is_some() {
                    let _ = self.outbox.pop_front();
                    self.in_flight_since = None;
                    Some(Event::Refused { pkid, reason })
                } else {
                    None
                }
            }
            Packet::PubAck { pkid } => {
                let head = self.outbox.front().and_then(|m| m.pkid);
                if head == Some(pkid) && self.in_flight_since.is_some() {
                    let _ = self.outbox.pop_front();
                    self.in_flight_since = None;
                    Some(Event::Delivered { pkid })
                } else {
                    None // a late duplicate
                }
            }
            Packet::SubAck { pkid, codes } if Some(pkid) == self.subscribe_pending => {
                self.subscribe_pending = None;
                if codes.iter().any(|&c| c >= 0x80) {
                    return Err(SessionError::SubscriptionRefused);
                }
                self.subscribed = true;
                Some(Event::Subscribed)
            }
            Packet::PingResp => {
                self.ping_sent = None;
                None
            }
            Packet::Publish(p) => {
                if let Some(id) = p.pkid {
                    self.pending_puback = Some(id);
                }
                match self.command_name(p.topic) {
                    Some(name) => match p.pkid {
                        // The broker's queue re-sends an unacknowledged command with DUP and the
                        // same packet id, also in a later session: the application saw it.
                        Some(id) if p.dup && id != 0 && self.seen.contains(&id) => None,
                        Some(id) => {
                            if !self.seen.contains(&id) {
                                self.seen[self.seen_at] = id;
                                self.seen_at = (self.seen_at + 1) % SEEN;
                            }
                            Some(Event::Command { name, payload: p.payload })
                        }
                        None => Some(Event::Command { name, payload: p.payload }),
                    },
                    #[cfg(feature = "_ota")]
                    None if !self.claim && self.root().is_ota_chunk(p.topic) => {
                        Some(Event::OtaChunk { payload: p.payload })
                    }
                    None => self.certs_kind(p.topic).map(|kind| Event::Certs { kind, payload: p.payload }),
                }
            }
            _ => None,
        };
        Ok((used, event))
    }
}

impl core::fmt::Display for SessionError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Refused(code) => {
                let why = match code {
                    1 => "unacceptable protocol version",
                    2 => "client id refused",
                    3 => "broker unavailable",
                    4 => "bad user name or password",
                    5 => "not authorized",
                    _ => "unknown return code",
                };
                write!(f, "the broker refused the connection: {why} (CONNACK {code})")
            }
            Self::Protocol(e) => write!(f, "the broker sent invalid MQTT: {e}"),
            Self::SubscriptionRefused => f.write_str("the broker refused the command subscription"),
            Self::KeepAliveTimeout => f.write_str("the broker did not answer a keep-alive ping"),
            Self::ConnectTimeout => f.write_str("the broker did not answer CONNECT in time"),
            Self::OutboxFull => f.write_str("the outbox is full"),
            Self::TooLarge => f.write_str("the topic or payload is too large"),
            Self::Encode(e) => write!(f, "{e}"),
            Self::NotConnected => f.write_str("not connected"),
            #[cfg(feature = "mqtt5")]
            Self::Disconnected(reason) => {
                write!(f, "the broker ended the session (DISCONNECT reason 0x{reason:02x})")
            }
            #[cfg(feature = "mqtt5")]
            Self::Moved(code) => {
                write!(f, "the broker sent the device to another server (reason 0x{code:02x})")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type S = Session<'static, 4, 64>;

    fn tx(s: &mut S, now: u64) -> std::vec::Vec<std::vec::Vec<u8>> {
        let mut out = std::vec::Vec::new();
        let mut buf = [0u8; 256];
        while let Some(n) = s.poll_transmit(Millis(now), &mut buf).expect("transmit") {
            out.push(buf[..n].to_vec());
        }
        out
    }

    fn kinds(packets: &[std::vec::Vec<u8>]) -> std::vec::Vec<u8> {
        packets.iter().map(|p| p[0] >> 4).collect()
    }

    fn feed<'b>(s: &mut S, bytes: &'b [u8]) -> Option<Event<'b>> {
        let (used, ev) = s.handle(Millis(0), bytes).expect("handle");
        assert_eq!(used, bytes.len());
        ev
    }

    fn connected() -> S {
        let mut s = S::new("dev-1", SessionConfig { keep_alive_secs: 10, ..SessionConfig::default() });
        s.transport_up(Millis(0));
        assert_eq!(kinds(&tx(&mut s, 0)), vec![1]); // CONNECT
        assert_eq!(feed(&mut s, &[0x20, 2, 0, 0]), Some(Event::Connected));
        let out = tx(&mut s, 1);
        assert_eq!(kinds(&out), vec![8]); // SUBSCRIBE devices/dev-1/commands/#
        let [hi, lo] = sub_pkid(&out[0]);
        assert_eq!(feed(&mut s, &[0x90, 3, hi, lo, 1]), Some(Event::Subscribed));
        s
    }

    /// The packet id of a SUBSCRIBE: after the fixed header, whose remaining length takes one
    /// byte per 7 bits (two with the `ota` chunk filter).
    fn sub_pkid(p: &[u8]) -> [u8; 2] {
        let len_bytes = p[1..].iter().position(|b| b & 0x80 == 0).expect("length") + 1;
        [p[1 + len_bytes], p[2 + len_bytes]]
    }

    #[test]
    fn connect_subscribe_publish_ack() {
        let mut s = connected();
        s.publish("telemetry", b"t=1", QoS::AtLeastOnce).unwrap();
        s.publish("telemetry", b"t=2", QoS::AtLeastOnce).unwrap();
        let out = tx(&mut s, 2);
        assert_eq!(kinds(&out), vec![3], "one QoS 1 message in flight at a time");
        let Ok((Packet::Publish(p), _)) = decode(&out[0], 1024) else { panic!("not a PUBLISH") };
        assert_eq!((p.topic, p.payload, p.dup), ("devices/dev-1/telemetry", &b"t=1"[..], false));
        let pkid = p.pkid.expect("QoS 1 has a packet id");
        let [hi, lo] = pkid.to_be_bytes();
        assert_eq!(feed(&mut s, &[0x40, 2, hi, lo]), Some(Event::Delivered { pkid }));
        let out = tx(&mut s, 3);
        assert!(out[0].ends_with(b"t=2"));
        assert_eq!(s.queued(), 1);
    }

    #[test]
    fn unacknowledged_qos1_is_retransmitted_with_dup() {
        let mut s = connected();
        s.publish("telemetry", b"x", QoS::AtLeastOnce).unwrap();
        let first = tx(&mut s, 10);
        assert_eq!(first[0][0], 0x32);
        assert!(tx(&mut s, 10 + 4_999).is_empty());
        let again = tx(&mut s, 10 + 5_000);
        assert_eq!(again[0][0], 0x3a, "DUP set on retransmission");
        assert_eq!(&again[0][1..], &first[0][1..], "same packet id and payload");
    }

    #[test]
    fn outbox_survives_disconnect_and_drains_after_reconnect() {
        let mut s = connected();
        s.publish("telemetry", b"a", QoS::AtLeastOnce).unwrap();
        let sent = tx(&mut s, 5);
        assert_eq!(sent.len(), 1);
        s.transport_down(Millis(6), 0);
        s.publish("telemetry", b"b", QoS::AtLeastOnce).unwrap();
        assert!(tx(&mut s, 7).is_empty(), "nothing is sent while disconnected");
        assert_eq!(s.queued(), 2);
        let retry = s.reconnect_at().unwrap();
        s.transport_up(retry);
        assert_eq!(kinds(&tx(&mut s, retry.0)), vec![1]);
        feed(&mut s, &[0x20, 2, 0, 0]);
        let out = tx(&mut s, retry.0 + 1);
        // SUBSCRIBE again (clean session), then "a" again with DUP.
        assert_eq!(kinds(&out), vec![8, 3]);
        assert_eq!(out[1][0], 0x3a);
        assert!(out[1].ends_with(b"a"));
    }

    #[test]
    fn a_resumed_persistent_session_does_not_subscribe_again() {
        let cfg = SessionConfig { clean_session: false, ..SessionConfig::default() };
        let mut s = S::new("dev-1", cfg);
        s.transport_up(Millis(0));
        let out = tx(&mut s, 0);
        let Ok((Packet::Connect { clean_session, .. }, _)) = decode(&out[0], 1024) else {
            panic!("no CONNECT")
        };
        assert!(!clean_session);
        // No session kept: subscribe as usual.
        feed(&mut s, &[0x20, 2, 0, 0]);
        assert!(!s.session_present());
        assert_eq!(kinds(&tx(&mut s, 1)), vec![8]);
        // Kept: the subscriptions are in force, nothing to send.
        s.transport_down(Millis(2), 0);
        let retry = s.reconnect_at().unwrap();
        s.transport_up(retry);
        assert_eq!(kinds(&tx(&mut s, retry.0)), vec![1]);
        feed(&mut s, &[0x20, 2, 1, 0]);
        assert!(s.session_present());
        assert!(tx(&mut s, retry.0 + 1).is_empty());
        // A broker that claims a session for a clean-session client is not believed.
        let mut s = connected();
        s.transport_down(Millis(2), 0);
        let retry = s.reconnect_at().unwrap();
        s.transport_up(retry);
        let _ = tx(&mut s, retry.0);
        feed(&mut s, &[0x20, 2, 1, 0]);
        assert!(!s.session_present());
        assert_eq!(kinds(&tx(&mut s, retry.0 + 1)), vec![8]);
    }

    #[test]
    fn overflow_policies() {
        let mut s =
            S::new("dev-1", SessionConfig { overflow: Overflow::RejectNew, ..SessionConfig::default() });
        for i in 0..4u8 {
            s.publish("t", &[i], QoS::AtLeastOnce).unwrap();
        }
        assert_eq!(s.publish("t", &[9], QoS::AtLeastOnce), Err(SessionError::OutboxFull));
        let mut s = S::new("dev-1", SessionConfig::default());
        for i in 0..6u8 {
            s.publish("t", &[i], QoS::AtLeastOnce).unwrap();
        }
        assert_eq!((s.queued(), s.dropped()), (4, 2));
        assert!(matches!(s.publish("t", &[0; 65], QoS::AtMostOnce), Err(SessionError::TooLarge)));
    }

    #[test]
    fn keepalive_ping_and_timeout() {
        let mut s = connected();
        assert!(tx(&mut s, 5_000).is_empty());
        assert_eq!(kinds(&tx(&mut s, 10_001)), vec![12], "PINGREQ after keep-alive of silence");
        feed(&mut s, &[0xd0, 0]);
        assert_eq!(kinds(&tx(&mut s, 20_002)), vec![12]);
        let mut buf = [0u8; 16];
        assert_eq!(s.poll_transmit(Millis(30_003), &mut buf), Err(SessionError::KeepAliveTimeout));
    }

    #[test]
    fn commands_are_events_and_qos1_commands_are_acked() {
        let mut s = connected();
        let mut buf = [0u8; 64];
        let p = Publish {
            topic: "devices/dev-1/commands/reboot",
            payload: b"now",
            qos: QoS::AtLeastOnce,
            retain: false,
            dup: false,
            pkid: Some(5),
        };
        let n = Packet::Publish(p).encode(&mut buf).unwrap();
        let bytes = buf[..n].to_vec();
        assert_eq!(feed(&mut s, &bytes), Some(Event::Command { name: "reboot", payload: b"now" }));
        assert_eq!(tx(&mut s, 2), vec![vec![0x40, 2, 0, 5]]);
    }

    #[cfg(feature = "_ota")]
    #[test]
    fn ota_chunks_are_subscribed_by_name_and_are_events() {
        let mut s = S::new("dev-1", SessionConfig::default());
        s.transport_up(Millis(0));
        tx(&mut s, 0);
        feed(&mut s, &[0x20, 2, 0, 0]);
        let sub = names(&tx(&mut s, 1)[0]);
        assert!(sub.contains("devices/dev-1/ota/chunk"), "{sub:?}");
        assert!(!sub.contains("ota/+") && !sub.contains("ota/#"), "its own requests would echo");
        let mut buf = [0u8; 128];
        let mut publish = |topic: &'static str| {
            let p = Publish {
                topic,
                payload: b"chunk",
                qos: QoS::AtMostOnce,
                retain: false,
                dup: false,
                pkid: None,
            };
            let n = Packet::Publish(p).encode(&mut buf).unwrap();
            buf[..n].to_vec()
        };
        assert_eq!(
            feed(&mut s, &publish("devices/dev-1/ota/chunk")),
            Some(Event::OtaChunk { payload: b"chunk" })
        );
        assert_eq!(feed(&mut s, &publish("devices/dev-2/ota/chunk")), None);
        assert_eq!(feed(&mut s, &publish("devices/dev-1/ota/get")), None);
    }

    /// The topics a packet names (SUBSCRIBE filters or a PUBLISH topic), as text.
    fn names(packet: &[u8]) -> std::string::String {
        std::string::String::from_utf8_lossy(packet).into_owned()
    }

    #[test]
    fn rotation_answers_are_events_and_a_claim_session_lives_under_its_client_id() {
        // A device subscribes to its commands and the issuer's answers, by name (no echo of its
        // own CSRs), and gets `certs/<kind>` as events.
        let mut s = S::new("dev-1", SessionConfig::default());
        s.transport_up(Millis(0));
        tx(&mut s, 0);
        feed(&mut s, &[0x20, 2, 0, 0]);
        let sub = names(&tx(&mut s, 1)[0]);
        for f in [
            "devices/dev-1/commands/#",
            "devices/dev-1/certs/issued",
            "devices/dev-1/certs/rejected",
            "devices/dev-1/certs/rotate",
        ] {
            assert!(sub.contains(f), "{f} not subscribed: {sub:?}");
        }
        assert!(!sub.contains("certs/+") && !sub.contains("certs/#"));
        let mut buf = [0u8; 128];
        let p = Publish {
            topic: "devices/dev-1/certs/issued",
            payload: b"\x30\x00",
            qos: QoS::AtLeastOnce,
            retain: false,
            dup: false,
            pkid: Some(9),
        };
        let n = Packet::Publish(p).encode(&mut buf).unwrap();
        let bytes = buf[..n].to_vec();
        assert_eq!(feed(&mut s, &bytes), Some(Event::Certs { kind: "issued", payload: b"\x30\x00" }));
        let p = Publish {
            topic: "devices/dev-2/certs/issued",
            payload: b"x",
            qos: QoS::AtMostOnce,
            retain: false,
            dup: false,
            pkid: None,
        };
        let n = Packet::Publish(p).encode(&mut buf).unwrap();
        let bytes = buf[..n].to_vec();
        assert_eq!(feed(&mut s, &bytes), None, "another device's answer");

        // A claim session: client id = topic root; only the answers; no commands.
        let mut c = S::new_claim("claims/batch-1/0123456789abcdef", SessionConfig::default());
        assert_eq!(
            c.encode_now("certs/csr", b"r", QoS::AtLeastOnce, &mut buf),
            Err(SessionError::NotConnected)
        );
        c.transport_up(Millis(0));
        let connect = names(&tx(&mut c, 0)[0]);
        assert!(connect.contains("claims/batch-1/0123456789abcdef"), "{connect:?}");
        feed(&mut c, &[0x20, 2, 0, 0]);
        let sub = names(&tx(&mut c, 1)[0]);
        assert!(
            sub.contains("claims/batch-1/0123456789abcdef/certs/issued") && sub.contains("/certs/rejected")
        );
        assert!(!sub.contains("commands") && !sub.contains("rotate") && !sub.contains("devices/"), "{sub:?}");
        let n = c.encode_now("certs/csr", b"r", QoS::AtLeastOnce, &mut buf).unwrap();
        assert!(names(&buf[..n]).contains("claims/batch-1/0123456789abcdef/certs/csr"));
        let p = Publish {
            topic: "claims/batch-1/0123456789abcdef/certs/rejected",
            payload: b"no",
            qos: QoS::AtMostOnce,
            retain: false,
            dup: false,
            pkid: None,
        };
        let n = Packet::Publish(p).encode(&mut buf).unwrap();
        let bytes = buf[..n].to_vec();
        assert_eq!(feed(&mut c, &bytes), Some(Event::Certs { kind: "rejected", payload: b"no" }));
        assert_eq!(c.command_name("claims/batch-1/0123456789abcdef/commands/x"), None);
    }

    #[test]
    fn a_retransmitted_command_is_acknowledged_again_but_reported_once_across_sessions() {
        let mut s = connected();
        let mut buf = [0u8; 64];
        let mut cmd = |dup: bool, pkid: u16| {
            let p = Publish {
                topic: "devices/dev-1/commands/reboot",
                payload: b"now",
                qos: QoS::AtLeastOnce,
                retain: false,
                dup,
                pkid: Some(pkid),
            };
            let n = Packet::Publish(p).encode(&mut buf).unwrap();
            buf[..n].to_vec()
        };
        let (first, again, other) = (cmd(false, 40_000), cmd(true, 40_000), cmd(true, 40_001));
        assert_eq!(feed(&mut s, &first), Some(Event::Command { name: "reboot", payload: b"now" }));
        assert_eq!(tx(&mut s, 2), vec![vec![0x40, 2, 0x9c, 0x40]]);
        // The PUBACK was lost; a new session gets it again with DUP.
        s.transport_down(Millis(3), 0);
        s.transport_up(Millis(4));
        tx(&mut s, 4);
        feed(&mut s, &[0x20, 2, 0, 0]);
        tx(&mut s, 5);
        assert_eq!(feed(&mut s, &again), None, "reported twice");
        assert_eq!(tx(&mut s, 6), vec![vec![0x40, 2, 0x9c, 0x40]], "acknowledged again");
        // A DUP of a command never seen (its first delivery was lost) is reported.
        assert_eq!(feed(&mut s, &other), Some(Event::Command { name: "reboot", payload: b"now" }));
    }

    #[test]
    fn refusal_and_backoff() {
        let mut s = S::new("dev-1", SessionConfig::default());
        s.transport_up(Millis(0));
        tx(&mut s, 0);
        assert_eq!(s.handle(Millis(0), &[0x20, 2, 0, 5]), Err(SessionError::Refused(5)));
        let mut last = 0;
        for (i, random) in [0u32, u32::MAX, 7, 0, 0, 0, 0, 0, 0, 0, 0].into_iter().enumerate() {
            s.transport_down(Millis(0), random);
            let d = s.reconnect_at().unwrap().0;
            let cap = (500u64 << i).min(60_000);
            assert!(d >= cap / 2 && d <= cap, "attempt {i}: {d} outside [{}, {cap}]", cap / 2);
            last = d;
        }
        assert!(last <= 60_000);
        // Incomplete input is not an error.
        assert_eq!(s.handle(Millis(0), &[0x20]), Ok((0, None)));
        assert!(matches!(s.handle(Millis(0), &[0xf0, 0]), Err(SessionError::Protocol(_))));
    }

    /// An MQTT 5 session of `dev-1` (longest back-off 60 s) whose transport is up.
    #[cfg(feature = "mqtt5")]
    fn v5_session() -> S {
        let cfg = SessionConfig {
            mqtt5: Some(Mqtt5::default()),
            backoff_max_ms: 60_000,
            ..SessionConfig::default()
        };
        let mut s = S::new("dev-1", cfg);
        s.transport_up(Millis(0));
        s
    }

    /// MQTT 5: telemetry sets its alias on the first PUBLISH of a connection and uses it after;
    /// a new connection sets it again; the broker's DISCONNECT 0x98 makes the next wait the
    /// longest.
    #[cfg(feature = "mqtt5")]
    #[test]
    fn a_v5_session_aliases_telemetry_per_connection_and_holds_off_after_a_revocation() {
        use rumqttc::v5::mqttbytes::v5 as m5;
        let topic_of = |bytes: &[u8]| {
            let mut b = bytes::BytesMut::from(bytes);
            match m5::Packet::read(&mut b, None).expect("v5 packet") {
                m5::Packet::Publish(p) => (p.topic.to_vec(), p.properties.and_then(|p| p.topic_alias)),
                other => panic!("{other:?}"),
            }
        };
        let mut s = v5_session();
        let connect = tx(&mut s, 0);
        assert_eq!(connect[0][8], 5, "protocol level 5");
        assert_eq!(feed(&mut s, &[0x20, 3, 0, 0, 0]), Some(Event::Connected));
        let sub = tx(&mut s, 1);
        let [hi, lo] = sub_pkid(&sub[0]);
        assert_eq!(feed(&mut s, &[0x90, 4, hi, lo, 0, 1]), Some(Event::Subscribed));
        s.publish("telemetry", b"1", QoS::AtLeastOnce).unwrap();
        let first = tx(&mut s, 2);
        assert_eq!(topic_of(&first[0]), (b"devices/dev-1/telemetry".to_vec(), Some(1)));
        let pkid = u16::from_be_bytes([first[0][27], first[0][28]]); // after "devices/dev-1/telemetry"
        let [hi, lo] = pkid.to_be_bytes();
        assert_eq!(feed(&mut s, &[0x40, 2, hi, lo]), Some(Event::Delivered { pkid }));
        s.publish("telemetry", b"2", QoS::AtLeastOnce).unwrap();
        assert_eq!(topic_of(&tx(&mut s, 3)[0]), (std::vec::Vec::new(), Some(1)), "the alias alone");
        // The broker cuts it: revoked. The next attempt waits the longest back-off.
        let err = s.handle(Millis(4), &[0xe0, 1, 0x98]).unwrap_err();
        assert_eq!(err, SessionError::Disconnected(0x98));
        s.transport_down(Millis(5), 0);
        assert!(s.reconnect_at().is_some_and(|t| t.0 >= 5 + 30_000));
        // A new connection sets the alias again (the retransmission carries the topic).
        s.transport_up(Millis(40_000));
        tx(&mut s, 40_000);
        feed(&mut s, &[0x20, 3, 0, 0, 0]);
        let again = tx(&mut s, 40_001);
        let publish = again.iter().find(|p| p[0] >> 4 == 3).expect("the retransmission");
        assert_eq!(topic_of(publish), (b"devices/dev-1/telemetry".to_vec(), Some(1)));
    }

    /// MQTT 5: a broker that sends the device elsewhere (CONNACK 0x9D with a Server Reference)
    /// is followed at once; an admission there keeps it; three failed attempts there go back to
    /// the bundle's broker.
    #[cfg(feature = "mqtt5")]
    #[test]
    fn a_v5_session_follows_a_server_reference_and_gives_it_up_when_it_leads_nowhere() {
        let mut s = v5_session();
        tx(&mut s, 0);
        // CONNACK 0x9D, properties: Server Reference "b:1884".
        let moved = [0x20, 12, 0, 0x9D, 9, 0x1C, 0, 6, b'b', b':', b'1', b'8', b'8', b'4'];
        assert_eq!(s.handle(Millis(1), &moved).unwrap_err(), SessionError::Moved(0x9D));
        assert_eq!(s.server_reference(), Some("b:1884"));
        s.transport_down(Millis(2), 0);
        assert!(s.reconnect_at().is_some_and(|t| t.0 <= 2 + 1_000), "followed at once");
        // Admitted there: it stays, whatever happens later to this connection.
        s.transport_up(Millis(3));
        tx(&mut s, 3);
        assert_eq!(feed(&mut s, &[0x20, 3, 0, 0, 0]), Some(Event::Connected));
        s.transport_down(Millis(4), 0);
        assert_eq!(s.server_reference(), Some("b:1884"));
        // It leads nowhere now: after three failed attempts, back to the bundle's broker.
        for t in 5..7 {
            s.transport_down(Millis(t), 0);
            assert_eq!(s.server_reference(), Some("b:1884"), "attempt {t}");
        }
        s.transport_down(Millis(8), 0);
        assert_eq!(s.server_reference(), None);
        // A reference longer than the session keeps is a refusal like any other.
        // Remaining length 207 and property length 203, each a two-byte variable integer.
        let mut long = std::vec![0x20, 0xCF, 0x01, 0, 0x9D, 0xCB, 0x01, 0x1C, 0, 200];
        long.extend(core::iter::repeat_n(b'h', 200));
        s.transport_up(Millis(9));
        tx(&mut s, 9);
        assert_eq!(s.handle(Millis(10), &long[..]).unwrap_err(), SessionError::Moved(0x9D));
        assert_eq!(s.server_reference(), None);
    }
}
