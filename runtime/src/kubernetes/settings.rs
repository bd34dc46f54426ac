//! The catalogue's `kubernetes:` blocks as written (the per-environment one is
//! [`KubernetesPlacement`], kept in the environment's record), and their checks: each field refused with
//! one line naming it, before anything reaches the API server (which would refuse the Pod at
//! a user's first login instead).
//!
//! ```yaml
//! kubernetes:                       # top level: the users' home claims
//!   home: {storage_class: fast-rwx, size: 20Gi, access_mode: ReadWriteMany}
//! environments:
//!   - name: cuda
//!     kubernetes:                   # per environment: where and how its Pods run
//!       node_selector: {nvidia.com/gpu.present: "true"}
//!       tolerations: ["nvidia.com/gpu:NoSchedule"]
//!       image_pull_policy: IfNotPresent
//!       image_pull_secrets: [lab-registry]
//! ```

use serde::Deserialize;

use super::objects::parse_toleration;
use super::{HomeSettings, PodSettings, names};
use crate::types::KubernetesPlacement;

/// The top-level block.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogueKubernetes {
    #[serde(default)]
    pub home: Option<HomeText>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HomeText {
    #[serde(default)]
    pub storage_class: Option<String>,
    #[serde(default)]
    pub size: Option<String>,
    #[serde(default)]
    pub access_mode: Option<String>,
}

const ACCESS_MODES: &[&str] = &["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"];
const PULL_POLICIES: &[&str] = &["Always", "IfNotPresent", "Never"];

impl CatalogueKubernetes {
    /// Errors name the field below `kubernetes.`: `home.size: ...`.
    pub fn home(&self) -> Result<HomeSettings, String> {
        let mut home = HomeSettings::default();
        let Some(text) = &self.home else {
            return Ok(home);
        };
        if let Some(class) = &text.storage_class {
            if !is_dns_subdomain(class) {
                return Err(format!(
                    "home.storage_class: {class:?} is not a storage class name (lowercase letters, digits, - and .)"
                ));
            }
            home.storage_class = Some(class.clone());
        }
        if let Some(size) = &text.size {
            if !is_storage_quantity(size) {
                return Err(format!(
                    "home.size: {size:?} is not a size (a whole number with Ki, Mi, Gi, Ti, k, M, G or T, e.g. 20Gi)"
                ));
            }
            home.size = size.clone();
        }
        if let Some(mode) = &text.access_mode {
            if !ACCESS_MODES.contains(&mode.as_str()) {
                return Err(format!(
                    "home.access_mode: {mode:?} is not one of {}",
                    ACCESS_MODES.join(", ")
                ));
            }
            home.access_mode = mode.clone();
        }
        Ok(home)
    }
}

impl KubernetesPlacement {
    /// Errors name the field below `kubernetes.`: `tolerations[1]: ...`.
    pub fn settings(&self) -> Result<PodSettings, String> {
        for (key, value) in &self.node_selector {
            if !names::is_qualified_name(key) {
                return Err(format!(
                    "node_selector: {key:?} is not a label key (letters, digits, -, _, ., an optional prefix/)"
                ));
            }
            if !names::is_label_value(value) {
                return Err(format!(
                    "node_selector.{key}: {value:?} is not a label value (at most 63 letters, digits, -, _, .)"
                ));
            }
        }
        let tolerations = self
            .tolerations
            .iter()
            .enumerate()
            .map(|(i, t)| parse_toleration(t).map_err(|e| format!("tolerations[{i}]: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(policy) = &self.image_pull_policy
            && !PULL_POLICIES.contains(&policy.as_str())
        {
            return Err(format!(
                "image_pull_policy: {policy:?} is not one of {}",
                PULL_POLICIES.join(", ")
            ));
        }
        for (i, secret) in self.image_pull_secrets.iter().enumerate() {
            if !is_dns_subdomain(secret) {
                return Err(format!(
                    "image_pull_secrets[{i}]: {secret:?} is not a Secret name (lowercase letters, digits, - and .)"
                ));
            }
        }
        Ok(PodSettings {
            node_selector: self.node_selector.clone(),
            tolerations,
            image_pull_policy: self.image_pull_policy.clone(),
            image_pull_secrets: self.image_pull_secrets.clone(),
        })
    }
}

/// A Kubernetes object name: DNS labels joined by dots, at most 253 characters.
pub fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|part| {
            !part.is_empty()
                && part.len() <= 63
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

/// A whole number of bytes with an optional binary or decimal suffix (what home sizes use;
/// Kubernetes accepts more forms, which envgate has no need for).
fn is_storage_quantity(text: &str) -> bool {
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &text[digits.len()..];
    !digits.is_empty()
        && digits.len() <= 18
        && digits.bytes().all(|b| b.is_ascii_digit())
        && digits.bytes().any(|b| b != b'0')
        && ["", "Ki", "Mi", "Gi", "Ti", "Pi", "k", "M", "G", "T", "P"].contains(&suffix)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn kube_catalogue_home_defaults_and_checks() {
        assert_eq!(
            CatalogueKubernetes::default().home().unwrap(),
            HomeSettings::default()
        );
        let home = |storage_class: Option<&str>, size: Option<&str>, mode: Option<&str>| {
            CatalogueKubernetes {
                home: Some(HomeText {
                    storage_class: storage_class.map(str::to_owned),
                    size: size.map(str::to_owned),
                    access_mode: mode.map(str::to_owned),
                }),
            }
            .home()
        };
        let ok = home(Some("fast-rwx"), Some("20Gi"), Some("ReadWriteMany")).unwrap();
        assert_eq!(
            (
                ok.storage_class.as_deref(),
                ok.size.as_str(),
                ok.access_mode.as_str()
            ),
            (Some("fast-rwx"), "20Gi", "ReadWriteMany")
        );
        assert_eq!(
            home(Some("Fast"), None, None).unwrap_err(),
            "home.storage_class: \"Fast\" is not a storage class name (lowercase letters, digits, - and .)"
        );
        assert_eq!(
            home(None, Some("20 GB"), None).unwrap_err(),
            "home.size: \"20 GB\" is not a size (a whole number with Ki, Mi, Gi, Ti, k, M, G or T, e.g. 20Gi)"
        );
        assert!(home(None, Some("0Gi"), None).is_err());
        assert!(home(None, Some("Gi"), None).is_err());
        assert_eq!(
            home(None, None, Some("ReadOnlyMany")).unwrap_err(),
            "home.access_mode: \"ReadOnlyMany\" is not one of ReadWriteOnce, ReadWriteMany, ReadWriteOncePod"
        );
    }

    #[test]
    fn kube_catalogue_environment_settings_are_checked_field_by_field() {
        let good = KubernetesPlacement {
            node_selector: BTreeMap::from([(
                "nvidia.com/gpu.present".to_owned(),
                "true".to_owned(),
            )]),
            tolerations: vec!["nvidia.com/gpu:NoSchedule".to_owned()],
            image_pull_policy: Some("IfNotPresent".to_owned()),
            image_pull_secrets: vec!["lab-registry".to_owned()],
        };
        let settings = good.settings().unwrap();
        assert_eq!(
            settings.tolerations[0].key.as_deref(),
            Some("nvidia.com/gpu")
        );
        let bad = |f: fn(&mut KubernetesPlacement)| {
            let mut e = good.clone();
            f(&mut e);
            e.settings().unwrap_err()
        };
        assert_eq!(
            bad(|e| e.image_pull_policy = Some("always".to_owned())),
            "image_pull_policy: \"always\" is not one of Always, IfNotPresent, Never"
        );
        assert_eq!(
            bad(|e| e.tolerations.push("gpu=yes:Never".to_owned())),
            "tolerations[1]: toleration \"gpu=yes:Never\": effect \"Never\" is not NoSchedule, \
             PreferNoSchedule or NoExecute"
        );
        assert_eq!(
            bad(|e| e.image_pull_secrets = vec!["Lab_Registry".to_owned()]),
            "image_pull_secrets[0]: \"Lab_Registry\" is not a Secret name (lowercase letters, digits, - and .)"
        );
        assert_eq!(
            bad(|e| {
                e.node_selector
                    .insert("zone".to_owned(), "eu west".to_owned());
            }),
            "node_selector.zone: \"eu west\" is not a label value (at most 63 letters, digits, -, _, .)"
        );
        assert!(
            bad(|e| {
                e.node_selector
                    .insert("bad key!".to_owned(), "x".to_owned());
            })
            .starts_with("node_selector: \"bad key!\"")
        );
    }
}
