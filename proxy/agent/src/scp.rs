//! `envgate-agent scp -t|-f …`: the remote end of legacy `scp -O` (the rcp protocol), for
//! images without an `scp` of their own. When the image has one on `PATH`, it is run instead,
//! unchanged. Like every session process this runs as the session's user, so it reads and
//! writes exactly what they may.
//!
//! The protocol, as OpenSSH's `scp.c` speaks it: the sink answers each line with a status
//! byte (0 ok, 1 warning + message, 2 fatal + message); the source sends `C<mode> <size>
//! <name>` then the bytes and a 0, `D<mode> 0 <name>` … `E` around a directory (`-r`), and
//! `T<mtime> 0 <atime> 0` before either when times are kept (`-p`).

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Longest protocol line accepted (a name is at most 255 bytes on Linux).
const MAX_LINE: usize = 4096;
/// Deepest directory nesting a sink accepts, so a hostile source cannot recurse forever.
const MAX_DEPTH: usize = 256;

#[derive(Debug, Default, PartialEq, Eq)]
struct Options {
    sink: bool,
    source: bool,
    recursive: bool,
    preserve: bool,
    /// `-d`: the target must be a directory.
    target_is_dir: bool,
    paths: Vec<String>,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options::default();
    let mut operands = false;
    for arg in args {
        if operands || !arg.starts_with('-') || arg == "-" {
            o.paths.push(arg.clone());
            continue;
        }
        if arg == "--" {
            operands = true;
            continue;
        }
        for flag in arg[1..].chars() {
            match flag {
                't' => o.sink = true,
                'f' => o.source = true,
                'r' => o.recursive = true,
                'p' => o.preserve = true,
                'd' => o.target_is_dir = true,
                // Verbosity and the client's own options that reach the remote side.
                'v' | 'q' | 'E' => {}
                other => return Err(format!("unknown option -{other}")),
            }
        }
    }
    if o.sink == o.source {
        return Err("exactly one of -t and -f is needed".into());
    }
    if o.paths.is_empty() || (o.sink && o.paths.len() != 1) {
        return Err("one target (-t) or at least one source (-f) is needed".into());
    }
    Ok(o)
}

/// `scp` on `PATH` other than this binary, if the image has one.
fn image_scp() -> Option<PathBuf> {
    let me = std::env::current_exe()
        .ok()
        .and_then(|p| fs::canonicalize(p).ok());
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("scp"))
        .find(|candidate| candidate.is_file() && fs::canonicalize(candidate).ok() != me)
}

/// Runs as `scp` with `args` (everything after `scp`); returns the exit status.
pub fn main(args: &[String]) -> i32 {
    if let Some(scp) = image_scp() {
        use std::os::unix::process::CommandExt;
        let e = std::process::Command::new(&scp).args(args).exec();
        eprintln!("scp: cannot run {}: {e}", scp.display());
        return 1;
    }
    let options = match parse(args) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("scp: {e} (this environment serves only scp's remote side)");
            return 1;
        }
    };
    let stdin = io::stdin().lock();
    let stdout = io::stdout().lock();
    let result = if options.sink {
        Sink::new(BufReader::new(stdin), stdout, &options).run(&options.paths[0])
    } else {
        Source::new(BufReader::new(stdin), stdout, &options).run(&options.paths)
    };
    match result {
        Ok(true) => 0,
        Ok(false) => 1,
        // The connection broke or the peer spoke nonsense: nothing more can be said to it.
        Err(e) => {
            eprintln!("scp: {e}");
            1
        }
    }
}

fn protocol(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// "Permission denied (os error 13)" → "Permission denied", as scp prints it.
fn reason(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

/// Reads one `\n`-terminated line, bounded.
fn read_line(input: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    let n = input
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(protocol("protocol line too long or cut short"));
    }
    line.pop();
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| protocol("protocol line is not UTF-8"))
}

struct Sink<R, W> {
    input: R,
    output: W,
    preserve: bool,
    recursive: bool,
    target_is_dir: bool,
    ok: bool,
}

/// A name the source sent: one path component, never `..` or `/`.
fn safe_name(name: &str) -> Result<&str, String> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        Err(format!("unexpected filename: {name}"))
    } else {
        Ok(name)
    }
}

/// `C0644 1234 name` or `D0755 0 name` → (mode, size, name).
fn parse_entry(line: &str) -> Result<(u32, u64, &str), String> {
    let mut parts = line[1..].splitn(3, ' ');
    let (Some(mode), Some(size), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("bad protocol line: {line}"));
    };
    let mode = u32::from_str_radix(mode, 8).map_err(|_| format!("bad file mode in: {line}"))?;
    let size = size.parse().map_err(|_| format!("bad size in: {line}"))?;
    Ok((mode & 0o7777, size, safe_name(name)?))
}

impl<R: BufRead, W: Write> Sink<R, W> {
    fn new(input: R, output: W, o: &Options) -> Self {
        Sink {
            input,
            output,
            preserve: o.preserve,
            recursive: o.recursive,
            target_is_dir: o.target_is_dir,
            ok: true,
        }
    }

    fn answer(&mut self, status: Result<(), String>) -> io::Result<()> {
        match status {
            Ok(()) => self.output.write_all(&[0])?,
            Err(message) => {
                self.ok = false;
                writeln!(self.output, "\x01scp: {message}")?;
            }
        }
        self.output.flush()
    }

    /// Returns whether everything was written.
    fn run(mut self, target: &str) -> io::Result<bool> {
        let target = Path::new(target);
        if self.target_is_dir && !target.is_dir() {
            writeln!(
                self.output,
                "\x02scp: {}: Not a directory",
                target.display()
            )?;
            self.output.flush()?;
            return Ok(false);
        }
        self.answer(Ok(()))?;
        self.receive(target, 0)?;
        Ok(self.ok)
    }

    fn receive(&mut self, target: &Path, depth: usize) -> io::Result<()> {
        let mut times: Option<(u64, u64)> = None;
        while let Some(line) = read_line(&mut self.input)? {
            let kind = line.bytes().next().unwrap_or(0);
            match kind {
                b'E' if depth > 0 => return self.answer(Ok(())),
                b'T' => {
                    let fields: Vec<&str> = line[1..].split(' ').collect();
                    times = match fields.as_slice() {
                        [m, _, a, _] => m.parse().ok().zip(a.parse().ok()),
                        _ => None,
                    };
                    let status = times
                        .map(|_| ())
                        .ok_or_else(|| format!("bad times: {line}"));
                    self.answer(status)?;
                }
                b'C' => {
                    let (mode, size, name) = match parse_entry(&line) {
                        Ok(entry) => entry,
                        Err(message) => return Err(protocol(message)),
                    };
                    let path = if target.is_dir() {
                        target.join(name)
                    } else {
                        target.to_path_buf()
                    };
                    self.file(&path, mode, size, times.take())?;
                }
                b'D' if self.recursive && depth < MAX_DEPTH => {
                    let (mode, _, name) = parse_entry(&line).map_err(protocol)?;
                    let path = if target.is_dir() {
                        target.join(name)
                    } else {
                        target.to_path_buf()
                    };
                    let made = match fs::DirBuilder::new().mode(mode | 0o700).create(&path) {
                        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                            Err(format!("{}: {}", path.display(), reason(&e)))
                        }
                        _ => Ok(()),
                    };
                    let failed = made.is_err();
                    self.answer(made)?;
                    if failed {
                        return Err(protocol(format!("cannot make {}", path.display())));
                    }
                    self.receive(&path, depth + 1)?;
                    if self.preserve {
                        let _ = fs::set_permissions(&path, fs::Permissions::from_mode(mode));
                    }
                    if let Some((mtime, atime)) = times.take() {
                        set_times(&path, mtime, atime);
                    }
                }
                1 => {
                    // A warning from the source ("scp: x: Permission denied"): it goes on.
                    eprintln!("{}", &line[1..]);
                    self.ok = false;
                }
                2 => {
                    eprintln!("{}", &line[1..]);
                    return Ok(());
                }
                _ => return Err(protocol(format!("unexpected protocol line: {line:?}"))),
            }
        }
        Ok(())
    }

    /// Receives `size` bytes into `path`. The bytes are read even when the file cannot be
    /// written, so the stream stays in step and the next file still arrives.
    fn file(
        &mut self,
        path: &Path,
        mode: u32,
        size: u64,
        times: Option<(u64, u64)>,
    ) -> io::Result<()> {
        let mut file = File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)
            .map_err(|e| format!("{}: {}", path.display(), reason(&e)));
        self.output.write_all(&[0])?;
        self.output.flush()?;
        let mut left = size;
        let mut buf = vec![0; 64 * 1024];
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = self.input.read(&mut buf[..want])?;
            if n == 0 {
                return Err(protocol("connection closed in the middle of a file"));
            }
            if let Ok(f) = &mut file
                && let Err(e) = f.write_all(&buf[..n])
            {
                file = Err(format!("{}: {}", path.display(), reason(&e)));
            }
            left -= n as u64;
        }
        let mut end = [0];
        self.input.read_exact(&mut end)?;
        let status = file.map(|f| {
            if self.preserve {
                let _ = f.set_permissions(fs::Permissions::from_mode(mode));
            }
            drop(f);
            if let Some((mtime, atime)) = times {
                set_times(path, mtime, atime);
            }
        });
        self.answer(status)
    }
}

fn set_times(path: &Path, mtime: u64, atime: u64) {
    let at = |secs| UNIX_EPOCH + Duration::from_secs(secs);
    if let Ok(f) = File::options()
        .write(true)
        .open(path)
        .or_else(|_| File::open(path))
    {
        let _ = f.set_times(
            fs::FileTimes::new()
                .set_modified(at(mtime))
                .set_accessed(at(atime)),
        );
    }
}

struct Source<R, W> {
    input: R,
    output: W,
    preserve: bool,
    recursive: bool,
    ok: bool,
}

impl<R: BufRead, W: Write> Source<R, W> {
    fn new(input: R, output: W, o: &Options) -> Self {
        Source {
            input,
            output,
            preserve: o.preserve,
            recursive: o.recursive,
            ok: true,
        }
    }

    /// The sink's answer to what was just sent: `Ok(true)` to go on.
    fn acknowledged(&mut self) -> io::Result<bool> {
        let mut status = [0];
        self.input.read_exact(&mut status)?;
        match status[0] {
            0 => Ok(true),
            1 | 2 => {
                let message = read_line(&mut self.input)?.unwrap_or_default();
                eprintln!("{message}");
                self.ok = false;
                if status[0] == 2 {
                    return Err(protocol(message));
                }
                Ok(false)
            }
            other => Err(protocol(format!("unexpected answer {other:#04x}"))),
        }
    }

    fn warn(&mut self, message: String) -> io::Result<()> {
        self.ok = false;
        writeln!(self.output, "\x01scp: {message}")?;
        self.output.flush()
    }

    fn run(mut self, paths: &[String]) -> io::Result<bool> {
        // The sink starts by saying it is ready.
        if !self.acknowledged()? {
            return Ok(false);
        }
        for path in paths {
            self.send(Path::new(path), 0)?;
        }
        Ok(self.ok)
    }

    fn send(&mut self, path: &Path, depth: usize) -> io::Result<()> {
        let meta = match fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) => return self.warn(format!("{}: {}", path.display(), reason(&e))),
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".to_owned());
        if self.preserve {
            let secs = |t: io::Result<SystemTime>| {
                t.ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs())
            };
            writeln!(
                self.output,
                "T{} 0 {} 0",
                secs(meta.modified()),
                secs(meta.accessed())
            )?;
            self.output.flush()?;
            if !self.acknowledged()? {
                return Ok(());
            }
        }
        let mode = meta.permissions().mode() & 0o7777;
        if meta.is_dir() {
            if !self.recursive || depth >= MAX_DEPTH {
                return self.warn(format!("{}: not a regular file", path.display()));
            }
            let entries = match fs::read_dir(path) {
                Ok(entries) => entries,
                Err(e) => return self.warn(format!("{}: {}", path.display(), reason(&e))),
            };
            writeln!(self.output, "D{mode:04o} 0 {name}")?;
            self.output.flush()?;
            if !self.acknowledged()? {
                return Ok(());
            }
            for entry in entries.flatten() {
                self.send(&entry.path(), depth + 1)?;
            }
            self.output.write_all(b"E\n")?;
            self.output.flush()?;
            self.acknowledged()?;
            return Ok(());
        }
        if !meta.is_file() {
            return self.warn(format!("{}: not a regular file", path.display()));
        }
        let mut file = match File::open(path) {
            Ok(file) => file,
            Err(e) => return self.warn(format!("{}: {}", path.display(), reason(&e))),
        };
        writeln!(self.output, "C{mode:04o} {} {name}", meta.len())?;
        self.output.flush()?;
        if !self.acknowledged()? {
            return Ok(());
        }
        // Exactly the size announced, even if the file changes meanwhile.
        let sent = io::copy(&mut (&mut file).take(meta.len()), &mut self.output)?;
        if sent < meta.len() {
            io::copy(&mut io::repeat(0).take(meta.len() - sent), &mut self.output)?;
            self.output.write_all(&[1])?;
            writeln!(
                self.output,
                "scp: {}: file shrank while it was read",
                path.display()
            )?;
        } else {
            self.output.write_all(&[0])?;
        }
        self.output.flush()?;
        self.acknowledged()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_owned).collect()
    }

    #[test]
    fn options_are_what_openssh_sends() {
        let o = parse(&args("-v -r -p -d -t -- /home/x dir")).unwrap_err();
        assert_eq!(o, "one target (-t) or at least one source (-f) is needed");
        let o = parse(&args("-r -p -d -t -- -odd")).unwrap();
        assert!(o.sink && o.recursive && o.preserve && o.target_is_dir);
        assert_eq!(o.paths, ["-odd"]);
        assert_eq!(
            parse(&args("-t -f x")).unwrap_err(),
            "exactly one of -t and -f is needed"
        );
        assert_eq!(parse(&args("-x -t y")).unwrap_err(), "unknown option -x");
    }

    #[test]
    fn a_source_cannot_name_a_path_outside_the_target() {
        for line in [
            "C0644 1 ../x",
            "C0644 1 a/b",
            "C0644 1 ..",
            "D0755 0 /",
            "C0644 x name",
        ] {
            assert!(parse_entry(line).is_err(), "{line}");
        }
        assert_eq!(parse_entry("C0644 12 a b").unwrap(), (0o644, 12, "a b"));
    }
}
