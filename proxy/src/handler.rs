//! The russh [`Handler`]: kept thin. It authenticates through [`Authenticator`],
//! answers channel requests at once (russh remembers only the latest
//! request's want-reply flag, so a reply must be sent before the next request
//! is read), passes channel input to the channel's [`Inbound`] queue, and
//! turns everything else into [`Event`]s for the connection's session task,
//! which owns the session state.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use envgate_proto::audit::{Method, Outcome};
use envgate_proto::names::{Login, parse_login};
use russh::keys::{Certificate, PublicKey};
use russh::server::{
    Auth, ChannelOpenHandle, Handler, Msg, PublicKeyOffer, Response, Session, VerifiedPublicKey,
};
use russh::{Channel, ChannelId, ChannelOpenFailure, ChannelWriteHalf, MethodKind, MethodSet, Pty};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::auth::{Attempt, AuthOutcome, Authenticated, Authenticator, OfferOutcome};
use crate::error::{ProxyError, UNSUPPORTED_CHANNEL, placement_failure_line};
use crate::exec::{Inbound, TerminalSize};
use crate::session::{ChannelRequest, Event, ForwardTarget};

/// Environment variable names a client may send. Which of them reach the process is the
/// environment's `accept_env` (known only once the session is placed, and `ENVGATE_ENV`
/// may be what chooses it); here only the form is checked, as a shell would.
pub fn accepted_env(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Keyboard-interactive asks for the password with one prompt, as sshd does with PAM, for
/// clients and users who expect it; the answer is checked as a password.
pub fn methods() -> MethodSet {
    MethodSet::from(
        &[
            MethodKind::PublicKey,
            MethodKind::KeyboardInteractive,
            MethodKind::Password,
        ][..],
    )
}

/// The one keyboard-interactive prompt.
const PASSWORD_PROMPT: &str = "Password: ";

/// How long a `tcpip-forward` may take to be answered (it may place the session first).
const REMOTE_FORWARD_WAIT: Duration = Duration::from_secs(90);

/// Session channels one connection may have open, as sshd's MaxSessions.
pub const MAX_SESSIONS: usize = 10;

/// Env requests one channel may have accepted. sshd keeps at most 128 per
/// session; envgate takes 18 standard names (`LANG`, the 13 `LC_*`
/// categories, `TERM`, `TZ`, `COLORTERM`, `ENVGATE_ENV`), so 32 leaves room
/// for every one of them without letting made-up `LC_*` names pile up.
pub const MAX_ENV_PER_CHANNEL: usize = 32;
/// Longest accepted env name (`LC_IDENTIFICATION` is 17).
pub const MAX_ENV_NAME_BYTES: usize = 64;
/// Longest accepted env value: locales, terminal and time zone names and
/// environment names are far shorter; sshd has no limit but its packet size.
pub const MAX_ENV_VALUE_BYTES: usize = 4096;

/// Why an env request on a channel that has not started its process is
/// refused (sshd answers each with a failure too, and keeps nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EnvRefusal {
    /// Not a variable name ([`accepted_env`]).
    NotAccepted,
    NameTooLong,
    ValueTooLong,
    /// The channel has [`MAX_ENV_PER_CHANNEL`] already.
    TooMany,
}

impl EnvRefusal {
    /// A limit, rather than a name envgate does not take.
    fn is_limit(self) -> bool {
        self != Self::NotAccepted
    }
}

/// Whether the request is taken, given how many the channel took so far.
/// Only taken ones count: a refused one keeps nothing.
fn env_refusal(name: &str, value: &str, accepted: usize) -> Option<EnvRefusal> {
    if name.len() > MAX_ENV_NAME_BYTES {
        Some(EnvRefusal::NameTooLong)
    } else if !accepted_env(name) {
        Some(EnvRefusal::NotAccepted)
    } else if value.len() > MAX_ENV_VALUE_BYTES {
        Some(EnvRefusal::ValueTooLong)
    } else if accepted >= MAX_ENV_PER_CHANNEL {
        Some(EnvRefusal::TooMany)
    } else {
        None
    }
}

/// At most `MAX_ENV_NAME_BYTES` characters of a client's name, for a log line.
fn loggable(name: &str) -> String {
    name.chars()
        .take(MAX_ENV_NAME_BYTES)
        .flat_map(char::escape_debug)
        .collect()
}

pub struct ConnectionHandler {
    connection_id: String,
    client_address: String,
    authenticator: Arc<Authenticator>,
    events: mpsc::Sender<Event>,
    /// Cancelled once the user is authenticated (stops the login-grace timer).
    authenticated: CancellationToken,
    /// A key accepted at the offer, awaiting its signature.
    offered: Option<Offer>,
    /// A refusal not written to the audit log when it happened (a key offer, a malformed
    /// name): written when the connection ends without logging in, so a client offering six
    /// keys makes one record, not five.
    unrecorded_refusal: Option<(Attempt, String)>,
    /// Why the control plane could not check the last credential (a directory down, too many
    /// failures): a keyboard-interactive login shows it to the user, a password login cannot.
    unexplained: Option<tonic::Status>,
    /// That reason was shown as a keyboard-interactive round of its own; the client's empty
    /// answer to it ends the attempt.
    explained: bool,
    channels: HashMap<ChannelId, HandlerChannel>,
    /// What the certificate the user logged in with permits; `None` (a key or a password):
    /// everything.
    permits: Option<Permits>,
    /// The connection's span: russh runs the handler on a task of its own.
    span: tracing::Span,
}

/// A key the client may sign with: the login it was offered for and the key (wire format).
struct Offer {
    login: String,
    key: Vec<u8>,
    /// Not the user's key: only a certificate for it may go on (`OfferOutcome::CertificateOnly`).
    certificate_only: bool,
}

/// The extensions of an OpenSSH user certificate that envgate enforces, as sshd does: no
/// terminal without `permit-pty`, no `-L`/`-R`/`-W` without `permit-port-forwarding`, no `-A`
/// without `permit-agent-forwarding`. (X11 and user rc are never offered.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Permits {
    pty: bool,
    port_forwarding: bool,
    agent_forwarding: bool,
}

impl Permits {
    fn of(certificate: &Certificate) -> Self {
        let has = |name: &str| certificate.extensions().contains_key(name);
        Self {
            pty: has("permit-pty"),
            port_forwarding: has("permit-port-forwarding"),
            agent_forwarding: has("permit-agent-forwarding"),
        }
    }
}

struct HandlerChannel {
    inbound: Arc<Inbound>,
    started: bool,
    /// Env requests taken (at most [`MAX_ENV_PER_CHANNEL`]).
    env_accepted: usize,
    /// An env request past a limit was logged at info level; the channel's
    /// next ones are logged at debug level.
    env_limit_logged: bool,
}

impl ConnectionHandler {
    pub fn new(
        connection_id: String,
        client_address: String,
        authenticator: Arc<Authenticator>,
        events: mpsc::Sender<Event>,
        authenticated: CancellationToken,
    ) -> Self {
        Self {
            connection_id,
            client_address,
            authenticator,
            events,
            authenticated,
            offered: None,
            unrecorded_refusal: None,
            unexplained: None,
            explained: false,
            channels: HashMap::new(),
            permits: None,
            span: tracing::Span::current(),
        }
    }

    fn login(&self, login: &str) -> Option<Login> {
        match parse_login(login) {
            Ok(login) => Some(login),
            Err(e) => {
                tracing::info!(parent: &self.span, login = %login.escape_debug(), reason = %e, "rejected login name");
                None
            }
        }
    }

    fn attempt(&self, user: &str, method: Method, key: Option<&[u8]>) -> Attempt {
        Attempt {
            user: user.to_owned(),
            client: self.client_address.clone(),
            connection: self.connection_id.clone(),
            method,
            key: key.map(<[u8]>::to_vec),
        }
    }

    /// A credential that was checked and refused: recorded now.
    fn refused(&mut self, attempt: &Attempt, reason: String) {
        self.unrecorded_refusal = None;
        self.authenticator
            .record(attempt, Outcome::Failure, false, Some(reason));
    }

    /// Takes a channel the client opened: its input is read through `data` (the channel's own
    /// read half would only hold a second copy of every message), its output goes through the
    /// write half returned. `started`: no process may be asked for on it.
    fn add_channel(
        &mut self,
        channel: Channel<Msg>,
        started: bool,
    ) -> (ChannelId, ChannelWriteHalf<Msg>, Arc<Inbound>) {
        let id = channel.id();
        let (read_half, writer) = channel.split();
        drop(read_half);
        let inbound = Arc::new(Inbound::default());
        self.channels.insert(
            id,
            HandlerChannel {
                inbound: inbound.clone(),
                started,
                env_accepted: 0,
                env_limit_logged: false,
            },
        );
        (id, writer, inbound)
    }

    /// Hands a forwarding channel to the session task, which answers `reply`.
    async fn forward(
        &mut self,
        channel: Channel<Msg>,
        target: ForwardTarget,
        reply: ChannelOpenHandle,
    ) {
        // No shell, exec or subsystem on a forwarded connection.
        let (id, writer, inbound) = self.add_channel(channel, true);
        self.send(Event::ForwardOpened {
            channel: id,
            writer,
            inbound,
            target,
            reply,
        })
        .await;
    }

    async fn send(&self, event: Event) {
        // The session task outlives the handler; if it is gone the
        // connection is being torn down anyway.
        let _ = self.events.send(event).await;
    }

    async fn accept(&mut self, login: Login, who: Authenticated, attempt: &Attempt) -> Auth {
        tracing::info!(parent: &self.span, user = %who.user, cache_hit = who.cache_hit, "authenticated");
        self.unrecorded_refusal = None;
        self.authenticator
            .record(attempt, Outcome::Success, who.cache_hit, None);
        self.authenticated.cancel();
        self.send(Event::Authenticated {
            login,
            identity: who,
        })
        .await;
        Auth::Accept
    }

    /// The authenticated user, or `None` after recording why not.
    fn outcome(&mut self, attempt: &Attempt, outcome: AuthOutcome) -> Option<Authenticated> {
        let user = &attempt.user;
        match outcome {
            AuthOutcome::Accepted(who) => Some(who),
            AuthOutcome::Rejected => {
                tracing::info!(parent: &self.span, %user, "credential rejected");
                self.refused(attempt, "credential refused".into());
                None
            }
            AuthOutcome::Failed(status) => {
                let why = status.message().to_owned();
                tracing::warn!(parent: &self.span, %user, error = %why, "authentication failed");
                // The control plane's reason (throttled, busy, unreachable) is the record's.
                self.refused(attempt, why);
                self.unexplained = Some(status);
                None
            }
        }
    }

    /// A password, typed at the password prompt or a keyboard-interactive one: the same
    /// control-plane check, and so the same throttle.
    async fn password(&mut self, user: &str, password: &str, method: Method) -> Auth {
        let Some(login) = self.login(user) else {
            let attempt = self.attempt(user, method, None);
            self.refused(&attempt, "malformed login name".into());
            return Auth::reject();
        };
        let outcome = self
            .authenticator
            .password(
                &login.user,
                password,
                &self.client_address,
                &self.connection_id,
            )
            .instrument(tracing::info_span!(parent: &self.span, "auth"))
            .await;
        let attempt = self.attempt(&login.user, method, None);
        match self.outcome(&attempt, outcome) {
            Some(who) => self.accept(login, who, &attempt).await,
            None => Auth::reject(),
        }
    }

    /// Whether the login's certificate (if any) permits what `allowed` picks; a refusal is
    /// logged with the extension's name.
    fn permitted(&self, allowed: fn(&Permits) -> bool, extension: &str) -> bool {
        let ok = self.permits.as_ref().is_none_or(allowed);
        if !ok {
            tracing::info!(parent: &self.span, extension, "refused: the certificate does not permit it");
        }
        ok
    }

    /// Marks the channel's process as requested; a second shell/exec on the
    /// same channel is refused, as sshd does.
    fn start(&mut self, channel: ChannelId) -> bool {
        match self.channels.get_mut(&channel) {
            Some(c) if !c.started => {
                c.started = true;
                true
            }
            _ => false,
        }
    }
}

/// Why a forwarding is refused to a certificate without `permit-port-forwarding`.
const FORWARDING_NOT_PERMITTED: &str = "port forwarding is not permitted by your certificate";

/// The one subsystem served.
const SFTP: &str = "sftp";

/// Answers a channel request; only when the client asked for an answer
/// (russh checks its want-reply flag).
fn reply(session: &mut Session, channel: ChannelId, ok: bool) -> Result<(), ProxyError> {
    if ok {
        session.channel_success(channel)?
    } else {
        session.channel_failure(channel)?
    }
    Ok(())
}

fn key_bytes(key: &PublicKey) -> Option<Vec<u8>> {
    key.to_bytes().ok()
}

impl Handler for ConnectionHandler {
    type Error = ProxyError;

    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        Ok(Auth::Reject {
            proceed_with_methods: Some(methods()),
            partial_success: false,
        })
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        self.offered = None;
        let key = key_bytes(offer.public_key);
        let Some(login) = self.login(user) else {
            let attempt = self.attempt(user, Method::Publickey, key.as_deref());
            self.unrecorded_refusal = Some((attempt, "malformed login name".into()));
            return Ok(Auth::reject());
        };
        let Some(key) = key else {
            return Ok(Auth::reject());
        };
        let outcome = self
            .authenticator
            .public_key_offered(&login.user, &key, &self.client_address, &self.connection_id)
            .instrument(tracing::info_span!(parent: &self.span, "auth_offer"))
            .await;
        let attempt = self.attempt(&login.user, Method::Publickey, Some(&key));
        match outcome {
            OfferOutcome::Acceptable | OfferOutcome::CertificateOnly => {
                let certificate_only = outcome == OfferOutcome::CertificateOnly;
                if certificate_only {
                    self.unrecorded_refusal =
                        Some((attempt, "no offered key is authorized".into()));
                }
                self.offered = Some(Offer {
                    login: user.to_owned(),
                    key,
                    certificate_only,
                });
                Ok(Auth::Accept)
            }
            OfferOutcome::Refused => {
                tracing::debug!(parent: &self.span, user = %login.user, "offered key is not authorized");
                self.unrecorded_refusal = Some((attempt, "no offered key is authorized".into()));
                Ok(Auth::reject())
            }
            OfferOutcome::Failed(why) => {
                tracing::warn!(parent: &self.span, user = %login.user, error = %why, "checking an offered key failed");
                self.unrecorded_refusal = Some((
                    attempt,
                    "the control plane could not check the credential".into(),
                ));
                Ok(Auth::reject())
            }
        }
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        // russh has verified the signature over this session: the client holds the key. Only
        // now is the control plane asked for a token (proof of possession).
        let (Some(login), Some(bytes)) = (self.login(user), key_bytes(key.public_key)) else {
            return Ok(Auth::reject());
        };
        match self.offered.take() {
            Some(offer) if offer.login == user && offer.key == bytes => {
                if offer.certificate_only {
                    // A plain key nobody authorized: refused here, without a failed attempt
                    // at the control plane (the offer's refusal is recorded at the end).
                    tracing::debug!(parent: &self.span, user = %login.user, "signed key is not authorized");
                    return Ok(Auth::reject());
                }
            }
            _ => return Ok(Auth::reject()),
        }
        let outcome = self
            .authenticator
            .public_key_verified(
                &login.user,
                &bytes,
                &self.client_address,
                &self.connection_id,
            )
            .instrument(tracing::info_span!(parent: &self.span, "auth"))
            .await;
        let attempt = self.attempt(&login.user, Method::Publickey, Some(&bytes));
        match self.outcome(&attempt, outcome) {
            Some(who) => Ok(self.accept(login, who, &attempt).await),
            None => Ok(Auth::reject()),
        }
    }

    /// An OpenSSH certificate whose key signed this session's request. russh checked the
    /// certificate's own signature and validity first (an expired one never gets here: russh
    /// logs "Certificate is expired or not yet valid"); the control plane decides the rest.
    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        certificate: &Certificate,
    ) -> Result<Auth, Self::Error> {
        let key = PublicKey::new(certificate.public_key().clone(), "");
        let (Some(login), Some(key), Ok(bytes)) =
            (self.login(user), key_bytes(&key), certificate.to_bytes())
        else {
            return Ok(Auth::reject());
        };
        match self.offered.take() {
            Some(offer) if offer.login == user && offer.key == key => {}
            _ => return Ok(Auth::reject()),
        }
        let outcome = self
            .authenticator
            .certificate_verified(
                &login.user,
                bytes,
                &self.client_address,
                &self.connection_id,
            )
            .instrument(tracing::info_span!(parent: &self.span, "auth"))
            .await;
        let attempt = self.attempt(&login.user, Method::Certificate, Some(&key));
        match self.outcome(&attempt, outcome) {
            Some(who) => {
                self.permits = Some(Permits::of(certificate));
                Ok(self.accept(login, who, &attempt).await)
            }
            None => Ok(Auth::reject()),
        }
    }

    async fn auth_password(&mut self, user: &str, password: &str) -> Result<Auth, Self::Error> {
        Ok(self.password(user, password, Method::Password).await)
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        user: &str,
        _submethods: &str,
        response: Option<Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        let Some(mut response) = response else {
            self.explained = false;
            return Ok(Auth::Partial {
                name: "".into(),
                instructions: "".into(),
                prompts: vec![(PASSWORD_PROMPT.into(), false)].into(),
            });
        };
        if std::mem::take(&mut self.explained) {
            // The answer to the round that only said why: already recorded.
            return Ok(Auth::reject());
        }
        // Exactly one answer, in UTF-8, as the one prompt asked; anything else is refused
        // without reaching the control plane.
        let answer = response.next();
        let password = match (answer, response.next()) {
            (Some(answer), None) => String::from_utf8(answer.to_vec()).ok(),
            _ => None,
        };
        match password {
            Some(password) => {
                self.unexplained = None;
                let auth = self
                    .password(user, &password, Method::KeyboardInteractive)
                    .await;
                // When the password could not be checked, one more round with no prompt
                // tells the user why, as sshd shows PAM's messages; ssh prints it on stderr.
                match self.unexplained.take() {
                    Some(status) if auth != Auth::Accept => {
                        self.explained = true;
                        Ok(Auth::Partial {
                            name: "".into(),
                            instructions: placement_failure_line(&status).into(),
                            prompts: Vec::new().into(),
                        })
                    }
                    _ => Ok(auth),
                }
            }
            None => {
                let attempt = self.attempt(user, Method::KeyboardInteractive, None);
                self.refused(&attempt, "malformed keyboard-interactive response".into());
                Ok(Auth::reject())
            }
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.channels.len() >= MAX_SESSIONS {
            tracing::info!(parent: &self.span, "refused a session channel: {MAX_SESSIONS} already open");
            let reason = format!("at most {MAX_SESSIONS} sessions per connection");
            reply
                .reject(ChannelOpenFailure::Other { code: 4, reason })
                .await;
            return Ok(());
        }
        let (id, writer, inbound) = self.add_channel(channel, false);
        reply.accept().await;
        self.send(Event::ChannelOpened {
            channel: id,
            writer,
            inbound,
        })
        .await;
        Ok(())
    }

    /// `ssh -L`, `-D`, `-W`: the connection is made from inside the user's container (see
    /// `Connection::forward`); the open is answered once it is, or refused with the reason.
    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let refusal = if !self.permitted(|p| p.port_forwarding, "permit-port-forwarding") {
            Some(FORWARDING_NOT_PERMITTED.to_owned())
        } else if self.channels.len() >= MAX_SESSIONS {
            Some(format!("at most {MAX_SESSIONS} channels per connection"))
        } else if host.is_empty() || host.len() > 255 || host.chars().any(char::is_control) {
            Some("bad host name".to_owned())
        } else {
            u16::try_from(port)
                .ok()
                .filter(|p| *p != 0)
                .is_none()
                .then(|| format!("bad port {port}"))
        };
        if let Some(reason) = refusal {
            tracing::info!(parent: &self.span, host = %host.escape_debug(), port, %reason, "refused direct-tcpip channel");
            reply
                .reject(ChannelOpenFailure::Other { code: 2, reason })
                .await;
            return Ok(());
        }
        self.forward(
            channel,
            ForwardTarget::Tcp(host.to_owned(), port as u16),
            reply,
        )
        .await;
        Ok(())
    }

    async fn channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reject_unsupported(reply).await;
        Ok(())
    }

    /// `ssh -L port:/path/to.sock`: as `direct-tcpip`, to a Unix socket in the container.
    async fn channel_open_direct_streamlocal(
        &mut self,
        channel: Channel<Msg>,
        socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let refusal = if !self.permitted(|p| p.port_forwarding, "permit-port-forwarding") {
            Some(FORWARDING_NOT_PERMITTED.to_owned())
        } else if self.channels.len() >= MAX_SESSIONS {
            Some(format!("at most {MAX_SESSIONS} channels per connection"))
        } else if socket_path.is_empty()
            || socket_path.len() > 107
            || socket_path.chars().any(char::is_control)
        {
            Some("bad socket path".to_owned())
        } else {
            None
        };
        if let Some(reason) = refusal {
            tracing::info!(parent: &self.span, path = %socket_path.escape_debug(), %reason, "refused direct-streamlocal channel");
            reply
                .reject(ChannelOpenFailure::Other { code: 2, reason })
                .await;
            return Ok(());
        }
        self.forward(channel, ForwardTarget::Unix(socket_path.to_owned()), reply)
            .await;
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(c) = self.channels.get(&channel) {
            let inbound = c.inbound.clone();
            inbound.push(data).await?;
        }
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(c) = self.channels.get(&channel) {
            c.inbound.finish();
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(c) = self.channels.remove(&channel) {
            c.inbound.close();
        }
        self.send(Event::ChannelClosed { channel }).await;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = self.channels.get(&channel).is_some_and(|c| !c.started)
            && self.permitted(|p| p.pty, "permit-pty");
        reply(session, channel, ok)?;
        if ok {
            let size = TerminalSize {
                cols: col_width,
                rows: row_height,
            };
            self.send(Event::Request {
                channel,
                request: ChannelRequest::Pty {
                    term: term.to_owned(),
                    size,
                    // Opcodes as RFC 4254 numbers them; the agent applies what it knows.
                    modes: modes.iter().map(|(op, v)| (*op as u8, *v)).collect(),
                },
            })
            .await;
        }
        Ok(())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(c) = self.channels.get_mut(&channel).filter(|c| !c.started) else {
            reply(session, channel, false)?;
            tracing::debug!(parent: &self.span, name = %loggable(name), "ignored env request: no channel waiting for a process");
            return Ok(());
        };
        let refusal = env_refusal(name, value, c.env_accepted);
        reply(session, channel, refusal.is_none())?;
        match refusal {
            None => {
                c.env_accepted += 1;
                let request = ChannelRequest::Env {
                    name: name.to_owned(),
                    value: value.to_owned(),
                };
                self.send(Event::Request { channel, request }).await;
            }
            Some(why) if why.is_limit() && !c.env_limit_logged => {
                c.env_limit_logged = true;
                tracing::info!(parent: &self.span, name = %loggable(name), name_bytes = name.len(), value_bytes = value.len(), reason = ?why, "refused env request past a limit; more on this channel are logged at debug level");
            }
            Some(why) => {
                tracing::debug!(parent: &self.span, name = %loggable(name), reason = ?why, "ignored env request");
            }
        }
        Ok(())
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = self.start(channel);
        reply(session, channel, ok)?;
        if ok {
            self.send(Event::Request {
                channel,
                request: ChannelRequest::Shell,
            })
            .await;
        }
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = self.start(channel);
        reply(session, channel, ok)?;
        if ok {
            let command = String::from_utf8_lossy(data).into_owned();
            self.send(Event::Request {
                channel,
                request: ChannelRequest::Exec { command },
            })
            .await;
        }
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // SFTP is served by the agent in the container; nothing else is offered (as sshd
        // with only `Subsystem sftp`). OpenSSH's client says "subsystem request failed".
        let ok = name == SFTP && self.start(channel);
        reply(session, channel, ok)?;
        if ok {
            self.send(Event::Request {
                channel,
                request: ChannelRequest::Sftp,
            })
            .await;
        } else {
            tracing::info!(parent: &self.span, subsystem = %name.escape_debug(), "refused subsystem request");
        }
        Ok(())
    }

    /// `ssh -A`: the channel's process gets `SSH_AUTH_SOCK`, a socket in the container whose
    /// connections come back to the client's agent (`forwarded.rs`).
    async fn agent_request(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let ok = self.channels.get(&channel).is_some_and(|c| !c.started)
            && self.permitted(|p| p.agent_forwarding, "permit-agent-forwarding");
        if ok {
            self.send(Event::Request {
                channel,
                request: ChannelRequest::AgentForward,
            })
            .await;
        }
        Ok(ok)
    }

    /// `ssh -R [address:]port:…`: a listener in the user's container, on its loopback unless
    /// an address is given. Answered once it listens (port 0: the port it got).
    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        if address.len() > 255
            || address.chars().any(char::is_control)
            || *port > 65535
            || !self.permitted(|p| p.port_forwarding, "permit-port-forwarding")
        {
            return Ok(false);
        }
        let (answer, answered) = tokio::sync::oneshot::channel();
        self.send(Event::RemoteForward {
            address: address.to_owned(),
            port: *port,
            answer,
        })
        .await;
        match tokio::time::timeout(REMOTE_FORWARD_WAIT, answered).await {
            Ok(Ok(Ok(bound))) => {
                *port = bound;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        self.send(Event::CancelRemoteForward {
            address: address.to_owned(),
            port,
            answer,
        })
        .await;
        Ok(matches!(
            tokio::time::timeout(REMOTE_FORWARD_WAIT, answered).await,
            Ok(Ok(true))
        ))
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply(session, channel, false)
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        signal: russh::Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let name = match signal {
            russh::Sig::Custom(name) => name,
            // The unit variants print as their SSH names.
            other => format!("{other:?}"),
        };
        // In the channel's input queue, so it reaches the process after the
        // data sent before it.
        if let Some(c) = self.channels.get(&channel) {
            c.inbound.signal(name);
        }
        Ok(())
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let size = TerminalSize {
            cols: col_width,
            rows: row_height,
        };
        // The process gets it through the channel's input queue, before the
        // keys typed after it; the session task keeps the size for a process
        // not started yet and repaints the menu.
        if let Some(c) = self.channels.get(&channel) {
            c.inbound.resize(size);
        }
        self.send(Event::Request {
            channel,
            request: ChannelRequest::WindowChange(size),
        })
        .await;
        Ok(())
    }
}

impl Drop for ConnectionHandler {
    /// A connection that ends without logging in leaves the refusal it ended on.
    fn drop(&mut self) {
        if let Some((attempt, reason)) = self.unrecorded_refusal.take()
            && !self.authenticated.is_cancelled()
        {
            self.authenticator
                .record(&attempt, Outcome::Failure, false, Some(reason));
        }
    }
}

/// Refuses a channel type envgate does not offer (forwarding, X11), with the reason.
async fn reject_unsupported(reply: ChannelOpenHandle) {
    reply
        .reject(ChannelOpenFailure::Other {
            code: 1,
            reason: UNSUPPORTED_CHANNEL.into(),
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use envgate_proto::audit::AuditLog;

    #[test]
    fn env_requests_are_bounded_in_number_and_size() {
        assert_eq!(env_refusal("LANG", "C.UTF-8", 0), None);
        assert_eq!(env_refusal("LC_ALL", &"x".repeat(4096), 31), None);
        assert_eq!(env_refusal("LC_ALL", "C", 32), Some(EnvRefusal::TooMany));
        assert_eq!(
            env_refusal("LANG", &"x".repeat(4097), 0),
            Some(EnvRefusal::ValueTooLong)
        );
        let long_name = format!("LC_{}", "X".repeat(62));
        assert_eq!(
            env_refusal(&long_name, "C", 0),
            Some(EnvRefusal::NameTooLong)
        );
        assert_eq!(
            env_refusal("NOT-A-NAME", "x", 0),
            Some(EnvRefusal::NotAccepted)
        );
        assert!(!EnvRefusal::NotAccepted.is_limit());
        assert_eq!(loggable(&"\n".repeat(1000)).len(), 2 * MAX_ENV_NAME_BYTES);
    }

    #[test]
    fn env_names_are_taken_by_their_form() {
        for name in ["LANG", "LC_ALL", "TERM", "ENVGATE_ENV", "lang", "_X1"] {
            assert!(accepted_env(name), "{name}");
        }
        for name in ["", "1X", "A-B", "A=B", "A B", "É"] {
            assert!(!accepted_env(name), "{name}");
        }
    }

    fn handler(control_plane_url: String, audit: AuditLog) -> ConnectionHandler {
        let pki = envgate_controlplane::testkit::TestPki::new().unwrap();
        let control_plane = crate::controlplane::ControlPlane::new(
            &[control_plane_url],
            &pki.proxy_tls("p"),
            None,
            "p".into(),
        )
        .unwrap();
        let cache = Arc::new(crate::auth_cache::AuthCache::new(4));
        let (events, _) = mpsc::channel(1);
        ConnectionHandler::new(
            "c".into(),
            "127.0.0.1:1".into(),
            Arc::new(Authenticator::new(cache, control_plane, audit)),
            events,
            CancellationToken::new(),
        )
    }

    #[tokio::test]
    async fn bad_user_names_are_rejected_without_a_call() {
        // A "control plane" that only notices being dialled.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let audit = AuditLog::in_memory();
        let mut handler = handler(
            format!("https://{}", listener.local_addr().unwrap()),
            audit.clone(),
        );
        for login in [
            "",
            "Bad..User",
            "a+b+c",
            "root\0",
            "alice+",
            "al ice",
            &"a".repeat(40),
        ] {
            assert!(handler.login(login).is_none(), "{login:?}");
            let auth = handler.auth_password(login, "pw").await.unwrap();
            assert_eq!(auth, Auth::reject(), "{login:?}");
        }
        let dialled =
            tokio::time::timeout(std::time::Duration::from_millis(200), listener.accept()).await;
        assert!(
            dialled.is_err(),
            "the control plane must not be called for a bad name"
        );
        assert_eq!(
            handler.login("alice+busybox"),
            Some(Login {
                user: "alice".into(),
                environment: Some("busybox".into())
            })
        );
        assert!(!handler.authenticated.is_cancelled());
        // Each refusal is in the audit log, the malformed name as the client sent it.
        let lines = audit.lines();
        assert_eq!(lines.len(), 7, "{lines:#?}");
        let record: serde_json::Value = serde_json::from_str(&lines[3]).unwrap();
        assert_eq!(record["event"], "login");
        assert_eq!(record["outcome"], "failure");
        assert_eq!(record["user"], "root\u{0}");
        assert_eq!(record["method"], "password");
        assert_eq!(record["reason"], "malformed login name");
        assert_eq!(record["client"], "127.0.0.1:1");
        assert_eq!(record["proxy"], "p");
    }

    #[tokio::test]
    async fn keyboard_interactive_asks_for_the_password_with_one_hidden_prompt() {
        let mut handler = handler("https://127.0.0.1:1".into(), AuditLog::in_memory());
        let auth = handler
            .auth_keyboard_interactive("alice", "", None)
            .await
            .unwrap();
        assert_eq!(
            auth,
            Auth::Partial {
                name: "".into(),
                instructions: "".into(),
                prompts: vec![("Password: ".into(), false)].into(),
            }
        );
    }
}
