//! Lifetime policy: when a container is idle long enough to be reaped, when it reaches its
//! environment's maximum lifetime, when and how its sessions are warned before, and the
//! messages its users read.

use super::{Action, ReconcileError, Reconciler, count};
use crate::catalogue;
use crate::fleet;
use crate::model::{CommandRecord, ContainerRecord, EnvironmentRecord};
use crate::store::{Compare, TxnOp, Versioned};

/// Fallback idle timeout when the environment was deleted from the catalogue: the default an
/// environment gets when it sets none.
const DEFAULT_IDLE_TIMEOUT: i64 = catalogue::DEFAULT_IDLE_TIMEOUT_SECONDS as i64;
/// The lifetime warning comes at most this long before the end (a quarter of the lifetime
/// when that is shorter, see [`warning_lead`]).
const MAX_WARNING_LEAD: i64 = 300;

impl Reconciler {
    /// Ends the sessions of a container past its maximum lifetime, telling them why, and
    /// removes it.
    pub(super) async fn reap_over_age(
        &self,
        key: String,
        record: Versioned<ContainerRecord>,
        max_lifetime: i64,
    ) -> (String, Result<bool, ReconcileError>) {
        let message = end_message(&record.value.environment, max_lifetime);
        let removed = self
            .remove(
                &key,
                &record,
                Action::ReapLifetime,
                "max lifetime",
                Some(&message),
            )
            .await
            .map(|ended| ended.is_some());
        (key, removed)
    }

    /// Marks the record warned (CAS, so at most once whoever leads), then shows every session
    /// on it a notice. A failure after the mark loses the warning rather than risk a second.
    pub(super) async fn warn_lifetime(
        &self,
        key: &str,
        record: &Versioned<ContainerRecord>,
        end_of_life: i64,
    ) -> Result<bool, ReconcileError> {
        let r = &record.value;
        let now = self.clock.now();
        let warned = ContainerRecord {
            lifetime_warned_at: now,
            ..r.clone()
        };
        let marked = self
            .store
            .txn(
                vec![Compare::revision(key, record.mod_revision)],
                vec![TxnOp::put_json(key, &warned, None)],
            )
            .await?;
        if marked.is_none() {
            tracing::debug!(key, "record changed; warning next pass");
            return Ok(false);
        }
        let message = warning_message(&r.environment, end_of_life - now, end_of_life);
        let told = fleet::command_container_sessions(self.store.as_ref(), key, |session_id| {
            CommandRecord::Notice {
                session_id,
                message: message.clone(),
            }
        })
        .await?;
        count(Action::WarnLifetime.label());
        tracing::info!(action = Action::WarnLifetime.label(), container = %r.container_name, id = %r.container_id, user = %r.user, environment = %r.environment, sessions = told, ends_at = end_of_life, reason = "max lifetime near", "sessions warned");
        Ok(true)
    }
}

/// The idle timeout the reaper applies to a container of `env` (`None`: the environment was
/// deleted from the catalogue).
pub fn idle_timeout(env: Option<&EnvironmentRecord>) -> i64 {
    env.map_or(DEFAULT_IDLE_TIMEOUT, |e| i64::from(e.idle_timeout_seconds))
}

/// `env`'s maximum lifetime in seconds; 0: none (also for a deleted environment).
pub(super) fn max_lifetime(env: Option<&EnvironmentRecord>) -> i64 {
    env.map_or(0, |e| i64::from(e.max_lifetime_seconds))
}

/// When `record`'s container reaches its environment's maximum lifetime (counted from its
/// creation, or its claim from a warm pool); `None` when there is no maximum.
pub fn end_of_life(record: &ContainerRecord, env: Option<&EnvironmentRecord>) -> Option<i64> {
    let max_lifetime = max_lifetime(env);
    (max_lifetime > 0).then_some(record.created_at + max_lifetime)
}

/// How long before the end of its maximum lifetime a container's sessions are warned:
/// `min(300 s, max_lifetime / 4)`, so a short lifetime is not warned about from its start.
pub fn warning_lead(max_lifetime: i64) -> i64 {
    (max_lifetime / 4).min(MAX_WARNING_LEAD)
}

/// The notice shown `warning_lead` before the end, e.g. `environment "busybox" reaches its
/// maximum lifetime in 4 min (at 17:42 UTC); save your work — your home directory is kept`.
fn warning_message(environment: &str, left: i64, end_of_life: i64) -> String {
    let left = left.max(0);
    format!(
        "environment \"{environment}\" reaches its maximum lifetime in {} (at {} UTC); save your work — your home directory is kept",
        span(left),
        clock(end_of_life, left < 120),
    )
}

/// Why an over-age container's sessions end. ASCII only: OpenSSH prints it again in its
/// "Received disconnect" line, escaping anything else.
fn end_message(environment: &str, max_lifetime: i64) -> String {
    format!(
        "environment \"{environment}\" reached its maximum lifetime ({}); the session ends and its container is removed; your home directory is kept, connect again for a fresh container",
        span(max_lifetime)
    )
}

/// `45 s`, `4 min`, `2 h`, `1 h 30 min`.
fn span(seconds: i64) -> String {
    if seconds < 120 {
        return format!("{seconds} s");
    }
    let minutes = (seconds + 30) / 60;
    match (minutes / 60, minutes % 60) {
        (0, m) => format!("{m} min"),
        (h, 0) => format!("{h} h"),
        (h, m) => format!("{h} h {m} min"),
    }
}

/// The UTC time of day of a Unix second, `17:42` or `17:42:09`.
fn clock(unix: i64, with_seconds: bool) -> String {
    let day = unix.rem_euclid(86_400);
    let (h, m, s) = (day / 3600, day % 3600 / 60, day % 60);
    if with_seconds {
        format!("{h:02}:{m:02}:{s:02}")
    } else {
        format!("{h:02}:{m:02}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_warning_comes_a_quarter_of_the_lifetime_before_the_end_but_at_most_5_minutes() {
        assert_eq!(warning_lead(12), 3);
        assert_eq!(warning_lead(1000), 250);
        assert_eq!(warning_lead(1200), 300);
        assert_eq!(warning_lead(8 * 3600), 300);
        let end = 17 * 3600 + 42 * 60 + 9;
        assert_eq!(
            warning_message("busybox", 240, end),
            "environment \"busybox\" reaches its maximum lifetime in 4 min (at 17:42 UTC); save your work — your home directory is kept"
        );
        assert_eq!(
            warning_message("short", 3, end),
            "environment \"short\" reaches its maximum lifetime in 3 s (at 17:42:09 UTC); save your work — your home directory is kept"
        );
        assert_eq!(span(7200), "2 h");
        assert_eq!(span(5400), "1 h 30 min");
    }
}
