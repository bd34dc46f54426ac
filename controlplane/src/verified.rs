//! Tokens this replica has already verified, by their bytes. A proxy sends the same token for
//! every login of a user while it lives (300 s by default), and its Ed25519 check was a tenth of
//! a warm open's CPU in the control plane (docs/benchmarks.md, "No read, no inspect"): it is
//! done once per token and replica. Only the signature is remembered; expiry is judged at each
//! use and revocations are checked at every open, as before.

use std::collections::HashMap;
use std::sync::Mutex;

use envgate_proto::token::{Claims, TokenError, TokenKeys};

/// Tokens remembered at most; past it the expired ones go, and if none has expired, all.
const AT_MOST: usize = 10_000;

#[derive(Default)]
pub struct VerifiedTokens {
    claims: Mutex<HashMap<String, Claims>>,
}

impl VerifiedTokens {
    /// `keys.verify(token, now)`, from memory when this token was verified before.
    pub fn verify(&self, keys: &TokenKeys, token: &str, now: i64) -> Result<Claims, TokenError> {
        let mut known = self.claims.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(claims) = known.get(token) {
            return if claims.exp <= now {
                known.remove(token);
                Err(TokenError::Expired)
            } else {
                Ok(claims.clone())
            };
        }
        drop(known);
        let claims = keys.verify(token, now)?;
        let mut known = self.claims.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() >= AT_MOST {
            known.retain(|_, c| c.exp > now);
            if known.len() >= AT_MOST {
                known.clear();
            }
        }
        known.insert(token.to_owned(), claims.clone());
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::tests::test_keys;

    fn claims(exp: i64) -> Claims {
        Claims {
            sub: "alice".into(),
            groups: vec![],
            iat: exp - 300,
            exp,
            jti: "t".into(),
            aud: String::new(),
            kid: String::new(),
        }
    }

    #[test]
    fn a_verified_token_is_remembered_until_it_expires_and_a_forged_one_never() {
        let keys = test_keys();
        let verified = VerifiedTokens::default();
        let token = keys.sign(claims(1000));
        let signed = keys.verify(&token, 900).unwrap();
        assert_eq!(verified.verify(&keys, &token, 900).unwrap(), signed);
        assert_eq!(verified.verify(&keys, &token, 999).unwrap(), signed);
        assert_eq!(
            verified.verify(&keys, &token, 1000),
            Err(TokenError::Expired)
        );
        assert_eq!(
            verified.verify(&keys, &token, 1001),
            Err(TokenError::Expired)
        );
        // The same claims under another signature are not the remembered token.
        let (body, _) = token.split_once('.').unwrap();
        let forged = format!("{body}.AAAA");
        assert!(verified.verify(&keys, &forged, 900).is_err());
    }
}
