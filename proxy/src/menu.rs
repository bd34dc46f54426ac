//! The interactive menu a user with a terminal sees when nothing else chose
//! their environment (no pinned port, no `user+env`, no `ENVGATE_ENV`, no
//! saved default).
//!
//! [`Menu`] is a pure state machine: it renders itself to bytes and turns
//! input bytes into a [`Step`], so every key, split escape sequence and
//! cancel path is unit-tested without a terminal. [`run`] drives it over a
//! [`MenuTerminal`] (the SSH channel) before any process exists: it reads
//! the channel's queued input and writes the drawing; once it returns, the
//! channel's input queue is left to the process that starts next.
//!
//! Bytes typed after Enter in the same read are dropped: the input queue
//! ([`crate::exec::Inbound`]) has no way to put bytes back at its front, and
//! anything typed after that read reaches the shell as usual.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use envgate_proto::v1::UserEnvironments;
use tokio::sync::mpsc;

use crate::exec::{ChannelOutput, TerminalSize};

/// How long a user may look at the menu before the connection is closed.
pub const MENU_TIMEOUT: Duration = Duration::from_secs(120);

/// The hint under the environments.
pub const HINT: &str = "↑/↓ or number, Enter to start, q to quit";

/// Reverse video on, attributes off.
const HIGHLIGHT: &str = "\x1b[7m";
const PLAIN: &str = "\x1b[0m";
/// Width assumed when the client reported none.
const DEFAULT_WIDTH: u32 = 80;

/// One environment the user may choose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MenuItem {
    pub name: String,
    pub description: String,
    /// The user has a container for it already (starting is instant).
    pub running: bool,
    /// The catalogue's default.
    pub is_default: bool,
}

/// Why no environment was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancel {
    /// `q`.
    Quit,
    /// Ctrl-C.
    Interrupt,
    /// Ctrl-D, or the client closed its input.
    EndOfInput,
    /// Nothing chosen within [`MENU_TIMEOUT`].
    Timeout,
}

impl Cancel {
    /// The one line the user sees.
    pub fn line(self) -> String {
        match self {
            Cancel::Timeout => format!(
                "envgate: no environment chosen within {} s",
                MENU_TIMEOUT.as_secs()
            ),
            _ => "envgate: no environment chosen".to_owned(),
        }
    }

    /// The session's exit status: 130 after Ctrl-C, as a shell reports
    /// SIGINT; 1 otherwise.
    pub fn exit_status(self) -> u32 {
        match self {
            Cancel::Interrupt => 130,
            _ => 1,
        }
    }
}

/// What one batch of input did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing visible changed (an unknown key, half an escape sequence).
    Nothing,
    /// The highlight moved: redraw.
    Moved,
    /// Enter on row `index`; `dropped` bytes followed it in the same input.
    Chose {
        index: usize,
        dropped: usize,
    },
    Cancelled(Cancel),
}

/// Where the parser is inside an escape sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    None,
    /// After ESC.
    Started,
    /// After `ESC [` (CSI): parameters until a final byte.
    Csi,
    /// After `ESC O` (SS3, application cursor mode): one final byte.
    Ss3,
}

/// What the environment list means before any menu is shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Preselect {
    /// Use this environment without asking ("" = let the control plane
    /// decide, and explain when it cannot).
    Use(String),
    Ask(Menu),
}

/// The menu's decision rule: the saved default wins without a menu; a
/// single environment needs no question; none is left to the control
/// plane, whose error names the problem; otherwise ask.
pub fn preselect(list: &UserEnvironments) -> Preselect {
    if !list.user_default.is_empty() {
        return Preselect::Use(list.user_default.clone());
    }
    match list.environments.as_slice() {
        [] => Preselect::Use(String::new()),
        [only] => Preselect::Use(only.name.clone()),
        many => {
            let items = many
                .iter()
                .map(|e| MenuItem {
                    name: e.name.clone(),
                    description: e.description.clone(),
                    running: e.running,
                    is_default: e.name == list.catalogue_default,
                })
                .collect();
            Preselect::Ask(Menu::new(items))
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Menu {
    items: Vec<MenuItem>,
    selected: usize,
    escape: Escape,
}

impl Menu {
    /// The highlight starts on the catalogue's default, else the first row.
    pub fn new(items: Vec<MenuItem>) -> Self {
        let selected = items.iter().position(|i| i.is_default).unwrap_or(0);
        Self {
            items,
            selected,
            escape: Escape::None,
        }
    }

    pub fn items(&self) -> &[MenuItem] {
        &self.items
    }

    pub fn selected(&self) -> usize {
        self.selected
    }

    /// Applies input bytes in order; stops at the first choice or cancel.
    /// An escape sequence cut between two reads continues with the next.
    pub fn feed(&mut self, input: &[u8]) -> Step {
        let mut moved = false;
        for (at, &byte) in input.iter().enumerate() {
            match self.key(byte) {
                Key::None => {}
                Key::Up => moved |= self.select(self.selected.saturating_sub(1)),
                Key::Down => moved |= self.select(self.selected + 1),
                Key::Row(row) => moved |= self.select(row),
                Key::Enter if !self.items.is_empty() => {
                    return Step::Chose {
                        index: self.selected,
                        dropped: input.len() - at - 1,
                    };
                }
                Key::Enter => {}
                Key::Cancel(why) => return Step::Cancelled(why),
            }
        }
        if moved { Step::Moved } else { Step::Nothing }
    }

    /// The timeout as a decision: `Some` once `waited` reaches
    /// [`MENU_TIMEOUT`].
    pub fn timed_out(waited: Duration) -> Option<Cancel> {
        (waited >= MENU_TIMEOUT).then_some(Cancel::Timeout)
    }

    /// Moves the highlight to `row` if it exists; true if it moved.
    fn select(&mut self, row: usize) -> bool {
        if row < self.items.len() && row != self.selected {
            self.selected = row;
            true
        } else {
            false
        }
    }

    fn key(&mut self, byte: u8) -> Key {
        match self.escape {
            Escape::Started => {
                self.escape = match byte {
                    b'[' => Escape::Csi,
                    b'O' => Escape::Ss3,
                    0x1b => Escape::Started,
                    // Alt+key or a lone ESC followed by a key: the key counts.
                    _ => return self.plain_key(byte),
                };
                Key::None
            }
            Escape::Csi => match byte {
                // Parameter and intermediate bytes (e.g. `1;5` of Ctrl-Up).
                0x20..=0x3f => Key::None,
                0x40..=0x7e => {
                    self.escape = Escape::None;
                    arrow(byte)
                }
                // A control byte inside a sequence: the sequence was
                // garbage, the byte (Ctrl-C, Enter) is meant.
                _ => self.plain_key(byte),
            },
            Escape::Ss3 => match byte {
                0x40..=0x7e => {
                    self.escape = Escape::None;
                    arrow(byte)
                }
                _ => self.plain_key(byte),
            },
            Escape::None => self.plain_key(byte),
        }
    }

    fn plain_key(&mut self, byte: u8) -> Key {
        self.escape = Escape::None;
        match byte {
            0x1b => {
                self.escape = Escape::Started;
                Key::None
            }
            b'k' => Key::Up,
            b'j' => Key::Down,
            b'1'..=b'9' => Key::Row(usize::from(byte - b'1')),
            b'\r' | b'\n' => Key::Enter,
            b'q' | b'Q' => Key::Cancel(Cancel::Quit),
            0x03 => Key::Cancel(Cancel::Interrupt),
            0x04 => Key::Cancel(Cancel::EndOfInput),
            _ => Key::None,
        }
    }

    /// The menu's lines, each cut to fit `width` columns (so none wraps and
    /// a redraw knows how many lines to go back), the selected row in
    /// reverse video.
    pub fn lines(&self, width: u32) -> Vec<String> {
        let width = if width == 0 { DEFAULT_WIDTH } else { width };
        // One column spare: writing the last column makes some terminals wrap.
        let fit = usize::try_from(width.saturating_sub(1).max(1)).unwrap_or(usize::MAX);
        let name_width = self
            .items
            .iter()
            .map(|i| i.name.chars().count())
            .max()
            .unwrap_or(0);
        let mut lines = vec![cut("envgate: choose an environment", fit)];
        for (row, item) in self.items.iter().enumerate() {
            let marker = if row == self.selected { '>' } else { ' ' };
            let mut text = format!("{marker} {}. {:<name_width$}", row + 1, item.name);
            if !item.description.is_empty() {
                text.push_str("  ");
                text.push_str(&printable(&item.description));
            }
            if item.is_default {
                text.push_str("  (default)");
            }
            if item.running {
                text.push_str("  (running)");
            }
            let text = cut(&text, fit);
            if row == self.selected {
                lines.push(format!("{HIGHLIGHT}{text}{PLAIN}"));
            } else {
                lines.push(text);
            }
        }
        lines.push(cut(HINT, fit));
        lines
    }

    /// The first drawing, where the cursor is; the cursor is left at the
    /// end of the hint line.
    pub fn draw(&self, width: u32) -> Vec<u8> {
        self.lines(width).join("\r\n").into_bytes()
    }

    /// Erase, then draw again in the same place.
    pub fn redraw(&self, width: u32) -> Vec<u8> {
        let mut bytes = self.erase();
        bytes.extend(self.draw(width));
        bytes
    }

    /// After a window change, lines the terminal re-wrapped make "go back N
    /// lines" unreliable: clear the screen and draw at the top.
    pub fn repaint(&self, width: u32) -> Vec<u8> {
        let mut bytes = b"\x1b[H\x1b[2J".to_vec();
        bytes.extend(self.draw(width));
        bytes
    }

    /// Removes the drawing line by line, bottom up, leaving the cursor where
    /// it began. Not "clear to the end of the screen": from the top line that
    /// is a whole-screen clear, which tmux and others turn into scrolling the
    /// menu into the history.
    pub fn erase(&self) -> Vec<u8> {
        let mut bytes = b"\r\x1b[2K".to_vec();
        for _ in 0..=self.items.len() {
            bytes.extend(b"\x1b[1A\x1b[2K");
        }
        bytes
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    None,
    Up,
    Down,
    Row(usize),
    Enter,
    Cancel(Cancel),
}

fn arrow(final_byte: u8) -> Key {
    match final_byte {
        b'A' => Key::Up,
        b'B' => Key::Down,
        _ => Key::None,
    }
}

/// At most `fit` characters.
fn cut(text: &str, fit: usize) -> String {
    text.chars().take(fit).collect()
}

/// Descriptions come from the catalogue: no control characters reach the
/// user's terminal (each becomes a space). Self-service fields use it too.
pub(crate) fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Where the menu is shown and read: the SSH channel, or a script in tests.
#[async_trait]
pub trait MenuTerminal: Send + Sync {
    /// False once the client is gone.
    async fn write(&self, bytes: Vec<u8>) -> bool;
    /// The next input; `None` at EOF or once the channel closed.
    async fn read(&self) -> Option<Bytes>;
}

#[async_trait]
impl MenuTerminal for ChannelOutput {
    async fn write(&self, bytes: Vec<u8>) -> bool {
        self.stdout(Bytes::from(bytes)).await.is_ok()
    }

    async fn read(&self) -> Option<Bytes> {
        self.inbound().next().await
    }
}

/// Shows `menu` until the user chooses (the environment's name) or gives
/// up; window changes from `resizes` repaint it. The drawing is erased
/// either way, so the shell or the cancel line starts on a tidy screen.
pub async fn run(
    mut menu: Menu,
    terminal: &dyn MenuTerminal,
    size: TerminalSize,
    resizes: &mut mpsc::Receiver<TerminalSize>,
) -> Result<String, Cancel> {
    let started = tokio::time::Instant::now();
    let mut width = size.cols;
    if !terminal.write(menu.draw(width)).await {
        return Err(Cancel::EndOfInput);
    }
    let mut resizes_open = true;
    loop {
        let step = tokio::select! {
            input = terminal.read() => match input {
                Some(input) => menu.feed(&input),
                None => Step::Cancelled(Cancel::EndOfInput),
            },
            size = resizes.recv(), if resizes_open => {
                match size {
                    Some(size) => {
                        width = size.cols;
                        if !terminal.write(menu.repaint(width)).await {
                            return Err(Cancel::EndOfInput);
                        }
                    }
                    None => resizes_open = false,
                }
                Step::Nothing
            }
            () = tokio::time::sleep_until(started + MENU_TIMEOUT) => {
                match Menu::timed_out(started.elapsed()) {
                    Some(why) => Step::Cancelled(why),
                    None => Step::Nothing,
                }
            }
        };
        match step {
            Step::Nothing => {}
            Step::Moved => {
                if !terminal.write(menu.redraw(width)).await {
                    return Err(Cancel::EndOfInput);
                }
            }
            Step::Chose { index, dropped } => {
                if dropped > 0 {
                    tracing::debug!(dropped, "input typed after Enter in the same read dropped");
                }
                let _ = terminal.write(menu.erase()).await;
                let name = menu.items[index].name.clone();
                tracing::info!(environment = %name, "environment chosen in the menu");
                return Ok(name);
            }
            Step::Cancelled(why) => {
                let _ = terminal.write(menu.erase()).await;
                tracing::info!(?why, "no environment chosen in the menu");
                return Err(why);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use envgate_proto::v1::UserEnvironment;

    use super::*;

    fn item(name: &str, running: bool, is_default: bool) -> MenuItem {
        MenuItem {
            name: name.into(),
            description: format!("{name} shell"),
            running,
            is_default,
        }
    }

    fn menu() -> Menu {
        Menu::new(vec![
            item("busybox", false, true),
            item("debian", true, false),
            item("python", false, false),
        ])
    }

    #[test]
    fn renders_title_rows_marks_and_hint() {
        let menu = menu();
        let lines = menu.lines(80);
        assert_eq!(
            lines,
            [
                "envgate: choose an environment",
                "\x1b[7m> 1. busybox  busybox shell  (default)\x1b[0m",
                "  2. debian   debian shell  (running)",
                "  3. python   python shell",
                "↑/↓ or number, Enter to start, q to quit",
            ]
        );
        assert_eq!(menu.draw(80), lines.join("\r\n").into_bytes());
        // The five lines cleared from the cursor's up.
        let erase = "\r\x1b[2K\x1b[1A\x1b[2K\x1b[1A\x1b[2K\x1b[1A\x1b[2K\x1b[1A\x1b[2K";
        assert_eq!(String::from_utf8(menu.erase()).unwrap(), erase);
        assert!(menu.redraw(80).starts_with(erase.as_bytes()));
        assert!(menu.repaint(80).starts_with(b"\x1b[H\x1b[2J"));
    }

    #[test]
    fn lines_fit_a_narrow_terminal_and_descriptions_cannot_inject_escapes() {
        let mut menu = Menu::new(vec![
            MenuItem {
                name: "evil".into(),
                description: "x\x1b[2Jy".into(),
                running: false,
                is_default: false,
            },
            item("debian", false, false),
        ]);
        assert_eq!(menu.lines(80)[1], "\x1b[7m> 1. evil    x [2Jy\x1b[0m");
        menu.feed(b"j");
        for line in menu.lines(12) {
            let visible = line.replace(HIGHLIGHT, "").replace(PLAIN, "");
            assert!(visible.chars().count() <= 11, "{line:?}");
        }
        assert_eq!(menu.lines(12)[2], "\x1b[7m> 2. debian\x1b[0m");
        // No size reported: 80 columns.
        assert_eq!(menu.lines(0), menu.lines(80));
    }

    #[test]
    fn arrows_in_both_cursor_modes_and_vi_keys_move() {
        let mut menu = menu();
        assert_eq!(menu.selected(), 0, "starts on the default");
        assert_eq!(menu.feed(b"\x1b[B"), Step::Moved);
        assert_eq!(menu.selected(), 1);
        assert_eq!(menu.feed(b"\x1bOB"), Step::Moved);
        assert_eq!(menu.selected(), 2);
        assert_eq!(menu.feed(b"\x1b[B"), Step::Nothing, "stays on the last row");
        assert_eq!(menu.feed(b"\x1bOA"), Step::Moved);
        assert_eq!(menu.feed(b"k"), Step::Moved);
        assert_eq!(menu.selected(), 0);
        assert_eq!(menu.feed(b"k"), Step::Nothing, "stays on the first row");
        assert_eq!(menu.feed(b"j"), Step::Moved);
        // Ctrl-Down (`ESC [ 1 ; 5 B`) is still down; other keys do nothing.
        assert_eq!(menu.feed(b"\x1b[1;5B"), Step::Moved);
        assert_eq!(menu.selected(), 2);
        assert_eq!(menu.feed(b"\x1b[C\x1b[Dx \t"), Step::Nothing);
        assert_eq!(menu.selected(), 2);
    }

    #[test]
    fn escape_sequences_split_across_reads_work() {
        let mut menu = menu();
        assert_eq!(menu.feed(b"\x1b"), Step::Nothing);
        assert_eq!(menu.feed(b"["), Step::Nothing);
        assert_eq!(menu.feed(b"B"), Step::Moved);
        assert_eq!(menu.selected(), 1);
        assert_eq!(menu.feed(b"\x1bO"), Step::Nothing);
        assert_eq!(menu.feed(b"A"), Step::Moved);
        assert_eq!(menu.selected(), 0);
        assert_eq!(menu.feed(b"\x1b[1;"), Step::Nothing);
        assert_eq!(menu.feed(b"5B"), Step::Moved);
        assert_eq!(menu.selected(), 1);
        // A key after a lone ESC counts; the bracket of a sequence does not.
        assert_eq!(menu.feed(b"\x1b"), Step::Nothing);
        assert_eq!(menu.feed(b"j"), Step::Moved);
        assert_eq!(menu.selected(), 2);
        // Ctrl-C inside a broken sequence still cancels.
        assert_eq!(menu.feed(b"\x1b[1\x03"), Step::Cancelled(Cancel::Interrupt));
    }

    #[test]
    fn digits_select_and_enter_confirms() {
        let mut menu = menu();
        assert_eq!(menu.feed(b"2"), Step::Moved);
        assert_eq!(menu.selected(), 1);
        assert_eq!(menu.feed(b"2"), Step::Nothing, "already there");
        assert_eq!(menu.feed(b"9"), Step::Nothing, "no ninth row");
        assert_eq!(menu.feed(b"0"), Step::Nothing);
        assert_eq!(
            menu.feed(b"\r"),
            Step::Chose {
                index: 1,
                dropped: 0
            }
        );
        let mut menu = self::menu();
        assert_eq!(
            menu.feed(b"3\rls\r"),
            Step::Chose {
                index: 2,
                dropped: 3
            }
        );
        let mut menu = self::menu();
        assert_eq!(
            menu.feed(b"\n"),
            Step::Chose {
                index: 0,
                dropped: 0
            },
            "newline is Enter too"
        );
        let mut empty = Menu::new(Vec::new());
        assert_eq!(empty.feed(b"\r"), Step::Nothing);
    }

    #[test]
    fn q_ctrl_c_and_ctrl_d_cancel_with_their_statuses() {
        for (key, why, status) in [
            (&b"q"[..], Cancel::Quit, 1),
            (b"Q", Cancel::Quit, 1),
            (b"\x03", Cancel::Interrupt, 130),
            (b"\x04", Cancel::EndOfInput, 1),
        ] {
            let mut menu = menu();
            assert_eq!(menu.feed(key), Step::Cancelled(why), "{key:?}");
            assert_eq!(why.exit_status(), status);
            assert_eq!(why.line(), "envgate: no environment chosen");
        }
        // The first decisive key wins.
        assert_eq!(menu().feed(b"j\x03\r"), Step::Cancelled(Cancel::Interrupt));
    }

    #[test]
    fn the_timeout_is_a_decision_on_the_time_waited() {
        assert_eq!(Menu::timed_out(Duration::from_secs(119)), None);
        assert_eq!(Menu::timed_out(MENU_TIMEOUT), Some(Cancel::Timeout));
        assert_eq!(
            Cancel::Timeout.line(),
            "envgate: no environment chosen within 120 s"
        );
        assert_eq!(Cancel::Timeout.exit_status(), 1);
    }

    fn environments(names: &[&str], user_default: &str) -> UserEnvironments {
        UserEnvironments {
            environments: names
                .iter()
                .map(|n| UserEnvironment {
                    name: (*n).into(),
                    description: format!("{n} shell"),
                    running: *n == "debian",
                    ..Default::default()
                })
                .collect(),
            user_default: user_default.into(),
            catalogue_default: "busybox".into(),
        }
    }

    #[test]
    fn a_default_or_a_single_environment_needs_no_menu() {
        assert_eq!(
            preselect(&environments(&["busybox", "debian"], "debian")),
            Preselect::Use("debian".into())
        );
        assert_eq!(
            preselect(&environments(&["debian"], "")),
            Preselect::Use("debian".into())
        );
        assert_eq!(
            preselect(&environments(&[], "")),
            Preselect::Use(String::new())
        );
        let Preselect::Ask(menu) = preselect(&environments(&["debian", "busybox"], "")) else {
            panic!("two environments and no default: ask");
        };
        assert_eq!(
            menu.items(),
            [item("debian", true, false), item("busybox", false, true)]
        );
        assert_eq!(menu.selected(), 1, "the highlight starts on the default");
    }

    /// Input from a script, output recorded.
    struct Script {
        input: Mutex<VecDeque<Bytes>>,
        output: Mutex<Vec<u8>>,
        /// After the script: wait (as a user who does nothing) or EOF.
        then_wait: bool,
    }

    impl Script {
        fn new(input: &[&[u8]], then_wait: bool) -> Self {
            Self {
                input: Mutex::new(input.iter().map(|i| Bytes::copy_from_slice(i)).collect()),
                output: Mutex::default(),
                then_wait,
            }
        }

        fn output(&self) -> String {
            String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
        }
    }

    #[async_trait]
    impl MenuTerminal for Script {
        async fn write(&self, bytes: Vec<u8>) -> bool {
            self.output.lock().unwrap().extend(bytes);
            true
        }

        async fn read(&self) -> Option<Bytes> {
            let next = self.input.lock().unwrap().pop_front();
            match next {
                Some(input) => Some(input),
                None if self.then_wait => std::future::pending().await,
                None => None,
            }
        }
    }

    const SIZE: TerminalSize = TerminalSize { cols: 80, rows: 24 };

    #[tokio::test]
    async fn the_driver_draws_moves_and_erases() {
        let script = Script::new(&[b"\x1b", b"[B", b"\r"], false);
        let (_resize, mut resizes) = mpsc::channel(1);
        let chosen = run(menu(), &script, SIZE, &mut resizes).await;
        assert_eq!(chosen, Ok("debian".to_owned()));
        // Exactly: the drawing, one redraw once the split arrow is complete
        // (none for its first half), and the erase after Enter.
        let mut moved = menu();
        assert_eq!(moved.feed(b"\x1b[B"), Step::Moved);
        assert!(moved.lines(80)[2].starts_with("\x1b[7m> 2. debian"));
        let expected = [menu().draw(80), moved.redraw(80), moved.erase()].concat();
        assert_eq!(script.output(), String::from_utf8(expected).unwrap());

        let script = Script::new(&[b"j"], false);
        let result = run(menu(), &script, SIZE, &mut resizes).await;
        assert_eq!(result, Err(Cancel::EndOfInput), "EOF before a choice");
    }

    #[tokio::test]
    async fn a_window_change_repaints_at_the_new_width() {
        let script = Script::new(&[], true);
        let (resize, mut resizes) = mpsc::channel(1);
        resize
            .send(TerminalSize { cols: 12, rows: 10 })
            .await
            .unwrap();
        let run = run(menu(), &script, SIZE, &mut resizes);
        let waited = tokio::time::timeout(Duration::from_millis(200), run).await;
        assert!(waited.is_err(), "still waiting for a key");
        // The first drawing at 80 columns, then a whole repaint at 12.
        let expected = [menu().draw(80), menu().repaint(12)].concat();
        assert_eq!(script.output(), String::from_utf8(expected).unwrap());
        assert!(
            menu()
                .repaint(12)
                .starts_with(b"\x1b[H\x1b[2Jenvgate: ch\r\n")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn nobody_choosing_times_out() {
        let script = Script::new(&[b"j"], true);
        let (_resize, mut resizes) = mpsc::channel(1);
        let started = tokio::time::Instant::now();
        let result = run(menu(), &script, SIZE, &mut resizes).await;
        assert_eq!(result, Err(Cancel::Timeout));
        assert_eq!(started.elapsed(), MENU_TIMEOUT);
        assert!(
            script
                .output()
                .ends_with(&String::from_utf8(menu().erase()).unwrap())
        );
    }
}
