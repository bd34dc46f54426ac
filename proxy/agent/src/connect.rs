//! `envgate-agent connect HOST PORT`: one forwarded TCP connection (`ssh -L`, `-D`, `-W`),
//! and `connect-unix PATH`, one forwarded Unix-socket connection (`ssh -L port:/path`),
//! opened from inside the container, as the session's user, so `127.0.0.1` is the
//! container's own loopback and the container's network rules apply to it like to anything
//! else the user runs. Once connected it writes one 0 byte on stdout (the proxy accepts the
//! SSH channel then), and copies stdin to the socket and the socket to stdout until both
//! ends are done. A failure is one line on stderr and exit status 1 (the proxy refuses the
//! channel with it).

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// How long a connection attempt may take (a firewalled address drops, never refuses).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The addresses for `host`: IP literals and `localhost` directly (the static binary has no
/// NSS modules), other names through the resolver when it works.
fn addresses(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(vec![SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)]);
    }
    (host, port)
        .to_socket_addrs()
        .map(Vec::from_iter)
        .map_err(|e| format!("cannot resolve {host}: {e}"))
}

fn reason(e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::WouldBlock {
        return format!("no answer within {} s", CONNECT_TIMEOUT.as_secs());
    }
    let text = e.to_string();
    match text.find(" (os error") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

fn connect(host: &str, port: &str) -> Result<TcpStream, String> {
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("bad port {port:?}"))?;
    let mut last = format!("{host} has no address");
    for address in addresses(host, port)? {
        match TcpStream::connect_timeout(&address, CONNECT_TIMEOUT) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = format!("{host}:{port}: {}", reason(&e)),
        }
    }
    Err(last)
}

/// A connected stream of either kind, as the relay needs it.
trait Connected: Read + Write + Send + Sized + 'static {
    fn split(&self) -> io::Result<Self>;
    fn close_write(&self);
}

impl Connected for TcpStream {
    fn split(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn close_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

impl Connected for UnixStream {
    fn split(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn close_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

/// Runs as `connect` with `args` (`HOST PORT`); returns the exit status.
pub fn main(args: &[String]) -> i32 {
    let [host, port] = args else {
        eprintln!("usage: envgate-agent connect HOST PORT");
        return 2;
    };
    match connect(host, port) {
        Ok(stream) => relay(stream),
        Err(message) => {
            eprintln!("{message}");
            1
        }
    }
}

/// Runs as `connect-unix` with `args` (`PATH`): `ssh -L` to a Unix socket in the container.
pub fn main_unix(args: &[String]) -> i32 {
    let [path] = args else {
        eprintln!("usage: envgate-agent connect-unix PATH");
        return 2;
    };
    match UnixStream::connect(path) {
        Ok(stream) => relay(stream),
        Err(e) => {
            eprintln!("{path}: {}", reason(&e));
            1
        }
    }
}

/// Says "connected" (one 0 byte), then copies both ways until the socket's side ends.
fn relay<S: Connected>(stream: S) -> i32 {
    let mut stdout = io::stdout().lock();
    if stdout
        .write_all(&[0])
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return 1;
    }
    let Ok(mut to_socket) = stream.split() else {
        return 1;
    };
    // stdin → socket on its own thread; its end is the socket's write side closing.
    std::thread::spawn(move || {
        let mut stdin = io::stdin().lock();
        let _ = io::copy(&mut stdin, &mut to_socket);
        to_socket.close_write();
    });
    let mut from_socket = stream;
    let mut buf = vec![0; 64 * 1024];
    loop {
        match from_socket.read(&mut buf) {
            Ok(0) | Err(_) => return 0,
            Ok(n) => {
                if stdout
                    .write_all(&buf[..n])
                    .and_then(|()| stdout.flush())
                    .is_err()
                {
                    return 0;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_and_localhost_need_no_resolver() {
        assert_eq!(
            addresses("127.0.0.1", 80).unwrap(),
            ["127.0.0.1:80".parse().unwrap()]
        );
        assert_eq!(
            addresses("[::1]", 80).unwrap(),
            ["[::1]:80".parse().unwrap()]
        );
        assert_eq!(
            addresses("LocalHost", 8888).unwrap(),
            ["127.0.0.1:8888".parse().unwrap()]
        );
    }

    #[test]
    fn failures_are_one_line_naming_the_target() {
        assert_eq!(connect("127.0.0.1", "0").unwrap_err(), "bad port \"0\"");
        assert_eq!(
            connect("127.0.0.1", "http").unwrap_err(),
            "bad port \"http\""
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        assert_eq!(
            connect("127.0.0.1", &port.to_string()).unwrap_err(),
            format!("127.0.0.1:{port}: Connection refused")
        );
    }
}
