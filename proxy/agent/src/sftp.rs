//! `envgate-agent sftp-server`: the SFTP subsystem (version 3, as OpenSSH's `sftp-server`)
//! on stdin and stdout, for images that ship no SFTP server. The proxy starts it through the
//! agent like any session process, so it runs as the session's user, in the container's mount
//! namespace, with their home as its working directory: it can touch exactly what that user
//! can. The protocol is russh-sftp's; the file system side is here.

use std::collections::HashMap;
use std::fs::{self, File, Metadata};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use russh_sftp::protocol::{
    Attrs, Data, ExtendedReply, File as Entry, FileAttributes, Handle, Name, OpenFlags, Packet,
    Status, StatusCode, Version,
};
use russh_sftp::server::{Handler, StatusReply};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::task::ready;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

use crate::spawn::{async_fd, raw_read, raw_write};

/// Handles (files and directories) one client may hold open at once, as `sftp-server`'s
/// limit; past it, opens fail with a message rather than exhausting descriptors.
const MAX_HANDLES: usize = 512;
/// The largest packet taken from a client (russh-sftp's default), and the most one read or
/// write carries: what OpenSSH's sftp-server allows, announced with `limits@openssh.com` so
/// the client asks for that much at once rather than its default 32 KiB.
const MAX_PACKET: u64 = 256 * 1024;
const MAX_READ: u32 = 256 * 1024 - 1024;

enum Open {
    File(File),
    /// The listing, handed out by the first `readdir`; the second answers end-of-file.
    Dir(Option<Vec<Entry>>),
}

#[derive(Default)]
pub struct Server {
    handles: HashMap<String, Open>,
    next: u64,
}

fn status(id: u32) -> Status {
    Status {
        id,
        status_code: StatusCode::Ok,
        error_message: "Ok".to_owned(),
        language_tag: "en-US".to_owned(),
    }
}

/// The client shows the message: say what went wrong, as `sftp-server` does.
fn failure(e: io::Error) -> StatusReply {
    let code = match e.kind() {
        io::ErrorKind::NotFound => StatusCode::NoSuchFile,
        io::ErrorKind::PermissionDenied => StatusCode::PermissionDenied,
        _ => StatusCode::Failure,
    };
    let message = e.to_string();
    // "No such file or directory (os error 2)" → "No such file or directory"
    let message = match message.find(" (os error") {
        Some(at) => message[..at].to_owned(),
        None => message,
    };
    code.with_message(message)
}

/// A listing entry; its long name (what `sftp ls -l` prints) names links and other special
/// files by their type letter, as `ls -l` does.
fn entry(name: impl Into<String>, meta: &Metadata) -> Entry {
    use std::os::unix::fs::FileTypeExt;
    let mut entry = Entry::new(name, attributes(meta));
    let kind = meta.file_type();
    let letter = if kind.is_symlink() {
        'l'
    } else if kind.is_fifo() {
        'p'
    } else if kind.is_socket() {
        's'
    } else if kind.is_char_device() {
        'c'
    } else if kind.is_block_device() {
        'b'
    } else {
        return entry;
    };
    entry.longname.replace_range(..1, &letter.to_string());
    entry
}

fn attributes(meta: &Metadata) -> FileAttributes {
    let mut attrs = FileAttributes::from(meta);
    attrs.permissions = Some(meta.mode());
    attrs
}

fn set_attributes(path: &Path, file: Option<&File>, attrs: &FileAttributes) -> io::Result<()> {
    if let Some(size) = attrs.size {
        match file {
            Some(file) => file.set_len(size)?,
            None => File::options().write(true).open(path)?.set_len(size)?,
        }
    }
    if let Some(mode) = attrs.permissions {
        fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o7777))?;
    }
    if attrs.uid.is_some() || attrs.gid.is_some() {
        std::os::unix::fs::chown(path, attrs.uid, attrs.gid)?;
    }
    if let (Some(atime), Some(mtime)) = (attrs.atime, attrs.mtime) {
        let to = |secs: u32| std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.into());
        let times = fs::FileTimes::new()
            .set_accessed(to(atime))
            .set_modified(to(mtime));
        match file {
            Some(file) => file.set_times(times)?,
            None => File::options().write(true).open(path)?.set_times(times)?,
        }
    }
    Ok(())
}

impl Server {
    fn add(&mut self, open: Open) -> Result<String, StatusReply> {
        if self.handles.len() >= MAX_HANDLES {
            return Err(StatusCode::Failure.with_message(format!(
                "too many open files and directories (at most {MAX_HANDLES})"
            )));
        }
        self.next += 1;
        let handle = self.next.to_string();
        self.handles.insert(handle.clone(), open);
        Ok(handle)
    }

    fn file(&self, handle: &str) -> Result<&File, StatusReply> {
        match self.handles.get(handle) {
            Some(Open::File(file)) => Ok(file),
            _ => Err(StatusCode::Failure.with_message("no such open file")),
        }
    }

    /// The path a handle was opened under, for `fsetstat` (permissions go by path).
    fn file_path(&self, handle: &str) -> Result<PathBuf, StatusReply> {
        let file = self.file(handle)?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(file);
        Ok(PathBuf::from(format!("/proc/self/fd/{fd}")))
    }
}

impl Handler for Server {
    type Error = StatusReply;

    fn unimplemented(&self) -> StatusReply {
        StatusCode::OpUnsupported.into()
    }

    async fn init(
        &mut self,
        _version: u32,
        _extensions: HashMap<String, String>,
    ) -> Result<Version, StatusReply> {
        let mut version = Version::new();
        version
            .extensions
            .insert(russh_sftp::extensions::LIMITS.to_owned(), "1".to_owned());
        Ok(version)
    }

    async fn extended(
        &mut self,
        id: u32,
        request: String,
        _data: Vec<u8>,
    ) -> Result<Packet, StatusReply> {
        if request != russh_sftp::extensions::LIMITS {
            return Err(StatusCode::OpUnsupported.into());
        }
        let limits = [
            MAX_PACKET,
            u64::from(MAX_READ),
            u64::from(MAX_READ),
            MAX_HANDLES as u64,
        ];
        Ok(Packet::ExtendedReply(ExtendedReply {
            id,
            data: limits.iter().flat_map(|n| n.to_be_bytes()).collect(),
        }))
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        attrs: FileAttributes,
    ) -> Result<Handle, StatusReply> {
        let mut options: fs::OpenOptions = pflags.into();
        if pflags.contains(OpenFlags::CREATE) {
            std::os::unix::fs::OpenOptionsExt::mode(
                &mut options,
                attrs.permissions.unwrap_or(0o666) & 0o7777,
            );
        }
        let file = options.open(&filename).map_err(failure)?;
        let handle = self.add(Open::File(file))?;
        Ok(Handle { id, handle })
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, StatusReply> {
        match self.handles.remove(&handle) {
            Some(_) => Ok(status(id)),
            None => Err(StatusCode::Failure.with_message("no such handle")),
        }
    }

    async fn read(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        len: u32,
    ) -> Result<Data, StatusReply> {
        let file = self.file(&handle)?;
        let mut data = vec![0; len.min(MAX_READ) as usize];
        let n = file.read_at(&mut data, offset).map_err(failure)?;
        if n == 0 && !data.is_empty() {
            return Err(StatusCode::Eof.into());
        }
        data.truncate(n);
        Ok(Data { id, data })
    }

    async fn write(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<Status, StatusReply> {
        self.file(&handle)?
            .write_all_at(&data, offset)
            .map_err(failure)?;
        Ok(status(id))
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, StatusReply> {
        let meta = fs::symlink_metadata(&path).map_err(failure)?;
        Ok(Attrs {
            id,
            attrs: attributes(&meta),
        })
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, StatusReply> {
        let meta = fs::metadata(&path).map_err(failure)?;
        Ok(Attrs {
            id,
            attrs: attributes(&meta),
        })
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, StatusReply> {
        let meta = self.file(&handle)?.metadata().map_err(failure)?;
        Ok(Attrs {
            id,
            attrs: attributes(&meta),
        })
    }

    async fn setstat(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, StatusReply> {
        set_attributes(Path::new(&path), None, &attrs).map_err(failure)?;
        Ok(status(id))
    }

    async fn fsetstat(
        &mut self,
        id: u32,
        handle: String,
        attrs: FileAttributes,
    ) -> Result<Status, StatusReply> {
        let path = self.file_path(&handle)?;
        set_attributes(&path, Some(self.file(&handle)?), &attrs).map_err(failure)?;
        Ok(status(id))
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<Handle, StatusReply> {
        let dir = Path::new(&path);
        let mut entries = Vec::new();
        for name in [".", ".."] {
            if let Ok(meta) = fs::symlink_metadata(dir.join(name)) {
                entries.push(entry(name, &meta));
            }
        }
        for found in fs::read_dir(dir).map_err(failure)? {
            let found = found.map_err(failure)?;
            // An entry removed meanwhile is left out, as `ls` would.
            if let Ok(meta) = found.path().symlink_metadata() {
                entries.push(entry(found.file_name().to_string_lossy(), &meta));
            }
        }
        let handle = self.add(Open::Dir(Some(entries)))?;
        Ok(Handle { id, handle })
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, StatusReply> {
        match self.handles.get_mut(&handle) {
            Some(Open::Dir(listing)) => match listing.take() {
                Some(files) => Ok(Name { id, files }),
                None => Err(StatusCode::Eof.into()),
            },
            _ => Err(StatusCode::Failure.with_message("no such open directory")),
        }
    }

    async fn remove(&mut self, id: u32, filename: String) -> Result<Status, StatusReply> {
        fs::remove_file(&filename).map_err(failure)?;
        Ok(status(id))
    }

    async fn mkdir(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, StatusReply> {
        std::os::unix::fs::DirBuilderExt::mode(
            &mut fs::DirBuilder::new(),
            attrs.permissions.unwrap_or(0o777) & 0o7777,
        )
        .create(&path)
        .map_err(failure)?;
        Ok(status(id))
    }

    async fn rmdir(&mut self, id: u32, path: String) -> Result<Status, StatusReply> {
        fs::remove_dir(&path).map_err(failure)?;
        Ok(status(id))
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, StatusReply> {
        let path = if path.is_empty() {
            ".".to_owned()
        } else {
            path
        };
        let real = fs::canonicalize(&path).map_err(failure)?;
        Ok(Name {
            id,
            files: vec![Entry::dummy(real.to_string_lossy())],
        })
    }

    /// Version 3 rename never replaces an existing file (OpenSSH's `sftp-server` does the
    /// same); `sftp` says so.
    async fn rename(
        &mut self,
        id: u32,
        oldpath: String,
        newpath: String,
    ) -> Result<Status, StatusReply> {
        if fs::symlink_metadata(&newpath).is_ok() {
            return Err(StatusCode::Failure.with_message(format!("{newpath} already exists")));
        }
        fs::rename(&oldpath, &newpath).map_err(failure)?;
        Ok(status(id))
    }

    async fn readlink(&mut self, id: u32, path: String) -> Result<Name, StatusReply> {
        let target = fs::read_link(&path).map_err(failure)?;
        Ok(Name {
            id,
            files: vec![Entry::dummy(target.to_string_lossy())],
        })
    }

    /// OpenSSH sends the target first and the new link second (the reverse of the draft's
    /// field names, which russh-sftp keeps); every OpenSSH-compatible server follows OpenSSH.
    async fn symlink(
        &mut self,
        id: u32,
        target: String,
        link: String,
    ) -> Result<Status, StatusReply> {
        std::os::unix::fs::symlink(&target, &link).map_err(failure)?;
        Ok(status(id))
    }
}

/// stdin and stdout as one stream: pipes when the agent started the process, a socket pair
/// under `sftp -D`, anything pollable. A failed write (the client went away) turns the next
/// read into end-of-file, which is what ends russh-sftp's loop; dropping it tells `serve` the
/// loop is over.
struct Stdio {
    input: AsyncFd<OwnedFd>,
    output: AsyncFd<OwnedFd>,
    broken: bool,
    _done: oneshot::Sender<()>,
}

impl AsyncRead for Stdio {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.broken {
            return Poll::Ready(Ok(()));
        }
        loop {
            let mut guard = ready!(self.input.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| raw_read(fd.get_ref().as_raw_fd(), unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for Stdio {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.output.poll_write_ready(cx))?;
            match guard.try_io(|fd| raw_write(fd.get_ref().as_raw_fd(), buf)) {
                Ok(Ok(n)) => return Poll::Ready(Ok(n)),
                Ok(Err(e)) => {
                    self.broken = true;
                    return Poll::Ready(Err(e));
                }
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Serves SFTP on stdin and stdout until the client closes its side.
pub async fn serve() -> io::Result<()> {
    let (done, finished) = oneshot::channel();
    let stream = Stdio {
        input: async_fd(std::io::stdin().as_fd().try_clone_to_owned()?)?,
        output: async_fd(std::io::stdout().as_fd().try_clone_to_owned()?)?,
        broken: false,
        _done: done,
    };
    russh_sftp::server::run(stream, Server::default()).await;
    let _ = finished.await;
    Ok(())
}
