//! MQTT 3.1.1 packet codec (OASIS mqtt-v3.1.1, §2–§3), no allocation.
//!
//! `decode` returns the packet and how many bytes it used, or `Incomplete` (read more and call
//! again) apart from `Malformed` (close the connection). Decoded packets borrow from the input.
//! `Packet::encode` writes into a caller buffer and never panics: a short buffer is an error.
//!
//! Invariants enforced on decode: valid fixed-header flags per type, remaining length of at most
//! four bytes, strings in valid UTF-8 without NUL, QoS ≤ 2, non-zero packet identifiers where the
//! spec requires them, and no bytes beyond the remaining length.

use core::fmt;

/// Quality of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum QoS {
    /// At most once.
    AtMostOnce = 0,
    /// At least once.
    AtLeastOnce = 1,
    /// Exactly once (decoded, never produced by this client).
    ExactlyOnce = 2,
}

impl QoS {
    fn from_bits(b: u8) -> Result<Self, DecodeError> {
        match b {
            0 => Ok(QoS::AtMostOnce),
            1 => Ok(QoS::AtLeastOnce),
            2 => Ok(QoS::ExactlyOnce),
            _ => Err(DecodeError::Malformed("QoS 3")),
        }
    }
}

/// A PUBLISH packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish<'a> {
    /// Topic name (no wildcards).
    pub topic: &'a str,
    /// Payload.
    pub payload: &'a [u8],
    /// QoS.
    pub qos: QoS,
    /// Retain flag.
    pub retain: bool,
    /// Duplicate-delivery flag.
    pub dup: bool,
    /// Packet identifier: `Some` exactly when QoS > 0.
    pub pkid: Option<u16>,
}

/// The topic filters of a SUBSCRIBE, validated at decode, iterated without allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Filters<'a> {
    raw: &'a [u8],
}

impl<'a> Iterator for Filters<'a> {
    type Item = (&'a str, QoS);
    fn next(&mut self) -> Option<Self::Item> {
        // Validated at decode time, so these reads cannot fail; stop quietly if they did.
        let (topic, used) = read_str(self.raw, 0).ok()?;
        let qos = QoS::from_bits(*self.raw.get(used)?).ok()?;
        self.raw = self.raw.get(used + 1..)?;
        Some((topic, qos))
    }
}

/// An MQTT 3.1.1 control packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Packet<'a> {
    /// CONNECT (clean session, no will, no credentials: identity comes from the certificate).
    Connect {
        /// Client identifier.
        client_id: &'a str,
        /// Keep-alive in seconds.
        keep_alive: u16,
        /// Clean-session flag.
        clean_session: bool,
    },
    /// CONNACK.
    ConnAck {
        /// Session-present flag.
        session_present: bool,
        /// Return code (0 accepted; 1–5 refused).
        code: u8,
    },
    /// PUBLISH.
    Publish(Publish<'a>),
    /// PUBACK.
    PubAck {
        /// Acknowledged packet id.
        pkid: u16,
    },
    /// SUBSCRIBE.
    Subscribe {
        /// Packet id.
        pkid: u16,
        /// Filters (encode from a slice; decode yields an iterator).
        filters: SubscribeFilters<'a>,
    },
    /// SUBACK.
    SubAck {
        /// Packet id.
        pkid: u16,
        /// One return code per filter: 0–2 granted QoS, 0x80 failure.
        codes: &'a [u8],
    },
    /// PINGREQ.
    PingReq,
    /// PINGRESP.
    PingResp,
    /// DISCONNECT.
    Disconnect,
    /// MQTT 5: a PUBACK whose reason code refuses the message (0x80 and above).
    #[cfg(feature = "mqtt5")]
    PubRefused {
        /// The refused message's packet id.
        pkid: u16,
        /// The reason code (0x87 not authorized, 0x97 quota exceeded, ...).
        reason: u8,
    },
    /// MQTT 5: the broker ends the session, saying why.
    #[cfg(feature = "mqtt5")]
    ServerDisconnect {
        /// The reason code (0x98 administrative action: revoked; 0x8E session taken over, ...).
        reason: u8,
    },
    /// MQTT 5: a CONNACK or DISCONNECT that sends the client to another server (0x9C "use
    /// another server", 0x9D "server moved") and names it (Server Reference).
    #[cfg(feature = "mqtt5")]
    Moved {
        /// The reason code, 0x9C or 0x9D.
        code: u8,
        /// The Server Reference, as the broker wrote it (`host:port` for fleet-broker).
        reference: &'a str,
    },
}

/// SUBSCRIBE filters: a slice to encode, or the decoded bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeFilters<'a> {
    /// Filters to encode.
    List(&'a [(&'a str, QoS)]),
    /// Decoded filters.
    Decoded(Filters<'a>),
}

impl<'a> SubscribeFilters<'a> {
    /// Iterates the filters whichever form they are in.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, QoS)> + 'a {
        let (list, decoded) = match *self {
            SubscribeFilters::List(l) => (Some(l.iter().copied()), None),
            SubscribeFilters::Decoded(d) => (None, Some(d)),
        };
        list.into_iter().flatten().chain(decoded.into_iter().flatten())
    }
}

/// Why bytes are not a packet (yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// More bytes are needed; `needed` is the total packet size when known (else a lower bound).
    Incomplete {
        /// Bytes needed in total.
        needed: usize,
    },
    /// Not MQTT 3.1.1: close the connection.
    Malformed(&'static str),
    /// The packet is larger than the caller accepts.
    TooLarge {
        /// Its size.
        size: usize,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Incomplete { needed } => write!(f, "incomplete packet: {needed} bytes needed"),
            Self::Malformed(why) => write!(f, "malformed MQTT packet: {why}"),
            Self::TooLarge { size } => write!(f, "MQTT packet of {size} bytes exceeds the limit"),
        }
    }
}

impl core::error::Error for DecodeError {}

/// Why a packet could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EncodeError {
    /// The output buffer is too small.
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
    },
    /// A field violates the protocol (empty topic, wildcard in a topic, QoS/pkid mismatch, ...).
    Invalid(&'static str),
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BufferTooSmall { needed } => write!(f, "buffer too small: {needed} bytes needed"),
            Self::Invalid(why) => write!(f, "cannot encode: {why}"),
        }
    }
}

impl core::error::Error for EncodeError {}

const MAX_REMAINING: usize = 268_435_455;

pub(super) fn read_u16(b: &[u8], at: usize) -> Result<u16, DecodeError> {
    match b.get(at..at + 2) {
        Some(&[hi, lo]) => Ok(u16::from_be_bytes([hi, lo])),
        _ => Err(DecodeError::Malformed("truncated field")),
    }
}

/// Reads a length-prefixed UTF-8 string at `at`; returns it and the offset after it.
pub(super) fn read_str(b: &[u8], at: usize) -> Result<(&str, usize), DecodeError> {
    let len = usize::from(read_u16(b, at)?);
    let bytes = b.get(at + 2..at + 2 + len).ok_or(DecodeError::Malformed("truncated string"))?;
    let s = core::str::from_utf8(bytes).map_err(|_| DecodeError::Malformed("invalid UTF-8"))?;
    if s.contains('\0') {
        return Err(DecodeError::Malformed("NUL in string"));
    }
    Ok((s, at + 2 + len))
}

/// Decodes the remaining-length varint at `b[1..]`: (value, header length).
pub(super) fn remaining_length(b: &[u8]) -> Result<(usize, usize), DecodeError> {
    let mut value = 0usize;
    for i in 0..4 {
        let Some(&byte) = b.get(1 + i) else {
            return Err(DecodeError::Incomplete { needed: 2 + i });
        };
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            // A multi-byte encoding must not end in a zero byte (it would not be minimal).
            if i > 0 && byte == 0 {
                return Err(DecodeError::Malformed("non-minimal remaining length"));
            }
            return Ok((value, 2 + i));
        }
    }
    Err(DecodeError::Malformed("remaining length longer than 4 bytes"))
}

/// The head of a PUBLISH too large to buffer whole: what a receiver needs to skip and
/// acknowledge it without holding its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishHead<'a> {
    /// The topic.
    pub topic: &'a str,
    /// Packet id (QoS 1 and 2).
    pub pkid: Option<u16>,
    /// QoS.
    pub qos: QoS,
    /// Payload bytes.
    pub payload_len: usize,
    /// Bytes of the whole packet (fixed header included).
    pub total: usize,
}

/// Decodes the fixed header, topic and packet id of a PUBLISH from `buf`, which may hold only
/// the start of the packet. `Incomplete` until those are in `buf`; `Malformed` if it is not a
/// PUBLISH.
pub fn decode_publish_head(buf: &[u8]) -> Result<PublishHead<'_>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Err(DecodeError::Incomplete { needed: 2 });
    };
    if first >> 4 != 3 {
        return Err(DecodeError::Malformed("not a PUBLISH"));
    }
    let (len, header) = remaining_length(buf)?;
    let qos = match (first >> 1) & 3 {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => return Err(DecodeError::Malformed("QoS 3")),
    };
    let topic_len =
        usize::from(read_u16(buf, header).map_err(|_| DecodeError::Incomplete { needed: header + 2 })?);
    let mut at = header + 2 + topic_len;
    let pkid_len = if qos == QoS::AtMostOnce { 0 } else { 2 };
    if 2 + topic_len + pkid_len > len {
        return Err(DecodeError::Malformed("PUBLISH shorter than its topic"));
    }
    if at + pkid_len > buf.len() {
        return Err(DecodeError::Incomplete { needed: at + pkid_len });
    }
    let (topic, _) = read_str(buf, header)?;
    let pkid = if qos == QoS::AtMostOnce { None } else { Some(read_u16(buf, at)?) };
    at += pkid_len;
    Ok(PublishHead { topic, pkid, qos, payload_len: header + len - at, total: header + len })
}

/// The packet at the start of `buf` (up to `max_size` bytes): its first byte, its body and its
/// whole length; `Incomplete` until all of it is there.
pub(super) fn frame(buf: &[u8], max_size: usize) -> Result<(u8, &[u8], usize), DecodeError> {
    let Some(&first) = buf.first() else {
        return Err(DecodeError::Incomplete { needed: 2 });
    };
    let (len, header) = remaining_length(buf)?;
    let total = header + len;
    if total > max_size {
        return Err(DecodeError::TooLarge { size: total });
    }
    if buf.len() < total {
        return Err(DecodeError::Incomplete { needed: total });
    }
    Ok((first, &buf[header..total], total))
}

/// Decodes one packet from the start of `buf`, accepting packets up to `max_size` bytes.
/// Returns the packet and the number of bytes it occupied.
pub fn decode(buf: &[u8], max_size: usize) -> Result<(Packet<'_>, usize), DecodeError> {
    let (first, body, total) = frame(buf, max_size)?;
    let flags = first & 0x0f;
    let fixed = |want: u8| if flags == want { Ok(()) } else { Err(DecodeError::Malformed("reserved flags")) };
    let empty = |p: Packet<'static>| {
        if body.is_empty() {
            Ok(p)
        } else {
            Err(DecodeError::Malformed("unexpected body"))
        }
    };
    let packet = match first >> 4 {
        1 => {
            fixed(0)?;
            decode_connect(body)?
        }
        2 => {
            fixed(0)?;
            if body.len() != 2 || body[0] & 0xfe != 0 {
                return Err(DecodeError::Malformed("CONNACK"));
            }
            Packet::ConnAck { session_present: body[0] & 1 == 1, code: body[1] }
        }
        3 => decode_publish(flags, body)?,
        4 => {
            fixed(0)?;
            if body.len() != 2 {
                return Err(DecodeError::Malformed("PUBACK length"));
            }
            Packet::PubAck { pkid: nonzero(read_u16(body, 0)?)? }
        }
        8 => {
            fixed(2)?;
            let pkid = nonzero(read_u16(body, 0)?)?;
            let raw = &body[2..];
            let mut at = 0;
            while at < raw.len() {
                let (filter, next) = read_str(raw, at)?;
                if filter.is_empty() {
                    return Err(DecodeError::Malformed("empty topic filter"));
                }
                let q = *raw.get(next).ok_or(DecodeError::Malformed("missing QoS"))?;
                if q & 0xfc != 0 {
                    return Err(DecodeError::Malformed("SUBSCRIBE options"));
                }
                QoS::from_bits(q)?;
                at = next + 1;
            }
            if raw.is_empty() {
                return Err(DecodeError::Malformed("SUBSCRIBE without filters"));
            }
            Packet::Subscribe { pkid, filters: SubscribeFilters::Decoded(Filters { raw }) }
        }
        9 => {
            fixed(0)?;
            let pkid = nonzero(read_u16(body, 0)?)?;
            let codes = &body[2..];
            if codes.is_empty() || codes.iter().any(|c| !matches!(c, 0 | 1 | 2 | 0x80)) {
                return Err(DecodeError::Malformed("SUBACK return codes"));
            }
            Packet::SubAck { pkid, codes }
        }
        12 => {
            fixed(0)?;
            empty(Packet::PingReq)?
        }
        13 => {
            fixed(0)?;
            empty(Packet::PingResp)?
        }
        14 => {
            fixed(0)?;
            empty(Packet::Disconnect)?
        }
        0 | 15 => return Err(DecodeError::Malformed("reserved packet type")),
        _ => return Err(DecodeError::Malformed("packet type not supported by this client")),
    };
    Ok((packet, total))
}

fn nonzero(pkid: u16) -> Result<u16, DecodeError> {
    if pkid == 0 {
        Err(DecodeError::Malformed("packet identifier 0"))
    } else {
        Ok(pkid)
    }
}

fn decode_connect(body: &[u8]) -> Result<Packet<'_>, DecodeError> {
    let (name, at) = read_str(body, 0)?;
    if name != "MQTT" || body.get(at) != Some(&4) {
        return Err(DecodeError::Malformed("not MQTT 3.1.1"));
    }
    let flags = *body.get(at + 1).ok_or(DecodeError::Malformed("CONNECT flags"))?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::Malformed("CONNECT reserved flag"));
    }
    if flags & 0xfc != 0 {
        return Err(DecodeError::Malformed("will/credentials are not used by fleetgate clients"));
    }
    let keep_alive = read_u16(body, at + 2)?;
    let (client_id, end) = read_str(body, at + 4)?;
    if end != body.len() {
        return Err(DecodeError::Malformed("trailing bytes in CONNECT"));
    }
    Ok(Packet::Connect { client_id, keep_alive, clean_session: flags & 0x02 != 0 })
}

/// The head of a PUBLISH body, the same in both protocols: QoS, DUP, topic, packet id, and the
/// offset after them.
pub(super) fn publish_head(
    flags: u8,
    body: &[u8],
) -> Result<(QoS, bool, &str, Option<u16>, usize), DecodeError> {
    let qos = QoS::from_bits((flags >> 1) & 0x03)?;
    let dup = flags & 0x08 != 0;
    if qos == QoS::AtMostOnce && dup {
        return Err(DecodeError::Malformed("DUP on QoS 0"));
    }
    let (topic, mut at) = read_str(body, 0)?;
    if topic.is_empty() || topic.contains(['+', '#']) {
        return Err(DecodeError::Malformed("PUBLISH topic"));
    }
    let pkid = if qos == QoS::AtMostOnce {
        None
    } else {
        let id = nonzero(read_u16(body, at)?)?;
        at += 2;
        Some(id)
    };
    Ok((qos, dup, topic, pkid, at))
}

fn decode_publish(flags: u8, body: &[u8]) -> Result<Packet<'_>, DecodeError> {
    let (qos, dup, topic, pkid, at) = publish_head(flags, body)?;
    Ok(Packet::Publish(Publish { topic, payload: &body[at..], qos, retain: flags & 0x01 != 0, dup, pkid }))
}

/// Writes into `out` at a cursor, failing on overflow.
pub(super) struct Writer<'o> {
    out: &'o mut [u8],
    at: usize,
}

impl<'o> Writer<'o> {
    #[cfg(feature = "mqtt5")]
    pub(super) fn new(out: &'o mut [u8]) -> Self {
        Self { out, at: 0 }
    }

    /// Bytes written.
    #[cfg(feature = "mqtt5")]
    pub(super) fn at(&self) -> usize {
        self.at
    }

    pub(super) fn bytes(&mut self, b: &[u8]) -> Result<(), EncodeError> {
        let end = self.at + b.len();
        let dst = self.out.get_mut(self.at..end).ok_or(EncodeError::BufferTooSmall { needed: end })?;
        dst.copy_from_slice(b);
        self.at = end;
        Ok(())
    }
    pub(super) fn u8(&mut self, v: u8) -> Result<(), EncodeError> {
        self.bytes(&[v])
    }
    pub(super) fn u16(&mut self, v: u16) -> Result<(), EncodeError> {
        self.bytes(&v.to_be_bytes())
    }
    pub(super) fn str(&mut self, s: &str) -> Result<(), EncodeError> {
        let len =
            u16::try_from(s.len()).map_err(|_| EncodeError::Invalid("string longer than 65535 bytes"))?;
        self.u16(len)?;
        self.bytes(s.as_bytes())
    }
    pub(super) fn header(&mut self, first: u8, remaining: usize) -> Result<(), EncodeError> {
        if remaining > MAX_REMAINING {
            return Err(EncodeError::Invalid("packet too large for MQTT"));
        }
        self.u8(first)?;
        let mut x = remaining;
        loop {
            let mut byte = (x % 128) as u8;
            x /= 128;
            if x > 0 {
                byte |= 0x80;
            }
            self.u8(byte)?;
            if x == 0 {
                return Ok(());
            }
        }
    }
}

fn check_str(s: &str) -> Result<(), EncodeError> {
    if s.len() > usize::from(u16::MAX) || s.contains('\0') {
        return Err(EncodeError::Invalid("string too long or contains NUL"));
    }
    Ok(())
}

impl Packet<'_> {
    /// Encodes into `out`; returns the number of bytes written.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        let mut w = Writer { out, at: 0 };
        match *self {
            Packet::Connect { client_id, keep_alive, clean_session } => {
                check_str(client_id)?;
                w.header(0x10, 10 + 2 + client_id.len())?;
                w.str("MQTT")?;
                w.u8(4)?;
                w.u8(if clean_session { 0x02 } else { 0 })?;
                w.u16(keep_alive)?;
                w.str(client_id)?;
            }
            Packet::ConnAck { session_present, code } => {
                w.header(0x20, 2)?;
                w.u8(u8::from(session_present))?;
                w.u8(code)?;
            }
            Packet::Publish(p) => {
                check_str(p.topic)?;
                if p.topic.is_empty() || p.topic.contains(['+', '#']) {
                    return Err(EncodeError::Invalid("PUBLISH topic must be non-empty without wildcards"));
                }
                let pkid_len = match (p.qos, p.pkid) {
                    (QoS::AtMostOnce, None) => 0,
                    (QoS::AtMostOnce, Some(_)) => return Err(EncodeError::Invalid("QoS 0 has no packet id")),
                    (_, Some(0) | None) => {
                        return Err(EncodeError::Invalid("QoS > 0 needs a non-zero packet id"))
                    }
                    (_, Some(_)) => 2,
                };
                if p.dup && p.qos == QoS::AtMostOnce {
                    return Err(EncodeError::Invalid("DUP on QoS 0"));
                }
                let first = 0x30 | (u8::from(p.dup) << 3) | ((p.qos as u8) << 1) | u8::from(p.retain);
                w.header(first, 2 + p.topic.len() + pkid_len + p.payload.len())?;
                w.str(p.topic)?;
                if let Some(id) = p.pkid {
                    w.u16(id)?;
                }
                w.bytes(p.payload)?;
            }
            Packet::PubAck { pkid } => {
                w.header(0x40, 2)?;
                w.u16(pkid)?;
            }
            Packet::Subscribe { pkid, filters } => {
                if pkid == 0 {
                    return Err(EncodeError::Invalid("SUBSCRIBE needs a non-zero packet id"));
                }
                let mut len = 2;
                let mut n = 0;
                for (f, _) in filters.iter() {
                    check_str(f)?;
                    if f.is_empty() {
                        return Err(EncodeError::Invalid("empty topic filter"));
                    }
                    len += 2 + f.len() + 1;
                    n += 1;
                }
                if n == 0 {
                    return Err(EncodeError::Invalid("SUBSCRIBE needs at least one filter"));
                }
                w.header(0x82, len)?;
                w.u16(pkid)?;
                for (f, q) in filters.iter() {
                    w.str(f)?;
                    w.u8(q as u8)?;
                }
            }
            Packet::SubAck { pkid, codes } => {
                w.header(0x90, 2 + codes.len())?;
                w.u16(pkid)?;
                w.bytes(codes)?;
            }
            Packet::PingReq => w.header(0xc0, 0)?,
            Packet::PingResp => w.header(0xd0, 0)?,
            Packet::Disconnect => w.header(0xe0, 0)?,
            #[cfg(feature = "mqtt5")]
            Packet::PubRefused { .. } | Packet::ServerDisconnect { .. } | Packet::Moved { .. } => {
                return Err(EncodeError::Invalid("a broker's MQTT 5 packet"))
            }
        }
        Ok(w.at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (packet, its exact bytes): vectors written from the spec, not from this encoder.
    fn vectors() -> [(Packet<'static>, &'static [u8]); 11] {
        [
            (
                Packet::Connect { client_id: "dev-1", keep_alive: 60, clean_session: true },
                &[0x10, 17, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 5, b'd', b'e', b'v', b'-', b'1'],
            ),
            (Packet::ConnAck { session_present: false, code: 0 }, &[0x20, 2, 0, 0]),
            (Packet::ConnAck { session_present: false, code: 2 }, &[0x20, 2, 0, 2]),
            (
                Packet::Publish(Publish {
                    topic: "a/b",
                    payload: b"hi",
                    qos: QoS::AtMostOnce,
                    retain: false,
                    dup: false,
                    pkid: None,
                }),
                &[0x30, 7, 0, 3, b'a', b'/', b'b', b'h', b'i'],
            ),
            (
                Packet::Publish(Publish {
                    topic: "a/b",
                    payload: b"hi",
                    qos: QoS::AtLeastOnce,
                    retain: true,
                    dup: true,
                    pkid: Some(10),
                }),
                &[0x3b, 9, 0, 3, b'a', b'/', b'b', 0, 10, b'h', b'i'],
            ),
            (Packet::PubAck { pkid: 0x1234 }, &[0x40, 2, 0x12, 0x34]),
            (
                Packet::Subscribe { pkid: 1, filters: SubscribeFilters::List(&[("a/#", QoS::AtLeastOnce)]) },
                &[0x82, 8, 0, 1, 0, 3, b'a', b'/', b'#', 1],
            ),
            (Packet::SubAck { pkid: 1, codes: &[1, 0x80] }, &[0x90, 4, 0, 1, 1, 0x80]),
            (Packet::PingReq, &[0xc0, 0]),
            (Packet::PingResp, &[0xd0, 0]),
            (Packet::Disconnect, &[0xe0, 0]),
        ]
    }

    fn same(a: &Packet<'_>, b: &Packet<'_>) -> bool {
        match (a, b) {
            (Packet::Subscribe { pkid: p1, filters: f1 }, Packet::Subscribe { pkid: p2, filters: f2 }) => {
                p1 == p2 && f1.iter().eq(f2.iter())
            }
            _ => a == b,
        }
    }

    #[test]
    fn vectors_encode_and_decode() {
        for (packet, bytes) in vectors() {
            let mut out = [0u8; 64];
            let n = packet.encode(&mut out).expect("encode");
            assert_eq!(&out[..n], bytes, "{packet:?}");
            let (decoded, used) = decode(bytes, 1024).expect("decode");
            assert_eq!(used, bytes.len());
            assert!(same(&decoded, &packet), "{decoded:?} != {packet:?}");
        }
    }

    #[test]
    fn every_prefix_is_incomplete_never_malformed() {
        for (_, bytes) in vectors() {
            for len in 0..bytes.len() {
                match decode(&bytes[..len], 1024) {
                    Err(DecodeError::Incomplete { needed }) => assert!(needed > len),
                    other => panic!("{bytes:?}[..{len}] gave {other:?}"),
                }
            }
        }
    }

    #[test]
    fn publish_head_from_the_start_of_a_large_packet() {
        // QoS 1 PUBLISH "a/b", pkid 7, 300-byte payload: remaining length 2+3+2+300 = 307.
        let mut p = std::vec![0x32, 0xb3, 0x02, 0, 3, b'a', b'/', b'b', 0, 7];
        p.extend([0u8; 300]);
        let head = decode_publish_head(&p[..10]).expect("head");
        assert_eq!(
            head,
            PublishHead { topic: "a/b", pkid: Some(7), qos: QoS::AtLeastOnce, payload_len: 300, total: 310 }
        );
        assert!(matches!(decode_publish_head(&p[..9]), Err(DecodeError::Incomplete { .. })));
        assert!(matches!(decode_publish_head(&[0x40, 2, 0, 1]), Err(DecodeError::Malformed(_))));
        // A topic longer than the packet.
        assert!(matches!(
            decode_publish_head(&[0x30, 3, 0, 9, b'a', b'b', b'c']),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn remaining_length_boundaries() {
        let payload = [7u8; 300];
        for size in [0usize, 120, 121, 122, 200, 300] {
            let p = Publish {
                topic: "t",
                payload: &payload[..size],
                qos: QoS::AtMostOnce,
                retain: false,
                dup: false,
                pkid: None,
            };
            let mut out = [0u8; 400];
            let n = Packet::Publish(p).encode(&mut out).unwrap();
            let (d, used) = decode(&out[..n], 1024).unwrap();
            assert_eq!((d, used), (Packet::Publish(p), n));
            assert_eq!(out[1] & 0x80 != 0, 3 + size > 127, "varint length for {size}");
        }
        // Five-byte and non-minimal lengths are malformed.
        assert!(matches!(
            decode(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], 1 << 30),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(decode(&[0x30, 0x80, 0x00], 1 << 30), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn malformed_inputs() {
        let cases: &[&[u8]] = &[
            &[0x00, 0],                                                  // reserved type
            &[0xf0, 0],                                                  // reserved type
            &[0x41, 2, 0, 1],                                            // PUBACK with flags
            &[0x40, 2, 0, 0],                                            // pkid 0
            &[0x36, 5, 0, 1, b'a', 0, 1],                                // QoS 3
            &[0x32, 3, 0, 1, b'a'],                                      // QoS 1 without pkid
            &[0x38, 3, 0, 1, b'a'],                                      // DUP on QoS 0
            &[0x30, 3, 0, 1, b'#'],                                      // wildcard topic
            &[0x30, 4, 0, 2, 0xc3, 0x28],                                // invalid UTF-8
            &[0x30, 3, 0, 1, 0],                                         // NUL
            &[0x90, 3, 0, 1, 3],                                         // bad SUBACK code
            &[0xd0, 1, 0],                                               // PINGRESP with body
            &[0x20, 2, 2, 0],                                            // CONNACK reserved bits
            &[0x80, 6, 0, 1, 0, 1, b'a', 1],                             // SUBSCRIBE wrong flags
            &[0x82, 6, 0, 1, 0, 1, b'a', 4],                             // SUBSCRIBE bad QoS
            &[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 3, 2, 0, 1, 0, 0], // protocol level 3
        ];
        for c in cases {
            assert!(
                matches!(decode(c, 1024), Err(DecodeError::Malformed(_))),
                "{c:?} gave {:?}",
                decode(c, 1024)
            );
        }
        assert_eq!(decode(&[0x30, 0x80, 0x01], 100), Err(DecodeError::TooLarge { size: 131 }));
    }

    #[test]
    fn encode_refuses_bad_fields_and_short_buffers() {
        let mut out = [0u8; 64];
        let bad = Publish {
            topic: "a/+",
            payload: b"",
            qos: QoS::AtMostOnce,
            retain: false,
            dup: false,
            pkid: None,
        };
        assert!(matches!(Packet::Publish(bad).encode(&mut out), Err(EncodeError::Invalid(_))));
        let bad = Publish {
            topic: "a",
            payload: b"",
            qos: QoS::AtLeastOnce,
            retain: false,
            dup: false,
            pkid: None,
        };
        assert!(matches!(Packet::Publish(bad).encode(&mut out), Err(EncodeError::Invalid(_))));
        let ok = Packet::Connect { client_id: "dev-1", keep_alive: 60, clean_session: true };
        for len in 0..19 {
            assert!(matches!(ok.encode(&mut out[..len]), Err(EncodeError::BufferTooSmall { .. })), "{len}");
        }
        assert_eq!(ok.encode(&mut out[..19]), Ok(19));
    }

    #[test]
    fn two_packets_back_to_back() {
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&[0x20, 2, 0, 0]);
        buf[4..6].copy_from_slice(&[0xd0, 0]);
        let (a, n) = decode(&buf[..6], 64).unwrap();
        let (b, m) = decode(&buf[n..6], 64).unwrap();
        assert_eq!((a, b, n + m), (Packet::ConnAck { session_present: false, code: 0 }, Packet::PingResp, 6));
    }

    /// Deterministic mutation sweep: flipping, truncating and splicing the vectors never panics,
    /// and whatever decodes re-encodes to the same bytes it came from.
    #[test]
    fn mutations_never_panic_and_round_trip() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let vs = vectors();
        for _ in 0..200_000 {
            let (_, base) = vs[(rand() % vs.len() as u64) as usize];
            let mut buf = [0u8; 64];
            let n = base.len();
            buf[..n].copy_from_slice(base);
            for _ in 0..(rand() % 4 + 1) {
                let i = (rand() % n as u64) as usize;
                buf[i] = match rand() % 3 {
                    0 => buf[i] ^ (1 << (rand() % 8)),
                    1 => rand() as u8,
                    _ => buf[(rand() % n as u64) as usize],
                };
            }
            let len = if rand().is_multiple_of(4) { (rand() % (n as u64 + 1)) as usize } else { n };
            if let Ok((p, used)) = decode(&buf[..len], 1024) {
                let mut out = [0u8; 64];
                if let Ok(m) = p.encode(&mut out) {
                    assert_eq!(&out[..m], &buf[..used], "{p:?}");
                }
            }
        }
    }
}
