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
