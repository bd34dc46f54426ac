//! The in-process client: one russh connection per simulated user, every step
//! timed separately. Hundreds of these run on one tokio runtime.

use std::io::ErrorKind;
use std::sync::Arc;

use russh::client::{self, AuthResult, Handle};
use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{ChannelMsg, Disconnect};
use tokio::net::TcpStream;
use tokio::time::{Instant as TokioInstant, timeout_at};

use super::{Failure, FailureKind, Job, Outcome, Step, Timeline, first_line};

/// Accepts any host key: the load test measures, it does not protect a
/// session, and every fleet or floor it targets is started by the caller.
pub(crate) struct AcceptAnyHostKey;

impl client::Handler for AcceptAnyHostKey {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// The client configuration shared by every connection of a sweep; `kex`
/// pins the key exchange to one algorithm. Fails on a name russh does not
/// implement.
pub fn config(kex: Option<&str>) -> Result<Arc<client::Config>, String> {
    let mut preferred = russh::Preferred::default();
    if let Some(name) = kex {
        let name = russh::kex::Name::try_from(name)
            .map_err(|_| format!("the russh client does not implement key exchange {name:?}"))?;
        preferred.kex = vec![
            name,
            russh::kex::EXTENSION_SUPPORT_AS_CLIENT,
            russh::kex::EXTENSION_OPENSSH_STRICT_KEX_AS_CLIENT,
        ]
        .into();
    }
    Ok(Arc::new(client::Config {
        inactivity_timeout: None,
        nodelay: true,
        preferred,
        ..Default::default()
    }))
}

/// Runs one job to its end; never panics and never waits past `job.timeout`.
pub async fn run(job: &Job, config: Arc<client::Config>) -> Outcome {
    let mut timeline = Timeline::start();
    let deadline = TokioInstant::from_std(timeline.started() + job.timeout);
    let mut exit_status = None;
    let mut output_bytes = 0;
    let failure = drive(
        job,
        config,
        deadline,
        &mut timeline,
        &mut exit_status,
        &mut output_bytes,
    )
    .await
    .err();
    Outcome {
        total: timeline.elapsed(),
        timeline,
        exit_status,
        output_bytes,
        failure,
    }
}

async fn drive(
    job: &Job,
    config: Arc<client::Config>,
    deadline: TokioInstant,
    timeline: &mut Timeline,
    exit_status: &mut Option<u32>,
    output_bytes: &mut u64,
) -> Result<(), Failure> {
    let mut handle = connect(job, config, deadline, timeline).await?;
    // Whatever happens after the handshake, the connection is closed before
    // the client moves on, so no half-open session outlives its record.
    let result = authenticate(job, &mut handle, deadline, timeline).await;
    let result = match result {
        Ok(()) => exec(job, &handle, deadline, timeline, exit_status, output_bytes).await,
        Err(failure) => Err(failure),
    };
    close(&mut handle, deadline, timeline, result.is_ok()).await?;
    result
}

/// An authenticated connection that stays open until it is dropped (the
/// proxy-memory measurement holds many of them idle).
pub struct Idle {
    _connection: Handle<AcceptAnyHostKey>,
}

/// Connects and authenticates, and keeps the connection without opening a channel.
pub async fn open_idle(job: &Job, config: Arc<client::Config>) -> Result<Idle, Failure> {
    let mut timeline = Timeline::start();
    let deadline = TokioInstant::from_std(timeline.started() + job.timeout);
    let mut handle = connect(job, config, deadline, &mut timeline).await?;
    authenticate(job, &mut handle, deadline, &mut timeline).await?;
    Ok(Idle {
        _connection: handle,
    })
}

async fn connect(
    job: &Job,
    config: Arc<client::Config>,
    deadline: TokioInstant,
    timeline: &mut Timeline,
) -> Result<Handle<AcceptAnyHostKey>, Failure> {
    let stream = timeout_at(deadline, TcpStream::connect(&job.addr))
        .await
        .map_err(|_| Failure::timeout(Step::Connect))?
        .map_err(|e| {
            let kind = if e.kind() == ErrorKind::ConnectionRefused {
                FailureKind::ConnectRefused
            } else {
                FailureKind::ConnectError
            };
            Failure::new(kind, Step::Connect, e.to_string())
        })?;
    // Without it small SSH packets wait for delayed ACKs and every step looks slower.
    let _ = stream.set_nodelay(true);
    timeline.mark(Step::Connect);

    let handle = timeout_at(
        deadline,
        client::connect_stream(config, stream, AcceptAnyHostKey),
    )
    .await
    .map_err(|_| Failure::timeout(Step::Handshake))?
    .map_err(|e| Failure::new(FailureKind::HandshakeFailed, Step::Handshake, e.to_string()))?;
    timeline.mark(Step::Handshake);
    Ok(handle)
}

async fn authenticate(
    job: &Job,
    handle: &mut Handle<AcceptAnyHostKey>,
    deadline: TokioInstant,
    timeline: &mut Timeline,
) -> Result<(), Failure> {
    // RSA keys need the server's preferred signature hash (plain ssh-rsa is
    // SHA-1, which current servers refuse); other key types carry their own.
    let hash = if job.credential.key.algorithm().is_rsa() {
        timeout_at(deadline, handle.best_supported_rsa_hash())
            .await
            .map_err(|_| Failure::timeout(Step::Auth))?
            .map_err(|e| Failure::new(FailureKind::HandshakeFailed, Step::Auth, e.to_string()))?
            .flatten()
    } else {
        None
    };
    let key = PrivateKeyWithHashAlg::new(job.credential.key.clone(), hash);
    let auth = timeout_at(
        deadline,
        handle.authenticate_publickey(job.credential.user.clone(), key),
    )
    .await
    .map_err(|_| Failure::timeout(Step::Auth))?
    .map_err(|e| Failure::new(FailureKind::HandshakeFailed, Step::Auth, e.to_string()))?;
    if let AuthResult::Failure {
        remaining_methods, ..
    } = auth
    {
        return Err(Failure::new(
            FailureKind::AuthRejected,
            Step::Auth,
            format!(
                "publickey rejected for {}; server offers {remaining_methods:?}",
                job.credential.user
            ),
        ));
    }
    timeline.mark(Step::Auth);
    Ok(())
}

async fn exec(
    job: &Job,
    handle: &Handle<AcceptAnyHostKey>,
    deadline: TokioInstant,
    timeline: &mut Timeline,
    exit_status: &mut Option<u32>,
    output_bytes: &mut u64,
) -> Result<(), Failure> {
    let mut channel = timeout_at(deadline, handle.channel_open_session())
        .await
        .map_err(|_| Failure::timeout(Step::Exec))?
        .map_err(|e| Failure::new(FailureKind::ChannelError, Step::Exec, e.to_string()))?;
    timeout_at(deadline, channel.exec(true, job.command.as_bytes()))
        .await
        .map_err(|_| Failure::timeout(Step::Exec))?
        .map_err(|e| Failure::new(FailureKind::ChannelError, Step::Exec, e.to_string()))?;

    let mut stderr = Vec::new();
    let mut signal = None;
    loop {
        let step = if timeline.end_of(Step::Exec).is_none() {
            Step::Exec
        } else {
            Step::Output
        };
        let msg = timeout_at(deadline, channel.wait())
            .await
            .map_err(|_| Failure::timeout(step))?;
        match msg {
            Some(ChannelMsg::Data { data }) => {
                timeline.mark(Step::Exec);
                *output_bytes += data.len() as u64;
            }
            Some(ChannelMsg::ExtendedData { data, .. }) => {
                timeline.mark(Step::Exec);
                *output_bytes += data.len() as u64;
                if stderr.len() < 4096 {
                    stderr.extend_from_slice(&data);
                }
            }
            Some(ChannelMsg::Failure) => {
                return Err(Failure::new(
                    FailureKind::ChannelError,
                    Step::Exec,
                    "the server refused the exec request",
                ));
            }
            Some(ChannelMsg::ExitStatus { exit_status: code }) => {
                timeline.mark(Step::Exec);
                timeline.mark(Step::Output);
                *exit_status = Some(code);
            }
            Some(ChannelMsg::ExitSignal {
                signal_name,
                error_message,
                ..
            }) => {
                timeline.mark(Step::Exec);
                timeline.mark(Step::Output);
                signal = Some(format!("killed by signal {signal_name:?} {error_message}"));
            }
            Some(ChannelMsg::Close) | None => break,
            Some(_) => {}
        }
    }

    let stderr_line = first_line(&String::from_utf8_lossy(&stderr));
    match (*exit_status, signal) {
        (_, Some(signal)) => Err(Failure::new(FailureKind::ExitSignal, Step::Output, signal)),
        (Some(0), None) => Ok(()),
        (Some(code), None) => Err(Failure::new(
            FailureKind::NonZeroExit,
            Step::Output,
            format!("exit status {code}: {stderr_line}"),
        )),
        (None, None) => Err(Failure::new(
            FailureKind::NoExitStatus,
            if timeline.end_of(Step::Exec).is_none() {
                Step::Exec
            } else {
                Step::Output
            },
            format!("channel closed without an exit status: {stderr_line}"),
        )),
    }
}

/// Disconnects and waits until the connection task has ended. Close is only
/// timed (and its timeout only counted as a failure) after a clean run; after
/// a failure the first failure is the one that is reported.
async fn close(
    handle: &mut Handle<AcceptAnyHostKey>,
    deadline: TokioInstant,
    timeline: &mut Timeline,
    clean: bool,
) -> Result<(), Failure> {
    let waited = timeout_at(deadline, async {
        let _ = handle.disconnect(Disconnect::ByApplication, "", "en").await;
        let _ = (&mut *handle).await;
    })
    .await;
    match waited {
        Ok(()) if clean => {
            timeline.mark(Step::Close);
            Ok(())
        }
        Err(_) if clean => Err(Failure::timeout(Step::Close)),
        _ => Ok(()),
    }
}
