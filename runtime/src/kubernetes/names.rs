//! Names of the objects envgate makes. Kubernetes names are DNS labels (lowercase letters,
//! digits, `-`), label values may not start or end with `_` or `.`, and envgate user names may
//! hold `_` and `.`: a name that had to change gets a hash of the original, so `a_b` and `a-b`
//! never share a home claim.

/// `envgate-<instance>-<user>-<env>-<8 hex>`, the Docker container name's shape.
pub fn pod_name(instance: &str, user: &str, environment: &str, suffix: &str) -> String {
    format!(
        "envgate-{instance}-{}-{environment}-{suffix}",
        dns_safe(user)
    )
}

/// `<pod>-agent`.
pub fn secret_name(pod_name: &str) -> String {
    format!("{pod_name}-agent")
}

/// `envgate-<instance>-home-<user>`: one per user and instance.
pub fn home_claim_name(instance: &str, user: &str) -> String {
    format!("envgate-{instance}-home-{}", dns_safe(user))
}

/// A label value standing for `value`: itself when Kubernetes accepts it, its DNS-safe form
/// otherwise (the exact value is kept in an annotation).
pub fn label_value(value: &str) -> String {
    if is_label_value(value) {
        value.to_owned()
    } else {
        dns_safe(value)
    }
}

/// `value` as a DNS label part: unchanged when already one; otherwise lowercased, other
/// characters as `-`, trimmed, and followed by `-<8 hex>` of the original.
pub fn dns_safe(value: &str) -> String {
    let valid = !value.is_empty()
        && value.len() <= 40
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if valid {
        return value.to_owned();
    }
    let mapped: String = value
        .chars()
        .take(40)
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = mapped.trim_matches('-');
    let hash = fnv1a(value.as_bytes());
    if trimmed.is_empty() {
        format!("x-{hash:08x}")
    } else {
        format!("{trimmed}-{hash:08x}")
    }
}

/// Stable across releases and machines (unlike `std`'s hasher), which names need.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |hash, b| {
        (hash ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// At most 63 of letters, digits, `-`, `_`, `.`, beginning and ending with a letter or digit
/// (empty is allowed too).
pub fn is_label_value(value: &str) -> bool {
    value.is_empty()
        || (value.len() <= 63
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && value.as_bytes()[0].is_ascii_alphanumeric()
            && value.as_bytes()[value.len() - 1].is_ascii_alphanumeric())
}

/// A label key: an optional DNS prefix and `/`, then a non-empty label-value-shaped name.
pub fn is_qualified_name(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            })
    });
    prefix_ok && !name.is_empty() && is_label_value(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_names_keep_safe_users_and_hash_the_others() {
        assert_eq!(home_claim_name("lab", "alice"), "envgate-lab-home-alice");
        let a = home_claim_name("lab", "a_b");
        let b = home_claim_name("lab", "a-b");
        assert_ne!(a, b, "two users never share a claim");
        assert!(a.starts_with("envgate-lab-home-a-b-"));
        assert_eq!(dns_safe("_"), format!("x-{:08x}", fnv1a(b"_")));
        assert_eq!(
            dns_safe("Bob.Smith"),
            format!("bob-smith-{:08x}", fnv1a(b"Bob.Smith"))
        );
        assert_eq!(
            pod_name("lab", "alice", "dev", "0a1b2c3d"),
            "envgate-lab-alice-dev-0a1b2c3d"
        );
        assert_eq!(secret_name("p"), "p-agent");
    }

    #[test]
    fn kube_label_values_are_checked_as_the_api_server_does() {
        assert!(is_label_value("alice.b_c-1"));
        assert!(is_label_value(""));
        assert!(!is_label_value("_alice"));
        assert!(!is_label_value(&"a".repeat(64)));
        assert!(is_label_value(&label_value("_alice")));
        assert!(is_qualified_name("nvidia.com/gpu"));
        assert!(is_qualified_name("dedicated"));
        assert!(!is_qualified_name("/gpu"));
        assert!(!is_qualified_name("Nvidia.com/gpu"));
        assert!(!is_qualified_name("a b"));
    }
}
