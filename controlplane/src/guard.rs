//! Who is calling. Every call passes one of two guards before any handler runs:
//!
//! - [`ProxyGuard`] in front of the proxy-facing services (Auth, Sessions, Fleet,
//!   SelfService): the caller must have presented a client certificate the fleet CA issued to a
//!   proxy. The id it names becomes the call's [`ProxyIdentity`]; handlers take the proxy id
//!   from there and nowhere else.
//! - [`AdminGuard`] in front of the admin API: the caller presents a bearer token from the
//!   named admin tokens file; the name becomes the call's [`AdminIdentity`], which the audit
//!   log records.
//!
//! TLS itself (`envgate_proto::tls`) already refused anyone who does not speak it and any
//! client certificate the fleet CA did not issue.

use std::path::Path;
use std::sync::Arc;

use envgate_proto::audit::{AuditLog, Event, Outcome};
use envgate_proto::tls;
use ring::digest::{SHA256, digest};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::error::{AdminError, CallerError};

/// The proxy a call came from, read from its client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyIdentity(pub String);

/// The operator an admin call came from, by the name of their token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminIdentity(pub String);

/// The gRPC path of the call (`/envgate.admin.v1.Admin/PutUser`), put into every request's
/// extensions by [`mark_path`] so guards can name refused calls.
#[derive(Debug, Clone)]
pub struct CallPath(pub String);

/// A tower `map_request` function for the server: remembers each call's path.
pub fn mark_path<B>(
    mut request: tonic::codegen::http::Request<B>,
) -> tonic::codegen::http::Request<B> {
    let path = CallPath(request.uri().path().to_owned());
    request.extensions_mut().insert(path);
    request
}

/// The method's name from a request's [`CallPath`] (`PutUser`), `-` if unknown.
pub fn method_of<T>(request: &Request<T>) -> String {
    request
        .extensions()
        .get::<CallPath>()
        .and_then(|p| p.0.rsplit('/').next())
        .map_or_else(|| "-".to_owned(), str::to_owned)
}

/// The proxy identity a handler behind [`ProxyGuard`] runs for.
pub fn proxy_of<T>(request: &Request<T>) -> Result<ProxyIdentity, Status> {
    request
        .extensions()
        .get::<ProxyIdentity>()
        .cloned()
        .ok_or_else(|| CallerError::NoCertificate.into())
}

/// Lets through only callers with a proxy certificate from the fleet CA.
#[derive(Clone, Default)]
pub struct ProxyGuard;

impl Interceptor for ProxyGuard {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let certs = request.peer_certs().filter(|c| !c.is_empty());
        let Some(certs) = certs else {
            tracing::warn!(
                method = %method_of(&request),
                client = ?request.remote_addr(),
                "refused a call without a client certificate"
            );
            return Err(CallerError::NoCertificate.into());
        };
        match tls::proxy_id_of(&certs[0]) {
            Ok(id) => {
                request.extensions_mut().insert(ProxyIdentity(id));
                Ok(request)
            }
            Err(reason) => {
                tracing::warn!(
                    method = %method_of(&request),
                    client = ?request.remote_addr(),
                    %reason,
                    "refused a call whose certificate names no proxy"
                );
                Err(CallerError::NotAProxy(reason).into())
            }
        }
    }
}

/// The named admin tokens: one `NAME sha256:HEX` line per operator, HEX being the SHA-256 of
/// the token itself, so the file does not hold the tokens (see `docs/security.md`).
pub struct AdminTokens {
    entries: Vec<(String, [u8; 32])>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdminTokensError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("no admin token in it; add a line NAME sha256:HEX")]
    Empty,
}

impl AdminTokens {
    pub fn load(path: &Path) -> Result<Self, AdminTokensError> {
        let text = std::fs::read_to_string(path).map_err(|e| AdminTokensError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, AdminTokensError> {
        let mut entries: Vec<(String, [u8; 32])> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: String| AdminTokensError::Line {
                line: i + 1,
                reason,
            };
            let mut fields = line.split_whitespace();
            let (Some(name), Some(hash), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(bad("expected NAME sha256:HEX".into()));
            };
            envgate_proto::names::validate_user(name).map_err(|e| {
                bad(format!(
                    "{name:?}: {}",
                    e.to_string().replace("user name", "admin name")
                ))
            })?;
            let digest = hash
                .strip_prefix("sha256:")
                .and_then(decode_sha256)
                .ok_or_else(|| {
                    bad(format!(
                        "{name}: the hash must be sha256: and 64 hex digits"
                    ))
                })?;
            if entries.iter().any(|(n, _)| n == name) {
                return Err(bad(format!("{name}: named twice")));
            }
            if entries.iter().any(|(_, d)| *d == digest) {
                return Err(bad(format!("{name}: the same token as another admin")));
            }
            entries.push((name.to_owned(), digest));
        }
        if entries.is_empty() {
            return Err(AdminTokensError::Empty);
        }
        Ok(Self { entries })
    }

    /// The admin `token` belongs to. Every entry is compared in constant time, so timing
    /// reveals neither a match's position nor a matching prefix.
    pub fn identify(&self, token: &str) -> Option<&str> {
        let presented = digest(&SHA256, token.as_bytes());
        let mut found = None;
        for (name, expected) in &self.entries {
            if constant_time_eq(presented.as_ref(), expected) {
                found = Some(name.as_str());
            }
        }
        found
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn decode_sha256(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Checks `authorization: Bearer <token>` against the named admin tokens; a refused call is
/// written to the audit log here, an allowed one by the admin handler (which knows its target
/// and outcome).
#[derive(Clone)]
pub struct AdminGuard {
    tokens: Arc<AdminTokens>,
    audit: AuditLog,
}

impl AdminGuard {
    pub fn new(tokens: Arc<AdminTokens>, audit: AuditLog) -> Self {
        Self { tokens, audit }
    }
}

impl Interceptor for AdminGuard {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request
            .metadata()
            .get(envgate_proto::metadata::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match presented.and_then(|token| self.tokens.identify(token)) {
            Some(name) => {
                let identity = AdminIdentity(name.to_owned());
                request.extensions_mut().insert(identity);
                Ok(request)
            }
            None => {
                let error = AdminError::TokenRequired;
                self.audit.record(Event::Admin {
                    admin: "-".into(),
                    method: method_of(&request),
                    target: "-".into(),
                    outcome: Outcome::Failure,
                    error: Some(error.to_string()),
                });
                Err(error.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(token: &str) -> String {
        digest(&SHA256, token.as_bytes())
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn tokens_name_their_admin() {
        let file = format!(
            "# operators\nalice sha256:{}\n\n  bob   sha256:{}  \n",
            sha("alice-token"),
            sha("bob-token")
        );
        let tokens = AdminTokens::parse(&file).unwrap();
        assert_eq!(tokens.identify("alice-token"), Some("alice"));
        assert_eq!(tokens.identify("bob-token"), Some("bob"));
        assert_eq!(tokens.identify("alice-token "), None);
        assert_eq!(tokens.identify(""), None);
        assert_eq!(
            tokens.identify(&sha("alice-token")),
            None,
            "the hash is not the token"
        );
    }

    #[test]
    fn bad_token_files_say_which_line() {
        let good = sha("t");
        for (text, error) in [
            ("", AdminTokensError::Empty),
            ("# only a comment\n", AdminTokensError::Empty),
            (
                "alice",
                AdminTokensError::Line {
                    line: 1,
                    reason: "expected NAME sha256:HEX".into(),
                },
            ),
            (
                "\nalice sha256:abc",
                AdminTokensError::Line {
                    line: 2,
                    reason: "alice: the hash must be sha256: and 64 hex digits".into(),
                },
            ),
            (
                &format!("alice {good}"),
                AdminTokensError::Line {
                    line: 1,
                    reason: "alice: the hash must be sha256: and 64 hex digits".into(),
                },
            ),
            (
                &format!("alice sha256:{good}\nalice sha256:{}", sha("u")),
                AdminTokensError::Line {
                    line: 2,
                    reason: "alice: named twice".into(),
                },
            ),
            (
                &format!("alice sha256:{good}\nbob sha256:{good}"),
                AdminTokensError::Line {
                    line: 2,
                    reason: "bob: the same token as another admin".into(),
                },
            ),
            (
                &format!("Alice sha256:{good}"),
                AdminTokensError::Line {
                    line: 1,
                    reason: "\"Alice\": the admin name may contain only lowercase letters, digits, '_', '-' and '.', and must start with a letter or '_'".into(),
                },
            ),
        ] {
            assert_eq!(AdminTokens::parse(text).err(), Some(error), "{text:?}");
        }
    }
}
