//! The proxy's configuration, checked once at start (main.rs parses the
//! flags into this before anything is bound).

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use envgate_proto::audit::AuditLog;
use envgate_proto::names::{SELF_SERVICE_ENV, validate_environment};
use envgate_proto::tls::TlsFiles;
use russh::keys::PrivateKey;

use crate::error::ProxyError;
use crate::limits::ConnectionLimits;

pub struct Config {
    pub listen: SocketAddr,
    /// `None`: no ops endpoint (in-process tests).
    pub ops_listen: Option<SocketAddr>,
    pub controlplane: Vec<String>,
    pub host_key: PrivateKey,
    /// This proxy's client certificate, its key and the fleet CA.
    pub tls: TlsFiles,
    /// The name the control plane's certificate is checked against; `None`: each URL's host.
    pub controlplane_server_name: Option<String>,
    /// The id the certificate in `tls` names (`spiffe://envgate/proxy/<id>`).
    pub proxy_id: String,
    /// Where login records go.
    pub audit: AuditLog,
    pub trusted_proxies: Vec<Cidr>,
    pub max_connections: usize,
    /// Connections logging in, and each user's connections.
    pub limits: ConnectionLimits,
    pub login_grace: Duration,
    pub shutdown_grace: Duration,
    pub auth_cache_size: usize,
    /// The Docker socket for containers without the agent; `None`: no Docker access.
    pub docker_host: Option<String>,
    /// Where session recordings are written (`--recordings-dir`); `None`: sessions of
    /// environments that record are refused.
    pub recordings_dir: Option<std::path::PathBuf>,
    /// The address reported to the control plane; defaults to `listen`.
    pub advertise: Option<String>,
    /// Extra SSH listeners, each pinned to one environment.
    pub pinned_listen: Vec<PinnedListen>,
}

impl Config {
    /// Reads the host key (an OpenSSH private key file).
    pub fn load_host_key(path: &std::path::Path) -> Result<PrivateKey, ProxyError> {
        russh::keys::load_secret_key(path, None).map_err(|e| {
            ProxyError::Config(format!("cannot load host key {}: {e}", path.display()))
        })
    }
}

/// `--pinned-listen ADDR=ENV`: every connection accepted on `addr` is
/// placed in `environment`, whatever the login asks for (except the
/// self-service pseudo-environment, which stays reachable everywhere).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedListen {
    pub addr: SocketAddr,
    pub environment: String,
}

impl FromStr for PinnedListen {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let Some((addr, environment)) = text.rsplit_once('=') else {
            return Err(format!(
                "{text:?}: a pinned listener is ADDR=ENVIRONMENT, e.g. 0.0.0.0:2223=debian"
            ));
        };
        let addr: SocketAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{text:?}: {addr:?} is not an address with a port"))?;
        let environment = environment.trim();
        validate_environment(environment).map_err(|e| format!("{text:?}: {e}"))?;
        if environment == SELF_SERVICE_ENV {
            return Err(format!(
                "{text:?}: \"{SELF_SERVICE_ENV}\" is the self-service pseudo-environment, not one to pin a port to"
            ));
        }
        Ok(Self {
            addr,
            environment: environment.to_owned(),
        })
    }
}

/// Parses a comma-separated list of `ADDR=ENV`; empty entries are ignored.
pub fn parse_pinned(text: &str) -> Result<Vec<PinnedListen>, String> {
    text.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(str::parse)
        .collect()
}

/// No two listeners on one address (port 0, "any free port", may repeat).
pub fn check_listeners(listen: SocketAddr, pinned: &[PinnedListen]) -> Result<(), ProxyError> {
    let mut seen = vec![listen];
    for p in pinned {
        if p.addr.port() != 0 && seen.contains(&p.addr) {
            return Err(ProxyError::Config(format!(
                "--pinned-listen {}={}: {} is already a listen address",
                p.addr, p.environment, p.addr
            )));
        }
        seen.push(p.addr);
    }
    Ok(())
}

/// An address range, `10.0.0.0/8` or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or CIDR range"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0..={max}"))?,
            None => max,
        };
        Ok(Self { network, prefix })
    }
}

/// Parses a comma-separated list; empty entries are ignored.
pub fn parse_cidrs(text: &str) -> Result<Vec<Cidr>, String> {
    text.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(str::parse)
        .collect()
}

pub fn is_trusted(trusted: &[Cidr], ip: IpAddr) -> bool {
    trusted.iter().any(|c| c.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_match_their_ranges() {
        let list = parse_cidrs("127.0.0.1, 10.0.0.0/8,fd00::/8").unwrap();
        assert!(is_trusted(&list, "127.0.0.1".parse().unwrap()));
        assert!(!is_trusted(&list, "127.0.0.2".parse().unwrap()));
        assert!(is_trusted(&list, "10.200.3.4".parse().unwrap()));
        assert!(is_trusted(&list, "::ffff:10.1.1.1".parse().unwrap()));
        assert!(is_trusted(&list, "fd12::1".parse().unwrap()));
        assert!(!is_trusted(&list, "::1".parse().unwrap()));
        assert!(is_trusted(
            &parse_cidrs("0.0.0.0/0").unwrap(),
            "192.0.2.1".parse().unwrap()
        ));
        assert!(parse_cidrs("").unwrap().is_empty());
        assert!(parse_cidrs("10.0.0.0/33").is_err());
        assert!(parse_cidrs("nonsense").is_err());
    }

    #[test]
    fn pinned_listeners_are_checked_at_start() {
        let pinned = parse_pinned("127.0.0.1:2223=debian, [::1]:2224=py-3").unwrap();
        assert_eq!(
            pinned,
            [
                PinnedListen {
                    addr: "127.0.0.1:2223".parse().unwrap(),
                    environment: "debian".into()
                },
                PinnedListen {
                    addr: "[::1]:2224".parse().unwrap(),
                    environment: "py-3".into()
                },
            ]
        );
        assert!(parse_pinned("").unwrap().is_empty());
        for (bad, says) in [
            ("127.0.0.1:2223", "ADDR=ENVIRONMENT"),
            ("localhost:2223=debian", "not an address"),
            ("127.0.0.1=debian", "not an address"),
            ("127.0.0.1:2223=Debian", "lowercase"),
            ("127.0.0.1:2223=", "empty"),
            ("127.0.0.1:2223=envgate", "self-service"),
        ] {
            let e = parse_pinned(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let listen = "127.0.0.1:2200".parse().unwrap();
        assert!(check_listeners(listen, &pinned).is_ok());
        let twice = parse_pinned("127.0.0.1:2223=debian,127.0.0.1:2223=busybox").unwrap();
        let e = check_listeners(listen, &twice).unwrap_err().to_string();
        assert!(
            e.contains("127.0.0.1:2223 is already a listen address"),
            "{e}"
        );
        let on_listen = parse_pinned("127.0.0.1:2200=debian").unwrap();
        assert!(check_listeners(listen, &on_listen).is_err());
        let any = parse_pinned("127.0.0.1:0=debian,127.0.0.1:0=busybox").unwrap();
        assert!(check_listeners("127.0.0.1:0".parse().unwrap(), &any).is_ok());
    }
}
