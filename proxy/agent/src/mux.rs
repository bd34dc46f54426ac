//! The frames `envgate-agent listen` and the proxy exchange over the listener's stdin and
//! stdout: `kind: u8 | connection: u32 BE | length: u32 BE | payload`. The listener sends
//! `Ready` (payload: the bound port, or the socket's path) once, then `Accept` (payload: the
//! peer's `ip:port`, empty for a Unix socket), `Data`, `Eof` and `Close` per connection; the
//! proxy sends `Data`, `Eof` and `Close`.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest payload of one frame.
pub const MAX_PAYLOAD: usize = 32 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Ready,
    Accept,
    Data,
    Eof,
    Close,
}

impl FrameKind {
    fn to_wire(self) -> u8 {
        match self {
            FrameKind::Ready => 0,
            FrameKind::Accept => 1,
            FrameKind::Data => 2,
            FrameKind::Eof => 3,
            FrameKind::Close => 4,
        }
    }

    fn from_wire(b: u8) -> Option<Self> {
        Some(match b {
            0 => FrameKind::Ready,
            1 => FrameKind::Accept,
            2 => FrameKind::Data,
            3 => FrameKind::Eof,
            4 => FrameKind::Close,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub conn: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(kind: FrameKind, conn: u32, payload: Vec<u8>) -> Self {
        Frame {
            kind,
            conn,
            payload,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + self.payload.len());
        out.push(self.kind.to_wire());
        out.extend_from_slice(&self.conn.to_be_bytes());
        out.extend_from_slice(&(self.payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.payload);
        out
    }

    pub async fn write(&self, out: &mut (impl AsyncWrite + Unpin)) -> io::Result<()> {
        out.write_all(&self.encode()).await?;
        out.flush().await
    }

    /// The next frame; `None` at a clean end between frames. Not cancel safe.
    pub async fn read(input: &mut (impl AsyncRead + Unpin)) -> io::Result<Option<Frame>> {
        let mut header = [0u8; 9];
        match input.read_exact(&mut header[..1]).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        input.read_exact(&mut header[1..]).await?;
        let (kind, conn, len) = Frame::parse_header(&header)?;
        let mut payload = vec![0; len];
        input.read_exact(&mut payload).await?;
        Ok(Some(Frame {
            kind,
            conn,
            payload,
        }))
    }

    fn parse_header(header: &[u8; 9]) -> io::Result<(FrameKind, u32, usize)> {
        let kind = FrameKind::from_wire(header[0])
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unknown frame kind"))?;
        let conn = u32::from_be_bytes(header[1..5].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(header[5..9].try_into().expect("4 bytes")) as usize;
        if len > MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "frame too large",
            ));
        }
        Ok((kind, conn, len))
    }
}

/// Frames out of a byte stream that arrives in arbitrary chunks (the proxy's view of the
/// listener's stdout).
#[derive(Default)]
pub struct FrameBuffer {
    buf: Vec<u8>,
}

impl FrameBuffer {
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next whole frame, if one is buffered; `Err` when the stream is not frames.
    pub fn next_frame(&mut self) -> io::Result<Option<Frame>> {
        let Some(header) = self.buf.get(..9) else {
            return Ok(None);
        };
        let header: &[u8; 9] = header.try_into().expect("9 bytes");
        let (kind, conn, len) = Frame::parse_header(header)?;
        if self.buf.len() < 9 + len {
            return Ok(None);
        }
        let payload = self.buf[9..9 + len].to_vec();
        self.buf.drain(..9 + len);
        Ok(Some(Frame::new(kind, conn, payload)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_roundtrip_whole_and_in_pieces() {
        let frames = [
            Frame::new(FrameKind::Ready, 0, b"/tmp/x/agent.sock".to_vec()),
            Frame::new(FrameKind::Accept, 7, b"127.0.0.1:5000".to_vec()),
            Frame::new(FrameKind::Data, 7, vec![9; MAX_PAYLOAD]),
            Frame::new(FrameKind::Eof, 7, vec![]),
            Frame::new(FrameKind::Close, 7, vec![]),
        ];
        let wire: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();
        let mut reader = &wire[..];
        for frame in &frames {
            assert_eq!(
                Frame::read(&mut reader).await.unwrap().as_ref(),
                Some(frame)
            );
        }
        assert_eq!(Frame::read(&mut reader).await.unwrap(), None);
        let mut buffer = FrameBuffer::default();
        let mut got = Vec::new();
        for chunk in wire.chunks(5) {
            buffer.push(chunk);
            while let Some(frame) = buffer.next_frame().unwrap() {
                got.push(frame);
            }
        }
        assert_eq!(got, frames);
    }

    #[test]
    fn nonsense_is_an_error() {
        let mut buffer = FrameBuffer::default();
        buffer.push(&[9, 0, 0, 0, 1, 0, 0, 0, 0]);
        assert!(buffer.next_frame().is_err());
        let mut buffer = FrameBuffer::default();
        buffer.push(&[2, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff]);
        assert!(buffer.next_frame().is_err());
    }
}
