//! Session recording, for environments that opt in (`record_sessions`). Under
//! `<--recordings-dir>/<user>/`, per session:
//! - `SESSION.log`: one JSON line per shell, command, file transfer and forwarding;
//! - `SESSION-CHANNEL.cast`: each terminal channel as asciicast v2 (what `asciinema play`
//!   plays): the header, then `[seconds, "o", text]` for output and `[seconds, "r", "COLSxROWS"]`
//!   for window changes.
//!
//! The directory is shared by every proxy and the control plane, which serves the files to
//! operators (`Admin/ListRecordings`, `GetRecording`). Users are told at login.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use crate::exec::TerminalSize;

/// What the user reads when a session is recorded.
pub const NOTICE: &str = "envgate: this session is recorded";

/// Where recordings go (`--recordings-dir`).
#[derive(Debug, Clone)]
pub struct Recordings {
    dir: PathBuf,
}

impl Recordings {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn user_dir(&self, user: &str) -> io::Result<PathBuf> {
        let dir = self.dir.join(user);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(&dir)?;
        Ok(dir)
    }

    /// Appends one event to the session's log.
    pub fn log(&self, user: &str, session: &str, event: serde_json::Value) -> io::Result<()> {
        let path = self.user_dir(user)?.join(format!("{session}.log"));
        let mut line = serde_json::to_vec(&serde_json::json!({
            "time": envgate_proto::time::now_rfc3339(),
            "user": user,
            "session": session,
            "event": event,
        }))
        .expect("JSON values serialize");
        line.push(b'\n');
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?
            .write_all(&line)
    }

    /// Starts the asciicast of one terminal channel.
    pub fn cast(
        &self,
        user: &str,
        session: &str,
        channel: u32,
        size: TerminalSize,
        term: &str,
    ) -> io::Result<Cast> {
        let path = self
            .user_dir(user)?
            .join(format!("{session}-{channel}.cast"));
        Cast::create(&path, size, term)
    }
}

/// One terminal channel's asciicast v2 file.
pub struct Cast {
    file: Mutex<CastFile>,
    started: Instant,
}

struct CastFile {
    out: BufWriter<File>,
    /// The end of a UTF-8 character split between two reads, kept for the next one.
    partial: Vec<u8>,
    failed: bool,
}

impl Cast {
    fn create(path: &Path, size: TerminalSize, term: &str) -> io::Result<Cast> {
        let mut out = BufWriter::new(File::create(path)?);
        let header = serde_json::json!({
            "version": 2,
            "width": size.cols.max(1),
            "height": size.rows.max(1),
            "timestamp": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            "env": { "TERM": term },
        });
        writeln!(out, "{header}")?;
        out.flush()?;
        Ok(Cast {
            file: Mutex::new(CastFile {
                out,
                partial: Vec::new(),
                failed: false,
            }),
            started: Instant::now(),
        })
    }

    fn event(&self, kind: &str, data: &str) {
        let mut file = self.file.lock().expect("cast lock");
        if file.failed {
            return;
        }
        let line = serde_json::json!([self.started.elapsed().as_secs_f64(), kind, data]);
        // A full disk stops the recording, not the session; the proxy's log says so once.
        if let Err(e) = writeln!(file.out, "{line}").and_then(|()| file.out.flush()) {
            tracing::warn!(error = %e, "writing a session recording failed; it stops here");
            file.failed = true;
        }
    }

    /// Terminal output, in the order the user saw it.
    pub fn output(&self, data: &[u8]) {
        let text = {
            let mut file = self.file.lock().expect("cast lock");
            let mut bytes = std::mem::take(&mut file.partial);
            bytes.extend_from_slice(data);
            let valid = match std::str::from_utf8(&bytes) {
                Ok(_) => bytes.len(),
                // An incomplete character at the end waits for the rest; anything else invalid
                // is written as U+FFFD.
                Err(e) if e.error_len().is_none() => e.valid_up_to(),
                Err(_) => bytes.len(),
            };
            file.partial = bytes.split_off(valid);
            String::from_utf8_lossy(&bytes).into_owned()
        };
        if !text.is_empty() {
            self.event("o", &text);
        }
    }

    pub fn resize(&self, size: TerminalSize) {
        self.event("r", &format!("{}x{}", size.cols, size.rows));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cast_is_asciicast_v2_with_characters_kept_whole() {
        let dir = tempfile::tempdir().unwrap();
        let recordings = Recordings::new(dir.path().to_owned());
        let cast = recordings
            .cast(
                "alice",
                "s1",
                3,
                TerminalSize { cols: 80, rows: 24 },
                "xterm",
            )
            .unwrap();
        let euro = "€".as_bytes();
        cast.output(b"hello ");
        cast.output(&euro[..1]);
        cast.output(&euro[1..]);
        cast.resize(TerminalSize {
            cols: 100,
            rows: 30,
        });
        drop(cast);
        let text = std::fs::read_to_string(dir.path().join("alice/s1-3.cast")).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["version"], 2);
        assert_eq!(
            (lines[0]["width"].clone(), lines[0]["height"].clone()),
            (80.into(), 24.into())
        );
        let events: Vec<(String, String)> = lines[1..]
            .iter()
            .map(|e| {
                (
                    e[1].as_str().unwrap().to_owned(),
                    e[2].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(
            events,
            [
                ("o".into(), "hello ".into()),
                ("o".into(), "€".into()),
                ("r".into(), "100x30".into())
            ]
        );

        recordings
            .log(
                "alice",
                "s1",
                serde_json::json!({"kind": "exec", "command": "ls"}),
            )
            .unwrap();
        let log = std::fs::read_to_string(dir.path().join("alice/s1.log")).unwrap();
        let record: serde_json::Value = serde_json::from_str(log.trim()).unwrap();
        assert_eq!(record["event"]["command"], "ls");
        assert_eq!(record["session"], "s1");
    }
}
