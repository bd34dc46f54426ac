//! Session tokens, as a proxy or a forged request presents them: never a panic, nothing
//! unsigned is ever accepted, and no change to a signed token (one byte anywhere) leaves it
//! valid.
#![no_main]

use std::sync::LazyLock;

use envgate_proto::token::{Claims, MAX_TOKEN_LEN, TokenKey, TokenKeys, audience};
use libfuzzer_sys::fuzz_target;

const NOW: i64 = 1_800_000_000;

static KEYS: LazyLock<TokenKeys> = LazyLock::new(|| {
    let key =
        TokenKey::from_hex_seed("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
            .expect("seed");
    TokenKeys::new(vec![key], audience("fuzz")).expect("keys")
});

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // Whatever arrives is not signed by this key.
    assert!(KEYS.verify(&text, NOW).is_err(), "accepted {text:?}");

    // A token signed here, for a user named by the input, verifies; one byte changed does not.
    let Some((&at, rest)) = data.split_first() else {
        return;
    };
    let claims = Claims {
        sub: String::from_utf8_lossy(rest).into_owned(),
        groups: vec!["users".into()],
        iat: NOW - 10,
        exp: NOW + 300,
        jti: "fuzz".into(),
        aud: String::new(),
        kid: String::new(),
    };
    let token = KEYS.sign(claims);
    let verified = KEYS.verify(&token, NOW);
    if token.len() <= MAX_TOKEN_LEN {
        let verified = verified.expect("a fresh token verifies");
        assert_eq!(verified.sub, String::from_utf8_lossy(rest));
    }
    let mut changed = token.into_bytes();
    let i = usize::from(at) * changed.len() / 256;
    changed[i] = if changed[i] == b'A' { b'B' } else { b'A' };
    if let Ok(changed) = String::from_utf8(changed) {
        assert!(
            KEYS.verify(&changed, NOW).is_err(),
            "{changed:?} still verifies"
        );
    }
});
