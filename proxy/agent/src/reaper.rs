//! The init duties: reap every child (our spawns and the orphans the kernel re-parents to
//! us), hand exit statuses to whoever waits for a spawned process, and signal them.
//!
//! Must run on a current-thread runtime: `spawn` registers a pid synchronously right after
//! the fork, and with a single thread the reaping task cannot run in between, so no exit
//! is ever reaped before someone is waiting for it.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, oneshot};

use crate::protocol::ExitStatus;
use crate::signals::signal_name;

pub(crate) struct Reaper {
    waiting: Mutex<HashMap<i32, oneshot::Sender<ExitStatus>>>,
    /// Woken whenever something was reaped (shutdown waits on it).
    reaped: Notify,
    is_init: bool,
}

/// What `reap` saw after collecting every exited child.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Children {
    Running,
    None,
}

impl Reaper {
    /// Installs the SIGCHLD handler and starts the reaping task. When not PID 1 (tests on the
    /// host, or under another init) the agent becomes a child subreaper, so orphans of its
    /// sessions are still re-parented to it.
    pub(crate) fn start() -> io::Result<Arc<Reaper>> {
        // SAFETY: getpid and prctl(PR_SET_CHILD_SUBREAPER) have no memory-safety preconditions.
        let is_init = unsafe { libc::getpid() } == 1;
        if !is_init && unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Arc::new(Reaper {
            waiting: Mutex::new(HashMap::new()),
            reaped: Notify::new(),
            is_init,
        });
        let task_reaper = reaper.clone();
        tokio::spawn(async move {
            loop {
                task_reaper.reap();
                // The periodic pass is a belt-and-braces against a coalesced signal.
                tokio::select! {
                    _ = sigchld.recv() => {}
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        });
        Ok(reaper)
    }

    pub(crate) fn is_init(&self) -> bool {
        self.is_init
    }

    /// Registers a freshly spawned pid; the receiver gets its exit status.
    pub(crate) fn track(&self, pid: i32) -> oneshot::Receiver<ExitStatus> {
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().expect("reaper lock").insert(pid, tx);
        rx
    }

    /// Collects every exited child without blocking.
    pub(crate) fn reap(&self) -> Children {
        let mut any = false;
        let state = loop {
            let mut status = 0;
            // SAFETY: plain waitpid with a valid out pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid > 0 {
                any = true;
                let exit = decode_status(status);
                if let Some(tx) = self.waiting.lock().expect("reaper lock").remove(&pid) {
                    let _ = tx.send(exit);
                }
                continue;
            }
            if pid == 0 {
                break Children::Running;
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                _ => break Children::None,
            }
        };
        if any {
            self.reaped.notify_waiters();
        }
        state
    }

    pub(crate) async fn reaped(&self) {
        self.reaped.notified().await
    }

    /// Signals a spawned process's whole process group (it is a session leader), but only
    /// while it has not been reaped: after that its pid may belong to someone else.
    pub(crate) fn signal_group(&self, pid: i32, sig: i32) {
        if self.waiting.lock().expect("reaper lock").contains_key(&pid) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(-pid, sig) };
        }
    }

    /// Signals just the spawned process (what sshd does for an SSH `signal` request).
    pub(crate) fn signal_process(&self, pid: i32, sig: i32) {
        if self.waiting.lock().expect("reaper lock").contains_key(&pid) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, sig) };
        }
    }

    /// Sends `sig` to everything this agent is responsible for: as PID 1 that is every
    /// process in the container (`kill(-1)` spares the caller); otherwise the process groups
    /// of the sessions it spawned.
    pub(crate) fn signal_everyone(&self, sig: i32) {
        if self.is_init {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(-1, sig) };
            return;
        }
        let pids: Vec<i32> = self
            .waiting
            .lock()
            .expect("reaper lock")
            .keys()
            .copied()
            .collect();
        for pid in pids {
            // SAFETY: as above.
            unsafe { libc::kill(-pid, sig) };
        }
    }
}

pub(crate) fn decode_status(status: i32) -> ExitStatus {
    if libc::WIFSIGNALED(status) {
        let number = libc::WTERMSIG(status);
        ExitStatus::Signal {
            number,
            name: signal_name(number),
            core_dumped: libc::WCOREDUMP(status),
        }
    } else {
        ExitStatus::Code(libc::WEXITSTATUS(status))
    }
}
