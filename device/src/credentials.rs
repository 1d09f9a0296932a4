//! The credentials bundle (`credentials.bin`): a device's identity as flashed at the factory.
//!
//! The format is specified in `docs/spec/credentials-bundle.md`; this module is the one
//! implementation of it, shared by the device (decode, zero-copy from a flash region) and the
//! provisioning station (encode). Layout:
//!
//! ```text
//! offset  size  field
//! 0       4     magic  "FGCB"
//! 4       1     format version (1)
//! 5       1     flags (0; reserved)
//! 6       4     body length N, u32 little endian
//! 10      N     body: postcard encoding of `Credentials`
//! 10+N    4     CRC-32 (ISO-HDLC) of bytes 0..10+N, little endian
//! ```
//!
//! Bytes after the trailer are ignored, so the bundle can sit at the start of an erased
//! (0xFF-filled) flash sector. Decoding never copies: every field borrows from the input.

use core::fmt;

use serde::{Deserialize, Serialize};

/// First four bytes of every bundle.
pub const MAGIC: [u8; 4] = *b"FGCB";
/// The format version this crate reads and writes.
pub const VERSION: u8 = 1;
/// Bytes before the body.
pub const HEADER_LEN: usize = 10;
/// Bytes after the body.
pub const TRAILER_LEN: usize = 4;
/// Largest body accepted; keeps a corrupt length field from meaning "the whole flash".
pub const MAX_BODY_LEN: usize = 16 * 1024;

const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// A device identity, borrowed from the bundle bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials<'a> {
    /// The device id; equals the certificate's CN and `urn:fleetgate:device:<id>` SAN.
    pub device_id: &'a str,
    /// The device certificate, DER.
    #[serde(borrow)]
    pub cert_der: &'a [u8],
    /// The device's P-256 private key, SEC1 `ECPrivateKey` DER.
    #[serde(borrow)]
    pub key_der: &'a [u8],
    /// The pinned server CA certificate, DER: the only issuer the device accepts for the broker.
    #[serde(borrow)]
    pub server_ca_der: &'a [u8],
    /// Broker host name; also the DNS name the broker certificate must carry.
    pub broker_host: &'a str,
    /// Broker TCP port.
    pub broker_port: u16,
}

/// Why a bundle was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum BundleError {
    /// Fewer bytes than the header and the length field promise.
    Truncated {
        /// Bytes the header says are needed.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// The first four bytes are not `FGCB`: not a bundle, or erased flash.
    BadMagic,
    /// A bundle of a format version this build does not read.
    UnsupportedVersion(u8),
    /// Reserved flags are set.
    UnsupportedFlags(u8),
    /// The length field exceeds [`MAX_BODY_LEN`].
    TooLarge(usize),
    /// The checksum does not match: the bundle is corrupt.
    ChecksumMismatch {
        /// Checksum stored in the trailer.
        stored: u32,
        /// Checksum computed over the bytes.
        computed: u32,
    },
    /// The body is not a valid postcard `Credentials` or has trailing bytes.
    MalformedBody,
    /// A field is empty or out of range (e.g. empty device id, port 0).
    InvalidField(&'static str),
    /// The output buffer is too small to encode into.
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
    },
}

impl fmt::Display for BundleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { needed, available } => {
                write!(f, "credentials bundle truncated: need {needed} bytes, have {available}")
            }
            Self::BadMagic => f.write_str("not a credentials bundle (bad magic)"),
            Self::UnsupportedVersion(v) => {
                write!(f, "credentials bundle version {v} is not supported (this build reads {VERSION})")
            }
            Self::UnsupportedFlags(x) => write!(f, "credentials bundle has unknown flags {x:#04x}"),
            Self::TooLarge(n) => write!(f, "credentials bundle body of {n} bytes exceeds {MAX_BODY_LEN}"),
            Self::ChecksumMismatch { stored, computed } => write!(
                f,
                "credentials bundle corrupt: checksum {stored:#010x} stored, {computed:#010x} computed"
            ),
            Self::MalformedBody => f.write_str("credentials bundle body is malformed"),
            Self::InvalidField(name) => write!(f, "credentials bundle field `{name}` is invalid"),
            Self::BufferTooSmall { needed } => {
                write!(f, "buffer too small for credentials bundle: need {needed} bytes")
            }
        }
    }
}

impl core::error::Error for BundleError {}

impl<'a> Credentials<'a> {
    /// Decodes a bundle from `bytes` (e.g. a flash region), borrowing every field from it.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, BundleError> {
        if bytes.len() < HEADER_LEN {
            return Err(BundleError::Truncated { needed: HEADER_LEN, available: bytes.len() });
        }
        if bytes[0..4] != MAGIC {
            return Err(BundleError::BadMagic);
        }
        if bytes[4] != VERSION {
            return Err(BundleError::UnsupportedVersion(bytes[4]));
        }
        if bytes[5] != 0 {
            return Err(BundleError::UnsupportedFlags(bytes[5]));
        }
        let body_len = u32::from_le_bytes([bytes[6], bytes[7], bytes[8], bytes[9]]) as usize;
        if body_len > MAX_BODY_LEN {
            return Err(BundleError::TooLarge(body_len));
        }
        let total = HEADER_LEN + body_len + TRAILER_LEN;
        if bytes.len() < total {
            return Err(BundleError::Truncated { needed: total, available: bytes.len() });
        }
        let covered = &bytes[..HEADER_LEN + body_len];
        let t = HEADER_LEN + body_len;
        let stored = u32::from_le_bytes([bytes[t], bytes[t + 1], bytes[t + 2], bytes[t + 3]]);
        let computed = CRC.checksum(covered);
        if stored != computed {
            return Err(BundleError::ChecksumMismatch { stored, computed });
        }
        let body = &bytes[HEADER_LEN..HEADER_LEN + body_len];
        let (creds, rest): (Credentials<'a>, _) =
            postcard::take_from_bytes(body).map_err(|_| BundleError::MalformedBody)?;
        if !rest.is_empty() {
            return Err(BundleError::MalformedBody);
        }
        creds.check()?;
        Ok(creds)
    }

    /// Encodes the bundle into `out`, returning the number of bytes written.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, BundleError> {
        self.check()?;
        let needed_min = HEADER_LEN + TRAILER_LEN;
        if out.len() < needed_min {
            return Err(BundleError::BufferTooSmall { needed: self.encoded_len() });
        }
        let body_cap = (out.len() - needed_min).min(MAX_BODY_LEN);
        let body_len = postcard::to_slice(self, &mut out[HEADER_LEN..HEADER_LEN + body_cap])
            .map_err(|_| BundleError::BufferTooSmall { needed: self.encoded_len() })?
            .len();
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5] = 0;
        // body_len <= MAX_BODY_LEN, which fits in u32.
        out[6..10].copy_from_slice(&(body_len as u32).to_le_bytes());
        let crc = CRC.checksum(&out[..HEADER_LEN + body_len]);
        out[HEADER_LEN + body_len..HEADER_LEN + body_len + TRAILER_LEN].copy_from_slice(&crc.to_le_bytes());
        Ok(HEADER_LEN + body_len + TRAILER_LEN)
    }

    /// The exact size [`encode`](Self::encode) needs.
    pub fn encoded_len(&self) -> usize {
        let body = postcard::experimental::serialized_size(self).unwrap_or(MAX_BODY_LEN);
        HEADER_LEN + body + TRAILER_LEN
    }

    fn check(&self) -> Result<(), BundleError> {
        if self.device_id.is_empty() || self.device_id.len() > 64 {
            return Err(BundleError::InvalidField("device_id"));
        }
        if self.cert_der.is_empty() {
            return Err(BundleError::InvalidField("cert_der"));
        }
        if self.key_der.is_empty() {
            return Err(BundleError::InvalidField("key_der"));
        }
        if self.server_ca_der.is_empty() {
            return Err(BundleError::InvalidField("server_ca_der"));
        }
        if self.broker_host.is_empty() || self.broker_host.len() > 253 {
            return Err(BundleError::InvalidField("broker_host"));
        }
        if self.broker_port == 0 {
            return Err(BundleError::InvalidField("broker_port"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Credentials<'static> {
        Credentials {
            device_id: "dev-1",
            cert_der: &[0x30, 0x03, 0x02, 0x01, 0x01],
            key_der: &[0x30, 0x02, 0x05, 0x00],
            server_ca_der: &[0x30, 0x00],
            broker_host: "broker.local",
            broker_port: 8883,
        }
    }

    /// The exact bytes of `sample()`: a vector that pins the wire format.
    const SAMPLE_BYTES: &[u8] = &[
        b'F', b'G', b'C', b'B', 1, 0, 35, 0, 0, 0, // header
        5, b'd', b'e', b'v', b'-', b'1', // device_id
        5, 0x30, 0x03, 0x02, 0x01, 0x01, // cert_der
        4, 0x30, 0x02, 0x05, 0x00, // key_der
        2, 0x30, 0x00, // server_ca_der
        12, b'b', b'r', b'o', b'k', b'e', b'r', b'.', b'l', b'o', b'c', b'a', b'l', // host
        0xb3, 0x45, // 8883 as varint: 51 | 0x80, 69
    ];

    fn encoded() -> ([u8; 256], usize) {
        let mut buf = [0u8; 256];
        let n = sample().encode(&mut buf).expect("encode");
        (buf, n)
    }

    #[test]
    fn vector_matches_spec() {
        let (buf, n) = encoded();
        assert_eq!(&buf[..n - TRAILER_LEN], SAMPLE_BYTES);
        let crc = CRC.checksum(SAMPLE_BYTES);
        assert_eq!(&buf[n - 4..n], &crc.to_le_bytes());
        assert_eq!(sample().encoded_len(), n);
    }

    #[test]
    fn round_trip_borrows_from_input() {
        let (buf, n) = encoded();
        let c = Credentials::decode(&buf[..n]).expect("decode");
        assert_eq!(c, sample());
        let start = buf.as_ptr() as usize;
        let p = c.cert_der.as_ptr() as usize;
        assert!(p >= start && p < start + n, "cert_der must borrow from the bundle");
    }

    #[test]
    fn trailing_erased_flash_is_ignored() {
        let (mut buf, n) = encoded();
        buf[n..].fill(0xff);
        assert_eq!(Credentials::decode(&buf).expect("decode"), sample());
    }

    #[test]
    fn every_truncation_is_refused() {
        let (buf, n) = encoded();
        for len in 0..n {
            let err = Credentials::decode(&buf[..len]).expect_err("truncated");
            assert!(matches!(err, BundleError::Truncated { .. }), "len {len}: {err:?}");
        }
    }

    #[test]
    fn every_single_bit_flip_is_refused() {
        let (buf, n) = encoded();
        for i in 0..n {
            for bit in 0..8 {
                let mut b = buf;
                b[i] ^= 1 << bit;
                assert!(Credentials::decode(&b[..n]).is_err(), "flip byte {i} bit {bit}");
            }
        }
    }

    #[test]
    fn version_magic_flags_refused_with_typed_errors() {
        let (buf, n) = encoded();
        let mut b = buf;
        b[4] = 2;
        assert_eq!(Credentials::decode(&b[..n]), Err(BundleError::UnsupportedVersion(2)));
        let mut b = buf;
        b[0] = b'X';
        assert_eq!(Credentials::decode(&b[..n]), Err(BundleError::BadMagic));
        let mut b = buf;
        b[5] = 1;
        assert_eq!(Credentials::decode(&b[..n]), Err(BundleError::UnsupportedFlags(1)));
        let mut b = buf;
        b[6..10].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Credentials::decode(&b[..n]), Err(BundleError::TooLarge(u32::MAX as usize)));
        assert_eq!(Credentials::decode(&[0xff; 64]), Err(BundleError::BadMagic));
    }

    #[test]
    fn body_with_valid_crc_but_garbage_is_malformed() {
        let mut b = [0u8; 32];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = VERSION;
        b[6] = 3;
        b[10..13].copy_from_slice(&[0xff, 0xff, 0xff]);
        let crc = CRC.checksum(&b[..13]);
        b[13..17].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(Credentials::decode(&b[..17]), Err(BundleError::MalformedBody));
    }

    #[test]
    fn invalid_fields_refused_on_encode() {
        let mut buf = [0u8; 256];
        let bad = Credentials { broker_port: 0, ..sample() };
        assert_eq!(bad.encode(&mut buf), Err(BundleError::InvalidField("broker_port")));
        let bad = Credentials { device_id: "", ..sample() };
        assert_eq!(bad.encode(&mut buf), Err(BundleError::InvalidField("device_id")));
        let mut small = [0u8; 20];
        assert!(matches!(sample().encode(&mut small), Err(BundleError::BufferTooSmall { .. })));
    }
}
