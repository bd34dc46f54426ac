//! Sealed records: what travels on an agent connection over TCP after the handshake.
//!
//! Over TCP the bytes cross a network the proxy and the agent do not own (the Pod network on
//! Kubernetes), so once both sides proved they hold the container secret they derive two
//! keys from it and from both handshake nonces (HKDF-SHA256, one label per direction), and
//! every later byte travels in records sealed with ChaCha20-Poly1305:
//!
//! ```text
//! len: u32 BE | ciphertext (len - 16 bytes) | tag (16 bytes)
//! ```
//!
//! The nonce is the record's number in its direction (a counter from 0, never sent), and
//! `len` is the associated data. So a record that was altered, dropped, replayed, reordered,
//! sent back in the other direction (other key) or written in plaintext fails to open, and
//! the connection ends with [`SealError::Forged`]. A record with no plaintext is the sealed
//! close: a connection that ends without it was cut, which is reported too.
//!
//! Records carry the frame byte stream ([`crate::protocol`]) unchanged: frames keep their
//! own length prefix and limit, and a record holds at most [`MAX_RECORD_PLAINTEXT`] bytes,
//! checked before anything of it is buffered, so the tag adds no way to make a receiver
//! buffer more than before.
//!
//! Unix-socket connections are not sealed: only root on the host and in the container can
//! reach the socket, and both can read the secret anyway (docs/agent-security.md).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use ring::aead::{self, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::protocol::NONCE_LEN;

/// Poly1305 tag length.
pub const TAG_LEN: usize = 16;
/// Largest plaintext in one record; a record announcing more is refused before it is read.
pub const MAX_RECORD_PLAINTEXT: usize = 64 * 1024;
/// Largest `len` of a record on the wire.
pub const MAX_RECORD_LEN: usize = MAX_RECORD_PLAINTEXT + TAG_LEN;

const SALT: &[u8] = b"envgate-agent sealed records v1";
const TO_AGENT_LABEL: &[u8] = b"envgate-agent v1 proxy to agent";
const TO_PROXY_LABEL: &[u8] = b"envgate-agent v1 agent to proxy";

/// Why a sealed connection ended. Each is one line for the log and the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error(
        "a sealed frame failed authentication (altered, dropped, replayed, reordered, reflected or plaintext); the connection is closed"
    )]
    Forged,
    #[error("sealed record of {0} bytes exceeds the size limit")]
    TooLarge(usize),
    #[error("the connection ended in the middle of a sealed record")]
    Truncated,
    #[error("the connection ended without its sealed close (cut on the way)")]
    Unclosed,
    #[error("bytes after the sealed close")]
    AfterClose,
    #[error("the record counter is exhausted; reconnect")]
    Exhausted,
}

impl From<SealError> for io::Error {
    fn from(e: SealError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

impl SealError {
    /// The seal error inside an i/o error from a [`SealedReader`], if that is what it is.
    pub fn from_io(e: &io::Error) -> Option<SealError> {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<SealError>())
            .cloned()
    }
}

/// Which end of the connection we are; it picks the key for each direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Proxy,
    Agent,
}

/// The two directional keys of one connection, from the secret and the handshake.
pub struct Keys {
    pub sealer: Sealer,
    pub opener: Opener,
}

impl Keys {
    /// Both sides call this with the same inputs after the mutual proof; the nonces are
    /// fresh per connection, so no two connections (and no two directions) share a key.
    pub fn derive(
        secret: &[u8],
        version: u16,
        agent_nonce: &[u8; NONCE_LEN],
        client_nonce: &[u8; NONCE_LEN],
        side: Side,
    ) -> Keys {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(secret);
        let key = |label: &[u8]| {
            let version = version.to_be_bytes();
            let info = [label, &version[..], &agent_nonce[..], &client_nonce[..]];
            let okm = prk
                .expand(&info, &CHACHA20_POLY1305)
                .expect("a 32-byte key is within HKDF-SHA256's output limit");
            LessSafeKey::new(UnboundKey::from(okm))
        };
        let (send, receive) = match side {
            Side::Proxy => (TO_AGENT_LABEL, TO_PROXY_LABEL),
            Side::Agent => (TO_PROXY_LABEL, TO_AGENT_LABEL),
        };
        Keys {
            sealer: Sealer {
                key: key(send),
                counter: 0,
            },
            opener: Opener {
                key: key(receive),
                counter: 0,
            },
        }
    }
}

fn nonce(counter: &mut u64) -> Result<Nonce, SealError> {
    let n = *counter;
    *counter = n.checked_add(1).ok_or(SealError::Exhausted)?;
    let mut bytes = [0u8; aead::NONCE_LEN];
    bytes[4..].copy_from_slice(&n.to_be_bytes());
    Ok(Nonce::assume_unique_for_key(bytes))
}

/// Seals the records we send.
pub struct Sealer {
    key: LessSafeKey,
    counter: u64,
}

impl Sealer {
    /// Appends `plaintext` as records (split at [`MAX_RECORD_PLAINTEXT`]) to `out`.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), SealError> {
        for chunk in plaintext.chunks(MAX_RECORD_PLAINTEXT) {
            self.seal_record(chunk, out)?;
        }
        Ok(())
    }

    /// Appends the sealed close (a record with no plaintext).
    pub fn seal_close(&mut self, out: &mut Vec<u8>) -> Result<(), SealError> {
        self.seal_record(&[], out)
    }

    fn seal_record(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), SealError> {
        let header = ((plaintext.len() + TAG_LEN) as u32).to_be_bytes();
        out.extend_from_slice(&header);
        let start = out.len();
        out.extend_from_slice(plaintext);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                nonce(&mut self.counter)?,
                Aad::from(header),
                &mut out[start..],
            )
            .map_err(|_| SealError::Exhausted)?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }
}

/// Opens the records we receive, in order.
pub struct Opener {
    key: LessSafeKey,
    counter: u64,
}

impl Opener {
    /// Opens one record (`header` is its `len`, `record` the ciphertext and tag) in place;
    /// returns the plaintext length.
    fn open(&mut self, header: [u8; 4], record: &mut [u8]) -> Result<usize, SealError> {
        let n = nonce(&mut self.counter)?;
        self.key
            .open_in_place(n, Aad::from(header), record)
            .map(|plain| plain.len())
            .map_err(|_| SealError::Forged)
    }
}

/// The frame byte stream out of sealed records. Cancel safe like any `AsyncRead` that keeps
/// its state in itself.
pub struct SealedReader<R> {
    inner: R,
    opener: Opener,
    /// Received bytes are `buf[start..end]`; `buf[..]` beyond `end` is spare, zeroed once.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Opened plaintext not yet handed out, inside `buf`.
    plain: std::ops::Range<usize>,
    closed: bool,
}

impl<R: AsyncRead + Unpin> SealedReader<R> {
    /// `received` are bytes already read from `inner` past the handshake.
    pub fn new(inner: R, opener: Opener, received: Vec<u8>) -> Self {
        let end = received.len();
        SealedReader {
            inner,
            opener,
            buf: received,
            start: 0,
            end,
            plain: 0..0,
            closed: false,
        }
    }

    /// Opens the next complete record in the buffer, if there is one.
    fn open_buffered(&mut self) -> Result<bool, SealError> {
        let avail = &self.buf[self.start..self.end];
        if avail.len() < 4 {
            return Ok(false);
        }
        let header: [u8; 4] = avail[..4].try_into().expect("4 bytes");
        let len = u32::from_be_bytes(header) as usize;
        if len > MAX_RECORD_LEN {
            return Err(SealError::TooLarge(len));
        }
        if len < TAG_LEN {
            // Cannot even hold a tag: plaintext, or garbage.
            return Err(SealError::Forged);
        }
        if avail.len() < 4 + len {
            return Ok(false);
        }
        let body = self.start + 4;
        let plain_len = self.opener.open(header, &mut self.buf[body..body + len])?;
        self.start = body + len;
        if plain_len == 0 {
            self.closed = true;
        } else {
            self.plain = body..body + plain_len;
        }
        Ok(true)
    }

    /// Reads more ciphertext; `Ok(false)` at end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        // Room for the rest of the current record (its length was checked against the limit
        // by `open_buffered`) or 16 KiB more, whichever is larger: bounded either way.
        let record = match self.buf.get(..4) {
            Some(h) if self.end >= 4 => {
                4 + u32::from_be_bytes(h.try_into().expect("4 bytes")) as usize
            }
            _ => 0,
        };
        let want = record.max(self.end + 16 * 1024);
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        let mut rb = ReadBuf::new(&mut self.buf[self.end..]);
        ready!(Pin::new(&mut self.inner).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        self.end += n;
        Poll::Ready(Ok(n > 0))
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for SealedReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.plain.is_empty() {
                let n = out.remaining().min(this.plain.len());
                out.put_slice(&this.buf[this.plain.start..this.plain.start + n]);
                this.plain.start += n;
                return Poll::Ready(Ok(()));
            }
            if this.closed {
                if this.start < this.end {
                    return Poll::Ready(Err(SealError::AfterClose.into()));
                }
                return Poll::Ready(Ok(()));
            }
            if this.open_buffered()? {
                continue;
            }
            if !ready!(this.poll_fill(cx))? {
                let error = if this.start == this.end {
                    SealError::Unclosed
                } else {
                    SealError::Truncated
                };
                return Poll::Ready(Err(error.into()));
            }
        }
    }
}

/// The read half of a connection: as it is (Unix socket) or sealed (TCP).
pub enum Inbound<R> {
    Plain(R),
    Sealed(Box<SealedReader<R>>),
}

impl<R: AsyncRead + Unpin> Inbound<R> {
    /// From here on the stream is sealed; `received` are the bytes already read past the
    /// handshake.
    pub fn seal(self, opener: Opener, received: Vec<u8>) -> Self {
        match self {
            Inbound::Plain(r) => Inbound::Sealed(Box::new(SealedReader::new(r, opener, received))),
            sealed @ Inbound::Sealed(_) => sealed,
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Inbound<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut *self {
            Inbound::Plain(r) => Pin::new(r).poll_read(cx, out),
            Inbound::Sealed(r) => Pin::new(r.as_mut()).poll_read(cx, out),
        }
    }
}

/// The write half of a connection: as it is (Unix socket) or sealed (TCP).
pub enum Outbound<W> {
    Plain(W),
    Sealed(Box<SealedWriter<W>>),
}

/// The sealed write half: the socket, our key and counter, and the buffer records are built in.
pub struct SealedWriter<W> {
    inner: W,
    sealer: Sealer,
    out: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> Outbound<W> {
    pub fn sealed(inner: W, sealer: Sealer) -> Self {
        Outbound::Sealed(Box::new(SealedWriter {
            inner,
            sealer,
            out: Vec::with_capacity(64 * 1024),
        }))
    }

    /// Writes `buf` (whole frames) out, sealed if the connection is.
    pub async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Outbound::Plain(w) => w.write_all(buf).await,
            Outbound::Sealed(w) => {
                let SealedWriter { inner, sealer, out } = &mut **w;
                out.clear();
                sealer.seal(buf, out)?;
                inner.write_all(out).await
            }
        }
    }

    /// Ends our direction: the sealed close first if sealed, then the socket's write side.
    pub async fn close(&mut self) {
        match self {
            Outbound::Plain(w) => {
                let _ = w.shutdown().await;
            }
            Outbound::Sealed(w) => {
                let SealedWriter { inner, sealer, out } = &mut **w;
                out.clear();
                if sealer.seal_close(out).is_ok() {
                    let _ = inner.write_all(out).await;
                }
                let _ = inner.shutdown().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn pair() -> (Keys, Keys) {
        let (a, c) = ([1u8; NONCE_LEN], [2u8; NONCE_LEN]);
        (
            Keys::derive(SECRET, 3, &a, &c, Side::Proxy),
            Keys::derive(SECRET, 3, &a, &c, Side::Agent),
        )
    }

    fn read_all(wire: &[u8], opener: Opener) -> Result<Vec<u8>, SealError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut r = SealedReader::new(wire, opener, Vec::new());
            let mut all = Vec::new();
            r.read_to_end(&mut all)
                .await
                .map_err(|e| SealError::from_io(&e).expect("a seal error"))?;
            Ok(all)
        })
    }

    fn records(sealer: &mut Sealer, parts: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut out: Vec<Vec<u8>> = parts
            .iter()
            .map(|p| {
                let mut v = Vec::new();
                sealer.seal(p, &mut v).unwrap();
                v
            })
            .collect();
        let mut close = Vec::new();
        sealer.seal_close(&mut close).unwrap();
        out.push(close);
        out
    }

    #[test]
    fn records_round_trip_and_split_at_the_limit() {
        let (mut proxy, agent) = pair();
        let big: Vec<u8> = (0..MAX_RECORD_PLAINTEXT * 2 + 5)
            .map(|i| (i % 251) as u8)
            .collect();
        let wire = records(&mut proxy.sealer, &[b"hello", &big]).concat();
        // hello, two full records, the 5-byte rest, the close.
        assert_eq!(
            wire.len(),
            5 * (4 + TAG_LEN) + 5 + big.len(),
            "record count"
        );
        assert_eq!(
            read_all(&wire, agent.opener).unwrap(),
            [&b"hello"[..], &big].concat()
        );
    }

    #[test]
    fn every_kind_of_tampering_fails() {
        let parts: [&[u8]; 3] = [b"one", b"two", b"three"];
        type Tamper = Box<dyn Fn(Vec<Vec<u8>>) -> Vec<u8>>;
        let cases: Vec<(&str, Tamper, SealError)> = vec![
            (
                "flipped byte",
                Box::new(|mut r| {
                    r[1][6] ^= 1;
                    r.concat()
                }),
                SealError::Forged,
            ),
            (
                "flipped length",
                Box::new(|mut r| {
                    r[1][3] ^= 1;
                    r.concat()
                }),
                SealError::Forged,
            ),
            (
                "dropped",
                Box::new(|mut r| {
                    r.remove(1);
                    r.concat()
                }),
                SealError::Forged,
            ),
            (
                "replayed",
                Box::new(|mut r| {
                    let again = r[0].clone();
                    r.insert(1, again);
                    r.concat()
                }),
                SealError::Forged,
            ),
            (
                "reordered",
                Box::new(|mut r| {
                    r.swap(0, 1);
                    r.concat()
                }),
                SealError::Forged,
            ),
            (
                "truncated",
                Box::new(|r| {
                    let mut all = r[..2].concat();
                    all.pop();
                    all
                }),
                SealError::Truncated,
            ),
            (
                "cut between records",
                Box::new(|r| r[..2].concat()),
                SealError::Unclosed,
            ),
            (
                "bytes after the close",
                Box::new(|r| {
                    let mut all = r.concat();
                    all.extend_from_slice(&r[0]);
                    all
                }),
                SealError::AfterClose,
            ),
            (
                "plaintext frame",
                Box::new(|_| {
                    let mut buf = Vec::new();
                    crate::protocol::Message::Close.encode(1, &mut buf);
                    buf
                }),
                SealError::Forged,
            ),
            (
                "oversized record",
                Box::new(|_| ((MAX_RECORD_LEN + 1) as u32).to_be_bytes().to_vec()),
                SealError::TooLarge(MAX_RECORD_LEN + 1),
            ),
        ];
        for (name, tamper, expected) in cases {
            let (mut proxy, agent) = pair();
            let wire = tamper(records(&mut proxy.sealer, &parts));
            assert_eq!(read_all(&wire, agent.opener), Err(expected), "{name}");
        }
    }

    #[test]
    fn garbage_never_panics_and_buffering_stays_bounded() {
        // Deterministic pseudo-random streams: whatever arrives, the reader ends with an
        // error (or, for the real stream, the data) and holds at most one record plus the
        // read-ahead.
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for round in 0..200 {
            let len = (next() % 200_000) as usize;
            let mut wire: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 2 == 0 && wire.len() >= 4 {
                // A plausible length in front, so the reader buffers before it fails.
                let n = (next() as usize % MAX_RECORD_LEN) as u32;
                wire[..4].copy_from_slice(&n.to_be_bytes());
            }
            let (_, agent) = pair();
            let result = rt.block_on(async {
                let mut r = SealedReader::new(&wire[..], agent.opener, Vec::new());
                let mut out = Vec::new();
                let result = r.read_to_end(&mut out).await;
                assert!(
                    r.buf.len() <= 4 + MAX_RECORD_LEN + 16 * 1024,
                    "{}",
                    r.buf.len()
                );
                result
            });
            let error = result.expect_err("random bytes are never a sealed stream");
            assert!(SealError::from_io(&error).is_some(), "{error}");
        }
        let (mut proxy, agent) = pair();
        let big = vec![7u8; 10 * MAX_RECORD_PLAINTEXT];
        let wire = records(&mut proxy.sealer, &[&big]).concat();
        rt.block_on(async {
            let mut r = SealedReader::new(&wire[..], agent.opener, Vec::new());
            let mut out = Vec::new();
            r.read_to_end(&mut out).await.unwrap();
            assert_eq!(out, big);
            assert!(
                r.buf.len() <= 4 + MAX_RECORD_LEN + 16 * 1024,
                "{}",
                r.buf.len()
            );
        });
    }

    #[test]
    fn a_record_sent_back_or_under_another_connection_fails() {
        // Reflected: the proxy's own records fed back to the proxy.
        let (mut proxy, _) = pair();
        let wire = records(&mut proxy.sealer, &[b"ping"]).concat();
        let (_, other_side) = pair();
        assert_eq!(read_all(&wire, pair().0.opener), Err(SealError::Forged));
        assert_eq!(read_all(&wire, other_side.opener).unwrap(), b"ping");
        // Another connection (other nonce) or another secret: other keys.
        let other = Keys::derive(SECRET, 3, &[1; NONCE_LEN], &[3; NONCE_LEN], Side::Agent);
        assert_eq!(read_all(&wire, other.opener), Err(SealError::Forged));
        let other = Keys::derive(
            b"another-secret-0123456789abcdef",
            3,
            &[1; NONCE_LEN],
            &[2; NONCE_LEN],
            Side::Agent,
        );
        assert_eq!(read_all(&wire, other.opener), Err(SealError::Forged));
    }
}
