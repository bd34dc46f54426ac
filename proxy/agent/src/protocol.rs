//! The proxy ⇄ agent wire protocol (version 2). `docs/agent.md` is the prose description.
//!
//! Every frame is `len: u32 BE | kind: u8 | channel: u32 BE | body`, where `len` counts
//! `kind`, `channel` and `body`. Channel 0 carries the handshake and connection-level
//! messages; every other channel is one multiplexed thing (today: a process). Channel ids
//! chosen by the proxy have the top bit clear; the top bit is reserved for channels the
//! agent opens itself (agent forwarding, reverse port forwarding in later versions).
//!
//! All integers are big endian; strings and byte strings are `u32` length + bytes.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The version this build speaks; the handshake settles on the highest both sides know.
/// Version 2 adds the session's own account to `Open` (`SpawnRequest::account`); version 3
/// lets data frames carry up to [`MAX_DATA_CHUNK_V3`].
pub const PROTOCOL_VERSION: u16 = 3;
/// The first version whose `Open` may carry an account.
pub const ACCOUNT_VERSION: u16 = 2;
/// The oldest version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// Starts the agent's hello so a peer that is not an envgate agent is detected at once.
pub const MAGIC: [u8; 8] = *b"EGAGENT\n";
/// Upper bound for `len`; anything larger is a protocol error (bounds every buffer).
pub const MAX_FRAME_LEN: usize = 1 << 20;
/// Largest payload of one data frame; keeps a stream from hogging the shared connection.
pub const MAX_DATA_CHUNK: usize = 32 * 1024;
/// The same from version 3 on: bulk output (a file over SFTP) crosses in an eighth of the
/// frames. A receiver of this build accepts it always; a sender uses it only with a peer
/// that settled on version 3, because older ones refuse larger frames.
pub const MAX_DATA_CHUNK_V3: usize = 256 * 1024;
/// The first version whose data frames may be that large.
pub const BIG_CHUNK_VERSION: u16 = 3;
pub const NONCE_LEN: usize = 32;
pub const MAC_LEN: usize = 32;
/// Channel ids with this bit set are reserved for channels the agent opens.
pub const AGENT_CHANNEL_BIT: u32 = 1 << 31;

const HEADER_LEN: usize = 4 + 1 + 4;

/// Frame kinds. Values are part of the wire format.
mod kind {
    pub const HELLO: u8 = 0x01;
    pub const AUTH: u8 = 0x02;
    pub const AUTH_OK: u8 = 0x03;
    pub const ERROR: u8 = 0x04;
    pub const PING: u8 = 0x05;
    pub const PONG: u8 = 0x06;
    pub const OPEN: u8 = 0x10;
    pub const OPEN_OK: u8 = 0x11;
    pub const OPEN_FAILED: u8 = 0x12;
    pub const DATA: u8 = 0x13;
    pub const EOF: u8 = 0x14;
    pub const WINDOW: u8 = 0x15;
    pub const RESIZE: u8 = 0x16;
    pub const SIGNAL: u8 = 0x17;
    pub const EXIT: u8 = 0x18;
    pub const CLOSE: u8 = 0x19;
}

/// Channel types carried by `Open`. Later versions add e.g. `DIRECT_TCP` (connect to the
/// container's loopback) and `AUTH_AGENT` (opened by the agent); an agent that does not
/// know a type answers `OpenFailed { code: UNSUPPORTED }`.
pub mod channel_type {
    pub const PROCESS: u8 = 1;
}

/// `OpenFailed` codes; the message is meant for the user.
pub mod open_error {
    pub const BAD_REQUEST: u8 = 1;
    pub const NO_SUCH_USER: u8 = 2;
    pub const EXEC_FAILED: u8 = 3;
    pub const RESOURCES: u8 = 4;
    pub const LIMIT: u8 = 5;
    pub const SHUTTING_DOWN: u8 = 6;
    pub const UNSUPPORTED: u8 = 7;
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("frame of {0} bytes exceeds the size limit")]
    FrameTooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// A sealed (TCP) connection failed its authentication or ended uncleanly.
    #[error("{0}")]
    Sealed(#[from] crate::seal::SealError),
    /// The peer closed the connection with an `Error` frame.
    #[error("the peer reported: {0}")]
    Reported(String),
}

/// One of the three byte streams of a process channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdin,
    Stdout,
    Stderr,
}

impl Stream {
    fn to_wire(self) -> u8 {
        match self {
            Stream::Stdin => 0,
            Stream::Stdout => 1,
            Stream::Stderr => 2,
        }
    }
    fn from_wire(v: u8) -> Result<Self, ProtocolError> {
        match v {
            0 => Ok(Stream::Stdin),
            1 => Ok(Stream::Stdout),
            2 => Ok(Stream::Stderr),
            _ => Err(ProtocolError::Malformed("unknown stream id")),
        }
    }
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Program {
    /// The user's login shell from the container's `/etc/passwd`, as a login shell (`-sh`).
    LoginShell,
    /// `<user's shell> -c <command>`, exactly what sshd does for `ssh host command`.
    ShellCommand(String),
    /// Executed directly (`PATH` lookup on `argv[0]`), no shell in between.
    Argv(Vec<String>),
}

/// Terminal size in characters and pixels (pixels may be 0), as in SSH's `pty-req`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WindowSize {
    pub cols: u32,
    pub rows: u32,
    pub pixel_width: u32,
    pub pixel_height: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtyRequest {
    /// Becomes `TERM` in the process environment.
    pub term: String,
    pub size: WindowSize,
    /// SSH encoded terminal modes (RFC 4254 §8) as (opcode, value); unknown opcodes are ignored.
    pub modes: Vec<(u8, u32)>,
}

/// A process the proxy asks the agent to start.
/// The session user's own account. The agent makes sure the container's passwd and group
/// files name it (replacing an entry of the same name) and hands the home directory to it
/// while the home is still root's, then runs the process as it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpawnRequest {
    pub program: Program,
    /// A name from the container's `/etc/passwd`, or a numeric uid; `None` runs as the
    /// agent's own user (root). Ignored when `account` is set.
    pub user: Option<String>,
    /// Version 2: run as this account, created in the container if it is missing.
    pub account: Option<Account>,
    /// Added on top of the session's base environment: the container's own environment
    /// (image `ENV`, as a Docker exec sees it) plus HOME, USER, LOGNAME, SHELL of the user,
    /// PATH if the image sets none, and TERM with a pty.
    pub env: Vec<(String, String)>,
    /// Working directory; `None` means the user's home (or `/` if that is missing).
    pub cwd: Option<String>,
    pub pty: Option<PtyRequest>,
}

impl SpawnRequest {
    pub fn new(program: Program) -> Self {
        SpawnRequest {
            program,
            user: None,
            account: None,
            env: Vec::new(),
            cwd: None,
            pty: None,
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    /// `name` is the SSH signal name (no `SIG` prefix), e.g. `TERM`.
    Signal {
        number: i32,
        name: String,
        core_dumped: bool,
    },
}

impl ExitStatus {
    pub fn success(&self) -> bool {
        matches!(self, ExitStatus::Code(0))
    }

    /// The status as a shell reports it in `$?` (and Docker as an exec's exit code):
    /// the code, or 128 + the signal number.
    pub fn shell_code(&self) -> i32 {
        match self {
            ExitStatus::Code(code) => *code,
            ExitStatus::Signal { number, .. } => 128 + number,
        }
    }
}

/// Body of `Open` for a process channel. The windows are how many bytes of stdout and
/// stderr the agent may send before it must wait for `Window` frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenProcess {
    pub request: SpawnRequest,
    pub stdout_window: u32,
    pub stderr_window: u32,
}

/// A decoded frame body. The channel id travels beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello {
        min_version: u16,
        max_version: u16,
        nonce: [u8; NONCE_LEN],
    },
    Auth {
        version: u16,
        nonce: [u8; NONCE_LEN],
        mac: [u8; MAC_LEN],
    },
    AuthOk {
        mac: [u8; MAC_LEN],
    },
    /// On channel 0: fatal for the connection; the sender closes right after.
    Error {
        message: String,
    },
    Ping {
        payload: Vec<u8>,
    },
    Pong {
        payload: Vec<u8>,
    },
    Open(OpenProcess),
    /// `stdin_window`: bytes of stdin the proxy may send before waiting for `Window`.
    OpenOk {
        pid: u32,
        stdin_window: u32,
    },
    OpenFailed {
        code: u8,
        message: String,
    },
    Data {
        stream: Stream,
        data: Vec<u8>,
    },
    Eof {
        stream: Stream,
    },
    Window {
        stream: Stream,
        increment: u32,
    },
    Resize(WindowSize),
    Signal {
        name: String,
    },
    /// The last frame the agent sends on a process channel.
    Exit(ExitStatus),
    /// Proxy → agent: the proxy gives up on the channel (the agent hangs the process up).
    Close,
    /// Decoded from an `Open` of a channel type this build does not know; never encoded.
    /// The receiver answers `OpenFailed { code: UNSUPPORTED }`.
    OpenUnknown {
        channel_type: u8,
    },
}

impl Message {
    /// Appends the complete frame (header included) to `out`.
    pub fn encode(&self, channel: u32, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; HEADER_LEN]);
        let mut e = Enc(out);
        let k = match self {
            Message::Hello {
                min_version,
                max_version,
                nonce,
            } => {
                e.raw(&MAGIC);
                e.u16(*min_version);
                e.u16(*max_version);
                e.raw(nonce);
                kind::HELLO
            }
            Message::Auth {
                version,
                nonce,
                mac,
            } => {
                e.u16(*version);
                e.raw(nonce);
                e.raw(mac);
                kind::AUTH
            }
            Message::AuthOk { mac } => {
                e.raw(mac);
                kind::AUTH_OK
            }
            Message::Error { message } => {
                e.str(message);
                kind::ERROR
            }
            Message::Ping { payload } => {
                e.bytes(payload);
                kind::PING
            }
            Message::Pong { payload } => {
                e.bytes(payload);
                kind::PONG
            }
            Message::Open(open) => {
                e.u8(channel_type::PROCESS);
                encode_spawn(&mut e, open);
                kind::OPEN
            }
            Message::OpenOk { pid, stdin_window } => {
                e.u8(channel_type::PROCESS);
                e.u32(*pid);
                e.u32(*stdin_window);
                kind::OPEN_OK
            }
            Message::OpenFailed { code, message } => {
                e.u8(*code);
                e.str(message);
                kind::OPEN_FAILED
            }
            Message::Data { stream, data } => {
                e.u8(stream.to_wire());
                e.raw(data);
                kind::DATA
            }
            Message::Eof { stream } => {
                e.u8(stream.to_wire());
                kind::EOF
            }
            Message::Window { stream, increment } => {
                e.u8(stream.to_wire());
                e.u32(*increment);
                kind::WINDOW
            }
            Message::Resize(size) => {
                encode_size(&mut e, size);
                kind::RESIZE
            }
            Message::Signal { name } => {
                e.str(name);
                kind::SIGNAL
            }
            Message::Exit(status) => {
                match status {
                    ExitStatus::Code(code) => {
                        e.u8(0);
                        e.u32(*code as u32);
                    }
                    ExitStatus::Signal {
                        number,
                        name,
                        core_dumped,
                    } => {
                        e.u8(1);
                        e.u32(*number as u32);
                        e.u8(u8::from(*core_dumped));
                        e.str(name);
                    }
                }
                kind::EXIT
            }
            Message::Close => kind::CLOSE,
            Message::OpenUnknown { channel_type } => {
                // Only produced by the decoder; encoded as an empty open of that type so the
                // peer refuses it rather than misreading it.
                e.u8(*channel_type);
                kind::OPEN
            }
        };
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
        out[start + 4] = k;
        out[start + 5..start + 9].copy_from_slice(&channel.to_be_bytes());
    }

    pub fn decode(kind: u8, body: &[u8]) -> Result<Message, ProtocolError> {
        let mut d = Dec(body);
        let msg = match kind {
            kind::HELLO => {
                if d.array::<8>()? != MAGIC {
                    return Err(ProtocolError::Malformed(
                        "bad magic: the peer is not an envgate agent",
                    ));
                }
                Message::Hello {
                    min_version: d.u16()?,
                    max_version: d.u16()?,
                    nonce: d.array()?,
                }
            }
            kind::AUTH => Message::Auth {
                version: d.u16()?,
                nonce: d.array()?,
                mac: d.array()?,
            },
            kind::AUTH_OK => Message::AuthOk { mac: d.array()? },
            kind::ERROR => Message::Error { message: d.str()? },
            kind::PING => Message::Ping {
                payload: d.bytes()?.to_vec(),
            },
            kind::PONG => Message::Pong {
                payload: d.bytes()?.to_vec(),
            },
            kind::OPEN => match d.u8()? {
                channel_type::PROCESS => Message::Open(decode_spawn(&mut d)?),
                // A newer peer's channel type: the body is skipped and the channel refused,
                // the connection stays up.
                other => {
                    d.rest();
                    Message::OpenUnknown {
                        channel_type: other,
                    }
                }
            },
            kind::OPEN_OK => {
                if d.u8()? != channel_type::PROCESS {
                    return Err(ProtocolError::Malformed("unsupported channel type"));
                }
                Message::OpenOk {
                    pid: d.u32()?,
                    stdin_window: d.u32()?,
                }
            }
            kind::OPEN_FAILED => Message::OpenFailed {
                code: d.u8()?,
                message: d.str()?,
            },
            kind::DATA => {
                let stream = Stream::from_wire(d.u8()?)?;
                let data = d.rest().to_vec();
                if data.len() > MAX_DATA_CHUNK_V3 {
                    return Err(ProtocolError::Malformed(
                        "data frame larger than the chunk limit",
                    ));
                }
                Message::Data { stream, data }
            }
            kind::EOF => Message::Eof {
                stream: Stream::from_wire(d.u8()?)?,
            },
            kind::WINDOW => Message::Window {
                stream: Stream::from_wire(d.u8()?)?,
                increment: d.u32()?,
            },
            kind::RESIZE => Message::Resize(decode_size(&mut d)?),
            kind::SIGNAL => Message::Signal { name: d.str()? },
            kind::EXIT => match d.u8()? {
                0 => Message::Exit(ExitStatus::Code(d.u32()? as i32)),
                1 => {
                    let number = d.u32()? as i32;
                    let core_dumped = d.u8()? != 0;
                    Message::Exit(ExitStatus::Signal {
                        number,
                        core_dumped,
                        name: d.str()?,
                    })
                }
                _ => return Err(ProtocolError::Malformed("unknown exit kind")),
            },
            kind::CLOSE => Message::Close,
            other => return Err(ProtocolError::UnknownKind(other)),
        };
        d.finish()?;
        Ok(msg)
    }
}

fn encode_size(e: &mut Enc<'_>, s: &WindowSize) {
    e.u32(s.cols);
    e.u32(s.rows);
    e.u32(s.pixel_width);
    e.u32(s.pixel_height);
}

fn decode_size(d: &mut Dec<'_>) -> Result<WindowSize, ProtocolError> {
    Ok(WindowSize {
        cols: d.u32()?,
        rows: d.u32()?,
        pixel_width: d.u32()?,
        pixel_height: d.u32()?,
    })
}

fn encode_spawn(e: &mut Enc<'_>, open: &OpenProcess) {
    let r = &open.request;
    match &r.program {
        Program::LoginShell => e.u8(0),
        Program::ShellCommand(cmd) => {
            e.u8(1);
            e.str(cmd);
        }
        Program::Argv(argv) => {
            e.u8(2);
            e.u32(argv.len() as u32);
            for a in argv {
                e.str(a);
            }
        }
    }
    e.str(r.user.as_deref().unwrap_or(""));
    e.u32(r.env.len() as u32);
    for (k, v) in &r.env {
        e.str(k);
        e.str(v);
    }
    e.str(r.cwd.as_deref().unwrap_or(""));
    match &r.pty {
        None => e.u8(0),
        Some(pty) => {
            e.u8(1);
            e.str(&pty.term);
            encode_size(e, &pty.size);
            e.u32(pty.modes.len() as u32);
            for (op, v) in &pty.modes {
                e.u8(*op);
                e.u32(*v);
            }
        }
    }
    e.u32(open.stdout_window);
    e.u32(open.stderr_window);
    // Version 2 appends the account; a version 1 peer is never sent one (see the client).
    if let Some(account) = &r.account {
        e.str(&account.name);
        e.u32(account.uid);
        e.u32(account.gid);
        e.str(&account.home);
    }
}

fn decode_spawn(d: &mut Dec<'_>) -> Result<OpenProcess, ProtocolError> {
    let program = match d.u8()? {
        0 => Program::LoginShell,
        1 => Program::ShellCommand(d.str()?),
        2 => {
            let n = d.count(4)?;
            let mut argv = Vec::with_capacity(n);
            for _ in 0..n {
                argv.push(d.str()?);
            }
            Program::Argv(argv)
        }
        _ => return Err(ProtocolError::Malformed("unknown program kind")),
    };
    let user = Some(d.str()?).filter(|u| !u.is_empty());
    let n = d.count(8)?;
    let mut env = Vec::with_capacity(n);
    for _ in 0..n {
        env.push((d.str()?, d.str()?));
    }
    let cwd = Some(d.str()?).filter(|c| !c.is_empty());
    let pty = match d.u8()? {
        0 => None,
        _ => {
            let term = d.str()?;
            let size = decode_size(d)?;
            let n = d.count(5)?;
            let mut modes = Vec::with_capacity(n);
            for _ in 0..n {
                modes.push((d.u8()?, d.u32()?));
            }
            Some(PtyRequest { term, size, modes })
        }
    };
    let stdout_window = d.u32()?;
    let stderr_window = d.u32()?;
    let account = if d.0.is_empty() {
        None
    } else {
        Some(Account {
            name: d.str()?,
            uid: d.u32()?,
            gid: d.u32()?,
            home: d.str()?,
        })
    };
    Ok(OpenProcess {
        request: SpawnRequest {
            program,
            user,
            account,
            env,
            cwd,
            pty,
        },
        stdout_window,
        stderr_window,
    })
}

struct Enc<'a>(&'a mut Vec<u8>);

impl Enc<'_> {
    fn raw(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.raw(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.raw(&v.to_be_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.raw(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
}

struct Dec<'a>(&'a [u8]);

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.0.len() < n {
            return Err(ProtocolError::Malformed("body shorter than its fields"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn bytes(&mut self) -> Result<&'a [u8], ProtocolError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn str(&mut self) -> Result<String, ProtocolError> {
        String::from_utf8(self.bytes()?.to_vec())
            .map_err(|_| ProtocolError::Malformed("string is not UTF-8"))
    }
    /// A list length, checked against the bytes left so a forged count cannot make us
    /// reserve gigabytes.
    fn count(&mut self, min_item_len: usize) -> Result<usize, ProtocolError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item_len) > self.0.len() {
            return Err(ProtocolError::Malformed("list count larger than the body"));
        }
        Ok(n)
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
    fn finish(&self) -> Result<(), ProtocolError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::Malformed("trailing bytes after the body"))
        }
    }
}

/// Reads frames from a byte stream. Cancel safe: partial frames stay in the internal buffer,
/// so `next()` can sit in a `select!`.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    scratch: Box<[u8]>,
    max_frame: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: Vec::with_capacity(64 * 1024),
            start: 0,
            scratch: vec![0; 64 * 1024].into(),
            max_frame: MAX_FRAME_LEN,
        }
    }

    /// Lowers the frame size limit, e.g. while the peer is not authenticated yet, so an
    /// anonymous peer cannot make us buffer a megabyte. `MAX_FRAME_LEN` is the ceiling.
    pub fn set_max_frame(&mut self, max: usize) {
        self.max_frame = max.min(MAX_FRAME_LEN);
    }

    /// The stream and the bytes read from it but not parsed yet (after the handshake of a
    /// sealed connection, the start of its first record).
    pub fn into_parts(mut self) -> (R, Vec<u8>) {
        self.buf.drain(..self.start);
        (self.inner, self.buf)
    }

    /// The next `(channel, message)`, or `None` when the peer closed cleanly between frames.
    pub async fn next(&mut self) -> Result<Option<(u32, Message)>, ProtocolError> {
        loop {
            if let Some((kind, channel, body_range)) = self.parse_header()? {
                let msg = Message::decode(kind, &self.buf[body_range.clone()]);
                self.start = body_range.end;
                return msg.map(|m| Some((channel, m)));
            }
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            // Read into scratch space: if this future is dropped mid-read, `buf` is untouched.
            let n = self.inner.read(&mut self.scratch).await.map_err(|e| {
                match crate::seal::SealError::from_io(&e) {
                    Some(sealed) => ProtocolError::Sealed(sealed),
                    None => ProtocolError::Io(e),
                }
            })?;
            self.buf.extend_from_slice(&self.scratch[..n]);
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ProtocolError::Truncated)
                };
            }
        }
    }

    fn parse_header(&self) -> Result<Option<(u8, u32, std::ops::Range<usize>)>, ProtocolError> {
        let avail = &self.buf[self.start..];
        if avail.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes(avail[..4].try_into().expect("4 bytes")) as usize;
        if len > self.max_frame {
            return Err(ProtocolError::FrameTooLarge(len));
        }
        if len < 5 {
            return Err(ProtocolError::Malformed("frame shorter than its header"));
        }
        if avail.len() < 4 + len {
            return Ok(None);
        }
        let kind = avail[4];
        let channel = u32::from_be_bytes(avail[5..9].try_into().expect("4 bytes"));
        let body_start = self.start + HEADER_LEN;
        Ok(Some((kind, channel, body_start..self.start + 4 + len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(channel: u32, msg: Message) {
        let mut buf = Vec::new();
        msg.encode(channel, &mut buf);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let got = rt.block_on(async {
            let mut r = FrameReader::new(&buf[..]);
            let first = r.next().await.unwrap().unwrap();
            assert!(r.next().await.unwrap().is_none());
            first
        });
        assert_eq!(got, (channel, msg));
    }

    #[test]
    fn every_message_roundtrips() {
        roundtrip(
            0,
            Message::Hello {
                min_version: 1,
                max_version: 3,
                nonce: [7; 32],
            },
        );
        roundtrip(
            0,
            Message::Auth {
                version: 1,
                nonce: [1; 32],
                mac: [2; 32],
            },
        );
        roundtrip(0, Message::AuthOk { mac: [9; 32] });
        roundtrip(
            0,
            Message::Error {
                message: "nope".into(),
            },
        );
        roundtrip(
            0,
            Message::Ping {
                payload: vec![1, 2],
            },
        );
        roundtrip(0, Message::Pong { payload: vec![] });
        roundtrip(
            5,
            Message::Open(OpenProcess {
                request: SpawnRequest {
                    program: Program::Argv(vec!["ls".into(), "-l".into()]),
                    user: Some("alice".into()),
                    account: Some(Account {
                        name: "alice".into(),
                        uid: 200_001,
                        gid: 200_001,
                        home: "/home/alice".into(),
                    }),
                    env: vec![("A".into(), "b".into())],
                    cwd: Some("/tmp".into()),
                    pty: Some(PtyRequest {
                        term: "xterm".into(),
                        size: WindowSize {
                            cols: 80,
                            rows: 24,
                            pixel_width: 0,
                            pixel_height: 0,
                        },
                        modes: vec![(53, 0), (128, 38400)],
                    }),
                },
                stdout_window: 1000,
                stderr_window: 2000,
            }),
        );
        roundtrip(
            6,
            Message::Open(OpenProcess {
                request: SpawnRequest::new(Program::ShellCommand("echo hi".into())),
                stdout_window: 1,
                stderr_window: 2,
            }),
        );
        roundtrip(
            6,
            Message::Open(OpenProcess {
                request: SpawnRequest::new(Program::LoginShell),
                stdout_window: 1,
                stderr_window: 2,
            }),
        );
        roundtrip(
            5,
            Message::OpenOk {
                pid: 42,
                stdin_window: 65536,
            },
        );
        roundtrip(
            5,
            Message::OpenFailed {
                code: open_error::NO_SUCH_USER,
                message: "x".into(),
            },
        );
        roundtrip(
            5,
            Message::Data {
                stream: Stream::Stderr,
                data: b"abc".to_vec(),
            },
        );
        roundtrip(
            5,
            Message::Eof {
                stream: Stream::Stdin,
            },
        );
        roundtrip(
            5,
            Message::Window {
                stream: Stream::Stdout,
                increment: 77,
            },
        );
        roundtrip(
            5,
            Message::Resize(WindowSize {
                cols: 1,
                rows: 2,
                pixel_width: 3,
                pixel_height: 4,
            }),
        );
        roundtrip(5, Message::Signal { name: "INT".into() });
        roundtrip(5, Message::Exit(ExitStatus::Code(-1)));
        roundtrip(
            5,
            Message::Exit(ExitStatus::Signal {
                number: 9,
                name: "KILL".into(),
                core_dumped: true,
            }),
        );
        roundtrip(5, Message::Close);
    }

    #[test]
    fn oversized_and_malformed_frames_are_errors() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let big = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
            let mut r = FrameReader::new(&big[..]);
            assert!(matches!(
                r.next().await,
                Err(ProtocolError::FrameTooLarge(_))
            ));

            // A list count that claims more items than the body holds.
            let mut buf = Vec::new();
            Message::Open(OpenProcess {
                request: SpawnRequest::new(Program::Argv(vec!["a".into()])),
                stdout_window: 1,
                stderr_window: 1,
            })
            .encode(1, &mut buf);
            buf[HEADER_LEN + 2..HEADER_LEN + 6].copy_from_slice(&u32::MAX.to_be_bytes());
            let mut r = FrameReader::new(&buf[..]);
            assert!(matches!(r.next().await, Err(ProtocolError::Malformed(_))));

            let mut buf = Vec::new();
            Message::OpenUnknown { channel_type: 9 }.encode(3, &mut buf);
            buf.extend_from_slice(&[1, 2, 3]);
            buf[..4].copy_from_slice(&(1u32 + 4 + 1 + 3).to_be_bytes());
            let mut r = FrameReader::new(&buf[..]);
            assert_eq!(
                r.next().await.unwrap(),
                Some((3, Message::OpenUnknown { channel_type: 9 }))
            );

            let mut buf = Vec::new();
            Message::Close.encode(1, &mut buf);
            buf[4] = 0x7f;
            let mut r = FrameReader::new(&buf[..]);
            assert!(matches!(
                r.next().await,
                Err(ProtocolError::UnknownKind(0x7f))
            ));

            let mut buf = Vec::new();
            Message::Close.encode(1, &mut buf);
            buf.pop();
            let mut r = FrameReader::new(&buf[..]);
            assert!(matches!(r.next().await, Err(ProtocolError::Truncated)));
        });
    }

    #[test]
    fn data_frames_are_bounded_by_the_version_3_chunk() {
        for (len, ok) in [(MAX_DATA_CHUNK_V3, true), (MAX_DATA_CHUNK_V3 + 1, false)] {
            let mut buf = Vec::new();
            Message::Data {
                stream: Stream::Stdout,
                data: vec![7; len],
            }
            .encode(1, &mut buf);
            let decoded = Message::decode(buf[4], &buf[HEADER_LEN..]);
            assert_eq!(decoded.is_ok(), ok, "{len} bytes");
        }
    }
}
