//! envgate as an SSH user certificate authority, and the checks a certificate login passes.
//!
//! Issuing: `ssh alice+envgate@host cert < key.pub` reaches [`CertificateAuthority::issue`]
//! through SelfService.IssueCertificate: the key is certified for its token's user only, for
//! `--user-cert-validity`, with the three extensions envgate honours and a key id an operator
//! can grep for and revoke (`alice@envgate serial 42`).
//!
//! Logging in: russh has checked the certificate's own signature and its validity against the
//! proxy's clock and verified the client's signature with the certified key before the proxy
//! sends the certificate on. [`CertificateAuthority::check`] then decides as sshd does with
//! `TrustedUserCAKeys`: a trusted CA, a user certificate, the login name among the principals,
//! within its validity, only critical options envgate enforces; [`is_revoked`] adds the key id
//! revocations kept in etcd. Every refusal has its own [`Refusal`], which the audit log shows.
//!
//! The CA keys are files, like the token keys: `--user-ca-key` (repeatable, the first signs,
//! all are trusted: rotation with overlap, docs/operations.md) and `--trusted-user-ca-keys`
//! (external CAs such as step-ca or Vault, one public key a line). Every replica must be given
//! the same files.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use russh::keys::HashAlg;
use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::ssh_key::public::KeyData;
use russh::keys::ssh_key::{Algorithm, Certificate, PrivateKey, PublicKey};
use serde::{Deserialize, Serialize};

use crate::store::{self, Store, StoreError};

/// The extensions of an issued certificate: a terminal, port forwarding and agent forwarding,
/// and nothing else (no X11, no user rc).
pub const ISSUED_EXTENSIONS: [&str; 3] = [
    "permit-agent-forwarding",
    "permit-port-forwarding",
    "permit-pty",
];

/// `--user-cert-validity`'s default.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(16 * 3600);

/// An issued certificate is valid from this long before it was signed, so a replica or proxy
/// whose clock is a little behind the issuing replica's accepts it at once.
const BACKDATE_SECONDS: u64 = 60;

/// How far a certificate's start may lie in the future of this replica's clock (a CA whose
/// clock runs ahead). Expiry gets no such grace: a certificate is refused the second it ends.
pub const NOT_YET_VALID_GRACE_SECONDS: u64 = 5;

/// The longest public key line `cert` takes (an RSA 16384-bit key is ~2.8 KB).
pub const MAX_PUBLIC_KEY_LINE: usize = 8 * 1024;

/// The smallest RSA key certified.
const MIN_RSA_BITS: usize = 2048;

/// Why a certificate login is refused; the `Display` text is the audit record's `reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("certificate unreadable")]
    Unreadable,
    #[error("not a user certificate")]
    NotUserCertificate,
    #[error("certificate not signed by a trusted CA")]
    UntrustedCa,
    #[error("certificate signature invalid")]
    BadSignature,
    #[error("certificate not yet valid")]
    NotYetValid,
    #[error("certificate expired")]
    Expired,
    #[error("principal not in certificate")]
    PrincipalNotInCertificate,
    #[error("certificate key id revoked")]
    Revoked,
    /// `force-command`, `verify-required` or one envgate does not know: OpenSSH refuses a
    /// certificate with a critical option it does not understand, and so does envgate with
    /// one it does not enforce.
    #[error("certificate critical option {0:?} not supported")]
    CriticalOption(String),
    #[error("client address not allowed by the certificate's source-address")]
    SourceAddress,
    /// A certificate names a user that does not exist (and may not create one).
    #[error("unknown user")]
    UnknownUser,
    #[error("user disabled")]
    UserDisabled,
    #[error("certificate logins are not configured")]
    NotConfigured,
}

/// Why `cert` will not certify a key: one line the user sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssueError {
    #[error("this server issues no certificates (it has no --user-ca-key)")]
    NoCaKey,
    #[error("expected one OpenSSH public key line on stdin (e.g. ~/.ssh/id_ed25519.pub)")]
    NotAPublicKey,
    #[error("the public key is more than {MAX_PUBLIC_KEY_LINE} bytes")]
    TooLong,
    #[error("{0} keys are not certified; use an ed25519 key (ssh-keygen -t ed25519)")]
    WeakKey(String),
    #[error("signing failed: {0}")]
    Signing(String),
}

/// Whence a trusted CA key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// One of envgate's own keys (`--user-ca-key`).
    Envgate,
    /// `--trusted-user-ca-keys`.
    External,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Envgate => "envgate",
            Origin::External => "external",
        }
    }
}

/// What a certificate login may do, once [`CertificateAuthority::check`] accepted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub key_id: String,
    pub serial: u64,
    /// Which kind of CA signed it.
    pub origin: Origin,
    /// The certified key, SSH wire format.
    pub key: Vec<u8>,
    /// The certificate's extensions (`permit-pty`, …).
    pub extensions: Vec<String>,
}

/// A certificate as issued by [`CertificateAuthority::issue`].
#[derive(Debug, Clone)]
pub struct Issued {
    pub certificate: Certificate,
    pub line: String,
    pub key_fingerprint: String,
    pub ca_fingerprint: String,
}

/// Users a certificate from an external CA makes on their first login
/// (`--certificate-creates-users`), in these groups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserCreation {
    pub groups: Vec<String>,
}

/// envgate's CA keys (the first signs) and the external CAs it trusts.
#[derive(Debug, Clone, Default)]
pub struct CertificateAuthority {
    own: Vec<PrivateKey>,
    external: Vec<PublicKey>,
    validity: Duration,
    creates_users: Option<UserCreation>,
}

impl CertificateAuthority {
    /// `own` keys must be Ed25519 ([`load_private_key`] checks that).
    pub fn new(
        own: Vec<PrivateKey>,
        external: Vec<PublicKey>,
        validity: Duration,
        creates_users: Option<UserCreation>,
    ) -> Self {
        Self {
            own,
            external,
            validity,
            creates_users,
        }
    }

    /// Whether certificates log anyone in (some CA is trusted).
    pub fn enabled(&self) -> bool {
        !self.own.is_empty() || !self.external.is_empty()
    }

    /// Users a certificate from an external CA may create.
    pub fn creates_users(&self) -> Option<&UserCreation> {
        self.creates_users.as_ref()
    }

    /// Every trusted CA key with where it comes from; envgate's signing key first.
    pub fn authorities(&self) -> Vec<(PublicKey, Origin)> {
        self.own
            .iter()
            .map(|k| (k.public_key().clone(), Origin::Envgate))
            .chain(self.external.iter().map(|k| (k.clone(), Origin::External)))
            .collect()
    }

    fn origin_of(&self, signer: &KeyData) -> Option<Origin> {
        if self.own.iter().any(|k| k.public_key().key_data() == signer) {
            Some(Origin::Envgate)
        } else if self.external.iter().any(|k| k.key_data() == signer) {
            Some(Origin::External)
        } else {
            None
        }
    }

    /// Certifies `public_key_line` for `user`, from `now` (Unix seconds) for the configured
    /// validity. The serial is random (63 bits): unique without a counter in etcd that every
    /// issue would have to go through.
    pub fn issue(&self, user: &str, public_key_line: &str, now: u64) -> Result<Issued, IssueError> {
        let Some(signer) = self.own.first() else {
            return Err(IssueError::NoCaKey);
        };
        let key = parse_public_key_line(public_key_line)?;
        refuse_weak(&key)?;
        let serial = rand::random::<u64>() >> 1;
        let valid_after = now.saturating_sub(BACKDATE_SECONDS);
        let valid_before = now.saturating_add(self.validity.as_secs());
        let nonce = rand::random::<[u8; 32]>();
        let sign = || -> Result<Certificate, russh::keys::ssh_key::Error> {
            let mut builder = Builder::new(
                nonce.to_vec(),
                key.key_data().clone(),
                valid_after,
                valid_before,
            )?;
            builder
                .serial(serial)?
                .cert_type(CertType::User)?
                .key_id(key_id(user, serial))?
                .valid_principal(user)?
                .comment(user)?;
            for extension in ISSUED_EXTENSIONS {
                builder.extension(extension, "")?;
            }
            builder.sign(signer)
        };
        let certificate = sign().map_err(|e| IssueError::Signing(e.to_string()))?;
        let line = certificate
            .to_openssh()
            .map_err(|e| IssueError::Signing(e.to_string()))?;
        Ok(Issued {
            line,
            key_fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
            ca_fingerprint: signer.public_key().fingerprint(HashAlg::Sha256).to_string(),
            certificate,
        })
    }

    /// Decides a certificate login for `user` from `client_address` at `now`, as sshd does
    /// with `TrustedUserCAKeys` (revocation is [`is_revoked`]'s, from etcd).
    pub fn check(
        &self,
        certificate: &Certificate,
        user: &str,
        client_address: &str,
        now: u64,
    ) -> Result<Checked, Refusal> {
        if !self.enabled() {
            return Err(Refusal::NotConfigured);
        }
        if certificate.cert_type() != CertType::User {
            return Err(Refusal::NotUserCertificate);
        }
        let origin = self
            .origin_of(certificate.signature_key())
            .ok_or(Refusal::UntrustedCa)?;
        if certificate.signature_key().is_certificate() || certificate.verify_signature().is_err() {
            return Err(Refusal::BadSignature);
        }
        if certificate.valid_after() > now.saturating_add(NOT_YET_VALID_GRACE_SECONDS) {
            return Err(Refusal::NotYetValid);
        }
        if now >= certificate.valid_before() {
            return Err(Refusal::Expired);
        }
        // No principals would be a certificate for anyone: sshd refuses it too.
        if !certificate.valid_principals().iter().any(|p| p == user) {
            return Err(Refusal::PrincipalNotInCertificate);
        }
        for (name, value) in certificate.critical_options().iter() {
            match name.as_str() {
                "source-address" => {
                    if !source_address_allows(value, client_address) {
                        return Err(Refusal::SourceAddress);
                    }
                }
                other => return Err(Refusal::CriticalOption(other.to_owned())),
            }
        }
        Ok(Checked {
            key_id: certificate.key_id().to_owned(),
            serial: certificate.serial(),
            origin,
            key: wire(certificate.public_key()),
            extensions: certificate.extensions().keys().cloned().collect(),
        })
    }
}

/// A key in SSH wire format (RFC 4253 section 6.6), as `PublicKey::to_bytes` writes it.
pub fn wire(key: &KeyData) -> Vec<u8> {
    PublicKey::new(key.clone(), "")
        .to_bytes()
        .unwrap_or_default()
}

/// `alice@envgate serial 42`: says who it is for and, with the serial, which certificate.
pub fn key_id(user: &str, serial: u64) -> String {
    format!("{user}@envgate serial {serial}")
}

/// One OpenSSH public key line, not a certificate, not a private key.
fn parse_public_key_line(line: &str) -> Result<PublicKey, IssueError> {
    if line.len() > MAX_PUBLIC_KEY_LINE {
        return Err(IssueError::TooLong);
    }
    let mut lines = line.lines().map(str::trim).filter(|l| !l.is_empty());
    let (Some(only), None) = (lines.next(), lines.next()) else {
        return Err(IssueError::NotAPublicKey);
    };
    PublicKey::from_openssh(only).map_err(|_| IssueError::NotAPublicKey)
}

/// DSA (1024-bit, SHA-1) and RSA below 2048 bits are not certified.
fn refuse_weak(key: &PublicKey) -> Result<(), IssueError> {
    match key.key_data() {
        KeyData::Dsa(_) => Err(IssueError::WeakKey("DSA".into())),
        KeyData::Rsa(rsa) => {
            let bits = rsa.key_size();
            if (bits as usize) < MIN_RSA_BITS {
                Err(IssueError::WeakKey(format!("{bits}-bit RSA")))
            } else {
                Ok(())
            }
        }
        KeyData::Other(_) => Err(IssueError::WeakKey(key.algorithm().to_string())),
        _ => Ok(()),
    }
}

/// Whether `client_address` (`ip:port`, or a bare address) is in the comma-separated CIDR list
/// of a `source-address` critical option. An unreadable list or address allows nothing, as
/// sshd refuses a certificate whose list it cannot parse.
fn source_address_allows(list: &str, client_address: &str) -> bool {
    let client = client_address
        .parse::<SocketAddr>()
        .map(|a| a.ip())
        .or_else(|_| client_address.parse::<IpAddr>());
    let Ok(client) = client else {
        return false;
    };
    let client = match client {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(client, IpAddr::V4),
        v4 => v4,
    };
    let mut allowed = false;
    for entry in list.split(',') {
        match cidr_contains(entry.trim(), client) {
            Some(true) => allowed = true,
            Some(false) => {}
            None => return false,
        }
    }
    allowed
}

/// `Some(whether)` `net` (`addr` or `addr/len`) contains `ip`; `None` if `net` is unreadable.
fn cidr_contains(net: &str, ip: IpAddr) -> Option<bool> {
    let (addr, len) = match net.split_once('/') {
        Some((addr, len)) => (addr.parse::<IpAddr>().ok()?, Some(len.parse::<u32>().ok()?)),
        None => (net.parse::<IpAddr>().ok()?, None),
    };
    match (addr, ip) {
        (IpAddr::V4(net), IpAddr::V4(ip)) => {
            let len = len.unwrap_or(32);
            if len > 32 {
                return None;
            }
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            Some(u32::from(net) & mask == u32::from(ip) & mask)
        }
        (IpAddr::V6(net), IpAddr::V6(ip)) => {
            let len = len.unwrap_or(128);
            if len > 128 {
                return None;
            }
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            Some(u128::from(net) & mask == u128::from(ip) & mask)
        }
        _ => Some(false),
    }
}

/// Reads an envgate CA key: an unencrypted OpenSSH Ed25519 private key, as
/// `ssh-keygen -t ed25519 -N '' -f FILE` writes it.
pub fn load_private_key(path: &Path) -> Result<PrivateKey, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
    let key = PrivateKey::from_openssh(text.trim())
        .map_err(|e| format!("not an OpenSSH private key: {e}"))?;
    if key.is_encrypted() {
        return Err("the key is encrypted; write it without a passphrase (-N '')".into());
    }
    if key.algorithm() != Algorithm::Ed25519 {
        return Err(format!(
            "the CA key must be ed25519 (ssh-keygen -t ed25519), not {}",
            key.algorithm()
        ));
    }
    Ok(key)
}

/// Reads `TrustedUserCAKeys`-style lines: one OpenSSH public key a line; blank lines and `#`
/// comments are skipped.
pub fn load_trusted_keys(path: &Path) -> Result<Vec<PublicKey>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
    let mut keys = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key = PublicKey::from_openssh(line)
            .map_err(|e| format!("line {}: not an OpenSSH public key: {e}", number + 1))?;
        keys.push(key);
    }
    if keys.is_empty() {
        return Err("no key in it".into());
    }
    Ok(keys)
}

/// `16h`, `30m`, `3600s`, `2d` or plain seconds: `--user-cert-validity`.
pub fn parse_validity(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a number with s, m, h or d, e.g. 16h"))?;
    let seconds = match unit {
        "s" => number,
        "m" => number.saturating_mul(60),
        "h" => number.saturating_mul(3600),
        "d" => number.saturating_mul(86_400),
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d")),
    };
    if seconds == 0 || seconds > 366 * 86_400 {
        return Err(format!("{text:?}: must be between 1 s and 366 days"));
    }
    Ok(Duration::from_secs(seconds))
}

/// A revoked key id, under `certrevocations/{sha256(key id)}`: key ids are free text (any CA
/// picks its own), so the key is their hash and the record keeps the text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateRevocationRecord {
    pub key_id: String,
    #[serde(default)]
    pub reason: String,
    pub revoked_at: i64,
    #[serde(default)]
    pub revoked_by: String,
}

pub const CERT_REVOCATIONS: &str = "certrevocations/";

pub fn cert_revocation_key(key_id: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, key_id.as_bytes());
    format!("{CERT_REVOCATIONS}{}", hex::encode(digest.as_ref()))
}

/// Whether `key_id` was revoked.
pub async fn is_revoked(store: &dyn Store, key_id: &str) -> Result<bool, StoreError> {
    Ok(store.get(&cert_revocation_key(key_id)).await?.is_some())
}

pub async fn revoke(
    store: &dyn Store,
    record: &CertificateRevocationRecord,
) -> Result<(), StoreError> {
    store::put_json(store, &cert_revocation_key(&record.key_id), record, None).await?;
    Ok(())
}

pub async fn revocations(
    store: &dyn Store,
) -> Result<Vec<CertificateRevocationRecord>, StoreError> {
    let mut records: Vec<CertificateRevocationRecord> = store::range_json(store, CERT_REVOCATIONS)
        .await?
        .into_iter()
        .map(|(_, v): (String, store::Versioned<CertificateRevocationRecord>)| v.value)
        .collect();
    records.sort_by(|a, b| (a.revoked_at, &a.key_id).cmp(&(b.revoked_at, &b.key_id)));
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::keys::ssh_key::private::Ed25519Keypair;

    const NOW: u64 = 1_800_000_000;

    fn ed25519() -> PrivateKey {
        PrivateKey::from(Ed25519Keypair::from_seed(&rand::random::<[u8; 32]>()))
    }

    fn line(key: &PrivateKey) -> String {
        key.public_key().to_openssh().unwrap()
    }

    fn ca(own: Vec<PrivateKey>, external: Vec<PublicKey>) -> CertificateAuthority {
        CertificateAuthority::new(own, external, DEFAULT_VALIDITY, None)
    }

    /// A certificate for `key` built as an external CA (`ssh-keygen -s`) would.
    fn signed_by(
        signer: &PrivateKey,
        key: &PrivateKey,
        principals: &[&str],
        validity: (u64, u64),
        critical: &[(&str, &str)],
        cert_type: CertType,
    ) -> Certificate {
        let mut b = Builder::new(
            vec![7; 32],
            key.public_key().key_data().clone(),
            validity.0,
            validity.1,
        )
        .unwrap();
        b.serial(9)
            .unwrap()
            .cert_type(cert_type)
            .unwrap()
            .key_id("ext-9")
            .unwrap();
        if principals.is_empty() {
            b.all_principals_valid().unwrap();
        }
        for p in principals {
            b.valid_principal(*p).unwrap();
        }
        for (name, value) in critical {
            b.critical_option(*name, *value).unwrap();
        }
        b.sign(signer).unwrap()
    }

    #[test]
    fn issued_certificates_name_the_user_and_permit_three_things() {
        let signer = ed25519();
        let ca = ca(vec![signer.clone()], vec![]);
        let key = ed25519();
        let issued = ca.issue("alice", &line(&key), NOW).unwrap();
        let cert = Certificate::from_openssh(&issued.line).unwrap();
        assert_eq!(cert.valid_principals(), ["alice".to_owned()]);
        assert_eq!(cert.cert_type(), CertType::User);
        assert_eq!(cert.key_id(), key_id("alice", cert.serial()));
        assert_eq!(cert.valid_before() - NOW, 16 * 3600);
        assert!(cert.critical_options().is_empty());
        let extensions: Vec<&str> = cert.extensions().keys().map(String::as_str).collect();
        assert_eq!(extensions, ISSUED_EXTENSIONS);
        assert_eq!(cert.public_key(), key.public_key().key_data());
        let checked = ca.check(&cert, "alice", "192.0.2.1:22", NOW).unwrap();
        assert_eq!(checked.origin, Origin::Envgate);
        assert_eq!(checked.key, key.public_key().to_bytes().unwrap());
        assert_eq!(checked.serial, cert.serial());
        // Two issues never share a serial.
        let again = ca.issue("alice", &line(&key), NOW).unwrap();
        assert_ne!(again.certificate.serial(), cert.serial());
    }

    #[test]
    fn garbage_and_weak_keys_are_not_certified() {
        let ca = ca(vec![ed25519()], vec![]);
        let key = line(&ed25519());
        for garbage in [
            "",
            "\n\n",
            "hello",
            "ssh-ed25519 notbase64!!",
            "-----BEGIN OPENSSH PRIVATE KEY-----",
            &format!("{key}\n{key}"),
        ] {
            assert_eq!(
                ca.issue("alice", garbage, NOW).err(),
                Some(IssueError::NotAPublicKey),
                "{garbage:?}"
            );
        }
        assert_eq!(
            ca.issue("alice", &"A".repeat(MAX_PUBLIC_KEY_LINE + 1), NOW)
                .err(),
            Some(IssueError::TooLong)
        );
        // A certificate is not a public key.
        let cert = ca.issue("alice", &key, NOW).unwrap().line;
        assert_eq!(
            ca.issue("alice", &cert, NOW).err(),
            Some(IssueError::NotAPublicKey)
        );
        // Written by `ssh-keygen -t rsa -b 1024` and `ssh-keygen -t dsa`.
        let rsa1024 = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDHen03VWvKFDlTMtfT9Yz1uGFduMYcVwvsTmWmRh3TN7OGPxlrsEMMGgzXQ277eeTZN5YT8XIcLH4mf1vmnK64cULcwM3cEsX/xXdnOPCzbXI/WBvlvjNUxjAQyj/6zESIBrq5rIJl1qZElnl2CBDyVaaRlD8DDZNWaismPvh4nw== weak";
        match ca.issue("alice", rsa1024, NOW) {
            Err(IssueError::WeakKey(what)) => assert_eq!(what, "1024-bit RSA"),
            other => panic!("{:?}", other.map(|i| i.line)),
        }
        let dsa = "ssh-dss AAAAB3NzaC1kc3MAAACBAORwhK5Vkvz9SJfk08fnXf67xY206HKuSMO+5oorxNQoFXQ2XkLSyv8hQamjR5U036GQRyf4Cx5G7AQfKnX6pJXLLsf6XT4uqbcgm8qJh71F0bG30OJZ/qVoAOuKmjE5AL3MNRRE5UG/4xPbbYWY2cpJjpB3COfuT1P0UOAHKwr3AAAAFQDC9BMmdY2ZvxDZkK6NfcCL7nxB4wAAAIEAvmtpfZWpLqHhvGHkCRR6kRpFkK2ZDGh9MQuVE2WdJGARWzd7mH7BH9/7P+Qe6xWqul4ashOymw7kzonKTXAcBYT7LGtNZYPk2cz/+0zWCmq5Pao3/R4O1J5BaFbegKoiGMzWUFVAyrR377ZtQfpVAZaTZF8+omEK6gqcb1ISjPcAAACBAKlhzCJrHzLkCp0ZWKJhD5N5drwp7aKie/cjpur6Sw6dGpxKMgNzm6P+T6+JEngFbgpKiBk/iO7Lh8CTum/fwqerFsI8QSe/AySoialnZqeelJF124AkKZoTSFat/EyO221YjEi9XFvppAzp23wcHatczVc5TTOSDTOi7a/9lqqY dsa";
        match ca.issue("alice", dsa, NOW) {
            Err(IssueError::WeakKey(what)) => assert_eq!(what, "DSA"),
            other => panic!("{:?}", other.map(|i| i.line)),
        }
        let no_ca = CertificateAuthority::new(vec![], vec![], DEFAULT_VALIDITY, None);
        assert_eq!(
            no_ca.issue("alice", &key, NOW).err(),
            Some(IssueError::NoCaKey)
        );
    }

    #[test]
    fn each_refusal_has_its_reason() {
        let own = ed25519();
        let external = ed25519();
        let foreign = ed25519();
        let key = ed25519();
        let ca = ca(vec![own.clone()], vec![external.public_key().clone()]);
        let valid = (NOW - 10, NOW + 3600);
        let user = CertType::User;
        let check = |cert: &Certificate| ca.check(cert, "alice", "192.0.2.7:4000", NOW);

        let ok = signed_by(&external, &key, &["alice"], valid, &[], user);
        assert_eq!(check(&ok).unwrap().origin, Origin::External);
        assert_eq!(check(&ok).unwrap().key_id, "ext-9");
        let cases = [
            (
                signed_by(&foreign, &key, &["alice"], valid, &[], user),
                Refusal::UntrustedCa,
            ),
            (
                signed_by(&own, &key, &["bob"], valid, &[], user),
                Refusal::PrincipalNotInCertificate,
            ),
            (
                signed_by(&own, &key, &[], valid, &[], user),
                Refusal::PrincipalNotInCertificate,
            ),
            (
                signed_by(&own, &key, &["alice"], (NOW - 100, NOW), &[], user),
                Refusal::Expired,
            ),
            (
                signed_by(&own, &key, &["alice"], (NOW + 60, NOW + 3600), &[], user),
                Refusal::NotYetValid,
            ),
            (
                signed_by(&own, &key, &["alice"], valid, &[], CertType::Host),
                Refusal::NotUserCertificate,
            ),
            (
                signed_by(
                    &own,
                    &key,
                    &["alice"],
                    valid,
                    &[("force-command", "id")],
                    user,
                ),
                Refusal::CriticalOption("force-command".into()),
            ),
            (
                signed_by(&own, &key, &["alice"], valid, &[("made-up", "")], user),
                Refusal::CriticalOption("made-up".into()),
            ),
            (
                signed_by(
                    &own,
                    &key,
                    &["alice"],
                    valid,
                    &[("source-address", "10.0.0.0/8")],
                    user,
                ),
                Refusal::SourceAddress,
            ),
            (
                signed_by(
                    &own,
                    &key,
                    &["alice"],
                    valid,
                    &[("source-address", "nonsense,192.0.2.0/24")],
                    user,
                ),
                Refusal::SourceAddress,
            ),
        ];
        for (cert, refusal) in cases {
            assert_eq!(check(&cert).err(), Some(refusal.clone()), "{refusal}");
        }
        // A start a few seconds ahead (the CA's clock) is tolerated.
        let ahead = signed_by(&own, &key, &["alice"], (NOW + 3, NOW + 60), &[], user);
        assert!(check(&ahead).is_ok());
        let here = signed_by(
            &own,
            &key,
            &["alice"],
            valid,
            &[("source-address", "10.0.0.0/8,192.0.2.0/24")],
            user,
        );
        assert!(check(&here).is_ok());
        // A forged signature: the CA field swapped for a trusted key.
        let mut bytes = signed_by(&foreign, &key, &["alice"], valid, &[], user)
            .to_bytes()
            .unwrap();
        let foreign_wire = foreign.public_key().key_data().ed25519().unwrap().0;
        let own_wire = own.public_key().key_data().ed25519().unwrap().0;
        let at = bytes
            .windows(32)
            .position(|w| w == foreign_wire)
            .expect("the CA key is in the certificate");
        bytes[at..at + 32].copy_from_slice(&own_wire);
        let forged = Certificate::from_bytes(&bytes).unwrap();
        assert_eq!(check(&forged).err(), Some(Refusal::BadSignature));
        let off = CertificateAuthority::default();
        assert_eq!(
            off.check(&ok, "alice", "", NOW).err(),
            Some(Refusal::NotConfigured)
        );
    }

    #[test]
    fn source_addresses_are_matched_as_cidr() {
        assert!(source_address_allows("192.0.2.0/24", "192.0.2.200:1"));
        assert!(source_address_allows("192.0.2.5", "192.0.2.5:1"));
        assert!(!source_address_allows("192.0.2.5", "192.0.2.6:1"));
        assert!(source_address_allows("0.0.0.0/0", "203.0.113.9:1"));
        assert!(source_address_allows("2001:db8::/32", "[2001:db8::1]:22"));
        assert!(source_address_allows(
            "192.0.2.0/24",
            "[::ffff:192.0.2.1]:22"
        ));
        assert!(!source_address_allows("192.0.2.0/33", "192.0.2.1:1"));
        assert!(!source_address_allows("192.0.2.0/24", "not an address"));
        assert!(!source_address_allows("", "192.0.2.1:1"));
    }

    #[test]
    fn validity_is_read_with_a_unit() {
        assert_eq!(parse_validity("16h"), Ok(DEFAULT_VALIDITY));
        assert_eq!(parse_validity("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_validity("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_validity("2d"), Ok(Duration::from_secs(172_800)));
        for bad in ["", "0", "h", "16x", "-1h", "400d", "1.5h"] {
            assert!(parse_validity(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ca_key_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("ca");
        let key = ed25519();
        std::fs::write(
            &good,
            key.to_openssh(Default::default()).unwrap().as_bytes(),
        )
        .unwrap();
        assert_eq!(
            load_private_key(&good).unwrap().public_key(),
            key.public_key()
        );
        let public = dir.path().join("ca.pub");
        std::fs::write(&public, format!("# ours\n\n{}\n", line(&key))).unwrap();
        assert_eq!(
            load_trusted_keys(&public).unwrap(),
            vec![key.public_key().clone()]
        );
        assert!(load_private_key(&public).is_err());
        let garbage = dir.path().join("garbage");
        std::fs::write(&garbage, "ssh-ed25519 ???\n").unwrap();
        assert!(
            load_trusted_keys(&garbage)
                .unwrap_err()
                .starts_with("line 1:")
        );
        std::fs::write(&garbage, "").unwrap();
        assert!(load_trusted_keys(&garbage).is_err());
        assert!(load_private_key(&dir.path().join("missing")).is_err());
    }

    #[tokio::test]
    async fn revocations_are_kept_by_key_id() {
        let store = crate::store::MemoryStore::new();
        assert!(!is_revoked(&store, "alice@envgate serial 1").await.unwrap());
        let record = CertificateRevocationRecord {
            key_id: "alice@envgate serial 1".into(),
            reason: "laptop lost".into(),
            revoked_at: 5,
            revoked_by: "ops".into(),
        };
        revoke(&store, &record).await.unwrap();
        assert!(is_revoked(&store, "alice@envgate serial 1").await.unwrap());
        assert!(!is_revoked(&store, "alice@envgate serial 10").await.unwrap());
        assert_eq!(revocations(&store).await.unwrap(), vec![record]);
    }
}
