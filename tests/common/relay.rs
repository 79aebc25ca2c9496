//! A fault relay: a unix-socket proxy between a client (p11-kit's client
//! module) and a server (`p11-kit server`), driven from the test thread to
//! inject the faults a network path has -- delay, a stall, a reset, a
//! refused connection, a peer that accepts and closes, and a black hole
//! that accepts and never answers -- or to make the member behind it one
//! of limited capacity (one request at a time per connection).
//! Include with `#[path = "common/relay.rs"] mod relay;`.
//!
//! Owns: the listening socket at its path, one thread accepting, and two
//! pump threads per connection. Must never: outlive its test (dropping it
//! closes every connection and stops every thread it started), or touch
//! the server's socket other than by connecting to it.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// How often a thread blocked on a socket looks at the relay's mode again.
const RECHECK: Duration = Duration::from_millis(20);

/// What the relay does with connections and the bytes on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forwards both ways at once.
    Pass,
    /// Forwards both ways, each chunk held this long from when it came
    /// (one way), as a network path's latency.
    Delay(Duration),
    /// A member of limited capacity: each connection is served one
    /// p11-kit request at a time, each held this long before it is
    /// forwarded; the next request goes on only once the server's answer
    /// to the last one has gone back.
    OneAtATime(Duration),
    /// Accepts, and holds every byte until the mode changes; then
    /// forwards what it held.
    Paused,
    /// Accepts each new connection, lets its first exchange through (a
    /// protocol's greeting) and closes it: reading first, so that the
    /// client's next write is sure to find it closed (`EPIPE`, and
    /// `SIGPIPE` where not blocked). Connections made before are left
    /// alone.
    AcceptAndClose,
    /// Accepts and never answers: new connections are never connected
    /// upstream, bytes on every connection are swallowed.
    Blackhole,
    /// Not listening: connecting is refused. Connections made before are
    /// left alone.
    Refuse,
}

struct State {
    mode: Mode,
    stopped: bool,
    /// Both ends of every connection made since the last reset, to reset
    /// them.
    connections: Vec<(UnixStream, Option<UnixStream>)>,
    accepted: usize,
    /// Chunks swallowed on connections made before a black hole.
    swallowed: usize,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mode(&self) -> Mode {
        self.state().mode
    }

    fn stopped(&self) -> bool {
        self.state().stopped
    }

    /// Waits while the relay is paused; false if it stopped.
    fn wait_while_paused(&self) -> bool {
        let mut state = self.state();
        while state.mode == Mode::Paused && !state.stopped {
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        !state.stopped
    }
}

/// A relay listening at `path` and forwarding to `upstream`.
pub struct Relay {
    pub path: PathBuf,
    upstream: PathBuf,
    shared: Arc<Shared>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl Relay {
    /// Listens at `path` (which must not exist), forwarding to the server
    /// socket `upstream`, in [`Mode::Pass`].
    pub fn start(path: &Path, upstream: &Path) -> Relay {
        assert!(!path.exists(), "{} already exists", path.display());
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                mode: Mode::Pass,
                stopped: false,
                connections: Vec::new(),
                accepted: 0,
                swallowed: 0,
            }),
            changed: Condvar::new(),
        });
        let mut relay = Relay {
            path: path.to_path_buf(),
            upstream: upstream.to_path_buf(),
            shared,
            acceptor: None,
        };
        relay.listen();
        relay
    }

    /// The value for `P11_KIT_SERVER_ADDRESS` that goes through the relay.
    pub fn address(&self) -> String {
        format!("unix:path={}", self.path.display())
    }

    fn listen(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let listener = UnixListener::bind(&self.path)
            .unwrap_or_else(|e| panic!("relay cannot listen at {}: {e}", self.path.display()));
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let (shared, upstream) = (Arc::clone(&self.shared), self.upstream.clone());
        self.acceptor = Some(
            thread::Builder::new()
                .name("relay-accept".into())
                .spawn(move || accept_loop(listener, upstream, shared))
                .expect("start the relay's accept thread"),
        );
    }

    /// Changes the mode. Leaving [`Mode::Refuse`] listens again; entering
    /// it stops listening (the socket file stays, so connecting is
    /// refused rather than "no such file").
    pub fn set(&mut self, mode: Mode) {
        let before = {
            let mut state = self.shared.state();
            std::mem::replace(&mut state.mode, mode)
        };
        self.shared.changed.notify_all();
        match (before == Mode::Refuse, mode == Mode::Refuse) {
            (false, true) => {
                if let Some(acceptor) = self.acceptor.take() {
                    acceptor.join().expect("the relay's accept thread");
                }
            }
            (true, false) => self.listen(),
            _ => {}
        }
    }

    pub fn pass(&mut self) {
        self.set(Mode::Pass);
    }

    /// Holds each chunk `delay` from when it came before forwarding it
    /// (each way).
    pub fn delay(&mut self, delay: Duration) {
        self.set(Mode::Delay(delay));
    }

    pub fn pause(&mut self) {
        self.set(Mode::Paused);
    }

    /// Forwards again, what was held first.
    pub fn resume(&mut self) {
        self.set(Mode::Pass);
    }

    pub fn refuse(&mut self) {
        self.set(Mode::Refuse);
    }

    pub fn accept_and_close(&mut self) {
        self.set(Mode::AcceptAndClose);
    }

    pub fn blackhole(&mut self) {
        self.set(Mode::Blackhole);
    }

    /// Closes every open connection, both ends, as a network reset does;
    /// the mode stays.
    pub fn reset(&self) {
        let connections = std::mem::take(&mut self.shared.state().connections);
        for (client, server) in connections {
            let _ = client.shutdown(Shutdown::Both);
            if let Some(server) = server {
                let _ = server.shutdown(Shutdown::Both);
            }
        }
        self.shared.changed.notify_all();
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.state().accepted
    }

    /// Chunks a black hole swallowed so far on connections made before it
    /// (either way): what tells a test that a request went into it.
    pub fn swallowed(&self) -> usize {
        self.shared.state().swallowed
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.state().stopped = true;
        self.reset();
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Accepts until the relay stops or refuses; then the listener is closed.
fn accept_loop(listener: UnixListener, upstream: PathBuf, shared: Arc<Shared>) {
    loop {
        {
            let state = shared.state();
            if state.stopped || state.mode == Mode::Refuse {
                return;
            }
        }
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                // Nothing to accept: wait for a mode change or the next look.
                let state = shared.state();
                let _ = shared.changed.wait_timeout(state, RECHECK);
                continue;
            }
            Err(e) => panic!("relay accept: {e}"),
        };
        client
            .set_nonblocking(false)
            .expect("blocking client socket");
        let mode = {
            let mut state = shared.state();
            state.accepted += 1;
            state.mode
        };
        match mode {
            Mode::AcceptAndClose => greet_and_close(client, &upstream),
            Mode::Blackhole => swallow(client, shared.clone()),
            _ => match UnixStream::connect(&upstream) {
                Ok(server) => connect(client, server, shared.clone()),
                // The server is gone: the client sees its connection close.
                Err(_) => {
                    let _ = client.shutdown(Shutdown::Both);
                }
            },
        }
    }
}

/// Passes one chunk each way, then closes; see [`Mode::AcceptAndClose`].
fn greet_and_close(mut client: UnixStream, upstream: &Path) {
    let mut exchange = || -> std::io::Result<()> {
        let mut server = UnixStream::connect(upstream)?;
        let mut buffer = vec![0u8; 64 * 1024];
        let n = client.read(&mut buffer)?;
        server.write_all(&buffer[..n])?;
        let n = server.read(&mut buffer)?;
        client.shutdown(Shutdown::Read)?;
        client.write_all(&buffer[..n])
    };
    let _ = exchange();
    let _ = client.shutdown(Shutdown::Both);
}

/// Keeps a connection open and reads whatever comes, answering nothing.
fn swallow(client: UnixStream, shared: Arc<Shared>) {
    let kept = client.try_clone().expect("clone a client socket");
    shared.state().connections.push((kept, None));
    thread::spawn(move || {
        let mut client = client;
        let mut sink = [0u8; 4096];
        while let Ok(n) = client.read(&mut sink) {
            if n == 0 || shared.stopped() {
                break;
            }
        }
    });
}

fn connect(client: UnixStream, server: UnixStream, shared: Arc<Shared>) {
    let clone = |s: &UnixStream| s.try_clone().expect("clone a relay socket");
    shared
        .state()
        .connections
        .push((clone(&client), Some(clone(&server))));
    let (c, s, sh) = (clone(&client), clone(&server), Arc::clone(&shared));
    let turnstile = Arc::new(Turnstile::default());
    let requests = Side::Requests(Arc::clone(&turnstile));
    thread::spawn(move || pump(c, s, sh, requests));
    thread::spawn(move || {
        pump(
            server,
            client,
            shared,
            Side::Answers(Arc::clone(&turnstile)),
        );
        turnstile.close();
    });
}

/// Counts the answers of one connection that have gone back to the
/// client, for [`Mode::OneAtATime`].
#[derive(Default)]
struct Turnstile {
    /// Answers gone back, and whether the server's side has closed.
    answered: Mutex<(u64, bool)>,
    changed: Condvar,
}

impl Turnstile {
    fn answer(&self) {
        self.answered.lock().unwrap_or_else(|p| p.into_inner()).0 += 1;
        self.changed.notify_all();
    }

    fn close(&self) {
        self.answered.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.changed.notify_all();
    }

    /// Waits until `sent` answers have gone back; false if the connection
    /// closed or the relay stopped first.
    fn wait_for(&self, sent: u64, shared: &Shared) -> bool {
        let mut answered = self.answered.lock().unwrap_or_else(|p| p.into_inner());
        while answered.0 < sent {
            if answered.1 || shared.stopped() {
                return false;
            }
            answered = self
                .changed
                .wait_timeout(answered, RECHECK)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

/// Where the p11-kit messages in a byte stream end: a version byte first,
/// then messages of a 12-byte header (call code, options length, body
/// length, big-endian) and that many bytes.
#[derive(Default)]
struct Framer {
    version_seen: bool,
    header: [u8; 12],
    header_len: usize,
    remaining: u64,
}

impl Framer {
    /// How many bytes of `data` reach the end of the first message that
    /// ends in it; `None` if none does (all of `data` is taken).
    fn message_end(&mut self, data: &[u8]) -> Option<usize> {
        if !self.version_seen && !data.is_empty() {
            self.version_seen = true;
            return Some(1);
        }
        let mut taken = 0;
        while taken < data.len() {
            if self.header_len < 12 {
                let n = (12 - self.header_len).min(data.len() - taken);
                self.header[self.header_len..self.header_len + n]
                    .copy_from_slice(&data[taken..taken + n]);
                self.header_len += n;
                taken += n;
                if self.header_len < 12 {
                    continue;
                }
                let length = |at: usize| {
                    u64::from(u32::from_be_bytes(
                        self.header[at..at + 4].try_into().unwrap(),
                    ))
                };
                self.remaining = length(4) + length(8);
            }
            let n = self.remaining.min((data.len() - taken) as u64);
            self.remaining -= n;
            taken += n as usize;
            if self.remaining == 0 {
                self.header_len = 0;
                return Some(taken);
            }
        }
        None
    }
}

/// Which way a pump moves a connection's messages.
enum Side {
    Requests(Arc<Turnstile>),
    Answers(Arc<Turnstile>),
}

/// Part of a chunk a pump read, on its way: due when it is to be written,
/// and whether it ends an answer (for [`Mode::OneAtATime`]).
struct Segment {
    due: Instant,
    bytes: Vec<u8>,
    ends_answer: bool,
}

/// Writes what a pump hands it, each segment at its due time, in order:
/// under [`Mode::Delay`] every chunk is held for the delay from when it
/// came, as a network path delays each packet, not after the chunk before
/// it (p11-kit's client writes a request in three writes; held one after
/// another, a 1 ms path cost 2-3 ms one way). Waits while the relay is
/// paused. On a failed write it closes both ends, which ends the pump.
fn deliver(
    segments: mpsc::Receiver<Segment>,
    (mut to, from): (UnixStream, UnixStream),
    queued: Arc<AtomicUsize>,
    shared: Arc<Shared>,
    answers: Option<Arc<Turnstile>>,
) {
    let mut broken = false;
    for segment in segments {
        if !broken {
            thread::sleep(segment.due.saturating_duration_since(Instant::now()));
            broken = !shared.wait_while_paused() || to.write_all(&segment.bytes).is_err();
            if broken {
                let _ = from.shutdown(Shutdown::Both);
                let _ = to.shutdown(Shutdown::Both);
            } else if segment.ends_answer {
                if let Some(turnstile) = &answers {
                    turnstile.answer();
                }
            }
        }
        queued.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Moves bytes from `from` to `to` as the mode says, until either end
/// closes; then closes both. What is delayed, or queued behind what is,
/// goes through a [`deliver`] thread; the rest is written here, at once.
fn pump(mut from: UnixStream, mut to: UnixStream, shared: Arc<Shared>, side: Side) {
    let clone = |s: &UnixStream| s.try_clone().expect("clone a relay socket");
    let queued = Arc::new(AtomicUsize::new(0));
    let (queue, segments) = mpsc::channel();
    let answers = match &side {
        Side::Answers(turnstile) => Some(Arc::clone(turnstile)),
        Side::Requests(_) => None,
    };
    let delivery = {
        let (ends, queued, shared) = ((clone(&to), clone(&from)), queued.clone(), shared.clone());
        thread::spawn(move || deliver(segments, ends, queued, shared, answers))
    };
    let mut buffer = vec![0u8; 64 * 1024];
    let mut framer = Framer::default();
    let mut sent = 0;
    'chunks: loop {
        let n = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let came = Instant::now();
        if !shared.wait_while_paused() {
            break;
        }
        let mode = shared.mode();
        let due = match mode {
            Mode::Blackhole => {
                shared.state().swallowed += 1;
                continue;
            }
            Mode::Delay(delay) => Some(came + delay),
            _ => None,
        };
        let mut rest = &buffer[..n];
        while !rest.is_empty() {
            let end = framer.message_end(rest);
            let (segment, tail) = rest.split_at(end.unwrap_or(rest.len()));
            rest = tail;
            let one_at_a_time = match (mode, &side, end) {
                (Mode::OneAtATime(service), Side::Requests(_), Some(_)) => {
                    thread::sleep(service);
                    true
                }
                _ => false,
            };
            let ends_answer = matches!((&side, end), (Side::Answers(_), Some(_)));
            if due.is_some() || queued.load(Ordering::Acquire) > 0 {
                queued.fetch_add(1, Ordering::AcqRel);
                let segment = Segment {
                    due: due.unwrap_or(came),
                    bytes: segment.to_vec(),
                    ends_answer,
                };
                if queue.send(segment).is_err() {
                    break 'chunks;
                }
            } else {
                if to.write_all(segment).is_err() {
                    break 'chunks;
                }
                if let (true, Side::Answers(turnstile)) = (ends_answer, &side) {
                    turnstile.answer();
                }
            }
            if let (Side::Requests(turnstile), Some(_)) = (&side, end) {
                sent += 1;
                if one_at_a_time && !turnstile.wait_for(sent, &shared) {
                    break 'chunks;
                }
            }
        }
    }
    // What is on its way still arrives (a closed connection's last bytes
    // do), then both ends close.
    drop(queue);
    let _ = delivery.join();
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
