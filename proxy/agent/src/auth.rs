//! Challenge/response over the per-container secret. Both sides prove they hold the secret
//! with an HMAC-SHA256 over both fresh nonces, so the secret never crosses the socket and a
//! recorded exchange cannot be replayed. The agent proves itself too: a user who is root in
//! the container could put a fake agent on the socket path, and the proxy must notice.

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::protocol::{MAC_LEN, NONCE_LEN};

/// Shortest secret either side accepts.
pub const MIN_SECRET_LEN: usize = 16;

const CLIENT_LABEL: &[u8] = b"envgate-agent v1 client proof";
const AGENT_LABEL: &[u8] = b"envgate-agent v1 agent proof";

pub fn fresh_nonce() -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .expect("the kernel random source failed");
    nonce
}

fn tag(
    secret: &[u8],
    label: &[u8],
    version: u16,
    agent_nonce: &[u8],
    client_nonce: &[u8],
) -> hmac::Tag {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(label);
    ctx.update(&version.to_be_bytes());
    ctx.update(agent_nonce);
    ctx.update(client_nonce);
    ctx.sign()
}

fn to_array(tag: hmac::Tag) -> [u8; MAC_LEN] {
    tag.as_ref().try_into().expect("HMAC-SHA256 is 32 bytes")
}

/// What the proxy sends to prove it holds the secret.
pub fn client_proof(
    secret: &[u8],
    version: u16,
    agent_nonce: &[u8],
    client_nonce: &[u8],
) -> [u8; MAC_LEN] {
    to_array(tag(
        secret,
        CLIENT_LABEL,
        version,
        agent_nonce,
        client_nonce,
    ))
}

/// What the agent answers to prove it holds the secret too.
pub fn agent_proof(
    secret: &[u8],
    version: u16,
    agent_nonce: &[u8],
    client_nonce: &[u8],
) -> [u8; MAC_LEN] {
    to_array(tag(secret, AGENT_LABEL, version, agent_nonce, client_nonce))
}

/// Constant-time comparison of a received proof against the expected one.
pub fn proofs_match(expected: &[u8; MAC_LEN], got: &[u8; MAC_LEN]) -> bool {
    // Verifying a MAC over the expected value compares in constant time without a second
    // crypto dependency.
    let key = hmac::Key::new(hmac::HMAC_SHA256, expected);
    let t = hmac::sign(&key, b"compare");
    hmac::verify(
        &hmac::Key::new(hmac::HMAC_SHA256, got),
        b"compare",
        t.as_ref(),
    )
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_depend_on_every_input() {
        let a = fresh_nonce();
        let c = fresh_nonce();
        assert_ne!(a, c);
        let p = client_proof(b"0123456789abcdef", 1, &a, &c);
        assert!(proofs_match(
            &p,
            &client_proof(b"0123456789abcdef", 1, &a, &c)
        ));
        assert!(!proofs_match(
            &p,
            &client_proof(b"0123456789abcdeX", 1, &a, &c)
        ));
        assert!(!proofs_match(
            &p,
            &client_proof(b"0123456789abcdef", 2, &a, &c)
        ));
        assert!(!proofs_match(
            &p,
            &client_proof(b"0123456789abcdef", 1, &c, &a)
        ));
        assert!(!proofs_match(
            &p,
            &agent_proof(b"0123456789abcdef", 1, &a, &c)
        ));
    }
}
