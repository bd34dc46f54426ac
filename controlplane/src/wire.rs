//! The gRPC enums of the records' states, modes and kinds: one conversion per pair, so no
//! handler spells them as strings on the wire. The records keep their own words in etcd
//! (`model`'s serde names), which the enums never change.

use envgate_proto::v1 as wire;

use crate::error::AdminError;
use crate::model::{ContainerState, Mode, SessionKind};

impl From<Mode> for wire::EnvironmentMode {
    fn from(mode: Mode) -> Self {
        match mode {
            Mode::Persistent => wire::EnvironmentMode::Persistent,
            Mode::Ephemeral => wire::EnvironmentMode::Ephemeral,
        }
    }
}

/// Unspecified is the default mode, persistent (as an empty string was before the enum).
impl From<wire::EnvironmentMode> for Mode {
    fn from(mode: wire::EnvironmentMode) -> Self {
        match mode {
            wire::EnvironmentMode::Unspecified | wire::EnvironmentMode::Persistent => {
                Mode::Persistent
            }
            wire::EnvironmentMode::Ephemeral => Mode::Ephemeral,
        }
    }
}

/// The mode an admin request asks for. A number this version does not know (a newer client's)
/// is refused rather than read as the default: the operator meant something else.
pub fn requested_mode(field: &str, value: i32) -> Result<Mode, AdminError> {
    wire::EnvironmentMode::try_from(value)
        .map(Mode::from)
        .map_err(|_| {
            AdminError::invalid(
                field,
                format!(
                    "unknown value {value}; must be ENVIRONMENT_MODE_PERSISTENT (1), \
                     ENVIRONMENT_MODE_EPHEMERAL (2) or unset (persistent)"
                ),
            )
        })
}

impl From<ContainerState> for wire::ContainerState {
    fn from(state: ContainerState) -> Self {
        match state {
            ContainerState::Creating => wire::ContainerState::Creating,
            ContainerState::Running => wire::ContainerState::Running,
            ContainerState::Removing => wire::ContainerState::Removing,
        }
    }
}

impl From<SessionKind> for wire::SessionKind {
    fn from(kind: SessionKind) -> Self {
        match kind {
            SessionKind::Shell => wire::SessionKind::Shell,
            SessionKind::Exec => wire::SessionKind::Exec,
            SessionKind::Sftp => wire::SessionKind::Sftp,
            SessionKind::Forward => wire::SessionKind::Forward,
            SessionKind::Unspecified => wire::SessionKind::Unspecified,
        }
    }
}

impl From<wire::SessionKind> for SessionKind {
    fn from(kind: wire::SessionKind) -> Self {
        match kind {
            wire::SessionKind::Shell => SessionKind::Shell,
            wire::SessionKind::Exec => SessionKind::Exec,
            wire::SessionKind::Sftp => SessionKind::Sftp,
            wire::SessionKind::Forward => SessionKind::Forward,
            wire::SessionKind::Unspecified => SessionKind::Unspecified,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_round_trip_and_unspecified_is_persistent() {
        for mode in [Mode::Persistent, Mode::Ephemeral] {
            assert_eq!(Mode::from(wire::EnvironmentMode::from(mode)), mode);
        }
        assert_eq!(
            Mode::from(wire::EnvironmentMode::Unspecified),
            Mode::Persistent
        );
        assert_eq!(
            requested_mode("environment.environment_mode", 0).unwrap(),
            Mode::Persistent
        );
        assert_eq!(
            requested_mode("environment.environment_mode", 2).unwrap(),
            Mode::Ephemeral
        );
    }

    #[test]
    fn an_unknown_mode_number_is_refused_naming_the_field_and_the_values() {
        let refused = requested_mode("environment.environment_mode", 7)
            .unwrap_err()
            .to_string();
        assert_eq!(
            refused,
            "environment.environment_mode: unknown value 7; must be \
             ENVIRONMENT_MODE_PERSISTENT (1), ENVIRONMENT_MODE_EPHEMERAL (2) or unset (persistent)"
        );
        assert!(!refused.contains('\n'));
    }

    #[test]
    fn container_states_map_one_to_one() {
        assert_eq!(
            [
                ContainerState::Creating,
                ContainerState::Running,
                ContainerState::Removing
            ]
            .map(wire::ContainerState::from),
            [
                wire::ContainerState::Creating,
                wire::ContainerState::Running,
                wire::ContainerState::Removing
            ]
        );
    }

    #[test]
    fn session_kinds_round_trip() {
        for kind in [
            SessionKind::Shell,
            SessionKind::Exec,
            SessionKind::Sftp,
            SessionKind::Forward,
            SessionKind::Unspecified,
        ] {
            assert_eq!(SessionKind::from(wire::SessionKind::from(kind)), kind);
        }
    }
}
