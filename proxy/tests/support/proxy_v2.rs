//! The PROXY protocol v2 header HAProxy sends (`send-proxy-v2`), for tests that stand in for
//! the balancer. Shared by the e2e harness and `proxy_inprocess.rs` (which has no fleet).

use std::net::SocketAddr;

/// A PROXY v2 header (PROXY command, TCP over IPv4) claiming the connection came from `source`.
pub fn proxy_v2_header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(src), SocketAddr::V4(dst)) = (source, destination) else {
        panic!("IPv4 only")
    };
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend_from_slice(&[0x21, 0x11, 0, 12]);
    header.extend_from_slice(&src.ip().octets());
    header.extend_from_slice(&dst.ip().octets());
    header.extend_from_slice(&src.port().to_be_bytes());
    header.extend_from_slice(&dst.port().to_be_bytes());
    header
}
