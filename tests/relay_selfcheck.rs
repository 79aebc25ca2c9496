//! Checks the fault relay (tests/common/relay.rs) itself against a small
//! echo server, mode by mode, before the chaos scenarios rely on it.

#[path = "common/relay.rs"]
mod relay;

use relay::Relay;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

/// A server that echoes every byte back, one thread per connection.
fn echo_server(path: &Path) {
    let listener = UnixListener::bind(path).unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            thread::spawn(move || {
                let mut buffer = [0u8; 1024];
                while let Ok(n) = stream.read(&mut buffer) {
                    if n == 0 || stream.write_all(&buffer[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

fn setup() -> (tempfile::TempDir, Relay) {
    let dir = tempfile::tempdir().unwrap();
    let server = dir.path().join("server.sock");
    echo_server(&server);
    let relay = Relay::start(&dir.path().join("relay.sock"), &server);
    (dir, relay)
}

/// Sends `bytes` and reads the echo, waiting at most `limit`.
fn round_trip(stream: &mut UnixStream, bytes: &[u8], limit: Duration) -> std::io::Result<Vec<u8>> {
    stream.set_read_timeout(Some(limit))?;
    stream.write_all(bytes)?;
    let mut answer = vec![0u8; bytes.len()];
    stream.read_exact(&mut answer)?;
    Ok(answer)
}

const PATIENCE: Duration = Duration::from_secs(5);

#[test]
fn pass_forwards_both_ways() {
    let (_dir, relay) = setup();
    let mut client = UnixStream::connect(&relay.path).unwrap();
    assert_eq!(
        round_trip(&mut client, b"hello", PATIENCE).unwrap(),
        b"hello"
    );
    assert_eq!(relay.accepted(), 1);
}

#[test]
fn delay_holds_each_way() {
    let (_dir, mut relay) = setup();
    relay.delay(Duration::from_millis(100));
    let mut client = UnixStream::connect(&relay.path).unwrap();
    let started = Instant::now();
    assert_eq!(round_trip(&mut client, b"slow", PATIENCE).unwrap(), b"slow");
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "a round trip took {:?}: less than the delay both ways",
        started.elapsed()
    );
}

/// Each chunk is held for the delay from when it came, as a network path
/// delays each packet: two chunks sent 50 ms apart arrive 50 ms apart, not
/// one delay apart (held one after another, each waited for the last).
#[test]
fn delay_holds_each_chunk_from_when_it_came() {
    let (_dir, mut relay) = setup();
    let delay = Duration::from_millis(300);
    let apart = Duration::from_millis(50);
    relay.delay(delay);
    let mut client = UnixStream::connect(&relay.path).unwrap();
    client.set_read_timeout(Some(PATIENCE)).unwrap();
    let sent = Instant::now();
    client.write_all(b"first").unwrap();
    thread::sleep(apart);
    client.write_all(b"second").unwrap();
    let mut first = [0u8; 5];
    client.read_exact(&mut first).unwrap();
    let first_back = sent.elapsed();
    let mut second = [0u8; 6];
    client.read_exact(&mut second).unwrap();
    let second_back = sent.elapsed();
    assert_eq!((&first, &second), (b"first", b"second"));
    assert!(first_back >= 2 * delay, "first echo after {first_back:?}");
    assert!(
        second_back - first_back < delay / 2,
        "the second echo came {:?} after the first: it waited for the first's delay",
        second_back - first_back
    );
}

#[test]
fn pause_holds_bytes_until_resume() {
    let (_dir, mut relay) = setup();
    let mut client = UnixStream::connect(&relay.path).unwrap();
    assert_eq!(round_trip(&mut client, b"a", PATIENCE).unwrap(), b"a");
    relay.pause();
    let held = round_trip(&mut client, b"b", Duration::from_millis(200));
    assert!(
        matches!(&held, Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
        "{held:?}"
    );
    relay.resume();
    let mut answer = [0u8; 1];
    client.set_read_timeout(Some(PATIENCE)).unwrap();
    client.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"b");
}

#[test]
fn reset_closes_open_connections() {
    let (_dir, relay) = setup();
    let mut client = UnixStream::connect(&relay.path).unwrap();
    assert_eq!(round_trip(&mut client, b"a", PATIENCE).unwrap(), b"a");
    relay.reset();
    let mut answer = [0u8; 1];
    client.set_read_timeout(Some(PATIENCE)).unwrap();
    assert_eq!(client.read(&mut answer).unwrap(), 0, "EOF after a reset");
    let mut again = UnixStream::connect(&relay.path).unwrap();
    assert_eq!(round_trip(&mut again, b"c", PATIENCE).unwrap(), b"c");
}

#[test]
fn refuse_stops_listening_until_pass() {
    let (_dir, mut relay) = setup();
    relay.refuse();
    let refused = UnixStream::connect(&relay.path);
    assert_eq!(
        refused.map(|_| ()).unwrap_err().kind(),
        ErrorKind::ConnectionRefused
    );
    relay.pass();
    let mut client = UnixStream::connect(&relay.path).unwrap();
    assert_eq!(round_trip(&mut client, b"d", PATIENCE).unwrap(), b"d");
}

#[test]
fn accept_and_close_passes_one_exchange_then_closes_new_connections_only() {
    let (_dir, mut relay) = setup();
    let mut before = UnixStream::connect(&relay.path).unwrap();
    assert_eq!(round_trip(&mut before, b"e", PATIENCE).unwrap(), b"e");
    relay.accept_and_close();
    let mut client = UnixStream::connect(&relay.path).unwrap();
    assert_eq!(round_trip(&mut client, b"x", PATIENCE).unwrap(), b"x");
    let refused = client.write_all(b"y");
    assert_eq!(refused.unwrap_err().kind(), ErrorKind::BrokenPipe);
    let mut answer = [0u8; 1];
    assert_eq!(client.read(&mut answer).unwrap(), 0, "closed");
    assert_eq!(round_trip(&mut before, b"f", PATIENCE).unwrap(), b"f");
}

#[test]
fn blackhole_accepts_and_never_answers() {
    let (_dir, mut relay) = setup();
    let mut before = UnixStream::connect(&relay.path).unwrap();
    assert_eq!(round_trip(&mut before, b"g", PATIENCE).unwrap(), b"g");
    relay.blackhole();
    let mut client = UnixStream::connect(&relay.path).unwrap();
    for stream in [&mut client, &mut before] {
        let silent = round_trip(stream, b"h", Duration::from_millis(300));
        assert!(
            matches!(&silent, Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
            "{silent:?}"
        );
    }
    assert_eq!(relay.accepted(), 2);
}

/// A p11-kit message: a 12-byte header (call code, options length, body
/// length, big-endian) and its body.
fn message(code: u32, body: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend(code.to_be_bytes());
    bytes.extend(0u32.to_be_bytes());
    bytes.extend((body.len() as u32).to_be_bytes());
    bytes.extend(body);
    bytes
}

/// A server that speaks p11-kit's framing: echoes the version byte, then
/// echoes each message once it has all of it, first noting whether the
/// next one had already arrived (bytes readable at once).
fn framed_server(path: &Path, early: std::sync::mpsc::Sender<bool>) {
    let listener = UnixListener::bind(path).unwrap();
    thread::spawn(move || {
        let Ok((mut stream, _)) = listener.accept() else {
            return;
        };
        let mut version = [0u8; 1];
        stream.read_exact(&mut version).unwrap();
        stream.write_all(&version).unwrap();
        loop {
            let mut header = [0u8; 12];
            if stream.read_exact(&mut header).is_err() {
                return;
            }
            let length = u32::from_be_bytes(header[8..12].try_into().unwrap()) as usize;
            let mut body = vec![0u8; length];
            stream.read_exact(&mut body).unwrap();
            let mut peek = [0u8; 1];
            // SAFETY: recv into a live one-byte buffer on our own socket.
            let waiting = unsafe {
                libc::recv(
                    std::os::fd::AsRawFd::as_raw_fd(&stream),
                    peek.as_mut_ptr().cast(),
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            } > 0;
            let _ = early.send(waiting);
            stream.write_all(&header).unwrap();
            stream.write_all(&body).unwrap();
        }
    });
}

#[test]
fn one_at_a_time_sends_a_request_only_after_the_last_answer() {
    let dir = tempfile::tempdir().unwrap();
    let server = dir.path().join("server.sock");
    let (early, noted) = std::sync::mpsc::channel();
    framed_server(&server, early);
    let mut relay = Relay::start(&dir.path().join("relay.sock"), &server);
    relay.set(relay::Mode::OneAtATime(Duration::from_millis(5)));
    let mut client = UnixStream::connect(&relay.path).unwrap();
    let mut pipelined = vec![0u8];
    pipelined.extend(message(1, b"first request"));
    pipelined.extend(message(2, b"second"));
    pipelined.extend(message(3, b""));
    assert_eq!(
        round_trip(&mut client, &pipelined, PATIENCE).unwrap(),
        pipelined,
        "every request answered, in order"
    );
    let seen: Vec<bool> = noted.try_iter().collect();
    assert_eq!(
        seen,
        [false, false, false],
        "no request reached the server before the answer to the last"
    );
}
