//! Applies SSH encoded terminal modes (RFC 4254 §8) to a termios, as sshd does for the
//! client's `pty-req`, so e.g. the user's erase character and `stty -echo` carry over.

use libc::{tcflag_t, termios};

enum Field {
    Char(usize),
    Input(tcflag_t),
    Local(tcflag_t),
    Output(tcflag_t),
    Control(tcflag_t),
}

fn field(opcode: u8) -> Option<Field> {
    use Field::*;
    Some(match opcode {
        1 => Char(libc::VINTR),
        2 => Char(libc::VQUIT),
        3 => Char(libc::VERASE),
        4 => Char(libc::VKILL),
        5 => Char(libc::VEOF),
        6 => Char(libc::VEOL),
        7 => Char(libc::VEOL2),
        8 => Char(libc::VSTART),
        9 => Char(libc::VSTOP),
        10 => Char(libc::VSUSP),
        12 => Char(libc::VREPRINT),
        13 => Char(libc::VWERASE),
        14 => Char(libc::VLNEXT),
        18 => Char(libc::VDISCARD),
        30 => Input(libc::IGNPAR),
        31 => Input(libc::PARMRK),
        32 => Input(libc::INPCK),
        33 => Input(libc::ISTRIP),
        34 => Input(libc::INLCR),
        35 => Input(libc::IGNCR),
        36 => Input(libc::ICRNL),
        37 => Input(libc::IUCLC),
        38 => Input(libc::IXON),
        39 => Input(libc::IXANY),
        40 => Input(libc::IXOFF),
        41 => Input(libc::IMAXBEL),
        42 => Input(libc::IUTF8),
        50 => Local(libc::ISIG),
        51 => Local(libc::ICANON),
        52 => Local(libc::XCASE),
        53 => Local(libc::ECHO),
        54 => Local(libc::ECHOE),
        55 => Local(libc::ECHOK),
        56 => Local(libc::ECHONL),
        57 => Local(libc::NOFLSH),
        58 => Local(libc::TOSTOP),
        59 => Local(libc::IEXTEN),
        60 => Local(libc::ECHOCTL),
        61 => Local(libc::ECHOKE),
        62 => Local(libc::PENDIN),
        70 => Output(libc::OPOST),
        71 => Output(libc::OLCUC),
        72 => Output(libc::ONLCR),
        73 => Output(libc::OCRNL),
        74 => Output(libc::ONOCR),
        75 => Output(libc::ONLRET),
        90 => Control(libc::CS7),
        91 => Control(libc::CS8),
        92 => Control(libc::PARENB),
        93 => Control(libc::PARODD),
        _ => return None,
    })
}

fn set_flag(flags: &mut tcflag_t, bit: tcflag_t, on: bool) {
    if on {
        *flags |= bit;
    } else {
        *flags &= !bit;
    }
}

/// Unknown opcodes (and the speeds, which a pty ignores) are skipped, as sshd does.
pub(crate) fn apply_modes(t: &mut termios, modes: &[(u8, u32)]) {
    for &(opcode, value) in modes {
        match field(opcode) {
            Some(Field::Char(i)) => t.c_cc[i] = value as libc::cc_t,
            Some(Field::Input(bit)) => set_flag(&mut t.c_iflag, bit, value != 0),
            Some(Field::Local(bit)) => set_flag(&mut t.c_lflag, bit, value != 0),
            Some(Field::Output(bit)) => set_flag(&mut t.c_oflag, bit, value != 0),
            Some(Field::Control(bit)) => {
                if bit == libc::CS7 || bit == libc::CS8 {
                    if value != 0 {
                        t.c_cflag = (t.c_cflag & !libc::CSIZE) | bit;
                    }
                } else {
                    set_flag(&mut t.c_cflag, bit, value != 0);
                }
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_set_and_clear_flags_and_chars() {
        // SAFETY: termios is plain old data; all-zero is a valid value.
        let mut t: termios = unsafe { std::mem::zeroed() };
        t.c_lflag = libc::ECHO;
        apply_modes(&mut t, &[(53, 0), (50, 1), (3, 0x7f), (91, 1), (200, 5)]);
        assert_eq!(t.c_lflag & libc::ECHO, 0);
        assert_ne!(t.c_lflag & libc::ISIG, 0);
        assert_eq!(t.c_cc[libc::VERASE], 0x7f);
        assert_eq!(t.c_cflag & libc::CSIZE, libc::CS8);
    }
}
