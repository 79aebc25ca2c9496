use super::*;

/// A list read by the two-call convention from a library that answers
/// as `answers` says: each answer is (count reported for NULL, count
/// reported for a buffer, what the buffer call returns).
fn read_with(answers: &[(CK_ULONG, CK_ULONG, CK_RV)]) -> (Result<Vec<CK_ULONG>>, usize) {
    let mut calls = 0;
    let mut round = 0;
    let result = read_list(|list, count| {
        calls += 1;
        let (length, filled, rv) = answers[round.min(answers.len() - 1)];
        if list.is_null() {
            *count = length;
            return CKR_OK;
        }
        round += 1;
        if rv == CKR_OK {
            // SAFETY: read_list gave a buffer of the length it was told.
            let slots = unsafe { std::slice::from_raw_parts_mut(list, filled as usize) };
            slots
                .iter_mut()
                .enumerate()
                .for_each(|(i, s)| *s = i as CK_ULONG + 1);
        }
        *count = filled;
        rv
    });
    (result, calls)
}

/// p11-kit's client answers a buffer of length 0 with
/// CKR_BUFFER_TOO_SMALL and a count of 0: an empty list takes one call,
/// not a loop (recovery asked a restarted server 500 times a second).
#[test]
fn an_empty_list_takes_one_call() {
    let (list, calls) = read_with(&[(0, 0, CKR_BUFFER_TOO_SMALL)]);
    assert_eq!(list.expect("an empty list"), Vec::<CK_ULONG>::new());
    assert_eq!(calls, 1);
}

#[test]
fn a_list_that_grew_between_the_calls_is_read_again() {
    let (list, calls) = read_with(&[(1, 2, CKR_BUFFER_TOO_SMALL), (2, 2, CKR_OK)]);
    assert_eq!(list.expect("the grown list"), vec![1, 2]);
    assert_eq!(calls, 4);
}

/// A library that always says the list grew gets an error after
/// [`LIST_READS`] rounds instead of keeping its caller forever.
#[test]
fn a_list_that_never_stops_growing_is_an_error() {
    let (list, calls) = read_with(&[(1, 2, CKR_BUFFER_TOO_SMALL)]);
    assert_eq!(
        list.expect_err("a list never read").rv,
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(calls, 2 * LIST_READS);
}

/// The classification table, by the answers each row holds.
#[test]
fn each_answer_is_classified_once_for_the_whole_library() {
    let rows: &[(&str, &[CK_RV], Answer)] = &[
        ("served", &[CKR_OK], Answer::Served),
        (
            "the member is down",
            &[
                CKR_DEVICE_ERROR,
                CKR_DEVICE_REMOVED,
                CKR_DEVICE_MEMORY,
                CKR_TOKEN_NOT_PRESENT,
                CKR_TOKEN_NOT_RECOGNIZED,
                CKR_SESSION_CLOSED,
                CKR_SESSION_HANDLE_INVALID,
                CKR_CRYPTOKI_NOT_INITIALIZED,
                luna::CKR_UNABLE_TO_CONNECT,
                luna::CKR_TIMEOUT,
                luna::CKR_DEVICE_TIMEOUT,
                luna::CKR_PARTITION_DISABLED,
                luna::CKR_CONTAINER_HANDLE_INVALID,
                luna::CKR_HSM_TAMPERED,
                0x8000_0045,
                0x8000_0050,
                0x8000_0066,
            ],
            Answer::Down,
        ),
        ("busy", &[luna::CKR_AGAIN, luna::CKR_BUSY], Answer::Busy),
        (
            "the login may be lost",
            &[
                CKR_USER_NOT_LOGGED_IN,
                CKR_OBJECT_HANDLE_INVALID,
                CKR_KEY_HANDLE_INVALID,
            ],
            Answer::LoginLost,
        ),
        (
            "the request's own answer",
            &[
                CKR_ARGUMENTS_BAD,
                CKR_PIN_INCORRECT,
                CKR_MECHANISM_INVALID,
                CKR_MECHANISM_PARAM_INVALID,
                CKR_ATTRIBUTE_VALUE_INVALID,
                CKR_BUFFER_TOO_SMALL,
                CKR_OPERATION_NOT_INITIALIZED,
                CKR_FUNCTION_NOT_SUPPORTED,
                CKR_GENERAL_ERROR,
                luna::CKR_OPERATION_NOT_ALLOWED,
                luna::CKR_OBJECT_ALREADY_EXISTS,
                luna::CKR_KEY_EXTRACTABLE,
                luna::CKR_HSM_STORAGE_FULL,
                luna::CKR_FAILED_TO_CLONE_AN_OBJECT,
                luna::CKR_CLONE_NOT_ATTEMPTED,
                0x8000_0044,
                0x8000_0067,
            ],
            Answer::Request,
        ),
    ];
    for (what, answers, expected) in rows {
        for &rv in *answers {
            let answer = classify("C_Sign", rv);
            assert_eq!(answer, *expected, "{what}: {}", rv_name(rv));
            assert_eq!(
                answer.is_member_fault(),
                matches!(expected, Answer::Down | Answer::Busy),
                "{what}: {}",
                rv_name(rv)
            );
        }
    }
}

#[test]
fn closing_a_session_the_member_no_longer_has_is_no_member_fault() {
    for rv in [CKR_SESSION_HANDLE_INVALID, CKR_SESSION_CLOSED] {
        assert_eq!(classify("C_CloseSession", rv), Answer::Request);
        assert_eq!(classify("C_SignInit", rv), Answer::Down);
    }
    assert_eq!(classify("C_CloseSession", CKR_DEVICE_ERROR), Answer::Down);
}

/// `CKR_GENERAL_ERROR` is a request's own answer, but a login answering it
/// through every retry (`group::log_in_member`) cannot be served there.
#[test]
fn a_login_failing_with_a_general_error_is_a_member_fault() {
    assert_eq!(classify("C_Login", CKR_GENERAL_ERROR), Answer::Down);
    assert_eq!(classify("C_Login", CKR_PIN_INCORRECT), Answer::Request);
    assert_eq!(classify("C_Sign", CKR_GENERAL_ERROR), Answer::Request);
}

/// Reconnecting cuts off the calls on the old connection's wire first: a
/// call blocked on a server that answers nothing (a black-holed path)
/// returns, its socket shut down, and knows it was cut off -- its request
/// may still be carried out when the path answers again, so an object it
/// made stays in doubt as long as after the watchdog's cut
/// (`Doubt::CutOff`), not merely as after a fault.
#[test]
fn a_reconnect_cuts_off_the_calls_on_the_old_connections_wire() {
    use std::os::fd::AsRawFd;
    use std::time::Duration;
    let (_dir, server, library, connection, _silent_peer) = client_with_a_silent_connection();
    let (tid, done) = call_reading(&library, connection.as_raw_fd());
    wait_blocked(&tid, connection.as_raw_fd());
    // The server is gone by the reconnect: its new connection is refused
    // at once, instead of waiting on a listener that never answers, and
    // p11-kit's client initialises with no slot.
    drop(server);
    library
        .reinitialize()
        .expect("initialised again, serverless");
    assert_eq!(library.slot_list(CK_FALSE).map_err(|e| e.rv), Ok(vec![]));
    assert_eq!(
        done.recv_timeout(Duration::from_secs(30)),
        Ok((0, true)),
        "the call on the old wire returns, cut off"
    );
}

/// After the application's `C_Finalize` a recovery thread left running
/// may still try to reconnect: the library is not initialised again
/// (SoftHSM, in this process, would stay initialised behind the
/// application's back and refuse its next user's `C_Initialize`).
#[test]
fn a_retired_library_is_not_initialised_again_by_recovery() {
    let library = MemberLibrary::load("softhsm", Path::new("/usr/lib/softhsm/libsofthsm2.so"), &[])
        .expect("SoftHSM loads");
    library.retire();
    let refused = library
        .reinitialize()
        .expect_err("reconnecting a retired library");
    assert_eq!(refused.rv, CKR_CRYPTOKI_NOT_INITIALIZED);
    assert!(!library.usable() && !library.initialized_by_us());
}

/// A job that is past its deadline and waits on a lock (no socket to
/// cut then), and then on a socket that never answers, returns once
/// the next job is asked for: the socket is cut then.
#[test]
fn a_job_stuck_on_a_socket_after_its_deadline_is_cut_when_the_next_is_asked_for() {
    use std::io::Read;
    use std::time::Duration;
    let library = Arc::new(
        MemberLibrary::load("softhsm", Path::new("/usr/lib/softhsm/libsofthsm2.so"), &[])
            .expect("SoftHSM loads"),
    );
    let (mut socket, _silent_peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let (go_on, waiting) = mpsc::channel::<()>();
    let job = library
        .start_bounded(move |_| {
            let _ = waiting.recv();
            let mut byte = [0u8; 1];
            socket.read(&mut byte).ok()
        })
        .expect("no job is under way");
    assert!(
        job.finish(crate::clock::now(), Duration::ZERO).is_err(),
        "the job waits on the channel past its deadline"
    );
    go_on.send(()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let tid = library.job_thread.load(Ordering::Acquire);
        if tid > 0 && blocked_socket(tid).is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "the job never read its socket");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        library.start_bounded(|_| ()).is_none(),
        "the stuck job is still under way"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while library.job_running() {
        assert!(
            Instant::now() < deadline,
            "the job still waits on its socket: it was not cut"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let next = library
        .start_bounded(|_| 7)
        .expect("the library takes a job again");
    assert_eq!(
        next.finish(
            Instant::now() + Duration::from_secs(30),
            Duration::from_secs(30)
        )
        .ok(),
        Some(7)
    );
}

/// Polls until thread `tid` is blocked on `fd`, for at most 30 s.
fn wait_blocked(tid: &mpsc::Receiver<i32>, fd: i32) -> i32 {
    use std::time::Duration;
    let tid = tid
        .recv_timeout(Duration::from_secs(30))
        .expect("the thread started");
    let deadline = Instant::now() + Duration::from_secs(30);
    while blocked_socket(tid) != Some(fd) {
        assert!(
            Instant::now() < deadline,
            "thread {tid} never blocked on {fd}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    tid
}

/// p11-kit's client, as member "own", set to reach the server at `socket`.
fn p11_kit_client(socket: &Path) -> MemberLibrary {
    MemberLibrary::load(
        "own",
        Path::new("/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"),
        &[(
            "P11_KIT_SERVER_ADDRESS".to_string(),
            format!("unix:path={}", socket.display()),
        )],
    )
    .expect("p11-kit's client loads")
}

/// p11-kit's client set to reach a listener of the test's own (in a
/// directory that lives as long as the first value), and a connection
/// made to that listener with its peer, which answers nothing: the
/// connection a call of the library is made to wait on.
fn client_with_a_silent_connection() -> (
    tempfile::TempDir,
    std::os::unix::net::UnixListener,
    Arc<MemberLibrary>,
    std::os::unix::net::UnixStream,
    std::os::unix::net::UnixStream,
) {
    use std::os::unix::net::{UnixListener, UnixStream};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.sock");
    let server = UnixListener::bind(&path).unwrap();
    let library = Arc::new(p11_kit_client(&path));
    let connection = UnixStream::connect(&path).unwrap();
    let (peer, _) = server.accept().unwrap();
    (dir, server, library, connection, peer)
}

/// A call on the library's wire, in a thread of its own, reading one
/// byte from descriptor `fd`; sends its thread id, then the read's
/// result and whether the call knows it was cut off
/// ([`last_call_cut_off`]).
fn call_reading(
    library: &Arc<MemberLibrary>,
    fd: i32,
) -> (mpsc::Receiver<i32>, mpsc::Receiver<(isize, bool)>) {
    let (tid, tid_known) = mpsc::channel();
    let (read, done) = mpsc::channel();
    let library = Arc::clone(library);
    std::thread::spawn(move || {
        tid.send(this_thread()).unwrap();
        let mut got = 0;
        library.on_wire("C_GetSlotList", &mut || {
            let mut byte = 0u8;
            // SAFETY: a read of one byte into a live local.
            got = unsafe { libc::read(fd, &mut byte as *mut u8 as *mut _, 1) };
            CKR_OK
        });
        let _ = read.send((got, last_call_cut_off()));
    });
    (tid_known, done)
}

/// A cut shuts down the library's own socket, and never another
/// member's at a reused number. A thread of ours blocked on a socket
/// whose number was closed under it (by a `C_Finalize` that did not
/// wait for it) and taken by another connection (made so here with
/// `dup2`: the next socket opened anywhere in the process takes it)
/// still reads its own socket, but `/proc` names the number: the cut
/// found that number and would shut down the other member's connection
/// (the suspected cause of a total outage in an issue 12 soak run).
#[test]
fn a_cut_shuts_down_the_librarys_own_socket_never_another_at_a_reused_number() {
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, IntoRawFd};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let (own_path, other_path) = (dir.path().join("own.sock"), dir.path().join("other.sock"));
    let own_server = UnixListener::bind(&own_path).unwrap();
    let other_server = UnixListener::bind(&other_path).unwrap();
    let library = Arc::new(p11_kit_client(&own_path));
    assert!(library.is_networked());

    let own = UnixStream::connect(&own_path).unwrap();
    let _own_peer = own_server.accept().unwrap();
    let (tid, done) = call_reading(&library, own.as_raw_fd());
    wait_blocked(&tid, own.as_raw_fd());
    assert_eq!(library.sever(), 1, "the library's own socket is cut");
    assert_eq!(
        done.recv_timeout(Duration::from_secs(30)),
        Ok((0, true)),
        "the cut call returns, its socket shut down"
    );

    let stale = UnixStream::connect(&own_path).unwrap().into_raw_fd();
    let (stale_peer, _) = own_server.accept().unwrap();
    let (tid, done) = call_reading(&library, stale);
    wait_blocked(&tid, stale);
    let mut other = UnixStream::connect(&other_path).unwrap();
    let (mut other_peer, _) = other_server.accept().unwrap();
    // SAFETY: `stale` is ours; the thread's read keeps its socket.
    assert_eq!(unsafe { libc::dup2(other.as_raw_fd(), stale) }, stale);
    assert_eq!(library.sever(), 0, "no socket of the library to cut");
    other
        .write_all(b"x")
        .expect("the other connection still sends");
    other_peer.write_all(b"y").unwrap();
    let mut byte = [0u8; 2];
    other_peer.read_exact(&mut byte[..1]).unwrap();
    other
        .read_exact(&mut byte[1..])
        .expect("and still receives");
    assert_eq!(&byte, b"xy");
    drop(stale_peer);
    assert_eq!(done.recv_timeout(Duration::from_secs(30)), Ok((0, true)));
    // SAFETY: the copy of `other` made at `stale`, no longer read.
    unsafe { libc::close(stale) };
}

/// A reconnect never finalises the library under a call of ours: one
/// cut off while it was not yet waiting on its socket (the cut found
/// none) and waiting there now is cut again, and the library is
/// finalised after it returned, however long ago the first cut was.
/// (A reconnect used to go ahead a second after the cut: its
/// `C_Finalize` freed the socket's number under the call.)
#[test]
fn a_reconnect_waits_for_a_call_cut_off_before_it_reached_its_socket() {
    use std::os::fd::AsRawFd;
    use std::time::Duration;
    let (_dir, _server, library, socket, _peer) = client_with_a_silent_connection();
    let fd = socket.as_raw_fd();
    let (go_on, waiting) = mpsc::channel::<()>();
    let (tid, tid_known) = mpsc::channel();
    let (returned, call_done) = mpsc::channel();
    let caller = Arc::clone(&library);
    std::thread::spawn(move || {
        tid.send(this_thread()).unwrap();
        let rv = caller.shielded("C_GetSlotList", || {
            let _ = waiting.recv();
            let mut byte = 0u8;
            // SAFETY: a read of one byte into a live local.
            unsafe { libc::read(fd, &mut byte as *mut u8 as *mut _, 1) };
            CKR_DEVICE_ERROR
        });
        returned.send(rv).unwrap();
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while library.call_on_wire() == 0 {
        assert!(Instant::now() < deadline, "the call never went on the wire");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        library
            .stalled_call()
            .as_deref()
            .and_then(|said| said.split_once(", ").map(|(call, _)| call)),
        Some("C_GetSlotList on its first instance"),
        "the HA log names the call on the wire"
    );
    assert_eq!(library.sever(), 0, "the call waits on no socket yet");
    go_on.send(()).unwrap();
    wait_blocked(&tid_known, fd);
    let (finalized, finalize_done) = mpsc::channel();
    let reconnect = Arc::clone(&library);
    std::thread::spawn(move || {
        reconnect.finalize();
        finalized.send(()).unwrap();
    });
    finalize_done
        .recv_timeout(Duration::from_secs(30))
        .expect("the finalisation ends");
    assert_eq!(
        call_done.try_recv(),
        Ok(CKR_DEVICE_ERROR),
        "the call returned, cut again, before the library was finalised"
    );
    drop(socket);
}

/// The server a cut checks a socket against is the one p11-kit's
/// client connects to: its address decoded, its default without one,
/// none for an address that is not a unix path.
#[test]
fn the_server_of_p11_kits_client_is_read_as_the_client_reads_it() {
    let server = |environment: &[(&str, &str)]| {
        let environment: Vec<(String, String)> = environment
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        p11_kit_server_path(&environment)
    };
    assert_eq!(
        server(&[("P11_KIT_SERVER_ADDRESS", "unix:path=/run/a%20b/sock")]),
        Some(PathBuf::from("/run/a b/sock"))
    );
    assert_eq!(
        server(&[("P11_KIT_SERVER_ADDRESS", "vsock:cid=3;port=9")]),
        None
    );
    assert_eq!(
        server(&[
            ("P11_KIT_SERVER_ADDRESS", ""),
            ("XDG_RUNTIME_DIR", "/run/user/7")
        ]),
        Some(PathBuf::from("/run/user/7/p11-kit/pkcs11"))
    );
}

/// A job that is merely running -- another member's recovery looking
/// for its token on this library, on the connection a healthy member
/// serves on -- is not cut when a second job is asked for: only a job
/// given up is.
#[test]
fn asking_for_a_job_while_one_runs_does_not_cut_its_socket() {
    use std::io::{Read, Write};
    use std::time::Duration;
    let library = Arc::new(
        MemberLibrary::load("softhsm", Path::new("/usr/lib/softhsm/libsofthsm2.so"), &[])
            .expect("SoftHSM loads"),
    );
    let (mut socket, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let job = library
        .start_bounded(move |_| {
            let mut byte = [0u8; 1];
            socket.read(&mut byte).ok().map(|n| (n, byte[0]))
        })
        .expect("no job is under way");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let tid = library.job_thread.load(Ordering::Acquire);
        if tid > 0 && blocked_socket(tid).is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "the job never read its socket");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        library.start_bounded(|_| ()).is_none(),
        "a job is under way"
    );
    peer.write_all(b"z")
        .expect("the running job's socket is not shut down");
    let far = Instant::now() + Duration::from_secs(30);
    assert_eq!(
        job.finish(far, Duration::from_secs(30)).ok(),
        Some(Some((1, b'z'))),
        "the running job's socket was not cut"
    );
}

/// SoftHSM answers `C_GetFunctionList` before it is initialised and
/// `CKR_CRYPTOKI_NOT_INITIALIZED` (a member fault) to anything else.
#[test]
fn the_call_path_counts_calls_on_the_token_its_scope_names() {
    let library = MemberLibrary::load("softhsm", Path::new("/usr/lib/softhsm/libsofthsm2.so"), &[])
        .expect("SoftHSM loads");
    let mut list: CK_FUNCTION_LIST_PTR = ptr::null_mut();
    let get_list = |list: &mut CK_FUNCTION_LIST_PTR| {
        member_call!(
            library,
            C_GetFunctionList(list as *mut CK_FUNCTION_LIST_PTR)
        )
    };
    let counts = CallCounts::default();
    assert_eq!(get_list(&mut list), CKR_OK);
    assert_eq!(counts.calls_served(), 0, "no scope names the token");
    {
        let _counting = Counting::on(&counts);
        assert_eq!(get_list(&mut list), CKR_OK);
        assert_eq!(
            member_call!(library, C_Finalize(ptr::null_mut())),
            CKR_CRYPTOKI_NOT_INITIALIZED
        );
        let inner = CallCounts::default();
        {
            let _nested = Counting::on(&inner);
            assert_eq!(get_list(&mut list), CKR_OK);
        }
        assert_eq!(inner.calls_served(), 1, "the nested scope's call");
        assert_eq!(get_list(&mut list), CKR_OK, "the outer scope again");
    }
    assert_eq!(get_list(&mut list), CKR_OK);
    assert_eq!(
        (counts.calls_served(), counts.in_flight()),
        (2, 0),
        "two calls served; the member fault ended without counting as served"
    );
}

/// The lending rule of spares: one that served is lent again first;
/// one that failed is lent only after every other idle spare, however
/// often it fails, and a spare that is not acceptable is passed over
/// in favour of the second choice.
#[test]
fn a_failed_spare_is_lent_after_every_healthy_one() {
    let mut idle: Vec<usize> = (0..3).collect();
    let any = |_: usize| true;
    let none = |_: usize| false;
    assert_eq!(lend_from(&mut idle, any, none), Some(2));
    hand_back(&mut idle, 2, false);
    assert_eq!(
        lend_from(&mut idle, any, none),
        Some(2),
        "the warm spare first"
    );
    hand_back(&mut idle, 2, true);
    for _ in 0..5 {
        let lent = lend_from(&mut idle, any, none);
        assert_eq!(lent, Some(1), "a healthy spare before the failed one");
        hand_back(&mut idle, 1, false);
    }
    let (first, second) = (
        lend_from(&mut idle, any, none).unwrap(),
        lend_from(&mut idle, any, none).unwrap(),
    );
    assert_eq!((first, second), (1, 0));
    assert_eq!(
        lend_from(&mut idle, any, none),
        Some(2),
        "the failed one last"
    );
    assert_eq!(lend_from(&mut idle, any, none), None);
    for i in [0, 1, 2] {
        hand_back(&mut idle, i, false);
    }
    assert_eq!(
        lend_from(&mut idle, |i| i == 0, |i| i == 1),
        Some(0),
        "the first choice wherever it is"
    );
    assert_eq!(lend_from(&mut idle, |i| i == 0, |i| i == 1), Some(1));
    assert_eq!(lend_from(&mut idle, |i| i == 0, |i| i == 1), None);
    assert_eq!(idle, [2]);
}

/// A spare that keeps missing the slot rests longer each time, up to
/// a bound, so that reconnecting it stays rare.
#[test]
fn a_spare_missing_the_slot_rests_longer_each_time_up_to_a_bound() {
    assert_eq!(spare_rest(1), SPARE_REST_FIRST);
    assert_eq!(spare_rest(2), SPARE_REST_FIRST * 2);
    assert_eq!(spare_rest(3), SPARE_REST_FIRST * 4);
    assert_eq!(spare_rest(40), SPARE_REST_MAX);
    assert_eq!(spare_rest(u32::MAX), SPARE_REST_MAX);
    assert!((1..60).all(|m| spare_rest(m) <= spare_rest(m + 1)));
}

#[test]
fn a_call_inside_when_c_finalize_gave_up_on_it_answers_not_initialized() {
    let inside = Inside::default();
    let done_before = inside.enter();
    let spanning = inside.enter();
    assert_eq!(inside.calls(), 2);
    assert_eq!(
        done_before.answer(CKR_SIGNATURE_INVALID),
        CKR_SIGNATURE_INVALID
    );
    inside.finalized();
    assert_eq!(spanning.answer(CKR_OK), CKR_CRYPTOKI_NOT_INITIALIZED);
    let after = inside.enter();
    assert_eq!(after.answer(CKR_OK), CKR_OK, "a call of the next provider");
    drop(inside.enter());
    assert_eq!(inside.calls(), 0, "an unanswered call leaves on unwinding");
}

/// An in-process library with a call inside is neither reconnected by
/// recovery nor finalised by the application's `C_Finalize`, which gives
/// up at its deadline; once the call has left (answering
/// `CKR_CRYPTOKI_NOT_INITIALIZED`), `C_Finalize` goes ahead.
#[test]
fn an_in_process_library_is_never_finalised_under_a_call() {
    use std::time::Duration;
    let library = Arc::new(
        MemberLibrary::load("softhsm", Path::new("/usr/lib/softhsm/libsofthsm2.so"), &[])
            .expect("SoftHSM loads"),
    );
    let call = library.inside.enter();
    let refused = library
        .reinitialize()
        .expect_err("reconnecting under a call");
    assert_eq!(refused.rv, CKR_DEVICE_ERROR);
    let patience = Duration::from_millis(20);
    let left = library
        .finalize_for_application(crate::clock::now() + patience, patience, true)
        .expect_err("C_Finalize under a call");
    assert_eq!(left.calls, 1);
    assert_eq!(call.answer(CKR_OK), CKR_CRYPTOKI_NOT_INITIALIZED);
    assert!(library
        .finalize_for_application(crate::clock::now() + patience, patience, true)
        .is_ok());
}

/// The HA log names the oldest call of a member on the wire, not a
/// spare's connection set-up older still: the set-up is no call of the
/// member, and the watchdog cuts it on its own. With only a set-up on the
/// wire, it names none.
#[test]
fn a_stalled_call_is_never_a_spares_connection_set_up() {
    let library = Arc::new(
        p11_kit_client(Path::new("/nonexistent/server.sock"))
            .with_instances(std::num::NonZeroUsize::new(2))
            .expect("its instances"),
    );
    let on_wire = |function: &'static str, spare: bool| {
        let (entered, on_the_wire) = mpsc::channel();
        let (release, released) = mpsc::channel::<()>();
        let library = Arc::clone(&library);
        let call = std::thread::spawn(move || {
            let instance = if spare {
                &library.spares.instances[0].library
            } else {
                &*library
            };
            instance.on_wire(function, &mut || {
                entered.send(()).unwrap();
                let _ = released.recv();
                CKR_OK
            });
        });
        on_the_wire.recv().unwrap();
        (release, call)
    };
    let set_up = on_wire(SPARE_CONNECT, true);
    assert_ne!(library.call_on_wire(), 0, "the set-up is on the wire");
    assert_eq!(library.stalled_call(), None, "only a set-up on the wire");
    let sign = on_wire("C_Sign", false);
    let named = library
        .stalled_call()
        .expect("a call of the member on the wire");
    assert!(
        named.starts_with("C_Sign on its first instance, "),
        "named: {named}"
    );
    for (release, call) in [set_up, sign] {
        release.send(()).unwrap();
        call.join().unwrap();
    }
}
