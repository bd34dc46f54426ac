//! Mutual TLS between the proxies and the control plane, and the proxy identity it carries.
//!
//! Every proxy holds a client certificate issued by the fleet CA. Its subject alternative
//! names include one URI, `spiffe://envgate/proxy/<id>`, and that URI is the proxy's only
//! identity: the control plane takes the id of every proxy-facing call from the verified
//! certificate, never from the request body, so proxy A cannot register, place or close
//! sessions as proxy B. The control plane's own certificate is a server certificate from the
//! same CA; rustls checks the extended key usage, so neither kind can stand in for the other.
//!
//! Both ends read their PEM files once, at start, and refuse to start on a file that is
//! missing, unparsable or outside its validity period, naming the file.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use thiserror::Error;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The URI SAN of a proxy certificate is this prefix followed by the proxy id.
pub const PROXY_URI_PREFIX: &str = "spiffe://envgate/proxy/";
/// Longest proxy id (it becomes part of etcd keys and metric labels).
pub const MAX_PROXY_ID_LEN: usize = 63;
/// How long a peer has to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TlsError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path}: no PEM {what} in it")]
    Missing { path: PathBuf, what: &'static str },
    #[error("{path}: not a valid certificate: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{path}: the certificate expired at {date} (Unix time)")]
    Expired { path: PathBuf, date: i64 },
    #[error("{path}: the certificate is not valid before {date} (Unix time)")]
    NotYetValid { path: PathBuf, date: i64 },
    #[error("{path}: {reason}")]
    Identity {
        path: PathBuf,
        reason: IdentityError,
    },
}

/// Why a certificate does not name a proxy.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("the certificate cannot be parsed")]
    Unparsable,
    #[error("the certificate names no envgate proxy (a URI SAN {PROXY_URI_PREFIX}<id>)")]
    NoProxyUri,
    #[error("the certificate names more than one envgate proxy")]
    SeveralProxyUris,
    #[error("{0}")]
    BadId(ProxyIdError),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProxyIdError {
    #[error("the proxy id is empty")]
    Empty,
    #[error("the proxy id is longer than {MAX_PROXY_ID_LEN} characters")]
    TooLong,
    #[error(
        "the proxy id may contain only lowercase letters, digits, '.', '_' and '-', and must start with a letter or digit"
    )]
    BadCharacters,
}

/// Proxy ids are path segments of the URI and of etcd keys: a DNS-label-like grammar.
pub fn validate_proxy_id(id: &str) -> Result<(), ProxyIdError> {
    if id.is_empty() {
        return Err(ProxyIdError::Empty);
    }
    if id.len() > MAX_PROXY_ID_LEN {
        return Err(ProxyIdError::TooLong);
    }
    let first_ok = id
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok = id
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    if first_ok && rest_ok {
        Ok(())
    } else {
        Err(ProxyIdError::BadCharacters)
    }
}

/// The URI a proxy certificate carries for `id`.
pub fn proxy_uri(id: &str) -> String {
    format!("{PROXY_URI_PREFIX}{id}")
}

/// The proxy id a certificate (DER) names through its URI SAN.
pub fn proxy_id_of(der: &[u8]) -> Result<String, IdentityError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| IdentityError::Unparsable)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| IdentityError::Unparsable)?;
    let mut ids = san
        .into_iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix(PROXY_URI_PREFIX),
            _ => None,
        });
    let id = ids.next().ok_or(IdentityError::NoProxyUri)?;
    if ids.next().is_some() {
        return Err(IdentityError::SeveralProxyUris);
    }
    validate_proxy_id(id).map_err(IdentityError::BadId)?;
    Ok(id.to_owned())
}

/// Docker is reached only through a local Unix socket: its API is root on the host, and over
/// TCP it would be that for anyone on the network.
pub fn check_docker_host(host: &str) -> Result<(), String> {
    if host.starts_with("unix://") {
        Ok(())
    } else {
        Err(format!(
            "{host} is not a unix:// socket; Docker over TCP is not supported (its API is root on the host)"
        ))
    }
}

/// A PEM file's bytes, read once at start.
pub fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// The first certificate of a PEM file, checked to be valid at `now`; returns its DER.
pub fn check_certificate(path: &Path, pem: &[u8], now: SystemTime) -> Result<Vec<u8>, TlsError> {
    let block = Pem::iter_from_buffer(pem)
        .filter_map(Result::ok)
        .find(|p| p.label == "CERTIFICATE")
        .ok_or_else(|| TlsError::Missing {
            path: path.to_owned(),
            what: "certificate",
        })?;
    let cert = block.parse_x509().map_err(|e| TlsError::BadCertificate {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let now = now
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let validity = cert.validity();
    if now < validity.not_before.timestamp() {
        return Err(TlsError::NotYetValid {
            path: path.to_owned(),
            date: validity.not_before.timestamp(),
        });
    }
    if now > validity.not_after.timestamp() {
        return Err(TlsError::Expired {
            path: path.to_owned(),
            date: validity.not_after.timestamp(),
        });
    }
    Ok(block.contents)
}

/// A private key file holds a PEM private key (checked at start; rustls parses it).
pub fn check_private_key(path: &Path, pem: &[u8]) -> Result<(), TlsError> {
    let found = Pem::iter_from_buffer(pem)
        .filter_map(Result::ok)
        .any(|p| p.label.ends_with("PRIVATE KEY"));
    if found {
        Ok(())
    } else {
        Err(TlsError::Missing {
            path: path.to_owned(),
            what: "private key",
        })
    }
}

/// A certificate, its key and the CA that verifies the other end, read and checked at start.
#[derive(Clone)]
pub struct TlsFiles {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub ca: Vec<u8>,
    /// The DER of `cert`, for reading the identity it names.
    pub cert_der: Vec<u8>,
}

impl TlsFiles {
    /// Reads `cert`, `key` and `ca`, and checks each is what it should be and valid now.
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Self, TlsError> {
        let now = SystemTime::now();
        let (cert_pem, key_pem, ca_pem) = (read_pem(cert)?, read_pem(key)?, read_pem(ca)?);
        let cert_der = check_certificate(cert, &cert_pem, now)?;
        check_private_key(key, &key_pem)?;
        check_certificate(ca, &ca_pem, now)?;
        Ok(Self {
            cert: cert_pem,
            key: key_pem,
            ca: ca_pem,
            cert_der,
        })
    }

    /// The server side: this certificate, and client certificates verified against the CA.
    /// A client may connect without one (the admin API authenticates by bearer token); the
    /// proxy-facing services refuse such callers (see the control plane's guards).
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
            .client_auth_optional(true)
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// The client side: this certificate as the client's identity, the server verified against
    /// the CA under `server_name`.
    pub fn client_config(&self, server_name: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
            .domain_name(server_name)
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// The proxy id this certificate names.
    pub fn proxy_id(&self, path: &Path) -> Result<String, TlsError> {
        proxy_id_of(&self.cert_der).map_err(|reason| TlsError::Identity {
            path: path.to_owned(),
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_ids_follow_their_grammar() {
        for good in ["p1", "fleet-proxy-1", "e2e0a1b2c3d-p0", "a.b_c", "0"] {
            assert_eq!(validate_proxy_id(good), Ok(()), "{good}");
        }
        assert_eq!(validate_proxy_id(""), Err(ProxyIdError::Empty));
        assert_eq!(
            validate_proxy_id(&"a".repeat(64)),
            Err(ProxyIdError::TooLong)
        );
        for bad in ["-p", "P1", "p/1", "p 1", "p\n", "..", "ü"] {
            assert_eq!(
                validate_proxy_id(bad),
                Err(ProxyIdError::BadCharacters),
                "{bad:?}"
            );
        }
    }

    /// A self-signed certificate with these URI SANs (and a DNS name), as DER.
    fn cert_with_uris(uris: &[&str]) -> Vec<u8> {
        use rcgen::{CertificateParams, KeyPair, SanType};
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI((*uri).try_into().unwrap()));
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_proxy_id_is_the_one_uri_san() {
        let der = cert_with_uris(&["spiffe://envgate/proxy/fleet-proxy-1"]);
        assert_eq!(proxy_id_of(&der).unwrap(), "fleet-proxy-1");
        let other_uris = cert_with_uris(&[
            "https://example.org/x",
            "spiffe://envgate/admin/ops",
            "spiffe://envgate/proxy/p2",
        ]);
        assert_eq!(proxy_id_of(&other_uris).unwrap(), "p2");
        assert_eq!(
            proxy_id_of(&cert_with_uris(&[])),
            Err(IdentityError::NoProxyUri)
        );
        assert_eq!(
            proxy_id_of(&cert_with_uris(&["spiffe://envgate/admin/ops"])),
            Err(IdentityError::NoProxyUri)
        );
        assert_eq!(
            proxy_id_of(&cert_with_uris(&[
                "spiffe://envgate/proxy/p1",
                "spiffe://envgate/proxy/p2"
            ])),
            Err(IdentityError::SeveralProxyUris)
        );
        assert_eq!(
            proxy_id_of(&cert_with_uris(&["spiffe://envgate/proxy/../p1"])),
            Err(IdentityError::BadId(ProxyIdError::BadCharacters))
        );
        assert_eq!(
            proxy_id_of(&cert_with_uris(&["spiffe://envgate/proxy/"])),
            Err(IdentityError::BadId(ProxyIdError::Empty))
        );
    }

    #[test]
    fn missing_and_garbage_files_are_named() {
        let path = Path::new("/nonexistent/envgate/cert.pem");
        assert!(matches!(read_pem(path), Err(TlsError::Read { .. })));
        let garbage = Path::new("garbage.pem");
        assert_eq!(
            check_certificate(garbage, b"not pem", SystemTime::now()).unwrap_err(),
            TlsError::Missing {
                path: garbage.to_owned(),
                what: "certificate"
            }
        );
        assert_eq!(
            check_certificate(
                garbage,
                b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                SystemTime::now()
            )
            .unwrap_err()
            .to_string()
            .split(':')
            .next(),
            Some("garbage.pem")
        );
        assert!(check_private_key(garbage, b"nothing").is_err());
        assert_eq!(
            proxy_id_of(b"\x30\x03\x02\x01\x00"),
            Err(IdentityError::Unparsable)
        );
    }
}
