//! Short-lived session tokens: `<base64url(claims)>.<base64url(signature)>`,
//! signed with Ed25519 by the control plane. Every replica holds the same
//! keys, so a token issued by one is accepted by all; the claims name their
//! audience (one fleet's proxies) and the id of the key that signed them, so a
//! key can be rotated with overlap. Revocation is a per-user not-before time
//! (`revocations/{user}` in etcd).

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
    /// Who may present the token: the proxy fleet of one envgate instance
    /// ([`audience`]). Set by [`TokenKeys::sign`].
    #[serde(default)]
    pub aud: String,
    /// The id of the key that signed it, so keys can be rotated with overlap. Set by
    /// [`TokenKeys::sign`].
    #[serde(default)]
    pub kid: String,
}

/// Longest token accepted; anything longer is refused before it is decoded.
pub const MAX_TOKEN_LEN: usize = 4096;

/// The audience of tokens for the proxies of the instance `instance`.
pub fn audience(instance: &str) -> String {
    format!("envgate:{instance}:proxies")
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's signature is not valid")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token was signed by an unknown key")]
    UnknownKey,
    #[error("the token is for another audience")]
    WrongAudience,
    #[error("the signing key must be 32 bytes written as 64 hex digits")]
    BadKey,
    #[error("at least one signing key is required")]
    NoKey,
}

/// One Ed25519 key pair, named by its key id.
pub struct TokenKey {
    pair: Ed25519KeyPair,
    kid: String,
}

impl TokenKey {
    /// Reads a key from its text form: the 32-byte Ed25519 seed in hex.
    pub fn from_hex_seed(text: &str) -> Result<Self, TokenError> {
        let seed = decode_hex(text.trim()).ok_or(TokenError::BadKey)?;
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|_| TokenError::BadKey)?;
        let digest = ring::digest::digest(&ring::digest::SHA256, pair.public_key().as_ref());
        let kid = digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Self { pair, kid })
    }

    /// The key id: the first 8 bytes of SHA-256 of the public key, in hex.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    fn verify_signature(&self, body: &[u8], sig: &[u8]) -> bool {
        signature::UnparsedPublicKey::new(&signature::ED25519, self.pair.public_key().as_ref())
            .verify(body, sig)
            .is_ok()
    }
}

/// The keys of one control plane: the first signs, every one verifies. Rotating is adding a
/// new key after the old one (every replica), then moving it first, then dropping the old one
/// once the tokens it signed have expired (docs/operations.md).
pub struct TokenKeys {
    keys: Vec<TokenKey>,
    audience: String,
}

impl TokenKeys {
    pub fn new(keys: Vec<TokenKey>, audience: String) -> Result<Self, TokenError> {
        if keys.is_empty() {
            return Err(TokenError::NoKey);
        }
        Ok(Self { keys, audience })
    }

    /// The id of the key that signs new tokens.
    pub fn signing_kid(&self) -> &str {
        self.keys[0].kid()
    }

    /// Signs `claims` with the first key, stamping its key id and this fleet's audience.
    pub fn sign(&self, mut claims: Claims) -> String {
        let key = &self.keys[0];
        claims.kid = key.kid.clone();
        claims.aud = self.audience.clone();
        let body = B64.encode(serde_json::to_vec(&claims).expect("claims serialize"));
        let sig = key.pair.sign(body.as_bytes());
        format!("{body}.{}", B64.encode(sig.as_ref()))
    }

    /// Checks the signature (with the key the token names), the audience and the expiry
    /// against `now` (Unix seconds).
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let (body, sig) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let sig = B64.decode(sig).map_err(|_| TokenError::Malformed)?;
        let json = B64.decode(body).map_err(|_| TokenError::Malformed)?;
        // The claims name their key; nothing in them is trusted until that key verified them.
        let claims: Claims = serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
        let key = self
            .keys
            .iter()
            .find(|k| k.kid == claims.kid)
            .ok_or(TokenError::UnknownKey)?;
        if !key.verify_signature(body.as_bytes(), &sig) {
            return Err(TokenError::BadSignature);
        }
        if claims.aud != self.audience {
            return Err(TokenError::WrongAudience);
        }
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
    const OTHER: &str = "ff0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    fn claims(exp: i64) -> Claims {
        Claims {
            sub: "alice".into(),
            groups: vec!["students".into()],
            iat: 100,
            exp,
            jti: "j1".into(),
            aud: String::new(),
            kid: String::new(),
        }
    }

    fn keys(seeds: &[&str], audience: &str) -> TokenKeys {
        let keys = seeds
            .iter()
            .map(|s| TokenKey::from_hex_seed(s).unwrap())
            .collect();
        TokenKeys::new(keys, audience.to_owned()).unwrap()
    }

    #[test]
    fn round_trip_stamps_audience_and_key_id() {
        let keys = keys(&[SEED], "envgate:lab:proxies");
        let token = keys.sign(claims(200));
        let verified = keys.verify(&token, 150).unwrap();
        assert_eq!(verified.aud, "envgate:lab:proxies");
        assert_eq!(verified.kid, keys.signing_kid());
        assert_eq!(verified.kid.len(), 16);
        assert_eq!(
            Claims {
                aud: String::new(),
                kid: String::new(),
                ..verified
            },
            claims(200)
        );
    }

    #[test]
    fn expired_tampered_and_foreign_tokens_are_refused() {
        let keys = keys(&[SEED], "envgate:lab:proxies");
        let token = keys.sign(claims(200));
        assert_eq!(keys.verify(&token, 200), Err(TokenError::Expired));

        let mut forged = keys.verify(&token, 150).unwrap();
        forged.sub = "root".into();
        let forged_body = B64.encode(serde_json::to_vec(&forged).unwrap());
        let sig = token.split_once('.').unwrap().1;
        assert_eq!(
            keys.verify(&format!("{forged_body}.{sig}"), 150),
            Err(TokenError::BadSignature)
        );
        assert_eq!(keys.verify("garbage", 150), Err(TokenError::Malformed));
        assert_eq!(
            keys.verify(&"a.".repeat(MAX_TOKEN_LEN), 150),
            Err(TokenError::Malformed)
        );
        // Another fleet's key: its key id is unknown here.
        let other = self::keys(&[OTHER], "envgate:lab:proxies");
        assert_eq!(
            keys.verify(&other.sign(claims(200)), 150),
            Err(TokenError::UnknownKey)
        );
        // The same key, another instance's audience.
        let elsewhere = self::keys(&[SEED], "envgate:other:proxies");
        assert_eq!(
            keys.verify(&elsewhere.sign(claims(200)), 150),
            Err(TokenError::WrongAudience)
        );
    }

    #[test]
    fn rotation_verifies_old_tokens_while_the_new_key_signs() {
        let before = keys(&[SEED], "a");
        let old_token = before.sign(claims(200));
        // Step 1: the new key is added after the old one; the old one still signs.
        let adding = keys(&[SEED, OTHER], "a");
        assert_eq!(adding.signing_kid(), before.signing_kid());
        // Step 2: the new key moves first; tokens of the old key are still accepted.
        let rotated = keys(&[OTHER, SEED], "a");
        assert_ne!(rotated.signing_kid(), before.signing_kid());
        assert!(rotated.verify(&old_token, 150).is_ok());
        let new_token = rotated.sign(claims(200));
        assert!(adding.verify(&new_token, 150).is_ok());
        // Step 3: the old key is dropped; its tokens are refused by key id.
        let after = keys(&[OTHER], "a");
        assert_eq!(after.verify(&old_token, 150), Err(TokenError::UnknownKey));
        assert!(after.verify(&new_token, 150).is_ok());
    }

    #[test]
    fn bad_keys_are_refused() {
        assert!(TokenKey::from_hex_seed("abc").is_err());
        assert!(TokenKey::from_hex_seed(&"zz".repeat(32)).is_err());
        assert_eq!(
            TokenKeys::new(Vec::new(), "a".into()).err(),
            Some(TokenError::NoKey)
        );
    }
}
