//! The data path: start the user's process in their container and pump
//! bytes between it and one SSH channel. The runtime that starts processes
//! sits behind [`ProcessRuntime`] (the `envgate-runtime` crate): the
//! container's agent when the placement's [`SessionTarget`] names one
//! (`agent.rs`), else the engine's exec (Docker exec, `envgate_runtime::docker`,
//! with the `docker` feature); the pumping is the same for every runtime.

pub mod agent;

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use russh::ChannelWriteHalf;
use russh::server::Msg;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use crate::error::ProxyError;

/// Client input held for a channel while its process is slow to read it and
/// produces no output: past this the SSH connection is not read any more
/// (TCP back-pressure on the client), as sshd would hold back the window.
pub const INPUT_SOFT_LIMIT: usize = 1024 * 1024;
/// While the process's output waits for the client, input is taken freely up
/// to this, then only one packet per [`INPUT_PACE`] (see [`Inbound::push`]).
pub const INPUT_HARD_LIMIT: usize = 16 * 1024 * 1024;
pub const INPUT_PACE: Duration = Duration::from_millis(50);
/// Held input is never more than this: a client that keeps sending while it
/// does not read its process's output is disconnected.
pub const INPUT_MAX: usize = 64 * 1024 * 1024;
/// How long input may wait for room before the connection is given up (the
/// process neither reads its input nor exits, and the client keeps sending).
pub const INPUT_STALL_LIMIT: Duration = Duration::from_secs(600);
/// Signals held for a channel whose process is not reading its input: past
/// this a client's further signals are dropped (window changes need no such
/// bound: consecutive ones are merged, and only the last size counts).
const MAX_QUEUED_SIGNALS: usize = 16;
/// How long to wait for the runtime to report an exit code after the
/// process's output ended.
const EXIT_CODE_WAIT: Duration = Duration::from_secs(5);

pub use envgate_runtime::session::{
    AgentTarget, ExecError, ExitSignal, Output, OutputStream, ProcessControl, ProcessEnd,
    ProcessRuntime, ProcessSpec, SessionTarget, StartedProcess, TerminalSize,
};

/// One thing the client sent on a channel, in the order it was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Data(Bytes),
    /// A window change: applied before any data that came after it, as
    /// sshd does (`stty size` typed right after a resize sees the new size).
    Resize(TerminalSize),
    /// An SSH signal name, delivered after the data before it.
    Signal(String),
    /// The client will send no more data (window changes and signals may
    /// still follow).
    Eof,
}

/// Client input of one channel, from the russh handler to the process:
/// data, window changes and signals in one queue, so each takes effect in
/// the order the client sent it (a window change travelling beside the data
/// could reach the terminal after keys typed behind it). Only data counts
/// for the limits below.
///
/// russh grants the client more window as soon as data arrives, so the only
/// brake on a fast client is to stop reading the connection, which the
/// handler does by awaiting [`Inbound::push`]. But output to the client is
/// sent by that same reading loop, and the client's window adjustments for
/// that output arrive behind its input: if input waited for room while
/// output waited for the loop, a process like `cat` whose output cannot
/// leave stops reading its input, and the connection deadlocks. So:
/// - while no output is waiting, input waits for room above
///   [`INPUT_SOFT_LIMIT`] (plain back-pressure: uploads, slow readers);
/// - while output is waiting, input is taken up to [`INPUT_HARD_LIMIT`],
///   then paced to one packet per [`INPUT_PACE`], so the loop keeps turning
///   and reaches the window adjustments that let the output go;
/// - past [`INPUT_MAX`] the connection is given up.
#[derive(Default)]
pub struct Inbound {
    state: Mutex<InboundState>,
    changed: Notify,
}

#[derive(Default)]
struct InboundState {
    items: VecDeque<Input>,
    /// Data bytes in `items`.
    held: usize,
    /// Signals in `items`.
    signals: usize,
    /// The last window change a data-only reader (the menu) stepped over;
    /// the process gets it before the items that follow.
    passed_resize: Option<TerminalSize>,
    /// The client sent EOF ([`Input::Eof`] is queued).
    eof: bool,
    /// Nobody will read any more (process ended, channel closed).
    closed: bool,
    /// Sends of output under way (waiting for the client or the loop).
    output_waiting: usize,
}

impl Inbound {
    /// Queues client bytes, waiting for room as described on [`Inbound`].
    pub async fn push(&self, data: &[u8]) -> Result<(), ProxyError> {
        if data.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let mut paced = false;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let output_waiting = {
                let mut state = self.state.lock().expect("inbound lock");
                // Data after EOF is a protocol error of the client's; dropped.
                if state.closed || state.eof {
                    return Ok(());
                }
                if state.held + data.len() > INPUT_MAX {
                    return Err(ProxyError::InputOverflow(INPUT_MAX >> 20));
                }
                let room = if state.output_waiting > 0 {
                    state.held < INPUT_HARD_LIMIT || paced
                } else {
                    state.held < INPUT_SOFT_LIMIT
                };
                if room {
                    state.held += data.len();
                    state
                        .items
                        .push_back(Input::Data(Bytes::copy_from_slice(data)));
                    drop(state);
                    self.changed.notify_waiters();
                    return Ok(());
                }
                state.output_waiting > 0
            };
            if output_waiting {
                paced = tokio::time::timeout(INPUT_PACE, notified).await.is_err();
                if paced {
                    tracing::trace!("input paced while output waits for the client");
                }
                continue;
            }
            let left = INPUT_STALL_LIMIT.saturating_sub(started.elapsed());
            if tokio::time::timeout(left, notified).await.is_err() {
                return Err(ProxyError::InputStalled(INPUT_STALL_LIMIT.as_secs()));
            }
        }
    }

    /// Queues a window change behind the data already sent, at once: a size
    /// is never dropped or held back by a full queue. It replaces a window
    /// change right before it (only the last of a burst counts).
    pub fn resize(&self, size: TerminalSize) {
        let mut state = self.state.lock().expect("inbound lock");
        if state.closed {
            return;
        }
        match state.items.back_mut() {
            Some(Input::Resize(last)) => *last = size,
            _ => state.items.push_back(Input::Resize(size)),
        }
        drop(state);
        self.changed.notify_waiters();
    }

    /// Queues a signal behind the data already sent; dropped past
    /// [`MAX_QUEUED_SIGNALS`] (the process is not reading its input).
    pub fn signal(&self, name: String) {
        let mut state = self.state.lock().expect("inbound lock");
        if state.closed {
            return;
        }
        if state.signals >= MAX_QUEUED_SIGNALS {
            tracing::debug!(signal = %name, "signal dropped: too many waiting");
            return;
        }
        state.signals += 1;
        state.items.push_back(Input::Signal(name));
        drop(state);
        self.changed.notify_waiters();
    }

    /// The client will send no more.
    pub fn finish(&self) {
        let mut state = self.state.lock().expect("inbound lock");
        if state.closed || state.eof {
            return;
        }
        state.eof = true;
        state.items.push_back(Input::Eof);
        drop(state);
        self.changed.notify_waiters();
    }

    /// Nobody reads any more; held and future input is dropped.
    pub fn close(&self) {
        let mut state = self.state.lock().expect("inbound lock");
        state.closed = true;
        state.items.clear();
        state.held = 0;
        state.signals = 0;
        drop(state);
        self.changed.notify_waiters();
    }

    /// The next chunk of data, for a reader before any process exists (the
    /// menu); `None` at EOF or after close. Signals are dropped (there is
    /// nothing to signal); the last window change is kept for the process
    /// (see [`Inbound::next_input`]).
    pub async fn next(&self) -> Option<Bytes> {
        loop {
            match self.next_item(false).await? {
                Input::Data(chunk) => return Some(chunk),
                Input::Resize(size) => {
                    self.state.lock().expect("inbound lock").passed_resize = Some(size);
                }
                Input::Signal(_) | Input::Eof => {}
            }
        }
    }

    /// The next thing the client sent, for the process, until the channel
    /// closes (`None`); window changes and signals may follow [`Input::Eof`].
    pub async fn next_input(&self) -> Option<Input> {
        self.next_item(true).await
    }

    async fn next_item(&self, for_process: bool) -> Option<Input> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.state.lock().expect("inbound lock");
                if for_process && let Some(size) = state.passed_resize.take() {
                    // A later window change at the front supersedes it.
                    if !matches!(state.items.front(), Some(Input::Resize(_))) {
                        return Some(Input::Resize(size));
                    }
                }
                // The data-only reader stops at EOF and leaves it for the process.
                if !for_process && matches!(state.items.front(), Some(Input::Eof)) {
                    return None;
                }
                if let Some(item) = state.items.pop_front() {
                    match &item {
                        Input::Data(chunk) => state.held -= chunk.len(),
                        Input::Signal(_) => state.signals -= 1,
                        Input::Resize(_) | Input::Eof => {}
                    }
                    drop(state);
                    self.changed.notify_waiters();
                    return Some(item);
                }
                if state.closed {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// Marks output as waiting to be sent until the guard is dropped (also
    /// when the send is abandoned).
    fn output_waiting(&self) -> OutputWaiting<'_> {
        self.state.lock().expect("inbound lock").output_waiting += 1;
        self.changed.notify_waiters();
        OutputWaiting(self)
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.state.lock().expect("inbound lock").held
    }
}

struct OutputWaiting<'a>(&'a Inbound);

impl Drop for OutputWaiting<'_> {
    fn drop(&mut self) {
        self.0.state.lock().expect("inbound lock").output_waiting -= 1;
        self.0.changed.notify_waiters();
    }
}

/// The sending side of one SSH channel. Writes wait for the client's window
/// (russh's channel writer), so output is never buffered past it.
pub struct ChannelOutput {
    writer: ChannelWriteHalf<Msg>,
    inbound: Arc<Inbound>,
    /// The channel's recording, when its environment records terminal sessions.
    cast: std::sync::OnceLock<Arc<crate::recording::Cast>>,
}

/// SSH extended-data type for stderr (RFC 4254 section 5.2).
const STDERR: u32 = 1;

impl ChannelOutput {
    pub fn new(writer: ChannelWriteHalf<Msg>, inbound: Arc<Inbound>) -> Self {
        Self {
            writer,
            inbound,
            cast: std::sync::OnceLock::new(),
        }
    }

    /// From now on everything the channel shows is also written to `cast`.
    pub fn record(&self, cast: crate::recording::Cast) {
        let _ = self.cast.set(Arc::new(cast));
    }

    pub fn record_resize(&self, size: TerminalSize) {
        if let Some(cast) = self.cast.get() {
            cast.resize(size);
        }
    }

    pub fn inbound(&self) -> &Arc<Inbound> {
        &self.inbound
    }

    pub async fn stdout(&self, data: Bytes) -> Result<(), russh::Error> {
        if let Some(cast) = self.cast.get() {
            cast.output(&data);
        }
        let _waiting = self.inbound.output_waiting();
        self.writer.data_bytes(data).await
    }

    pub async fn stderr(&self, data: Bytes) -> Result<(), russh::Error> {
        if let Some(cast) = self.cast.get() {
            cast.output(&data);
        }
        let _waiting = self.inbound.output_waiting();
        self.writer.extended_data_bytes(STDERR, data).await
    }

    /// One line on stderr, ended as the terminal needs it.
    pub async fn stderr_line(&self, line: &str, pty: bool) -> Result<(), russh::Error> {
        let end = if pty { "\r\n" } else { "\n" };
        self.stderr(Bytes::from(format!("{line}{end}"))).await
    }

    /// Exit status, EOF and close, in the order OpenSSH sends them.
    pub async fn finish(&self, exit_status: u32) -> Result<(), russh::Error> {
        self.inbound.close();
        self.writer.exit_status(exit_status).await?;
        self.close().await
    }

    /// EOF and close after an `exit-signal` (sent through the session
    /// handle, which the channel writer cannot).
    pub async fn close(&self) -> Result<(), russh::Error> {
        self.inbound.close();
        self.writer.eof().await?;
        self.writer.close().await
    }

    pub fn id(&self) -> russh::ChannelId {
        self.writer.id()
    }
}

/// Pumps a started process to and from the channel until its output ends,
/// then returns how it ended. Input is passed on with its EOF, and window
/// changes and signals in their place among it; output keeps stdout and
/// stderr apart (on a tty they are one stream anyway).
pub async fn pump(
    process: StartedProcess,
    output: &ChannelOutput,
    tty: bool,
) -> Result<ProcessEnd, ExecError> {
    let StartedProcess {
        mut stdin,
        output: mut process_output,
        control,
    } = process;
    let inbound = output.inbound().clone();
    let steer = control.as_ref();
    let stdin_task = async move {
        while let Some(input) = inbound.next_input().await {
            match input {
                Input::Data(chunk) => {
                    if let Err(e) = write_chunk(&mut stdin, &chunk).await {
                        tracing::debug!(error = %e, "process input closed");
                        inbound.close();
                        return;
                    }
                }
                // The runtime's resize returns once the terminal has its new
                // size, so the data behind it is written after that.
                Input::Resize(size) if tty => {
                    output.record_resize(size);
                    if let Err(e) = steer.resize(size).await {
                        tracing::debug!(error = %e, "resize failed");
                    }
                }
                // Without a terminal there is no window to change (sshd ignores it too).
                Input::Resize(_) => {}
                Input::Signal(name) => {
                    if let Err(e) = steer.signal(&name).await {
                        tracing::debug!(error = %e, signal = %name, "signal not delivered");
                    }
                }
                // Without a terminal, EOF is passed on by shutting the input
                // down. On a terminal there is no such thing (the runtime would
                // end the whole attachment, losing output still on its way), so,
                // as sshd does, the process just keeps its terminal until it exits.
                Input::Eof => {
                    tracing::debug!("client input ended");
                    if !tty && let Err(e) = stdin.shutdown().await {
                        tracing::debug!(error = %e, "closing process input failed");
                    }
                }
            }
        }
        // Keep the write half alive until the output ends: dropping it would
        // tear down the whole attach connection.
        std::future::pending::<()>().await;
    };

    let output_task = async {
        loop {
            let sent = match process_output.next().await {
                Some(Ok(Output::Stdout(data))) => output.stdout(data).await,
                Some(Ok(Output::Stderr(data))) => output.stderr(data).await,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "reading process output failed");
                    return;
                }
                None => {
                    tracing::debug!("process output ended");
                    return;
                }
            };
            if sent.is_err() {
                tracing::debug!("the channel closed before the process's output ended");
                return;
            }
        }
    };
    // Input and output run side by side; the input task never ends by itself.
    tokio::select! {
        () = stdin_task => {}
        () = output_task => {}
    }
    output.inbound().close();
    let code = wait_exit_code(control.as_ref()).await?;
    Ok(ProcessEnd {
        code,
        signal: control.exit_signal().await,
    })
}

async fn write_chunk(
    stdin: &mut Pin<Box<dyn AsyncWrite + Send>>,
    chunk: &[u8],
) -> std::io::Result<()> {
    stdin.write_all(chunk).await?;
    stdin.flush().await
}

/// The runtime may report the exit a moment after the output ended; ask a
/// few times, briefly.
async fn wait_exit_code(control: &dyn ProcessControl) -> Result<i64, ExecError> {
    let deadline = Instant::now() + EXIT_CODE_WAIT;
    let mut delay = Duration::from_millis(10);
    loop {
        if let Some(code) = control.exit_code().await? {
            return Ok(code);
        }
        if Instant::now() + delay > deadline {
            return Err(ExecError::NoExitCode);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

/// The SSH exit status for a process exit code (Docker reports signals as
/// 128+n, like a shell).
pub fn exit_status(code: i64) -> u32 {
    u32::try_from(code).unwrap_or(255)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn input_waits_for_room_unless_output_is_waiting() {
        let inbound = Arc::new(Inbound::default());
        let chunk = vec![0u8; 32 * 1024];
        while inbound.held() < INPUT_SOFT_LIMIT {
            inbound.push(&chunk).await.unwrap();
        }
        // Full and no output waiting: the next push waits (back-pressure)...
        let blocked = tokio::time::timeout(Duration::from_secs(60), inbound.push(&chunk)).await;
        assert!(blocked.is_err(), "push past the soft limit must wait");
        // ...until output waits to be sent: then input is taken up to the hard limit...
        let waiting = inbound.output_waiting();
        let started = tokio::time::Instant::now();
        while inbound.held() < INPUT_HARD_LIMIT {
            inbound.push(&chunk).await.unwrap();
        }
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "no waiting below the hard limit"
        );
        // ...then paced, one packet per INPUT_PACE...
        let started = tokio::time::Instant::now();
        inbound.push(&chunk).await.unwrap();
        inbound.push(&chunk).await.unwrap();
        assert_eq!(started.elapsed(), INPUT_PACE * 2);
        // ...and never past the maximum.
        while inbound.held() + chunk.len() <= INPUT_MAX {
            inbound.push(&chunk).await.unwrap();
        }
        assert!(matches!(
            inbound.push(&chunk).await,
            Err(ProxyError::InputOverflow(64))
        ));
        // Reading makes room, in order.
        let first = inbound.next().await.unwrap();
        assert_eq!(first.len(), chunk.len());
        drop(waiting);
        assert_eq!(inbound.state.lock().unwrap().output_waiting, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn input_that_is_never_read_gives_up() {
        let inbound = Inbound::default();
        inbound.push(&vec![0u8; INPUT_SOFT_LIMIT]).await.unwrap();
        let result = inbound.push(b"more").await;
        assert!(matches!(result, Err(ProxyError::InputStalled(600))));
    }

    #[tokio::test]
    async fn eof_comes_after_the_data_and_close_releases_writers() {
        let inbound = Inbound::default();
        inbound.push(b"hello").await.unwrap();
        inbound.finish();
        assert_eq!(inbound.next().await.unwrap(), Bytes::from_static(b"hello"));
        assert!(inbound.next().await.is_none());

        let inbound = Arc::new(Inbound::default());
        let big = vec![1u8; INPUT_SOFT_LIMIT];
        inbound.push(&big).await.unwrap();
        let writer = {
            let inbound = inbound.clone();
            tokio::spawn(async move { inbound.push(b"more").await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!writer.is_finished());
        inbound.close();
        writer.await.unwrap().unwrap();
        assert!(inbound.next().await.is_none());
    }

    #[tokio::test]
    async fn window_changes_and_signals_keep_their_place_among_the_data() {
        let size = |cols, rows| TerminalSize { cols, rows };
        let inbound = Inbound::default();
        inbound.push(b"before").await.unwrap();
        inbound.resize(size(90, 25));
        inbound.resize(size(91, 26));
        inbound.push(b"after").await.unwrap();
        inbound.signal("INT".into());
        inbound.finish();
        inbound.resize(size(80, 24));
        let mut seen = Vec::new();
        for _ in 0..6 {
            seen.push(inbound.next_input().await.unwrap());
        }
        assert_eq!(
            seen,
            [
                Input::Data(Bytes::from_static(b"before")),
                // A burst keeps only its last size.
                Input::Resize(size(91, 26)),
                Input::Data(Bytes::from_static(b"after")),
                Input::Signal("INT".into()),
                Input::Eof,
                // Window changes still reach a terminal after EOF.
                Input::Resize(size(80, 24)),
            ]
        );
        // Window changes do not count against the data limits.
        assert_eq!(inbound.held(), 0);
        inbound.close();
        assert_eq!(inbound.next_input().await, None);
    }

    #[tokio::test]
    async fn the_menu_reads_data_and_the_process_still_gets_the_last_size() {
        let size = |cols, rows| TerminalSize { cols, rows };
        let inbound = Inbound::default();
        inbound.resize(size(90, 25));
        inbound.signal("INT".into());
        inbound.push(b"\r").await.unwrap();
        inbound.push(b"ls\n").await.unwrap();
        // The menu reads the Enter, stepping over the window change and the
        // signal (no process yet)...
        assert_eq!(inbound.next().await.unwrap(), Bytes::from_static(b"\r"));
        // ...and the process started next gets the size, then the keys.
        assert_eq!(
            inbound.next_input().await,
            Some(Input::Resize(size(90, 25)))
        );
        assert_eq!(
            inbound.next_input().await,
            Some(Input::Data(Bytes::from_static(b"ls\n")))
        );
    }

    #[tokio::test]
    async fn signals_held_for_a_process_not_reading_are_bounded() {
        let inbound = Inbound::default();
        for _ in 0..MAX_QUEUED_SIGNALS + 5 {
            inbound.signal("INT".into());
        }
        inbound.finish();
        let mut seen = Vec::new();
        loop {
            match inbound.next_input().await {
                Some(Input::Eof) => break,
                other => seen.push(other),
            }
        }
        assert_eq!(
            seen,
            vec![Some(Input::Signal("INT".into())); MAX_QUEUED_SIGNALS]
        );
        // Once the process has read them, there is room again.
        inbound.signal("TERM".into());
        assert_eq!(
            inbound.next_input().await,
            Some(Input::Signal("TERM".into()))
        );
    }

    #[test]
    fn exit_codes_map_to_ssh_statuses() {
        assert_eq!(exit_status(0), 0);
        assert_eq!(exit_status(7), 7);
        assert_eq!(exit_status(137), 137);
        assert_eq!(exit_status(-1), 255);
    }
}
