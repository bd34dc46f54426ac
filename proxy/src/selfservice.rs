//! The `envgate` pseudo-environment: `ssh alice+envgate@host envs|status|stop ENV|default ENV`
//! answers from the control plane's SelfService, without placing a session or starting any
//! container.
//!
//! Text output is for people and for `awk`/`cut`: tab-separated columns under a header line,
//! every field non-empty (`-` for none) and the free-text description last, so both
//! `cut -f` and awk's default whitespace splitting find the columns. `--json` prints one JSON
//! document with the same facts for scripts. Exit status: 0 answered, 1 the control plane
//! refused (its message on stderr), 2 the command line was not understood (usage on stderr).
//! The format is described in docs/environments.md ("Self-service over ssh").

use std::time::Duration;

use bytes::Bytes;
use envgate_proto::names;
use envgate_proto::v1::{
    ContainerState, EnvironmentMode, SessionKind, StopEnvironmentResponse, UserEnvironments,
    UserStatus,
};
use serde_json::json;

use crate::controlplane::ControlPlane;
use crate::error::{ConnectionResult, UsageError, placement_failure_line};
use crate::exec::{ChannelOutput, Inbound};
use crate::menu::printable;

/// The one-line usage shown after a command line that was not understood.
pub const USAGE: &str = "usage: ssh USER+envgate envs [--json] | status [--json] | stop ENV [--json] | default ENV [--json] | default --clear | cert < KEY.pub | ca | help";

/// How long `cert` waits for the public key on stdin.
pub const CERT_INPUT_TIMEOUT: Duration = Duration::from_secs(10);
/// The most `cert` reads from stdin: one public key line (an RSA 16384-bit key is ~2.8 KB).
pub const CERT_INPUT_MAX: usize = 8 * 1024;

const HELP: &str = "\
envgate self-service: ask about your environments without starting one.

  envs [--json]       the environments you may use: DEFAULT marks your
                      default (or the catalogue's), RUNNING where you
                      have a container
  status [--json]     your containers (sessions, idle and lifetime seconds
                      left) and your open sessions
  stop ENV [--json]   remove your container for ENV, ending its sessions;
                      your home directory is kept
  default ENV         use ENV when you do not choose one
  default --clear     forget your default (the catalogue's then applies)
  cert < KEY.pub      an SSH certificate for your public key, e.g.
                      cert < ~/.ssh/id_ed25519.pub > ~/.ssh/id_ed25519-cert.pub
                      (ssh then logs you in with it; ssh-keygen -L shows it)
  ca                  the CA keys certificates are trusted from, one per
                      line (for TrustedUserCAKeys or @cert-authority)
  help                this text

Run them as `ssh USER+envgate@HOST COMMAND`, or as
`ssh -o SetEnv=ENVGATE_ENV=envgate USER@HOST COMMAND`.
Text output is tab-separated under a header line; --json prints one JSON
document.
";

/// A self-service command line, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Help,
    Envs {
        json: bool,
    },
    Status {
        json: bool,
    },
    Stop {
        environment: String,
        json: bool,
    },
    /// `environment` empty: clear the saved default.
    Default {
        environment: String,
        json: bool,
    },
    /// Certify the public key read from stdin.
    Cert,
    /// Print the trusted CA keys.
    Ca,
}

/// Parses what the user typed after `ssh USER+envgate`; `None` (a shell) asks for help.
pub fn parse(command: Option<&str>) -> Result<Command, UsageError> {
    let Some(command) = command else {
        return Ok(Command::Help);
    };
    let mut words = command.split_whitespace();
    let Some(verb) = words.next() else {
        return Ok(Command::Help);
    };
    let rest: Vec<&str> = words.collect();
    let json = rest.contains(&"--json");
    let mut args = rest.iter().copied().filter(|a| *a != "--json");
    let unexpected = |command: &'static str, argument: &str| UsageError::UnexpectedArgument {
        command,
        argument: argument.escape_default().to_string(),
    };
    let parsed = match verb {
        "help" | "--help" | "-h" => {
            if let Some(extra) = rest.first() {
                return Err(unexpected("help", extra));
            }
            Command::Help
        }
        "envs" => Command::Envs { json },
        "cert" | "ca" if json => {
            return Err(unexpected(
                if verb == "cert" { "cert" } else { "ca" },
                "--json",
            ));
        }
        "cert" => Command::Cert,
        "ca" => Command::Ca,
        "status" => Command::Status { json },
        "stop" => {
            let environment = args.next().ok_or(UsageError::MissingEnvironment("stop"))?;
            if environment.starts_with('-') {
                return Err(unexpected("stop", environment));
            }
            names::validate_environment(environment).map_err(|reason| {
                UsageError::BadEnvironment {
                    command: "stop",
                    reason,
                }
            })?;
            Command::Stop {
                environment: environment.to_owned(),
                json,
            }
        }
        "default" => {
            let environment = args
                .next()
                .ok_or(UsageError::MissingEnvironment("default"))?;
            let environment = match environment {
                "--clear" => String::new(),
                flag if flag.starts_with('-') => return Err(unexpected("default", flag)),
                name => {
                    names::validate_environment(name).map_err(|reason| {
                        UsageError::BadEnvironment {
                            command: "default",
                            reason,
                        }
                    })?;
                    name.to_owned()
                }
            };
            Command::Default { environment, json }
        }
        other => {
            return Err(UsageError::UnknownCommand(
                other.escape_default().to_string(),
            ));
        }
    };
    let name = match &parsed {
        Command::Help => "help",
        Command::Envs { .. } => "envs",
        Command::Status { .. } => "status",
        Command::Stop { .. } => "stop",
        Command::Default { .. } => "default",
        Command::Cert => "cert",
        Command::Ca => "ca",
    };
    if let Some(extra) = args.next() {
        return Err(unexpected(name, extra));
    }
    Ok(parsed)
}

/// What a self-service command shows its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub stdout: String,
    pub stderr: String,
    pub exit_status: u32,
    pub result: ConnectionResult,
}

impl Reply {
    fn out(stdout: String) -> Self {
        Reply {
            stdout,
            stderr: String::new(),
            exit_status: 0,
            result: ConnectionResult::SelfService,
        }
    }

    fn usage(error: &UsageError) -> Self {
        Reply {
            stdout: String::new(),
            stderr: format!("envgate: {error}; {USAGE}\n"),
            exit_status: 2,
            result: ConnectionResult::SelfService,
        }
    }

    /// A command that could not run as asked: `line` on stderr, exit status 1.
    fn refused(line: String) -> Self {
        Reply {
            stdout: String::new(),
            stderr: format!("envgate: {line}\n"),
            exit_status: 1,
            result: ConnectionResult::SelfServiceFailed,
        }
    }

    fn failed(status: &tonic::Status) -> Self {
        Reply {
            stdout: String::new(),
            stderr: format!("{}\n", placement_failure_line(status)),
            exit_status: 1,
            result: ConnectionResult::SelfServiceFailed,
        }
    }
}

/// Runs `command` (the exec request's command line; `None` for a shell) for the token's user;
/// `stdin` is the channel's input (`cert` reads the public key from it).
pub async fn run(
    control_plane: &ControlPlane,
    token: &str,
    connection_id: &str,
    command: Option<&str>,
    stdin: &Inbound,
) -> Reply {
    let parsed = match parse(command) {
        Ok(parsed) => parsed,
        Err(e) => return Reply::usage(&e),
    };
    tracing::info!(command = ?parsed, "self-service command");
    let answered = match parsed {
        Command::Help => Ok(HELP.to_owned()),
        Command::Cert => {
            let public_key = match read_public_key(stdin).await {
                Ok(key) => key,
                Err(line) => return Reply::refused(line),
            };
            control_plane
                .issue_certificate(token, &public_key, connection_id)
                .await
                .map(|issued| {
                    tracing::info!(key_id = %issued.key_id, "certificate issued");
                    format!("{}\n", issued.certificate)
                })
        }
        Command::Ca => control_plane
            .certificate_authorities(token, connection_id)
            .await
            .map(|keys| {
                keys.envgate
                    .iter()
                    .chain(&keys.external)
                    .map(|line| format!("{line}\n"))
                    .collect()
            }),
        Command::Envs { json } => control_plane
            .list_environments(token, connection_id)
            .await
            .map(|envs| {
                if json {
                    envs_json(&envs)
                } else {
                    envs_text(&envs)
                }
            }),
        Command::Status { json } => {
            control_plane
                .status(token, connection_id)
                .await
                .map(|status| {
                    if json {
                        status_json(&status)
                    } else {
                        status_text(&status)
                    }
                })
        }
        Command::Stop { environment, json } => control_plane
            .stop_environment(token, &environment, connection_id)
            .await
            .map(|stopped| {
                if json {
                    stop_json(&environment, &stopped)
                } else {
                    stop_text(&environment, &stopped)
                }
            }),
        Command::Default { environment, json } => control_plane
            .set_default(token, &environment, connection_id)
            .await
            .map(|()| {
                if json {
                    document(&json!({ "default": environment }))
                } else if environment.is_empty() {
                    "your default environment is cleared; the catalogue's default applies\n"
                        .to_owned()
                } else {
                    format!("your default environment is now {environment}\n")
                }
            }),
    };
    match answered {
        Ok(stdout) => Reply::out(stdout),
        Err(status) => {
            tracing::info!(code = ?status.code(), message = %status.message(), "self-service command refused");
            Reply::failed(&status)
        }
    }
}

/// The public key `cert` certifies: stdin up to EOF, at most [`CERT_INPUT_MAX`] bytes within
/// [`CERT_INPUT_TIMEOUT`]. Whether it is a key is the control plane's to say.
async fn read_public_key(stdin: &Inbound) -> Result<String, String> {
    let read = async {
        let mut input = Vec::new();
        while let Some(chunk) = stdin.next().await {
            input.extend_from_slice(&chunk);
            if input.len() > CERT_INPUT_MAX {
                return Err(format!(
                    "cert: stdin has more than {CERT_INPUT_MAX} bytes; give it one public key (cert < ~/.ssh/id_ed25519.pub)"
                ));
            }
        }
        String::from_utf8(input).map_err(|_| {
            "cert: stdin is not text; give it one public key (cert < ~/.ssh/id_ed25519.pub)"
                .to_owned()
        })
    };
    match tokio::time::timeout(CERT_INPUT_TIMEOUT, read).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "cert: no public key on stdin within {} s; run: ssh USER+envgate@HOST cert < ~/.ssh/id_ed25519.pub",
            CERT_INPUT_TIMEOUT.as_secs()
        )),
    }
}

/// Writes `reply` to the channel (stdout, then stderr, with `\r\n` on a terminal), then the
/// exit status, EOF and close.
pub async fn answer(output: &ChannelOutput, reply: &Reply, pty: bool) {
    let terminal = |text: &str| {
        if pty {
            Bytes::from(text.replace('\n', "\r\n"))
        } else {
            Bytes::from(text.to_owned())
        }
    };
    // A client that went away misses the answer; nothing else is left to do.
    if !reply.stdout.is_empty() {
        let _ = output.stdout(terminal(&reply.stdout)).await;
    }
    if !reply.stderr.is_empty() {
        let _ = output.stderr(terminal(&reply.stderr)).await;
    }
    let _ = output.finish(reply.exit_status).await;
}

/// One field of a text row: never empty, no tab or line break, no terminal control.
fn field(value: &str) -> String {
    let cleaned = printable(value);
    let cleaned = cleaned.trim();
    if cleaned.is_empty() {
        "-".to_owned()
    } else {
        cleaned.to_owned()
    }
}

/// The words users have always read for modes, states and kinds (the wire's enum names are
/// for programs); "" for a value not said, which a text row shows as `-`.
fn mode_word(mode: EnvironmentMode) -> &'static str {
    match mode {
        EnvironmentMode::Persistent => "persistent",
        EnvironmentMode::Ephemeral => "ephemeral",
        EnvironmentMode::Unspecified => "",
    }
}

fn state_word(state: ContainerState) -> &'static str {
    match state {
        ContainerState::Creating => "creating",
        ContainerState::Running => "running",
        ContainerState::Removing => "removing",
        ContainerState::Unspecified => "",
    }
}

fn kind_word(kind: SessionKind) -> &'static str {
    match kind {
        SessionKind::Shell => "shell",
        SessionKind::Exec => "exec",
        SessionKind::Sftp => "sftp",
        SessionKind::Forward => "forward",
        SessionKind::Unspecified => "",
    }
}

fn row(fields: &[String]) -> String {
    let mut line = fields.join("\t");
    line.push('\n');
    line
}

fn document(value: &serde_json::Value) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_else(|_| "{}".to_owned());
    text.push('\n');
    text
}

/// `yours` (the saved default), `catalogue` (the catalogue's, used when none is saved) or `-`.
fn default_mark(name: &str, envs: &UserEnvironments) -> &'static str {
    if name == envs.user_default {
        "yours"
    } else if name == envs.catalogue_default {
        "catalogue"
    } else {
        "-"
    }
}

fn seconds_or_none(seconds: u32) -> String {
    if seconds == 0 {
        "-".to_owned()
    } else {
        seconds.to_string()
    }
}

pub fn envs_text(envs: &UserEnvironments) -> String {
    let mut out = row(&[
        "NAME",
        "DEFAULT",
        "RUNNING",
        "MODE",
        "IDLE_TIMEOUT",
        "MAX_LIFETIME",
        "DESCRIPTION",
    ]
    .map(String::from));
    for env in &envs.environments {
        out.push_str(&row(&[
            field(&env.name),
            default_mark(&env.name, envs).to_owned(),
            if env.running { "yes" } else { "no" }.to_owned(),
            field(mode_word(env.environment_mode())),
            env.idle_timeout_seconds.to_string(),
            seconds_or_none(env.max_lifetime_seconds),
            field(&env.description),
        ]));
    }
    out
}

pub fn envs_json(envs: &UserEnvironments) -> String {
    let environments: Vec<serde_json::Value> = envs
        .environments
        .iter()
        .map(|env| {
            json!({
                "name": env.name,
                "description": env.description,
                "mode": mode_word(env.environment_mode()),
                "running": env.running,
                "user_default": env.name == envs.user_default,
                "catalogue_default": env.name == envs.catalogue_default,
                "idle_timeout_seconds": env.idle_timeout_seconds,
                "max_lifetime_seconds": env.max_lifetime_seconds,
            })
        })
        .collect();
    document(&json!({
        "environments": environments,
        "user_default": envs.user_default,
        "catalogue_default": envs.catalogue_default,
    }))
}

/// `in-use` while sessions are open (-1), else the seconds left.
fn idle_left(seconds: i64) -> String {
    if seconds < 0 {
        "in-use".to_owned()
    } else {
        seconds.to_string()
    }
}

/// `-` when there is no maximum (-1), else the seconds left.
fn lifetime_left(seconds: i64) -> String {
    if seconds < 0 {
        "-".to_owned()
    } else {
        seconds.to_string()
    }
}

/// Two tables, containers then sessions, each under its header, a blank line between.
pub fn status_text(status: &UserStatus) -> String {
    let mut out = row(&[
        "ENVIRONMENT",
        "STATE",
        "SESSIONS",
        "IDLE_LEFT",
        "LIFETIME_LEFT",
        "CREATED",
        "CONTAINER",
    ]
    .map(String::from));
    for c in &status.containers {
        out.push_str(&row(&[
            field(&c.environment),
            field(state_word(c.container_state())),
            c.sessions.to_string(),
            idle_left(c.idle_seconds_left),
            lifetime_left(c.lifetime_seconds_left),
            rfc3339(c.created_at),
            field(&c.container_name),
        ]));
    }
    out.push('\n');
    out.push_str(&row(&[
        "SESSION",
        "ENVIRONMENT",
        "KIND",
        "STARTED",
        "CLIENT",
        "PROXY",
    ]
    .map(String::from)));
    for s in &status.sessions {
        out.push_str(&row(&[
            field(&s.id),
            field(&s.environment),
            field(kind_word(s.session_kind())),
            rfc3339(s.started_at),
            field(&s.client_address),
            field(&s.proxy_id),
        ]));
    }
    out
}

pub fn status_json(status: &UserStatus) -> String {
    let containers: Vec<serde_json::Value> = status
        .containers
        .iter()
        .map(|c| {
            json!({
                "environment": c.environment,
                "state": state_word(c.container_state()),
                "container_name": c.container_name,
                "created_at": c.created_at,
                "last_active_at": c.last_active_at,
                "sessions": c.sessions,
                "idle_seconds_left": c.idle_seconds_left,
                "lifetime_seconds_left": c.lifetime_seconds_left,
            })
        })
        .collect();
    let sessions: Vec<serde_json::Value> = status
        .sessions
        .iter()
        .map(|s| {
            json!({
                "id": s.id,
                "environment": s.environment,
                "kind": kind_word(s.session_kind()),
                "started_at": s.started_at,
                "client_address": s.client_address,
                "proxy_id": s.proxy_id,
            })
        })
        .collect();
    document(&json!({ "containers": containers, "sessions": sessions }))
}

pub fn stop_text(environment: &str, stopped: &StopEnvironmentResponse) -> String {
    if !stopped.stopped {
        return format!("{environment} is not running; nothing to stop\n");
    }
    let sessions = match stopped.sessions_ended {
        1 => "1 session".to_owned(),
        n => format!("{n} sessions"),
    };
    format!("stopped {environment} ({sessions} ended); your home directory is kept\n")
}

pub fn stop_json(environment: &str, stopped: &StopEnvironmentResponse) -> String {
    document(&json!({
        "environment": environment,
        "stopped": stopped.stopped,
        "sessions_ended": stopped.sessions_ended,
    }))
}

/// `2026-11-26T17:03:09Z` for Unix seconds (UTC); `-` for 0 (unknown).
pub fn rfc3339(unix: i64) -> String {
    if unix <= 0 {
        return "-".to_owned();
    }
    envgate_proto::time::rfc3339(unix, None)
}

#[cfg(test)]
mod tests {
    use envgate_proto::v1::{UserContainer, UserEnvironment, UserSession};

    use super::*;

    fn parsed(line: &str) -> Command {
        parse(Some(line)).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }

    fn refused(line: &str) -> String {
        match parse(Some(line)) {
            Ok(command) => panic!("{line:?} parsed as {command:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn command_lines() {
        assert_eq!(parse(None).unwrap(), Command::Help);
        assert_eq!(parsed("   "), Command::Help);
        assert_eq!(parsed("help"), Command::Help);
        assert_eq!(parsed("--help"), Command::Help);
        assert_eq!(parsed("envs"), Command::Envs { json: false });
        assert_eq!(parsed(" envs  --json "), Command::Envs { json: true });
        assert_eq!(parsed("status --json"), Command::Status { json: true });
        assert_eq!(
            parsed("stop busybox"),
            Command::Stop {
                environment: "busybox".into(),
                json: false
            }
        );
        assert_eq!(
            parsed("stop --json busybox"),
            Command::Stop {
                environment: "busybox".into(),
                json: true
            }
        );
        assert_eq!(
            parsed("default debian"),
            Command::Default {
                environment: "debian".into(),
                json: false
            }
        );
        assert_eq!(
            parsed("default --clear"),
            Command::Default {
                environment: String::new(),
                json: false
            }
        );
    }

    #[test]
    fn certificate_commands() {
        assert_eq!(parsed("cert"), Command::Cert);
        assert_eq!(parsed(" ca "), Command::Ca);
        assert_eq!(
            refused("cert --json"),
            r#"cert: unexpected argument "--json""#
        );
        assert_eq!(
            refused("cert key.pub"),
            r#"cert: unexpected argument "key.pub""#
        );
        assert_eq!(refused("ca x"), r#"ca: unexpected argument "x""#);
        assert!(HELP.contains("cert < KEY.pub") && USAGE.contains("cert < KEY.pub"));
    }

    async fn stdin_of(chunks: &[&[u8]]) -> Inbound {
        let inbound = Inbound::default();
        for chunk in chunks {
            inbound.push(chunk).await.unwrap();
        }
        inbound.finish();
        inbound
    }

    #[tokio::test]
    async fn cert_reads_one_bounded_text_from_stdin() {
        let key = b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG alice@laptop\n";
        let stdin = stdin_of(&[&key[..10], &key[10..]]).await;
        assert_eq!(read_public_key(&stdin).await.unwrap().as_bytes(), &key[..]);
        let big = vec![b'A'; CERT_INPUT_MAX + 1];
        let err = read_public_key(&stdin_of(&[&big]).await).await.unwrap_err();
        assert!(
            err.starts_with("cert: stdin has more than 8192 bytes"),
            "{err}"
        );
        let err = read_public_key(&stdin_of(&[b"\xff\xfe"]).await)
            .await
            .unwrap_err();
        assert!(err.starts_with("cert: stdin is not text"), "{err}");
    }

    #[test]
    fn bad_command_lines_say_what_is_wrong() {
        assert_eq!(refused("frobnicate"), r#"unknown command "frobnicate""#);
        assert_eq!(
            refused("x\u{1b}[2J"),
            r#"unknown command "x\u{1b}[2J""#,
            "escaped: it is echoed to a terminal"
        );
        assert_eq!(refused("stop"), "stop: an environment name is required");
        assert_eq!(
            refused("default"),
            "default: an environment name is required"
        );
        assert_eq!(refused("stop a b"), r#"stop: unexpected argument "b""#);
        assert_eq!(
            refused("stop --force"),
            r#"stop: unexpected argument "--force""#
        );
        assert_eq!(
            refused("envs extra"),
            r#"envs: unexpected argument "extra""#
        );
        assert_eq!(refused("help me"), r#"help: unexpected argument "me""#);
        assert_eq!(
            refused("default --clear debian"),
            r#"default: unexpected argument "debian""#
        );
        assert!(refused("stop Busy!").starts_with("stop: the environment name may contain"));
        assert!(refused("default ../x").starts_with("default: the environment name"));
    }

    #[test]
    fn a_usage_error_is_one_line_and_exit_2() {
        let reply = Reply::usage(&UsageError::UnknownCommand("frobnicate".into()));
        assert_eq!(reply.exit_status, 2);
        assert_eq!(reply.stderr.lines().count(), 1);
        assert!(
            reply
                .stderr
                .starts_with(r#"envgate: unknown command "frobnicate"; usage: "#)
        );
        assert_eq!(reply.result.label(), "self_service");
    }

    #[test]
    fn a_refusal_shows_the_control_planes_message_and_exits_1() {
        let status = tonic::Status::not_found(r#"unknown environment "nope"; available: busybox"#);
        let reply = Reply::failed(&status);
        assert_eq!(
            reply.stderr,
            "envgate: unknown environment \"nope\"; available: busybox\n"
        );
        assert_eq!(reply.exit_status, 1);
        assert_eq!(reply.result.label(), "self_service_failed");
    }

    fn catalogue() -> UserEnvironments {
        UserEnvironments {
            environments: vec![
                UserEnvironment {
                    name: "busybox".into(),
                    description: "small\tand\nfast".into(),
                    environment_mode: EnvironmentMode::Persistent.into(),
                    running: true,
                    idle_timeout_seconds: 900,
                    max_lifetime_seconds: 0,
                },
                UserEnvironment {
                    name: "debian".into(),
                    description: String::new(),
                    environment_mode: EnvironmentMode::Ephemeral.into(),
                    running: false,
                    idle_timeout_seconds: 60,
                    max_lifetime_seconds: 3600,
                },
            ],
            user_default: "debian".into(),
            catalogue_default: "busybox".into(),
        }
    }

    #[test]
    fn envs_as_text_columns() {
        assert_eq!(
            envs_text(&catalogue()),
            "NAME\tDEFAULT\tRUNNING\tMODE\tIDLE_TIMEOUT\tMAX_LIFETIME\tDESCRIPTION\n\
             busybox\tcatalogue\tyes\tpersistent\t900\t-\tsmall and fast\n\
             debian\tyours\tno\tephemeral\t60\t3600\t-\n"
        );
    }

    #[test]
    fn envs_as_json() {
        let value: serde_json::Value = serde_json::from_str(&envs_json(&catalogue())).unwrap();
        assert_eq!(value["user_default"], "debian");
        assert_eq!(value["catalogue_default"], "busybox");
        let first = &value["environments"][0];
        assert_eq!(first["name"], "busybox");
        assert_eq!(first["running"], true);
        assert_eq!(first["catalogue_default"], true);
        assert_eq!(first["user_default"], false);
        assert_eq!(first["description"], "small\tand\nfast");
        assert_eq!(first["mode"], "persistent");
        assert_eq!(value["environments"][1]["mode"], "ephemeral");
        assert_eq!(value["environments"][1]["max_lifetime_seconds"], 3600);
    }

    fn status() -> UserStatus {
        UserStatus {
            containers: vec![
                UserContainer {
                    environment: "busybox".into(),
                    container_state: ContainerState::Running.into(),
                    container_name: "envgate-x-demo-busybox".into(),
                    created_at: 1_764_176_589,
                    last_active_at: 1_764_176_589,
                    sessions: 1,
                    idle_seconds_left: -1,
                    lifetime_seconds_left: -1,
                },
                UserContainer {
                    environment: "debian".into(),
                    container_state: ContainerState::Running.into(),
                    container_name: "envgate-x-demo-debian".into(),
                    created_at: 1_764_176_000,
                    last_active_at: 1_764_176_500,
                    sessions: 0,
                    idle_seconds_left: 420,
                    lifetime_seconds_left: 3000,
                },
            ],
            sessions: vec![UserSession {
                id: "s-1".into(),
                environment: "busybox".into(),
                client_address: String::new(),
                session_kind: SessionKind::Exec.into(),
                started_at: 1_764_176_589,
                proxy_id: "p0".into(),
            }],
        }
    }

    #[test]
    fn status_as_text_tables() {
        assert_eq!(
            status_text(&status()),
            "ENVIRONMENT\tSTATE\tSESSIONS\tIDLE_LEFT\tLIFETIME_LEFT\tCREATED\tCONTAINER\n\
             busybox\trunning\t1\tin-use\t-\t2025-11-26T17:03:09Z\tenvgate-x-demo-busybox\n\
             debian\trunning\t0\t420\t3000\t2025-11-26T16:53:20Z\tenvgate-x-demo-debian\n\
             \n\
             SESSION\tENVIRONMENT\tKIND\tSTARTED\tCLIENT\tPROXY\n\
             s-1\tbusybox\texec\t2025-11-26T17:03:09Z\t-\tp0\n"
        );
        let empty = status_text(&UserStatus::default());
        assert_eq!(
            empty.lines().filter(|l| !l.is_empty()).count(),
            2,
            "headers only"
        );
    }

    #[test]
    fn status_as_json() {
        let value: serde_json::Value = serde_json::from_str(&status_json(&status())).unwrap();
        assert_eq!(value["containers"][0]["idle_seconds_left"], -1);
        assert_eq!(value["containers"][0]["sessions"], 1);
        assert_eq!(value["containers"][1]["idle_seconds_left"], 420);
        assert_eq!(value["sessions"][0]["id"], "s-1");
        assert_eq!(value["sessions"][0]["started_at"], 1_764_176_589);
        assert_eq!(value["containers"][0]["state"], "running");
        assert_eq!(value["sessions"][0]["kind"], "exec");
    }

    /// Users read the same lowercase words as before the wire had enums: each value's enum
    /// name without its prefix; an unspecified (or unknown) value shows as `-`.
    #[test]
    fn enums_show_as_the_words_users_always_read() {
        let word = |name: &str, prefix: &str| name.strip_prefix(prefix).unwrap().to_lowercase();
        for mode in [EnvironmentMode::Persistent, EnvironmentMode::Ephemeral] {
            assert_eq!(
                mode_word(mode),
                word(mode.as_str_name(), "ENVIRONMENT_MODE_")
            );
        }
        for state in [
            ContainerState::Creating,
            ContainerState::Running,
            ContainerState::Removing,
        ] {
            assert_eq!(
                state_word(state),
                word(state.as_str_name(), "CONTAINER_STATE_")
            );
        }
        for kind in [
            SessionKind::Shell,
            SessionKind::Exec,
            SessionKind::Sftp,
            SessionKind::Forward,
        ] {
            assert_eq!(kind_word(kind), word(kind.as_str_name(), "SESSION_KIND_"));
        }
        let mut unsaid = status();
        unsaid.containers[0].container_state = 99;
        unsaid.sessions[0].session_kind = SessionKind::Unspecified.into();
        let text = status_text(&unsaid);
        assert!(text.contains("\nbusybox\t-\t1\t"), "{text}");
        assert!(text.contains("\ns-1\tbusybox\t-\t"), "{text}");
    }

    #[test]
    fn stop_answers() {
        let stopped = StopEnvironmentResponse {
            stopped: true,
            sessions_ended: 1,
        };
        assert_eq!(
            stop_text("busybox", &stopped),
            "stopped busybox (1 session ended); your home directory is kept\n"
        );
        let none = StopEnvironmentResponse::default();
        assert_eq!(
            stop_text("busybox", &none),
            "busybox is not running; nothing to stop\n"
        );
        let value: serde_json::Value = serde_json::from_str(&stop_json("busybox", &none)).unwrap();
        assert_eq!(
            value,
            json!({"environment": "busybox", "stopped": false, "sessions_ended": 0})
        );
    }

    #[test]
    fn timestamps_are_utc_rfc3339() {
        assert_eq!(rfc3339(0), "-");
        assert_eq!(rfc3339(1), "1970-01-01T00:00:01Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_764_176_589), "2025-11-26T17:03:09Z");
    }

    #[test]
    fn help_is_a_screenful() {
        assert!(HELP.lines().count() < 24);
        assert!(HELP.lines().all(|l| l.len() <= 80), "{HELP}");
    }
}
