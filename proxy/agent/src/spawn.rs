//! Starting a session process: user switch from the container's own passwd/group files,
//! a login-like environment, and either three pipes or a pty that becomes the process's
//! controlling terminal (so Ctrl-C reaches the foreground job).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use tokio::io::unix::AsyncFd;

use crate::passwd::{self, Account};
use crate::protocol::{Program, PtyRequest, SpawnRequest, WindowSize, open_error};
use crate::termios::apply_modes;

pub(crate) type Fd = Arc<AsyncFd<OwnedFd>>;

/// Where the agent looks up accounts; configurable so tests can use their own files.
#[derive(Debug, Clone)]
pub struct AccountFiles {
    pub passwd: PathBuf,
    pub group: PathBuf,
}

impl Default for AccountFiles {
    fn default() -> Self {
        AccountFiles {
            passwd: PathBuf::from("/etc/passwd"),
            group: PathBuf::from("/etc/group"),
        }
    }
}

pub(crate) struct Spawned {
    pub pid: i32,
    pub stdin: Fd,
    pub stdout: Fd,
    /// `None` with a pty: everything the process writes arrives on the terminal.
    pub stderr: Option<Fd>,
    /// The pty master, for window changes.
    pub pty: Option<Fd>,
}

#[derive(Debug)]
pub(crate) struct SpawnError {
    pub code: u8,
    pub message: String,
}

impl SpawnError {
    fn new(code: u8, message: impl Into<String>) -> Self {
        SpawnError {
            code,
            message: message.into(),
        }
    }
}

const ROOT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const USER_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

fn cstring(what: &str, s: &str) -> Result<CString, SpawnError> {
    CString::new(s).map_err(|_| {
        SpawnError::new(
            open_error::BAD_REQUEST,
            format!("{what} contains a NUL byte"),
        )
    })
}

fn resolve_account(req: &SpawnRequest, files: &AccountFiles) -> Result<Account, SpawnError> {
    let io_err = |e: io::Error| {
        SpawnError::new(
            open_error::RESOURCES,
            format!("cannot read account files: {e}"),
        )
    };
    // SAFETY: geteuid/getegid cannot fail and touch no memory.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let account = match (&req.account, &req.user) {
        (Some(own), _) => own_account(own, files, euid)?,
        (None, None) => passwd::account_for_uid(&files.passwd, euid, egid).map_err(io_err)?,
        (None, Some(user)) => passwd::find_account(&files.passwd, user)
            .map_err(io_err)?
            .ok_or_else(|| {
                SpawnError::new(
                    open_error::NO_SUCH_USER,
                    format!(
                        "no user {user:?} in this environment's {}",
                        files.passwd.display()
                    ),
                )
            })?,
    };
    if euid != 0 && account.uid != euid {
        return Err(SpawnError::new(
            open_error::BAD_REQUEST,
            format!(
                "the agent runs as uid {euid} and cannot start processes as uid {}",
                account.uid
            ),
        ));
    }
    Ok(account)
}

/// The session's own account, written into the container's files and given its home. A
/// container whose files cannot be written (a read-only root) still runs the session as the
/// uid, as `docker exec -u` would, and says why in the agent's log.
fn own_account(
    own: &crate::protocol::Account,
    files: &AccountFiles,
    euid: u32,
) -> Result<Account, SpawnError> {
    if own.uid == 0 || own.name.is_empty() || own.name.contains([':', '\n', '/']) {
        return Err(SpawnError::new(
            open_error::BAD_REQUEST,
            format!("refusing the account {:?} (uid {})", own.name, own.uid),
        ));
    }
    let bare = || passwd::Account {
        name: own.name.clone(),
        uid: own.uid,
        gid: own.gid,
        home: own.home.clone(),
        shell: "/bin/sh".to_owned(),
    };
    if euid != 0 {
        return Ok(bare());
    }
    let account = passwd::ensure_account(&files.passwd, &files.group, own).unwrap_or_else(|e| {
        tracing::warn!(user = %own.name, error = %e, "cannot add the session's account to the container's passwd and group files; running as the bare uid");
        bare()
    });
    if let Err(e) = passwd::hand_over_home(Path::new(&account.home), account.uid, account.gid) {
        tracing::warn!(user = %own.name, home = %account.home, error = %e, "cannot give the home directory to its user");
    }
    Ok(account)
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The container's own environment as the agent received it (the image's `ENV` and the
/// container's `-e` settings, as a Docker exec would see them), without the agent's own
/// settings — the secret may be among them — and without what is set per session.
pub fn session_base_env(
    inherited: impl IntoIterator<Item = (String, String)>,
) -> Vec<(String, String)> {
    const PER_SESSION: [&str; 5] = ["HOME", "USER", "LOGNAME", "SHELL", "TERM"];
    inherited
        .into_iter()
        .filter(|(k, _)| !k.starts_with("ENVGATE_AGENT_") && !PER_SESSION.contains(&k.as_str()))
        .collect()
}

pub(crate) fn spawn(
    req: &SpawnRequest,
    files: &AccountFiles,
    base_env: &[(String, String)],
) -> Result<Spawned, SpawnError> {
    let account = resolve_account(req, files)?;
    let groups = passwd::group_list(&files.group, &account.name, account.gid).map_err(|e| {
        SpawnError::new(
            open_error::RESOURCES,
            format!("cannot read {}: {e}", files.group.display()),
        )
    })?;

    let (program, args, arg0): (String, Vec<String>, String) = match &req.program {
        Program::LoginShell => (
            account.shell.clone(),
            Vec::new(),
            format!("-{}", basename(&account.shell)),
        ),
        Program::ShellCommand(cmd) => (
            account.shell.clone(),
            vec!["-c".to_owned(), cmd.clone()],
            basename(&account.shell).to_owned(),
        ),
        Program::Argv(argv) => {
            let Some(first) = argv.first() else {
                return Err(SpawnError::new(open_error::BAD_REQUEST, "empty argv"));
            };
            (first.clone(), argv[1..].to_vec(), first.clone())
        }
    };
    cstring("program", &program)?;
    for a in &args {
        cstring("argument", a)?;
    }

    let mut env: Vec<(String, String)> = base_env.to_vec();
    if !env.iter().any(|(k, _)| k == "PATH") {
        let path = if account.uid == 0 {
            ROOT_PATH
        } else {
            USER_PATH
        };
        env.push(("PATH".into(), path.into()));
    }
    env.extend([
        ("HOME".into(), account.home.clone()),
        ("USER".into(), account.name.clone()),
        ("LOGNAME".into(), account.name.clone()),
        ("SHELL".into(), account.shell.clone()),
    ]);
    if let Some(pty) = &req.pty {
        env.push(("TERM".into(), pty.term.clone()));
    }
    for (k, v) in &req.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(SpawnError::new(
                open_error::BAD_REQUEST,
                format!("invalid environment variable {k:?}"),
            ));
        }
        env.push((k.clone(), v.clone()));
    }

    // An explicit working directory must exist; the home directory falls back to `/`,
    // as with sshd ("Could not chdir to home directory").
    let (cwd, cwd_explicit) = match &req.cwd {
        Some(dir) => {
            if !Path::new(dir).is_dir() {
                return Err(SpawnError::new(
                    open_error::EXEC_FAILED,
                    format!("working directory {dir:?} does not exist"),
                ));
            }
            (cstring("working directory", dir)?, true)
        }
        None => (cstring("home directory", &account.home)?, false),
    };

    let mut cmd = Command::new(&program);
    cmd.arg0(&arg0)
        .args(&args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)));

    let pty = match &req.pty {
        Some(p) => Some(open_pty(p).map_err(|e| {
            SpawnError::new(open_error::RESOURCES, format!("cannot open a pty: {e}"))
        })?),
        None => None,
    };
    let resources = |e: io::Error| SpawnError::new(open_error::RESOURCES, e.to_string());
    match &pty {
        Some((_, slave)) => {
            cmd.stdin(Stdio::from(slave.try_clone().map_err(resources)?))
                .stdout(Stdio::from(slave.try_clone().map_err(resources)?))
                .stderr(Stdio::from(slave.try_clone().map_err(resources)?));
        }
        None => {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        }
    }

    // SAFETY: geteuid cannot fail.
    let switch_user = unsafe { libc::geteuid() } == 0;
    let with_tty = pty.is_some();
    let (uid, gid) = (account.uid, account.gid);
    let gids: Vec<libc::gid_t> = groups;
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // Start from default dispositions: whoever started the agent may have left
            // signals ignored (a shell's background job ignores SIGINT and SIGQUIT), and
            // ignored signals survive exec.
            for sig in 1..32 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if with_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            if switch_user {
                if libc::setgroups(gids.len(), gids.as_ptr()) < 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::setgid(gid) < 0 || libc::setuid(uid) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::chdir(cwd.as_ptr()) < 0 {
                if cwd_explicit {
                    return Err(io::Error::last_os_error());
                }
                libc::chdir(c"/".as_ptr());
            }
            Ok(())
        });
    }

    let mut child = cmd.spawn().map_err(|e| {
        SpawnError::new(
            open_error::EXEC_FAILED,
            format!("cannot run {program:?}: {}", strip_os_error(&e)),
        )
    })?;
    // The Command holds our copies of the pty slave: drop it so that the master reads EOF
    // (EIO) once the session's processes are gone.
    drop(cmd);
    let pid = child.id() as i32;

    let spawned = match pty {
        Some((master, _slave)) => {
            let master = Arc::new(async_fd(master).map_err(resources)?);
            Spawned {
                pid,
                stdin: master.clone(),
                stdout: master.clone(),
                stderr: None,
                pty: Some(master),
            }
        }
        None => {
            let stdin = child.stdin.take().expect("piped stdin");
            let stdout = child.stdout.take().expect("piped stdout");
            let stderr = child.stderr.take().expect("piped stderr");
            widen_pipe(stdin.as_raw_fd());
            widen_pipe(stdout.as_raw_fd());
            Spawned {
                pid,
                stdin: Arc::new(async_fd(OwnedFd::from(stdin)).map_err(resources)?),
                stdout: Arc::new(async_fd(OwnedFd::from(stdout)).map_err(resources)?),
                stderr: Some(Arc::new(
                    async_fd(OwnedFd::from(stderr)).map_err(resources)?,
                )),
                pty: None,
            }
        }
    };
    // The child is reaped by the reaper through waitpid(-1); std's handle must not wait.
    drop(child);
    Ok(spawned)
}

/// "No such file or directory (os error 2)" → "No such file or directory": the user sees it.
fn strip_os_error(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

fn set_cloexec_nonblock(fd: RawFd, nonblock: bool) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        if libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) < 0 {
            return Err(io::Error::last_os_error());
        }
        if nonblock {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Bulk transfers (a file over SFTP, a large `cat`) cross each pipe in far fewer wake-ups
/// with 1 MiB of room than with the default 64 KiB. Best effort: the limit for users
/// (`/proc/sys/fs/pipe-max-size`) may be lower, and then the pipe keeps its size.
fn widen_pipe(fd: RawFd) {
    // SAFETY: fcntl on a descriptor we own; failure leaves the pipe as it was.
    unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, 1 << 20) };
}

pub(crate) fn async_fd(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    set_cloexec_nonblock(fd.as_raw_fd(), true)?;
    // SAFETY: an OwnedFd keeps its descriptor open and unchanged for as long as it lives.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

fn winsize(size: &WindowSize) -> libc::winsize {
    libc::winsize {
        ws_row: size.rows.min(u16::MAX as u32) as u16,
        ws_col: size.cols.min(u16::MAX as u32) as u16,
        ws_xpixel: size.pixel_width.min(u16::MAX as u32) as u16,
        ws_ypixel: size.pixel_height.min(u16::MAX as u32) as u16,
    }
}

/// Returns (master, slave), both close-on-exec, the slave configured with the client's modes.
fn open_pty(req: &PtyRequest) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut master: libc::c_int = -1;
    let mut slave: libc::c_int = -1;
    let ws = winsize(&req.size);
    // SAFETY: valid out pointers; NULL name and termios are allowed.
    if unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openpty returned two fresh descriptors that nothing else owns.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    set_cloexec_nonblock(master.as_raw_fd(), false)?;
    set_cloexec_nonblock(slave.as_raw_fd(), false)?;
    if !req.modes.is_empty() {
        // SAFETY: termios is plain data, filled by tcgetattr before use.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and pointer.
        if unsafe { libc::tcgetattr(slave.as_raw_fd(), &mut t) } == 0 {
            apply_modes(&mut t, &req.modes);
            // SAFETY: as above.
            unsafe { libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t) };
        }
    }
    Ok((master, slave))
}

/// TIOCSWINSZ on the master; the kernel sends SIGWINCH to the foreground process group.
pub(crate) fn resize(master: &AsyncFd<OwnedFd>, size: &WindowSize) {
    let ws = winsize(size);
    // SAFETY: valid descriptor and pointer.
    unsafe { libc::ioctl(master.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &ws) };
}

pub(crate) fn raw_read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for buf.len() bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            // A pty master reads EIO once no process holds the slave any more: that is EOF.
            Some(libc::EIO) => return Ok(0),
            _ => return Err(e),
        }
    }
}

/// Reads what is there, waiting for readiness; `Ok(0)` is end of stream.
pub(crate) async fn read_some(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut guard = fd.readable().await?;
        match guard.try_io(|inner| raw_read(inner.get_ref().as_raw_fd(), buf)) {
            Ok(result) => return result,
            Err(_would_block) => continue,
        }
    }
}

/// One read without waiting: `None` when nothing is buffered right now.
pub(crate) fn try_read(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> io::Result<Option<usize>> {
    match raw_read(fd.get_ref().as_raw_fd(), buf) {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

pub(crate) fn raw_write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for buf.len() bytes.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

pub(crate) async fn write_all(fd: &AsyncFd<OwnedFd>, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let mut guard = fd.writable().await?;
        let result = guard.try_io(|inner| raw_write(inner.get_ref().as_raw_fd(), buf));
        match result {
            Ok(Ok(n)) => buf = &buf[n..],
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}
