//! PKCS#10 certificate signing requests built on the device, without an allocator: the key is
//! generated on the device (with the caller's RNG) and never leaves it; the request carries the
//! device id as the subject CN and as a SAN URI (`urn:fleetgate:device:<id>`), signed with
//! ECDSA P-256 / SHA-256 (RFC 2986, RFC 5280 §4.2.1.6).
//!
//! The DER is written in one pass per level: a TLV's length is measured first by running its
//! content writer into a counter, so the encoder needs no buffer beyond the output.

use p256::ecdsa::signature::Signer;
use p256::ecdsa::{DerSignature, SigningKey};
use rand_core::CryptoRngCore;

/// `id-ecPublicKey`, `prime256v1`, `ecdsa-with-SHA256`, `commonName`, `extensionRequest`,
/// `subjectAltName` (DER content octets).
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_ECDSA_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
const OID_EXTENSION_REQUEST: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x0e];
const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];
/// The SAN URI prefix of a device identity (docs/spec/certificate-profile.md).
const URI_PREFIX: &str = fleet_topic::uri::DEVICE;

/// Why a request could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum CsrError {
    /// The output buffer is too small (this many bytes are needed).
    BufferTooSmall(usize),
    /// The device id is empty or longer than 64 bytes.
    BadDeviceId,
}

/// A fresh P-256 device key from the caller's RNG.
pub fn generate_key(rng: &mut impl CryptoRngCore) -> SigningKey {
    SigningKey::random(rng)
}

/// Where DER goes: a slice, or a counter that measures.
trait Sink {
    fn put(&mut self, b: &[u8]);
}

struct Count(usize);

impl Sink for Count {
    fn put(&mut self, b: &[u8]) {
        self.0 += b.len();
    }
}

struct Out<'a> {
    buf: &'a mut [u8],
    at: usize,
    overflow: bool,
}

impl Sink for Out<'_> {
    fn put(&mut self, b: &[u8]) {
        match self.buf.get_mut(self.at..self.at + b.len()) {
            Some(dst) => dst.copy_from_slice(b),
            None => self.overflow = true,
        }
        self.at += b.len();
    }
}

fn length(s: &mut dyn Sink, n: usize) {
    match n {
        0..=0x7f => s.put(&[n as u8]),
        0x80..=0xff => s.put(&[0x81, n as u8]),
        _ => s.put(&[0x82, (n >> 8) as u8, n as u8]),
    }
}

/// Tag, length (measured), content.
fn tlv(s: &mut dyn Sink, tag: u8, content: &dyn Fn(&mut dyn Sink)) {
    let mut c = Count(0);
    content(&mut c);
    s.put(&[tag]);
    length(s, c.0);
    content(s);
}

fn bytes(s: &mut dyn Sink, tag: u8, b: &[u8]) {
    s.put(&[tag]);
    length(s, b.len());
    s.put(b);
}

/// CertificationRequestInfo for `id` and the public key `point` (uncompressed SEC1).
fn request_info(s: &mut dyn Sink, id: &str, point: &[u8]) {
    tlv(s, 0x30, &|s| {
        bytes(s, 0x02, &[0]); // version 0
                              // subject: CN=<id>
        tlv(s, 0x30, &|s| {
            tlv(s, 0x31, &|s| {
                tlv(s, 0x30, &|s| {
                    bytes(s, 0x06, OID_CN);
                    bytes(s, 0x0c, id.as_bytes());
                })
            })
        });
        // subjectPKInfo
        tlv(s, 0x30, &|s| {
            tlv(s, 0x30, &|s| {
                bytes(s, 0x06, OID_EC_PUBLIC_KEY);
                bytes(s, 0x06, OID_P256);
            });
            tlv(s, 0x03, &|s| {
                s.put(&[0]);
                s.put(point);
            });
        });
        // attributes [0]: extensionRequest { subjectAltName: URI urn:fleetgate:device:<id> }
        tlv(s, 0xa0, &|s| {
            tlv(s, 0x30, &|s| {
                bytes(s, 0x06, OID_EXTENSION_REQUEST);
                tlv(s, 0x31, &|s| {
                    tlv(s, 0x30, &|s| {
                        tlv(s, 0x30, &|s| {
                            bytes(s, 0x06, OID_SAN);
                            tlv(s, 0x04, &|s| {
                                tlv(s, 0x30, &|s| {
                                    s.put(&[0x86]);
                                    length(s, URI_PREFIX.len() + id.len());
                                    s.put(URI_PREFIX.as_bytes());
                                    s.put(id.as_bytes());
                                })
                            })
                        })
                    })
                })
            })
        });
    });
}

/// Writes a DER PKCS#10 request for `device_id`, signed by `key`, into `out`; returns its
/// length. 512 bytes hold the request of any id up to 64 bytes.
pub fn build(device_id: &str, key: &SigningKey, out: &mut [u8]) -> Result<usize, CsrError> {
    if device_id.is_empty() || device_id.len() > 64 {
        return Err(CsrError::BadDeviceId);
    }
    let point = key.verifying_key().to_encoded_point(false);
    let point = point.as_bytes();
    // The signed part, written into the output first to be signed in place.
    let mut info_len = Count(0);
    request_info(&mut info_len, device_id, point);
    let mut info = Out { buf: out, at: 0, overflow: false };
    request_info(&mut info, device_id, point);
    if info.overflow {
        return Err(CsrError::BufferTooSmall(info_len.0 + 96));
    }
    let sig: DerSignature = key.sign(&info.buf[..info_len.0]);
    let sig = sig.as_bytes();
    // SEQUENCE { info, algorithm, signature }: measure, then shift the info right by the
    // outer header and write the rest after it.
    let tail = |s: &mut dyn Sink| {
        tlv(s, 0x30, &|s| bytes(s, 0x06, OID_ECDSA_SHA256));
        tlv(s, 0x03, &|s| {
            s.put(&[0]);
            s.put(sig);
        });
    };
    let mut tail_len = Count(0);
    tail(&mut tail_len);
    let content = info_len.0 + tail_len.0;
    let mut header = Count(0);
    header.put(&[0x30]);
    length(&mut header, content);
    let total = header.0 + content;
    if out.len() < total {
        return Err(CsrError::BufferTooSmall(total));
    }
    out.copy_within(..info_len.0, header.0);
    let mut head = Out { buf: &mut out[..header.0], at: 0, overflow: false };
    head.put(&[0x30]);
    length(&mut head, content);
    let mut rest = Out { buf: &mut out[header.0 + info_len.0..total], at: 0, overflow: false };
    tail(&mut rest);
    Ok(total)
}

impl core::fmt::Display for CsrError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BufferTooSmall(n) => write!(f, "the CSR needs a {n}-byte buffer"),
            Self::BadDeviceId => f.write_str("the device id is empty or longer than 64 bytes"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic RNG for tests (xorshift; never for keys in the field).
    struct TestRng(u64);

    impl rand_core::RngCore for TestRng {
        fn next_u32(&mut self) -> u32 {
            self.next_u64() as u32
        }
        fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            for b in dest {
                *b = self.next_u64() as u8;
            }
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
            self.fill_bytes(dest);
            Ok(())
        }
    }

    impl rand_core::CryptoRng for TestRng {}

    #[test]
    fn a_request_is_well_formed_der_and_sized_for_its_buffer() {
        let mut rng = TestRng(0x9e37_79b9_7f4a_7c15);
        let key = generate_key(&mut rng);
        let mut buf = [0u8; 512];
        let n = build("dev-0123456789ab", &key, &mut buf).expect("build");
        // Outer SEQUENCE with a two-byte length covering the rest exactly.
        assert_eq!(buf[0], 0x30);
        let (len, hdr) = if buf[1] == 0x81 {
            (usize::from(buf[2]), 3)
        } else {
            (usize::from(buf[2]) << 8 | usize::from(buf[3]), 4)
        };
        assert_eq!(hdr + len, n);
        let mut small = [0u8; 100];
        assert!(matches!(build("dev-1", &key, &mut small), Err(CsrError::BufferTooSmall(_))));
        assert_eq!(build("", &key, &mut buf), Err(CsrError::BadDeviceId));
    }
}
