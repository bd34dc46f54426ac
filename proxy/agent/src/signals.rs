//! SSH signal names (RFC 4254 §6.10, without the `SIG` prefix) ⇄ Linux signal numbers.

const TABLE: &[(&str, i32)] = &[
    ("ABRT", libc::SIGABRT),
    ("ALRM", libc::SIGALRM),
    ("BUS", libc::SIGBUS),
    ("CHLD", libc::SIGCHLD),
    ("CONT", libc::SIGCONT),
    ("FPE", libc::SIGFPE),
    ("HUP", libc::SIGHUP),
    ("ILL", libc::SIGILL),
    ("INT", libc::SIGINT),
    ("IO", libc::SIGIO),
    ("KILL", libc::SIGKILL),
    ("PIPE", libc::SIGPIPE),
    ("PROF", libc::SIGPROF),
    ("PWR", libc::SIGPWR),
    ("QUIT", libc::SIGQUIT),
    ("SEGV", libc::SIGSEGV),
    ("STKFLT", libc::SIGSTKFLT),
    ("STOP", libc::SIGSTOP),
    ("SYS", libc::SIGSYS),
    ("TERM", libc::SIGTERM),
    ("TRAP", libc::SIGTRAP),
    ("TSTP", libc::SIGTSTP),
    ("TTIN", libc::SIGTTIN),
    ("TTOU", libc::SIGTTOU),
    ("URG", libc::SIGURG),
    ("USR1", libc::SIGUSR1),
    ("USR2", libc::SIGUSR2),
    ("VTALRM", libc::SIGVTALRM),
    ("WINCH", libc::SIGWINCH),
    ("XCPU", libc::SIGXCPU),
    ("XFSZ", libc::SIGXFSZ),
];

/// `"TERM"`, `"SIGTERM"` and `"term"` all give `SIGTERM`.
pub fn signal_number(name: &str) -> Option<i32> {
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    TABLE.iter().find(|(n, _)| *n == bare).map(|(_, v)| *v)
}

/// The SSH name for a signal number; signals without a name (real-time ones) are given as
/// their decimal number.
pub fn signal_name(number: i32) -> String {
    TABLE
        .iter()
        .find(|(_, v)| *v == number)
        .map(|(n, _)| (*n).to_owned())
        .unwrap_or_else(|| number.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_agree() {
        assert_eq!(signal_number("TERM"), Some(15));
        assert_eq!(signal_number("SIGint"), Some(2));
        assert_eq!(signal_number("NOPE"), None);
        assert_eq!(signal_name(9), "KILL");
        assert_eq!(signal_name(40), "40");
        for (name, num) in TABLE {
            assert_eq!(signal_number(name), Some(*num));
        }
    }
}
