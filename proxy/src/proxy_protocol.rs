//! PROXY protocol version 2 (the binary header HAProxy sends with
//! `send-proxy-v2`), read before the SSH banner so the proxy knows the real
//! client address. Only the fixed header and the address block are read —
//! never a byte more — so the SSH stream continues right after it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The 12-byte signature every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A PROXY v1 (text) header starts with this.
pub const V1_PREFIX: &[u8] = b"PROXY ";
/// Longest address block (addresses + TLVs) accepted. HAProxy sends 12 or 36
/// bytes plus a few TLVs; anything much larger is not a balancer talking.
pub const MAX_ADDRESS_BLOCK: usize = 1024;

const FIXED_LEN: usize = 16;
const TCP4_LEN: usize = 12;
const TCP6_LEN: usize = 36;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProxyHeaderError {
    #[error("the connection closed inside the PROXY header")]
    Truncated,
    #[error("the connection does not start with a PROXY v2 signature")]
    BadSignature,
    #[error("unsupported PROXY protocol version {0} (only 2 is supported)")]
    BadVersion(u8),
    #[error("unknown PROXY command {0:#x}")]
    BadCommand(u8),
    #[error(
        "unsupported PROXY address family/transport {0:#04x} (only TCP over IPv4/IPv6 or UNSPEC)"
    )]
    UnsupportedFamily(u8),
    #[error("the PROXY address block is {0} bytes, more than the {MAX_ADDRESS_BLOCK} accepted")]
    TooLong(usize),
    #[error("the PROXY address block is {got} bytes, too short for the {need} the family needs")]
    AddressTooShort { got: usize, need: usize },
    #[error("reading the PROXY header failed: {0}")]
    Io(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// The balancer's own connection (health check): use the socket address.
    Local,
    /// A relayed connection: the header carries the client address.
    Proxy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHeader {
    pub command: Command,
    /// The original client, when the command is PROXY and the family known.
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
}

/// What the fixed 16 bytes say: the command, the family byte and how many
/// bytes of address block follow.
fn parse_fixed(fixed: &[u8; FIXED_LEN]) -> Result<(Command, u8, usize), ProxyHeaderError> {
    if fixed[..12] != SIGNATURE {
        return Err(ProxyHeaderError::BadSignature);
    }
    let version = fixed[12] >> 4;
    if version != 2 {
        return Err(ProxyHeaderError::BadVersion(version));
    }
    let command = match fixed[12] & 0x0f {
        0 => Command::Local,
        1 => Command::Proxy,
        other => return Err(ProxyHeaderError::BadCommand(other)),
    };
    let family = fixed[13];
    let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if len > MAX_ADDRESS_BLOCK {
        return Err(ProxyHeaderError::TooLong(len));
    }
    Ok((command, family, len))
}

fn parse_addresses(
    command: Command,
    family: u8,
    block: &[u8],
) -> Result<ProxyHeader, ProxyHeaderError> {
    let need = match family {
        0x00 => 0,
        0x11 => TCP4_LEN,
        0x21 => TCP6_LEN,
        // A LOCAL header may carry any family; its addresses are ignored.
        _ if command == Command::Local => 0,
        other => return Err(ProxyHeaderError::UnsupportedFamily(other)),
    };
    if block.len() < need {
        return Err(ProxyHeaderError::AddressTooShort {
            got: block.len(),
            need,
        });
    }
    let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
    let (source, destination) = match (command, family) {
        (Command::Proxy, 0x11) => {
            let src = Ipv4Addr::new(block[0], block[1], block[2], block[3]);
            let dst = Ipv4Addr::new(block[4], block[5], block[6], block[7]);
            (
                Some(SocketAddr::new(IpAddr::V4(src), port(8))),
                Some(SocketAddr::new(IpAddr::V4(dst), port(10))),
            )
        }
        (Command::Proxy, 0x21) => {
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src.copy_from_slice(&block[0..16]);
            dst.copy_from_slice(&block[16..32]);
            (
                Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(src)), port(32))),
                Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(dst)), port(34))),
            )
        }
        _ => (None, None),
    };
    // Whatever follows the addresses is TLVs, which we do not use.
    Ok(ProxyHeader {
        command,
        source,
        destination,
    })
}

/// Parses a complete header from the start of `bytes`, returning it and the
/// number of bytes it took.
pub fn parse(bytes: &[u8]) -> Result<(ProxyHeader, usize), ProxyHeaderError> {
    let fixed: &[u8; FIXED_LEN] = bytes
        .get(..FIXED_LEN)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            if bytes.len() >= 12 && bytes[..12] != SIGNATURE {
                ProxyHeaderError::BadSignature
            } else {
                ProxyHeaderError::Truncated
            }
        })?;
    let (command, family, len) = parse_fixed(fixed)?;
    let block = bytes
        .get(FIXED_LEN..FIXED_LEN + len)
        .ok_or(ProxyHeaderError::Truncated)?;
    Ok((parse_addresses(command, family, block)?, FIXED_LEN + len))
}

/// Reads exactly one header from `stream`.
pub async fn read_header<R: AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<ProxyHeader, ProxyHeaderError> {
    let mut fixed = [0u8; FIXED_LEN];
    read_exact(stream, &mut fixed).await?;
    let (command, family, len) = parse_fixed(&fixed)?;
    let mut block = vec![0u8; len];
    read_exact(stream, &mut block).await?;
    parse_addresses(command, family, &block)
}

async fn read_exact<R: AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut [u8],
) -> Result<(), ProxyHeaderError> {
    stream
        .read_exact(buf)
        .await
        .map(|_| ())
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => ProxyHeaderError::Truncated,
            _ => ProxyHeaderError::Io(e.to_string()),
        })
}

/// Whether the first bytes of a connection look like a PROXY header (v1 or
/// v2), so a header from an untrusted source can be refused. `None`: not
/// enough bytes yet to tell.
pub fn looks_like_proxy_header(prefix: &[u8]) -> Option<bool> {
    for signature in [&SIGNATURE[..], V1_PREFIX] {
        let n = prefix.len().min(signature.len());
        if prefix[..n] == signature[..n] {
            if n == signature.len() {
                return Some(true);
            }
            return None;
        }
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(ver_cmd: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut out = SIGNATURE.to_vec();
        out.push(ver_cmd);
        out.push(family);
        out.extend_from_slice(&(block.len() as u16).to_be_bytes());
        out.extend_from_slice(block);
        out
    }

    fn tcp4_block() -> Vec<u8> {
        let mut b = vec![192, 0, 2, 7, 127, 0, 0, 1];
        b.extend_from_slice(&40000u16.to_be_bytes());
        b.extend_from_slice(&2222u16.to_be_bytes());
        b
    }

    #[test]
    fn tcp4_gives_the_client_address() {
        let bytes = header(0x21, 0x11, &tcp4_block());
        let (h, used) = parse(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(h.command, Command::Proxy);
        assert_eq!(h.source, Some("192.0.2.7:40000".parse().unwrap()));
        assert_eq!(h.destination, Some("127.0.0.1:2222".parse().unwrap()));
    }

    #[test]
    fn tcp6_gives_the_client_address() {
        let src: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let dst: Ipv6Addr = "::1".parse().unwrap();
        let mut block = src.octets().to_vec();
        block.extend_from_slice(&dst.octets());
        block.extend_from_slice(&5555u16.to_be_bytes());
        block.extend_from_slice(&22u16.to_be_bytes());
        let (h, _) = parse(&header(0x21, 0x21, &block)).unwrap();
        assert_eq!(h.source, Some("[2001:db8::1]:5555".parse().unwrap()));
        assert_eq!(h.destination, Some("[::1]:22".parse().unwrap()));
    }

    #[test]
    fn tlvs_after_the_addresses_are_skipped() {
        let mut block = tcp4_block();
        block.extend_from_slice(&[0x04, 0x00, 0x03, b'a', b'b', b'c']);
        let bytes = header(0x21, 0x11, &block);
        let (h, used) = parse(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(h.source, Some("192.0.2.7:40000".parse().unwrap()));
    }

    #[test]
    fn local_and_unspec_carry_no_address() {
        let (h, _) = parse(&header(0x20, 0x00, &[])).unwrap();
        assert_eq!(
            h,
            ProxyHeader {
                command: Command::Local,
                source: None,
                destination: None
            }
        );
        // LOCAL with addresses (HAProxy health checks) ignores them.
        let (h, _) = parse(&header(0x20, 0x11, &tcp4_block())).unwrap();
        assert_eq!(h.source, None);
        let (h, _) = parse(&header(0x21, 0x00, &[])).unwrap();
        assert_eq!(
            h,
            ProxyHeader {
                command: Command::Proxy,
                source: None,
                destination: None
            }
        );
    }

    #[test]
    fn malformed_headers_say_why() {
        assert_eq!(
            parse(b"SSH-2.0-OpenSSH_9.2\r\n"),
            Err(ProxyHeaderError::BadSignature)
        );
        assert_eq!(parse(&SIGNATURE[..8]), Err(ProxyHeaderError::Truncated));
        assert_eq!(
            parse(&header(0x11, 0x11, &tcp4_block())),
            Err(ProxyHeaderError::BadVersion(1))
        );
        assert_eq!(
            parse(&header(0x22, 0x11, &tcp4_block())),
            Err(ProxyHeaderError::BadCommand(2))
        );
        assert_eq!(
            parse(&header(0x21, 0x12, &tcp4_block())),
            Err(ProxyHeaderError::UnsupportedFamily(0x12))
        );
        assert_eq!(
            parse(&header(0x21, 0x31, &[0; 216])),
            Err(ProxyHeaderError::UnsupportedFamily(0x31))
        );
        assert_eq!(
            parse(&header(0x21, 0x11, &[1, 2, 3])),
            Err(ProxyHeaderError::AddressTooShort { got: 3, need: 12 })
        );
        assert_eq!(
            parse(&header(0x21, 0x21, &tcp4_block())),
            Err(ProxyHeaderError::AddressTooShort { got: 12, need: 36 })
        );
        assert_eq!(
            parse(&header(0x21, 0x11, &vec![0; 2000])),
            Err(ProxyHeaderError::TooLong(2000))
        );
        let mut cut = header(0x21, 0x11, &tcp4_block());
        cut.truncate(20);
        assert_eq!(parse(&cut), Err(ProxyHeaderError::Truncated));
    }

    #[tokio::test]
    async fn read_header_stops_at_the_end_of_the_header() {
        let mut bytes = header(0x21, 0x11, &tcp4_block());
        bytes.extend_from_slice(b"SSH-2.0-x\r\n");
        let mut reader = &bytes[..];
        let h = read_header(&mut reader).await.unwrap();
        assert_eq!(h.source, Some("192.0.2.7:40000".parse().unwrap()));
        assert_eq!(reader, b"SSH-2.0-x\r\n");

        let mut short = &header(0x21, 0x11, &tcp4_block())[..20];
        assert_eq!(
            read_header(&mut short).await,
            Err(ProxyHeaderError::Truncated)
        );
    }

    #[test]
    fn proxy_signatures_are_recognised_early() {
        assert_eq!(looks_like_proxy_header(b"SSH-2.0-OpenSSH"), Some(false));
        assert_eq!(looks_like_proxy_header(&SIGNATURE), Some(true));
        assert_eq!(looks_like_proxy_header(b"PROXY TCP4 1.2.3.4"), Some(true));
        assert_eq!(looks_like_proxy_header(b"\r\n\r\n"), None);
        assert_eq!(looks_like_proxy_header(b""), None);
    }
}
