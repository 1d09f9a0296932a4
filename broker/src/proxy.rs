//! PROXY protocol v2 (HAProxy `send-proxy-v2`): the header a TCP load balancer sends before the
//! client's first byte, naming the client's address. Behind a balancer in TCP mode every
//! connection otherwise comes from the balancer's address, and the per-source pre-admission cap
//! (`max_pre_admission_per_source`) would apply to the whole fleet at once.
//!
//! Sans-IO: [`parse`] decodes from a byte slice. The header is trusted: enable
//! `proxy_protocol` only where nothing but the balancer can reach the broker.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The 12-byte signature every v2 header starts with.
pub(crate) const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version/command, family/protocol, length.
const FIXED: usize = 16;
/// The longest header taken: addresses (36 bytes for IPv6) and the TLVs a balancer adds (unique
/// id, TLS details) fit many times over. The format allows 64 KiB, which a silent peer would
/// make the broker hold for every connection it opens.
pub const MAX_HEADER: usize = FIXED + 1024;
/// How long a connection may take to send its header: a balancer sends it as it connects.
pub(crate) const HEADER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(3);

/// What a header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A proxied connection from this client address.
    Proxied(SocketAddr),
    /// The balancer's own connection (a health check) or an address family we do not map
    /// (UNSPEC, UNIX): use the TCP peer address.
    Local,
}

/// Why a header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// More bytes needed: the total header length, once known.
    Incomplete(usize),
    /// Not a PROXY v2 header, or an inconsistent one.
    Malformed,
    /// A header longer than [`MAX_HEADER`] (its declared length).
    TooLong(usize),
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Incomplete(n) => write!(f, "the PROXY v2 header ended early ({n} bytes expected)"),
            Self::Malformed => f.write_str("not a PROXY v2 header, or an inconsistent one"),
            Self::TooLong(n) => write!(f, "a PROXY v2 header of {n} bytes (at most {MAX_HEADER} are taken)"),
        }
    }
}

/// Decodes the header at the start of `b`; on success also returns its length in bytes.
pub fn parse(b: &[u8]) -> Result<(Header, usize), ProxyError> {
    if b.len() < FIXED {
        // A prefix that is not the signature is refused at once.
        let n = b.len().min(SIGNATURE.len());
        return if b[..n] == SIGNATURE[..n] {
            Err(ProxyError::Incomplete(FIXED))
        } else {
            Err(ProxyError::Malformed)
        };
    }
    if b[..12] != SIGNATURE || b[12] >> 4 != 2 {
        return Err(ProxyError::Malformed);
    }
    let len = usize::from(u16::from_be_bytes([b[14], b[15]]));
    let total = FIXED + len;
    if total > MAX_HEADER {
        return Err(ProxyError::TooLong(total));
    }
    if b.len() < total {
        return Err(ProxyError::Incomplete(total));
    }
    let body = &b[FIXED..total];
    let header = match (b[12] & 0x0f, b[13]) {
        (0x0, _) => Header::Local,
        // PROXY, TCP over IPv4: source, destination, source port, destination port.
        (0x1, 0x11) if len >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            Header::Proxied(SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([body[8], body[9]])))
        }
        // PROXY, TCP over IPv6.
        (0x1, 0x21) if len >= 36 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&body[..16]);
            Header::Proxied(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(a)),
                u16::from_be_bytes([body[32], body[33]]),
            ))
        }
        (0x1, 0x11 | 0x21) => return Err(ProxyError::Malformed),
        (0x1, _) => Header::Local,
        _ => return Err(ProxyError::Malformed),
    };
    Ok((header, total))
}

/// Reads exactly the header from `sock` (never a byte of what follows it).
pub(crate) async fn read(sock: &mut TcpStream) -> Result<Header, ProxyError> {
    let mut buf = vec![0u8; FIXED];
    let mut have = 0;
    loop {
        match parse(&buf[..have]) {
            Ok((h, _)) => return Ok(h),
            Err(e @ (ProxyError::Malformed | ProxyError::TooLong(_))) => return Err(e),
            Err(ProxyError::Incomplete(total)) => {
                if buf.len() < total {
                    buf.resize(total, 0);
                }
                let n = sock.read(&mut buf[have..total]).await.map_err(|_| ProxyError::Malformed)?;
                if n == 0 {
                    return Err(ProxyError::Malformed);
                }
                have += n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(src: [u8; 4], sport: u16, extra_tlv: &[u8]) -> Vec<u8> {
        let mut b = SIGNATURE.to_vec();
        b.extend([0x21, 0x11]);
        b.extend(u16::try_from(12 + extra_tlv.len()).unwrap_or(0).to_be_bytes());
        b.extend(src);
        b.extend([127, 0, 0, 1]);
        b.extend(sport.to_be_bytes());
        b.extend(8883u16.to_be_bytes());
        b.extend(extra_tlv);
        b
    }

    #[test]
    fn vectors() {
        // IPv4 with a TLV (HAProxy sends e.g. PP2_TYPE_UNIQUE_ID), then TLS bytes that are not ours.
        let mut b = v4([10, 1, 2, 3], 40000, &[0x05, 0x00, 0x02, 0xab, 0xcd]);
        let len = b.len();
        b.extend([0x16, 0x03, 0x01]);
        assert_eq!(
            parse(&b),
            Ok((Header::Proxied("10.1.2.3:40000".parse().unwrap_or_else(|_| unreachable!())), len))
        );
        // Every prefix is incomplete, never malformed.
        for n in 0..len {
            assert!(matches!(parse(&b[..n]), Err(ProxyError::Incomplete(_))), "prefix {n}");
        }
        // IPv6.
        let mut b6 = SIGNATURE.to_vec();
        b6.extend([0x21, 0x21, 0, 36]);
        b6.extend(Ipv6Addr::LOCALHOST.octets());
        b6.extend(Ipv6Addr::LOCALHOST.octets());
        b6.extend([0x9c, 0x40, 0x22, 0xb3]);
        assert_eq!(
            parse(&b6),
            Ok((Header::Proxied("[::1]:40000".parse().unwrap_or_else(|_| unreachable!())), 52))
        );
        // LOCAL (a health check) and UNSPEC.
        let mut local = SIGNATURE.to_vec();
        local.extend([0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local), Ok((Header::Local, 16)));
        // Not PROXY: TLS straight away, v1 text, wrong version, a short address block.
        assert_eq!(parse(&[0x16, 0x03, 0x01, 0x02, 0x00]), Err(ProxyError::Malformed));
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"), Err(ProxyError::Malformed));
        let mut v1 = v4([1, 2, 3, 4], 1, &[]);
        v1[12] = 0x11;
        assert_eq!(parse(&v1), Err(ProxyError::Malformed));
        let mut short = SIGNATURE.to_vec();
        short.extend([0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert_eq!(parse(&short), Err(ProxyError::Malformed));
    }
}
