//! Short-lived session tokens: `<base64url(claims)>.<base64url(signature)>`,
//! signed with Ed25519 by the control plane. Every replica holds the same
//! signing key, so a token issued by one is accepted by all; revocation is a
//! per-user not-before time (`revocations/{user}` in etcd).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::signature::{self, Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user the token was issued to.
    pub sub: String,
    pub groups: Vec<String>,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Expires at, Unix seconds.
    pub exp: i64,
    /// Unique token id, for logs.
    pub jti: String,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's signature is not valid")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the signing key must be 32 bytes written as 64 hex digits")]
    BadKey,
}

/// Signs and verifies tokens. Cheap to clone behind an `Arc`.
pub struct TokenKey {
    pair: Ed25519KeyPair,
}

impl TokenKey {
    /// Reads a key from its text form: the 32-byte Ed25519 seed in hex.
    pub fn from_hex_seed(text: &str) -> Result<Self, TokenError> {
        let seed = decode_hex(text.trim()).ok_or(TokenError::BadKey)?;
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|_| TokenError::BadKey)?;
        Ok(Self { pair })
    }

    pub fn sign(&self, claims: &Claims) -> String {
        let body = B64.encode(serde_json::to_vec(claims).expect("claims serialize"));
        let sig = self.pair.sign(body.as_bytes());
        format!("{body}.{}", B64.encode(sig.as_ref()))
    }

    /// Checks the signature and the expiry against `now` (Unix seconds).
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, TokenError> {
        let (body, sig) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let sig = B64.decode(sig).map_err(|_| TokenError::Malformed)?;
        signature::UnparsedPublicKey::new(&signature::ED25519, self.pair.public_key().as_ref())
            .verify(body.as_bytes(), &sig)
            .map_err(|_| TokenError::BadSignature)?;
        let json = B64.decode(body).map_err(|_| TokenError::Malformed)?;
        let claims: Claims = serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
        if claims.exp <= now {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

fn decode_hex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    fn claims(exp: i64) -> Claims {
        Claims {
            sub: "alice".into(),
            groups: vec!["students".into()],
            iat: 100,
            exp,
            jti: "j1".into(),
        }
    }

    #[test]
    fn round_trip() {
        let key = TokenKey::from_hex_seed(SEED).unwrap();
        let token = key.sign(&claims(200));
        assert_eq!(key.verify(&token, 150).unwrap(), claims(200));
    }

    #[test]
    fn expired_tampered_and_foreign_tokens_are_refused() {
        let key = TokenKey::from_hex_seed(SEED).unwrap();
        let token = key.sign(&claims(200));
        assert_eq!(key.verify(&token, 200), Err(TokenError::Expired));

        let forged_body = B64.encode(
            serde_json::to_vec(&Claims {
                sub: "root".into(),
                ..claims(200)
            })
            .unwrap(),
        );
        let sig = token.split_once('.').unwrap().1;
        assert_eq!(
            key.verify(&format!("{forged_body}.{sig}"), 150),
            Err(TokenError::BadSignature)
        );

        let other = TokenKey::from_hex_seed(&SEED.replace("00", "ff")).unwrap();
        assert_eq!(other.verify(&token, 150), Err(TokenError::BadSignature));
        assert_eq!(key.verify("garbage", 150), Err(TokenError::Malformed));
    }

    #[test]
    fn bad_keys_are_refused() {
        assert!(TokenKey::from_hex_seed("abc").is_err());
        assert!(TokenKey::from_hex_seed(&"zz".repeat(32)).is_err());
    }
}
