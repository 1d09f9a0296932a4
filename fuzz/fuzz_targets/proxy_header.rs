//! The PROXY protocol v2 header decoder (what a load balancer sends before TLS): any bytes give
//! a header no longer than the input, "need more" with a length past the input, or a refusal;
//! a decoded header decodes the same from any longer input; a header is never longer than the
//! broker takes (`TooLong` names a length past it, and nothing past it is waited for). Never a
//! panic.
#![no_main]
use fleet_broker::fuzzing::{parse_proxy_header, ProxyError, MAX_PROXY_HEADER};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_proxy_header(data) {
        Ok((header, len)) => {
            assert!(len <= data.len() && len >= 16 && len <= MAX_PROXY_HEADER);
            let mut longer = data.to_vec();
            longer.extend_from_slice(b"\x16\x03\x01");
            assert_eq!(parse_proxy_header(&longer), Ok((header, len)));
        }
        Err(ProxyError::Incomplete(need)) => assert!(need > data.len() && need <= MAX_PROXY_HEADER),
        Err(ProxyError::TooLong(len)) => assert!(len > MAX_PROXY_HEADER),
        Err(ProxyError::Malformed) => {}
    }
});
