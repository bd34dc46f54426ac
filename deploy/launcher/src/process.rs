//! One process of the fleet: started by the launcher (attached or detached) or found again
//! from its pid file by a later `envgate-fleet` run.
//!
//! The e2e tests want their processes to die with the test: an attached process is SIGKILLed
//! and reaped when its handle drops. `deploy/local/fleet up` wants them to outlive the
//! launcher: a detached process runs in a session of its own (setsid), its pid is in
//! `run/NAME.pid`, and dropping its handle leaves it running. Every process gets a pid file,
//! so a later run can find it either way.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::Error;

pub struct Process {
    name: String,
    pid: u32,
    /// The program's file name, as `/proc/PID/cmdline` shows it (guards against a recycled pid).
    program: String,
    /// Present when this run started it; `None` when found from its pid file.
    child: Option<Child>,
    /// Killed and reaped on drop (attached) or left running (detached).
    owned: bool,
    log: PathBuf,
    pid_file: PathBuf,
}

impl Process {
    /// Starts `command` with stdin closed and stdout and stderr appended to `log`; its pid goes
    /// to `pid_file`. `detach`: a session of its own, left running when the handle drops.
    pub fn spawn(
        name: &str,
        mut command: Command,
        log: &Path,
        pid_file: &Path,
        detach: bool,
    ) -> Result<Process, Error> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(Error::io(format!("open {}", log.display())))?;
        let err = file
            .try_clone()
            .map_err(Error::io(format!("open {}", log.display())))?;
        command.stdin(Stdio::null()).stdout(file).stderr(err);
        if detach {
            // A daemon keeps none of its starter's descriptors: a `flock` around
            // `fleet up`, say, would otherwise stay held by etcd until the fleet stops.
            // SAFETY: setsid and close_range are async-signal-safe system calls and touch no
            // memory of the parent. CLOEXEC (not closing) keeps std's own exec-error pipe
            // working; a kernel without close_range (before 5.11) leaves them as they were.
            unsafe {
                command.pre_exec(|| {
                    libc::setsid();
                    libc::syscall(
                        libc::SYS_close_range,
                        3u32,
                        u32::MAX,
                        libc::CLOSE_RANGE_CLOEXEC,
                    );
                    Ok(())
                });
            }
        }
        let program = Path::new(command.get_program())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let child = command
            .spawn()
            .map_err(Error::io(format!("start {name} ({program})")))?;
        let pid = child.id();
        std::fs::write(pid_file, format!("{pid}\n"))
            .map_err(Error::io(format!("write {}", pid_file.display())))?;
        Ok(Process {
            name: name.to_owned(),
            pid,
            program,
            child: Some(child),
            owned: !detach,
            log: log.to_owned(),
            pid_file: pid_file.to_owned(),
        })
    }

    /// The process named in `pid_file` if it still runs `program`.
    pub fn adopt(name: &str, program: &str, log: &Path, pid_file: &Path) -> Option<Process> {
        let pid = std::fs::read_to_string(pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let process = Process {
            name: name.to_owned(),
            pid,
            program: program.to_owned(),
            child: None,
            owned: false,
            log: log.to_owned(),
            pid_file: pid_file.to_owned(),
        };
        pid_runs(pid, program).then_some(process)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Whether it still runs (a zombie does not).
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => pid_runs(self.pid, &self.program),
        }
    }

    /// How it exited, if this run started it and it has.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`), if it still runs.
    pub fn signal(&mut self, signal: i32) {
        if self.alive() {
            // SAFETY: kill(2) with a pid this process started or read from its pid file, and
            // checked just above to run the expected program.
            unsafe {
                libc::kill(self.pid as libc::pid_t, signal);
            }
        }
    }

    /// SIGKILL, as a crash would, and reaped if this run started it.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        if let Some(child) = self.child.as_mut() {
            let _ = child.wait();
        }
    }

    /// SIGTERM, then up to `grace` to exit, then SIGKILL; the pid file goes.
    pub async fn stop(&mut self, grace: Duration) {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while self.alive() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if self.alive() {
            eprintln!(
                "fleet: {} did not stop within {}s; killing it",
                self.name,
                grace.as_secs()
            );
        }
        self.kill();
        let _ = std::fs::remove_file(&self.pid_file);
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.owned {
            self.kill();
        }
    }
}

/// The last `lines` lines of the file at `path` ("" if unreadable).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `pid` is a live (not zombie) process whose command line names `program`.
fn pid_runs(pid: u32, program: &str) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the parenthesised command name, which may itself hold spaces.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, None | Some("Z") | Some("X")) {
        return false;
    }
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmdline| {
            cmdline
                .split(|b| *b == 0)
                .take(2)
                .any(|arg| String::from_utf8_lossy(arg).contains(program))
        })
        .unwrap_or(false)
}

/// Pids of the processes whose command line starts with `program` and holds `argument`
/// (HAProxy processes left finishing connections after a soft reload).
pub fn pids_with_argument(program: &str, argument: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            args.first().is_some_and(|a| a.ends_with(program))
                && args.iter().any(|a| a == argument)
                && pid_runs(*pid, program)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    /// An inheritable descriptor open in the launcher (as `flock`'s is) is not in a detached
    /// process, and is in an attached one (tests rely on nothing else of that behaviour).
    #[test]
    fn a_detached_process_keeps_none_of_its_starters_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        let held = std::fs::File::create(dir.path().join("lock")).unwrap();
        let fd = held.as_raw_fd();
        // SAFETY: clears FD_CLOEXEC on a descriptor this test owns.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
        let has_fd = |detach: bool| {
            let mut sleep = Command::new("sleep");
            sleep.arg("30");
            let name = if detach { "detached" } else { "attached" };
            let mut process = Process::spawn(
                name,
                sleep,
                &dir.path().join(format!("{name}.log")),
                &dir.path().join(format!("{name}.pid")),
                detach,
            )
            .unwrap();
            let seen = Path::new(&format!("/proc/{}/fd/{fd}", process.pid())).exists();
            process.kill();
            seen
        };
        assert!(
            has_fd(false),
            "the check itself sees an inherited descriptor"
        );
        assert!(
            !has_fd(true),
            "a detached process still holds descriptor {fd}"
        );
    }
}
