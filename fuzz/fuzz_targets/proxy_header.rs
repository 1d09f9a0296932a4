//! The PROXY protocol v2 header decoder (what a load balancer sends before TLS): any bytes give
//! a header no longer than the input, "need more" with a length past the input, or a refusal;
//! a decoded header decodes the same from any longer input. Never a panic.
#![no_main]
use fleet_broker::fuzzing::{parse_proxy_header, ProxyError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_proxy_header(data) {
        Ok((header, len)) => {
            assert!(len <= data.len() && len >= 16);
            let mut longer = data.to_vec();
            longer.extend_from_slice(b"\x16\x03\x01");
            assert_eq!(parse_proxy_header(&longer), Ok((header, len)));
        }
        Err(ProxyError::Incomplete(need)) => assert!(need > data.len()),
        Err(ProxyError::Malformed) => {}
    }
});
