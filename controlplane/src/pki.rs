//! A small certificate authority for one fleet, behind `envgate-controlplane pki` (which
//! `deploy/local/fleet` calls) and the test harnesses. Two CAs keep two trust domains apart:
//!
//! - the **fleet CA** issues the control plane's server certificate (also what `grpcurl
//!   -cacert` checks) and one client certificate per proxy, naming it by the URI SAN
//!   `spiffe://envgate/proxy/<id>` (`envgate_proto::tls`);
//! - the **etcd CA** issues etcd's server/peer certificate and the control plane's etcd
//!   client certificate. etcd lets in any client its CA vouches for, so no proxy certificate
//!   may come from it: a proxy must never reach etcd.
//!
//! Files live in one directory: `<ca>-ca.crt`/`<ca>-ca.key` and `<name>.crt`/`<name>.key`,
//! keys `0600`. Everything is idempotent: an existing CA is loaded, an existing certificate
//! is kept while it has more than [`RENEW_BEFORE`] left.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use envgate_proto::tls::{self, ProxyIdError};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// How long a CA is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);
/// How long a leaf certificate is valid.
const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 86_400);
/// A certificate with less than this left is issued again.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 86_400);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Unusable { path: PathBuf, reason: String },
    #[error(
        "{0}: only one of the CA's certificate and key exists; restore the other or remove both"
    )]
    HalfCa(PathBuf),
    #[error("a certificate name may contain only letters, digits, '.', '_' and '-' (got {0:?})")]
    BadName(String),
    #[error("proxy id {id:?}: {reason}")]
    BadProxyId { id: String, reason: ProxyIdError },
    #[error("{0:?} is neither a DNS name nor an IP address")]
    BadSan(String),
    #[error("generating the certificate failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// What a certificate is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Profile {
    /// A TLS server reached under these DNS names and IP addresses.
    Server { sans: Vec<String> },
    /// A TLS client named `common_name` (e.g. the control plane towards etcd).
    Client { common_name: String },
    /// An etcd member: server to clients and to its peers, client to its peers.
    Peer { sans: Vec<String> },
    /// An envgate proxy: a client whose identity is `spiffe://envgate/proxy/<id>`.
    Proxy { id: String },
}

/// A loaded or new CA that can issue certificates.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert_path: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

/// File names become paths: keep them to a safe alphabet.
fn check_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(PkiError::BadName(name.to_owned()))
    }
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    // Through a temporary name, so a reader never sees half a file.
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    file.write_all(contents.as_bytes()).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = SystemTime::now();
    // A little back-dating tolerates clocks that differ by a few minutes.
    params.not_before = (now - Duration::from_secs(300)).into();
    params.not_after = (now + lifetime).into();
}

/// Labels of letters, digits and '-', joined by dots; the first may be `*`.
fn is_dns_name(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

fn sans(names: &[String]) -> Result<Vec<SanType>, PkiError> {
    names
        .iter()
        .map(|name| match name.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) if is_dns_name(name) => name
                .as_str()
                .try_into()
                .map(SanType::DnsName)
                .map_err(|_| PkiError::BadSan(name.clone())),
            Err(_) => Err(PkiError::BadSan(name.clone())),
        })
        .collect()
}

impl Profile {
    fn params(&self) -> Result<CertificateParams, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "envgate");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let common_name = match self {
            Profile::Server { sans: names } => {
                params.subject_alt_names = sans(names)?;
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                names.first().cloned().unwrap_or_default()
            }
            Profile::Peer { sans: names } => {
                params.subject_alt_names = sans(names)?;
                params.extended_key_usages = vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ];
                names.first().cloned().unwrap_or_default()
            }
            Profile::Client { common_name } => {
                check_name(common_name)?;
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
                common_name.clone()
            }
            Profile::Proxy { id } => {
                tls::validate_proxy_id(id).map_err(|reason| PkiError::BadProxyId {
                    id: id.clone(),
                    reason,
                })?;
                let uri = tls::proxy_uri(id)
                    .try_into()
                    .map_err(|_| PkiError::BadName(id.clone()))?;
                params.subject_alt_names = vec![SanType::URI(uri)];
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
                format!("envgate proxy {id}")
            }
        };
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        validity(&mut params, LEAF_VALIDITY);
        Ok(params)
    }
}

/// Paths of a certificate and its key in `dir`.
pub fn paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    )
}

/// Whether the certificate at `path` exists and stays valid for longer than `RENEW_BEFORE`.
fn still_good(path: &Path) -> bool {
    let Ok(pem) = std::fs::read(path) else {
        return false;
    };
    tls::check_certificate(path, &pem, SystemTime::now() + RENEW_BEFORE).is_ok()
}

impl Authority {
    /// Loads `dir/<name>-ca.{crt,key}`, or creates them when neither exists.
    pub fn ensure(dir: &Path, name: &str) -> Result<Self, PkiError> {
        check_name(name)?;
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let (cert_path, key_path) = paths(dir, &format!("{name}-ca"));
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                let cert = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
                let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
                let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::Unusable {
                    path: key_path.clone(),
                    reason: e.to_string(),
                })?;
                let issuer =
                    Issuer::from_ca_cert_pem(&cert, key).map_err(|e| PkiError::Unusable {
                        path: cert_path.clone(),
                        reason: e.to_string(),
                    })?;
                Ok(Self { issuer, cert_path })
            }
            (false, false) => {
                let mut params = CertificateParams::default();
                let mut dn = DistinguishedName::new();
                dn.push(DnType::OrganizationName, "envgate");
                dn.push(DnType::CommonName, format!("envgate {name} CA"));
                params.distinguished_name = dn;
                params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
                params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
                validity(&mut params, CA_VALIDITY);
                let key = KeyPair::generate()?;
                let cert = params.self_signed(&key)?;
                write_file(&key_path, &key.serialize_pem(), 0o600)?;
                write_file(&cert_path, &cert.pem(), 0o644)?;
                Ok(Self {
                    issuer: Issuer::new(params, key),
                    cert_path,
                })
            }
            _ => Err(PkiError::HalfCa(cert_path)),
        }
    }

    /// The CA's certificate (what the other end is given to verify against).
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// Writes `dir/<name>.{crt,key}` for `profile`, unless a certificate there is still good;
    /// returns whether a new one was written.
    pub fn issue(&self, dir: &Path, name: &str, profile: &Profile) -> Result<bool, PkiError> {
        check_name(name)?;
        let (cert_path, key_path) = paths(dir, name);
        if still_good(&cert_path) && key_path.exists() {
            return Ok(false);
        }
        let params = profile.params()?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        write_file(&key_path, &key.serialize_pem(), 0o600)?;
        write_file(&cert_path, &cert.pem(), 0o644)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envgate_proto::tls::TlsFiles;

    #[test]
    fn a_proxy_certificate_names_its_proxy_and_is_kept_when_issued_again() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::ensure(dir.path(), "fleet").unwrap();
        assert!(
            ca.issue(dir.path(), "proxy-p1", &Profile::Proxy { id: "p1".into() })
                .unwrap()
        );
        let (cert, key) = paths(dir.path(), "proxy-p1");
        let files = TlsFiles::load(&cert, &key, ca.cert_path()).unwrap();
        assert_eq!(files.proxy_id(&cert).unwrap(), "p1");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "keys are private");

        // Idempotent: the CA is loaded, not replaced, and a good certificate is kept.
        let before = std::fs::read(&cert).unwrap();
        let again = Authority::ensure(dir.path(), "fleet").unwrap();
        assert!(
            !again
                .issue(dir.path(), "proxy-p1", &Profile::Proxy { id: "p1".into() })
                .unwrap()
        );
        assert_eq!(std::fs::read(&cert).unwrap(), before);
    }

    #[test]
    fn a_server_certificate_names_no_proxy() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::ensure(dir.path(), "fleet").unwrap();
        let profile = Profile::Server {
            sans: vec!["127.0.0.1".into(), "localhost".into()],
        };
        ca.issue(dir.path(), "controlplane", &profile).unwrap();
        let (cert, key) = paths(dir.path(), "controlplane");
        let files = TlsFiles::load(&cert, &key, ca.cert_path()).unwrap();
        assert!(files.proxy_id(&cert).is_err());
    }

    #[test]
    fn bad_names_and_half_cas_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Authority::ensure(dir.path(), "../x"),
            Err(PkiError::BadName(_))
        ));
        let ca = Authority::ensure(dir.path(), "fleet").unwrap();
        assert!(matches!(
            ca.issue(
                dir.path(),
                "proxy-x",
                &Profile::Proxy {
                    id: "Bad/Id".into()
                }
            ),
            Err(PkiError::BadProxyId { .. })
        ));
        assert!(matches!(
            ca.issue(
                dir.path(),
                "s",
                &Profile::Server {
                    sans: vec!["not a name".into()]
                }
            ),
            Err(PkiError::BadSan(_))
        ));
        std::fs::remove_file(dir.path().join("fleet-ca.key")).unwrap();
        let err = Authority::ensure(dir.path(), "fleet").err().unwrap();
        assert!(
            err.to_string().ends_with(
                "only one of the CA's certificate and key exists; restore the other or remove both"
            ),
            "{err}"
        );
    }
}
