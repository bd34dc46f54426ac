//! `user` and `user+environment` as typed by anyone who can reach the SSH port, and the
//! `accept_env` patterns of the catalogue: never a panic; an accepted login is exactly its
//! parts; a pattern without wildcards matches only itself.
#![no_main]

use envgate_proto::names::{env_pattern_matches, parse_login, validate_environment, validate_user};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(login) = parse_login(text) {
        assert!(validate_user(&login.user).is_ok());
        let rebuilt = match &login.environment {
            Some(env) => {
                assert!(validate_environment(env).is_ok());
                format!("{}+{env}", login.user)
            }
            None => login.user.clone(),
        };
        assert_eq!(rebuilt, text);
        assert!(
            login.user.bytes().all(|b| b.is_ascii_graphic()),
            "{:?}",
            login.user
        );
    }
    let (pattern, name) = text.split_once('\n').unwrap_or((text, text));
    let matched = env_pattern_matches(pattern, name);
    if !pattern.contains(['*', '?']) {
        assert_eq!(matched, pattern == name, "{pattern:?} vs {name:?}");
    }
    assert!(env_pattern_matches("*", name));
});
