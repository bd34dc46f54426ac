//! The grammar of user and environment names, and the `user+environment`
//! login syntax. Both the proxy (to reject bad input before any RPC) and the
//! control plane (to validate admin requests) use these, so they cannot drift.

use thiserror::Error;

/// Longest user name accepted, as for Linux `useradd` (32).
pub const MAX_USER_LEN: usize = 32;
/// Longest environment name accepted (a DNS label is 63; we keep room for
/// the user name in container names).
pub const MAX_ENV_LEN: usize = 32;
/// The pseudo-environment that answers self-service commands.
pub const SELF_SERVICE_ENV: &str = "envgate";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("the user name is empty")]
    EmptyUser,
    #[error("the user name is longer than {MAX_USER_LEN} characters")]
    UserTooLong,
    #[error(
        "the user name may contain only lowercase letters, digits, '_', '-' and '.', and must start with a letter or '_'"
    )]
    BadUser,
    #[error("the environment name after '+' is empty")]
    EmptyEnvironment,
    #[error("the environment name is longer than {MAX_ENV_LEN} characters")]
    EnvironmentTooLong,
    #[error(
        "the environment name may contain only lowercase letters, digits and '-', and must start with a letter or digit"
    )]
    BadEnvironment,
    #[error("use at most one '+' (user+environment)")]
    TooManyPlus,
}

/// A login name split into the user and the environment they asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    pub user: String,
    pub environment: Option<String>,
}

/// Client variables an environment accepts when it names none, as sshd's usual `AcceptEnv`
/// (Debian's `LANG LC_*`) plus the terminal, time zone and colour support.
pub const DEFAULT_ACCEPT_ENV: &[&str] = &["LANG", "LC_*", "TERM", "TZ", "COLORTERM"];

/// Whether `name` matches an `AcceptEnv` pattern: `*` any run of characters, `?` one.
pub fn env_pattern_matches(pattern: &str, name: &str) -> bool {
    // The usual greedy match with one backtrack point: at most len(p) * len(n) steps.
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        // A `*` in the pattern is a wildcard even where the name holds a `*` too.
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && (p[pi] == b'?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if let Some((star_p, star_n)) = star {
            pi = star_p + 1;
            ni = star_n + 1;
            star = Some((star_p, star_n + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

/// Parses `user` or `user+environment`.
pub fn parse_login(login: &str) -> Result<Login, NameError> {
    let mut parts = login.splitn(3, '+');
    let user = parts.next().unwrap_or_default();
    let environment = parts.next();
    if parts.next().is_some() {
        return Err(NameError::TooManyPlus);
    }
    validate_user(user)?;
    if let Some(env) = environment {
        validate_environment(env)?;
    }
    Ok(Login {
        user: user.to_owned(),
        environment: environment.map(str::to_owned),
    })
}

pub fn validate_user(user: &str) -> Result<(), NameError> {
    let mut chars = user.chars();
    let first = chars.next().ok_or(NameError::EmptyUser)?;
    if user.len() > MAX_USER_LEN {
        return Err(NameError::UserTooLong);
    }
    let first_ok = first.is_ascii_lowercase() || first == '_';
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-.".contains(c));
    if first_ok && rest_ok {
        Ok(())
    } else {
        Err(NameError::BadUser)
    }
}

pub fn validate_environment(env: &str) -> Result<(), NameError> {
    let mut chars = env.chars();
    let first = chars.next().ok_or(NameError::EmptyEnvironment)?;
    if env.len() > MAX_ENV_LEN {
        return Err(NameError::EnvironmentTooLong);
    }
    let first_ok = first.is_ascii_lowercase() || first.is_ascii_digit();
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if first_ok && rest_ok {
        Ok(())
    } else {
        Err(NameError::BadEnvironment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_suffixed_logins() {
        assert_eq!(
            parse_login("alice").unwrap(),
            Login {
                user: "alice".into(),
                environment: None
            }
        );
        assert_eq!(
            parse_login("alice+pytorch").unwrap(),
            Login {
                user: "alice".into(),
                environment: Some("pytorch".into())
            }
        );
    }

    #[test]
    fn bad_logins_say_why() {
        assert_eq!(parse_login(""), Err(NameError::EmptyUser));
        assert_eq!(parse_login("+x"), Err(NameError::EmptyUser));
        assert_eq!(parse_login("a+b+c"), Err(NameError::TooManyPlus));
        assert_eq!(parse_login("alice+"), Err(NameError::EmptyEnvironment));
        assert_eq!(parse_login(&"a".repeat(33)), Err(NameError::UserTooLong));
        assert_eq!(parse_login("al\u{7}ice"), Err(NameError::BadUser));
        assert_eq!(parse_login("Alice"), Err(NameError::BadUser));
        assert_eq!(parse_login("alice+Py"), Err(NameError::BadEnvironment));
        assert_eq!(parse_login("alice+-x"), Err(NameError::BadEnvironment));
        assert_eq!(parse_login("../etc"), Err(NameError::BadUser));
    }

    #[test]
    fn accept_env_patterns_match_as_sshd_does() {
        for (pattern, name) in [
            ("LANG", "LANG"),
            ("LC_*", "LC_ALL"),
            ("LC_*", "LC_"),
            ("*", "X"),
            ("A?C", "ABC"),
            ("*_KEY", "MY_KEY"),
            // Found by the login_names fuzz target: a `*` in the name made the pattern's `*`
            // match only itself.
            ("*", "*\n"),
            ("A*", "A*B"),
        ] {
            assert!(env_pattern_matches(pattern, name), "{pattern} {name}");
        }
        for (pattern, name) in [
            ("LANG", "LANGUAGE"),
            ("LC_*", "XLC_ALL"),
            ("A?C", "AC"),
            ("", "A"),
        ] {
            assert!(!env_pattern_matches(pattern, name), "{pattern} {name}");
        }
        // No blow-up on a hostile pattern.
        assert!(!env_pattern_matches(&"*A".repeat(32), &"A".repeat(31)));
        assert!(env_pattern_matches(&"*A".repeat(32), &"A".repeat(64)));
    }
}
