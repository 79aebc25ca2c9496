//! What pkcs11-ha costs per call: SoftHSM tokens driven four ways in one
//! process -- SoftHSM directly, pkcs11-ha's pass-through slot for the same
//! token, pkcs11-ha's virtual slot of a one-member group over it, and the
//! virtual slot of a two-member group over two other tokens. A one-member
//! group takes short cuts no real group takes (nothing to choose between,
//! nowhere to look an object up), so the two-member group is the figure
//! that says what an HA deployment costs.
//!
//! Owns: a throw-away SoftHSM token dir and pkcs11-ha config (temp dir),
//! and the process-global env (`SOFTHSM2_CONF`, `PKCS11_HA_CONF`).
//! Must never: touch the system's SoftHSM tokens, or measure anything but
//! the raw `CK_FUNCTION_LIST` calls (no `cryptoki` high-level API in the
//! loops: its own cost would blur a few-percent difference).
//!
//! Both libraries share one SoftHSM instance (same path, same `dlopen`
//! handle): pkcs11-ha is initialised first and initialises SoftHSM; our own
//! `C_Initialize` of SoftHSM then answers `CKR_CRYPTOKI_ALREADY_INITIALIZED`.
//!
//! Run: `cargo build --release && cargo bench --bench overhead`. After the
//! criterion groups it prints a table of ops/s and ratios, measured in short
//! slices that alternate between the targets (see [`measure`]). `-- --test`
//! runs each benchmark once and the table briefly; a filter that matches no
//! benchmark (`-- table`) prints only the table.

#[macro_use]
mod support;
#[path = "../tests/common/mod.rs"]
mod common;
use common::{SOFTHSM_LIB, USER_PIN};
use support::{attr, ha_library_path, initialize, load, user_session};

use criterion::{black_box, Criterion};
use cryptoki_sys::*;
use libloading::Library;
use std::ffi::c_void;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};
use std::{env, ptr};

const TOKEN_LABEL: &str = "bench";
const GROUP_LABEL: &str = "bench-ha";
/// The two-member group's label and its members' token labels.
const GROUP2_LABEL: &str = "bench-ha2";
const GROUP2_TOKENS: [&str; 2] = ["bench2", "bench3"];
const EC_ID: &[u8] = b"bench-ec";
const AES_ID: &[u8] = b"bench-aes";
/// DER OID of prime256v1 (P-256).
const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const DATA_LEN: usize = 1024;
const RANDOM_LEN: usize = 32;
/// Time per target and operation in the ratio table (and in test mode).
const TABLE_TIME: Duration = Duration::from_secs(2);
const TEST_TABLE_TIME: Duration = Duration::from_millis(20);
/// One timed run of calls in the ratio table.
const SLICE: Duration = Duration::from_millis(5);

/// One way of reaching the token: a function table, a logged-in session
/// and the handles of the keys as that session sees them.
struct Target {
    name: &'static str,
    fns: CK_FUNCTION_LIST,
    session: CK_SESSION_HANDLE,
    ec_key: CK_OBJECT_HANDLE,
    aes_key: CK_OBJECT_HANDLE,
}

/// One measured operation: a name, a call sequence on a [`Target`], and
/// the lowest acceptable ops/s ratio of pkcs11-ha over direct.
struct Operation {
    name: &'static str,
    run: fn(&Target, &mut Buffers),
    target_ratio: f64,
}

/// Inputs and outputs of the operations, allocated once.
struct Buffers {
    digest: [u8; 32],
    data: Vec<u8>,
    iv: [u8; 12],
    out: Vec<u8>,
}

impl Buffers {
    fn new() -> Buffers {
        Buffers {
            digest: [0x5a; 32],
            data: (0..DATA_LEN).map(|i| i as u8).collect(),
            iv: [7; 12],
            out: vec![0; DATA_LEN + 64],
        }
    }
}

const OPERATIONS: [Operation; 4] = [
    Operation {
        name: "ecdsa_p256_sign",
        run: sign,
        target_ratio: 0.97,
    },
    Operation {
        name: "aes256_gcm_encrypt_1k",
        run: encrypt,
        target_ratio: 0.97,
    },
    Operation {
        name: "sha256_digest_1k",
        run: digest,
        target_ratio: 0.95,
    },
    Operation {
        name: "generate_random_32",
        run: random,
        target_ratio: 0.95,
    },
];

/// C_SignInit(CKM_ECDSA) + C_Sign of a 32-byte digest.
fn sign(t: &Target, b: &mut Buffers) {
    let mut mechanism = CK_MECHANISM {
        mechanism: CKM_ECDSA,
        pParameter: ptr::null_mut(),
        ulParameterLen: 0,
    };
    let mut len = b.out.len() as CK_ULONG;
    ck!(t.fns, C_SignInit(t.session, &mut mechanism, t.ec_key));
    ck!(
        t.fns,
        C_Sign(
            t.session,
            b.digest.as_mut_ptr(),
            b.digest.len() as CK_ULONG,
            b.out.as_mut_ptr(),
            &mut len
        )
    );
    debug_assert_eq!(len, 64);
    black_box(&b.out);
}

/// C_EncryptInit(CKM_AES_GCM, 12-byte IV, 128-bit tag) + C_Encrypt of 1 KiB.
fn encrypt(t: &Target, b: &mut Buffers) {
    let mut params = CK_GCM_PARAMS {
        pIv: b.iv.as_mut_ptr(),
        ulIvLen: b.iv.len() as CK_ULONG,
        ulIvBits: (b.iv.len() * 8) as CK_ULONG,
        pAAD: ptr::null_mut(),
        ulAADLen: 0,
        ulTagBits: 128,
    };
    let mut mechanism = CK_MECHANISM {
        mechanism: CKM_AES_GCM,
        pParameter: &mut params as *mut CK_GCM_PARAMS as *mut c_void,
        ulParameterLen: std::mem::size_of::<CK_GCM_PARAMS>() as CK_ULONG,
    };
    let mut len = b.out.len() as CK_ULONG;
    ck!(t.fns, C_EncryptInit(t.session, &mut mechanism, t.aes_key));
    ck!(
        t.fns,
        C_Encrypt(
            t.session,
            b.data.as_mut_ptr(),
            b.data.len() as CK_ULONG,
            b.out.as_mut_ptr(),
            &mut len
        )
    );
    debug_assert_eq!(len as usize, DATA_LEN + 16);
    black_box(&b.out);
}

/// C_DigestInit(CKM_SHA256) + C_Digest of 1 KiB.
fn digest(t: &Target, b: &mut Buffers) {
    let mut mechanism = CK_MECHANISM {
        mechanism: CKM_SHA256,
        pParameter: ptr::null_mut(),
        ulParameterLen: 0,
    };
    let mut len = b.out.len() as CK_ULONG;
    ck!(t.fns, C_DigestInit(t.session, &mut mechanism));
    ck!(
        t.fns,
        C_Digest(
            t.session,
            b.data.as_mut_ptr(),
            b.data.len() as CK_ULONG,
            b.out.as_mut_ptr(),
            &mut len
        )
    );
    debug_assert_eq!(len, 32);
    black_box(&b.out);
}

/// C_GenerateRandom of 32 bytes.
fn random(t: &Target, b: &mut Buffers) {
    ck!(
        t.fns,
        C_GenerateRandom(t.session, b.out.as_mut_ptr(), RANDOM_LEN as CK_ULONG)
    );
    black_box(&b.out);
}

// ---------------------------------------------------------------------------
// Setup
// ---------------------------------------------------------------------------

/// Everything the run needs; dropping it finalises pkcs11-ha and removes the
/// token dir.
struct Bench {
    targets: Vec<Target>,
    ha_fns: CK_FUNCTION_LIST,
    // Unloaded only after C_Finalize (see Drop), then the token dir goes.
    _ha_lib: Library,
    _softhsm_lib: Library,
    _tokens: common::SoftHsm,
}

impl Drop for Bench {
    fn drop(&mut self) {
        // Direct sessions belong to the SoftHSM instance pkcs11-ha
        // initialised; its C_Finalize closes every session, ours included.
        let rv = ck_raw!(self.ha_fns, C_Finalize(ptr::null_mut()));
        if rv != CKR_OK {
            eprintln!("pkcs11-ha C_Finalize returned {rv:#x}");
        }
    }
}

/// Makes the token dir, the tokens (the two-member group's with a domain
/// key, so that its keys replicate) and the pkcs11-ha config (through the
/// integration tests' fixtures), and points the env at them. Returns the
/// token dir and SoftHSM's slot ID of the first token.
fn make_token() -> (common::SoftHsm, CK_SLOT_ID) {
    let hsm = common::SoftHsm::new(&[TOKEN_LABEL, GROUP2_TOKENS[0], GROUP2_TOKENS[1]]);
    common::provision_domain(&hsm, &common::DOMAIN_VALUE);
    let token = hsm.token(TOKEN_LABEL).clone();
    let pair: Vec<String> = GROUP2_TOKENS
        .iter()
        .map(|label| hsm.token(label).serial.clone())
        .collect();
    let config = common::write_config(
        hsm.dir.path(),
        &[(common::SOFTHSM_LIB_NAME, SOFTHSM_LIB)],
        &[
            common::GroupSpec::new(GROUP_LABEL, &[token.serial]),
            common::GroupSpec::new(GROUP2_LABEL, &pair),
        ],
        false,
    );
    // Single-threaded here: nothing else reads the environment yet.
    hsm.activate();
    common::activate_config(&config);
    (hsm, token.slot_id as CK_SLOT_ID)
}

fn token_label(fns: &CK_FUNCTION_LIST, slot: CK_SLOT_ID) -> String {
    // SAFETY: CK_TOKEN_INFO is plain data.
    let mut info: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
    ck!(fns, C_GetTokenInfo(slot, &mut info));
    String::from_utf8_lossy(&info.label).trim_end().to_string()
}

/// Makes the token's EC P-256 key pair and AES-256 key through `t` (a
/// virtual slot) as token objects; fills in `t`'s handles.
fn generate_keys(t: &mut Target) {
    let yes: CK_BBOOL = CK_TRUE;
    let public_class: CK_OBJECT_CLASS = CKO_PUBLIC_KEY;
    let private_class: CK_OBJECT_CLASS = CKO_PRIVATE_KEY;
    let ec_type: CK_KEY_TYPE = CKK_EC;
    let mut public = [
        attr(CKA_CLASS, &public_class),
        attr(CKA_KEY_TYPE, &ec_type),
        attr(CKA_TOKEN, &yes),
        attr(CKA_VERIFY, &yes),
        attr(CKA_EC_PARAMS, P256_OID),
        attr(CKA_ID, EC_ID),
        attr(CKA_LABEL, "bench-ec".as_bytes()),
    ];
    let mut private = [
        attr(CKA_CLASS, &private_class),
        attr(CKA_KEY_TYPE, &ec_type),
        attr(CKA_TOKEN, &yes),
        attr(CKA_PRIVATE, &yes),
        attr(CKA_SENSITIVE, &yes),
        attr(CKA_SIGN, &yes),
        attr(CKA_ID, EC_ID),
        attr(CKA_LABEL, "bench-ec".as_bytes()),
    ];
    let mut mechanism = CK_MECHANISM {
        mechanism: CKM_EC_KEY_PAIR_GEN,
        pParameter: ptr::null_mut(),
        ulParameterLen: 0,
    };
    let mut public_key = 0;
    ck!(
        t.fns,
        C_GenerateKeyPair(
            t.session,
            &mut mechanism,
            public.as_mut_ptr(),
            public.len() as CK_ULONG,
            private.as_mut_ptr(),
            private.len() as CK_ULONG,
            &mut public_key,
            &mut t.ec_key
        )
    );

    let secret_class: CK_OBJECT_CLASS = CKO_SECRET_KEY;
    let aes_type: CK_KEY_TYPE = CKK_AES;
    let value_len: CK_ULONG = 32;
    let mut template = [
        attr(CKA_CLASS, &secret_class),
        attr(CKA_KEY_TYPE, &aes_type),
        attr(CKA_VALUE_LEN, &value_len),
        attr(CKA_TOKEN, &yes),
        attr(CKA_PRIVATE, &yes),
        attr(CKA_SENSITIVE, &yes),
        attr(CKA_ENCRYPT, &yes),
        attr(CKA_DECRYPT, &yes),
        attr(CKA_ID, AES_ID),
        attr(CKA_LABEL, "bench-aes".as_bytes()),
    ];
    let mut mechanism = CK_MECHANISM {
        mechanism: CKM_AES_KEY_GEN,
        pParameter: ptr::null_mut(),
        ulParameterLen: 0,
    };
    ck!(
        t.fns,
        C_GenerateKey(
            t.session,
            &mut mechanism,
            template.as_mut_ptr(),
            template.len() as CK_ULONG,
            &mut t.aes_key
        )
    );
}

/// The one object of `class` with `CKA_ID = id` that `t`'s session sees.
fn find_key(t: &Target, class: CK_OBJECT_CLASS, id: &[u8]) -> CK_OBJECT_HANDLE {
    let mut template = [attr(CKA_CLASS, &class), attr(CKA_ID, id)];
    let mut found = [0; 2];
    let mut count = 0;
    ck!(
        t.fns,
        C_FindObjectsInit(t.session, template.as_mut_ptr(), template.len() as CK_ULONG)
    );
    ck!(
        t.fns,
        C_FindObjects(
            t.session,
            found.as_mut_ptr(),
            found.len() as CK_ULONG,
            &mut count
        )
    );
    ck!(t.fns, C_FindObjectsFinal(t.session));
    assert_eq!(
        count,
        1,
        "{}: {} keys with CKA_ID {:?}",
        t.name,
        count,
        String::from_utf8_lossy(id)
    );
    found[0]
}

impl Bench {
    fn start() -> Bench {
        let ha_path = ha_library_path();
        let (tokens, member_slot) = make_token();
        let (ha_lib, ha_fns) = load(&ha_path);
        let (softhsm_lib, softhsm_fns) = load(Path::new(SOFTHSM_LIB));

        // pkcs11-ha first: it initialises the shared SoftHSM instance.
        let rv = initialize(&ha_fns);
        assert_eq!(rv, CKR_OK, "C_Initialize of pkcs11-ha: {rv:#x}");
        let rv = initialize(&softhsm_fns);
        assert_eq!(
            rv, CKR_CRYPTOKI_ALREADY_INITIALIZED,
            "SoftHSM's C_Initialize should find the instance pkcs11-ha initialised \
             (same dlopen handle); got {rv:#x}"
        );

        let virtual_slot: CK_SLOT_ID = 0;
        let pair_slot: CK_SLOT_ID = 1;
        let passthrough_slot = common::passthrough_slot_id(common::SOFTHSM_LIB_NAME, member_slot);
        assert_eq!(token_label(&ha_fns, virtual_slot), GROUP_LABEL);
        assert_eq!(token_label(&ha_fns, pair_slot), GROUP2_LABEL);
        assert_eq!(token_label(&ha_fns, passthrough_slot), TOKEN_LABEL);
        assert_eq!(token_label(&softhsm_fns, member_slot), TOKEN_LABEL);

        // Log in through the virtual slot first, then the others (which may
        // find the token already logged in).
        let mut virt = Target {
            name: "virtual",
            fns: ha_fns,
            session: user_session(&ha_fns, virtual_slot, USER_PIN),
            ec_key: 0,
            aes_key: 0,
        };
        generate_keys(&mut virt);
        let mut pair = Target {
            name: "virtual2",
            fns: ha_fns,
            session: user_session(&ha_fns, pair_slot, USER_PIN),
            ec_key: 0,
            aes_key: 0,
        };
        generate_keys(&mut pair);
        let mut targets = vec![
            Target {
                name: "direct",
                fns: softhsm_fns,
                session: user_session(&softhsm_fns, member_slot, USER_PIN),
                ec_key: 0,
                aes_key: 0,
            },
            Target {
                name: "passthrough",
                fns: ha_fns,
                session: user_session(&ha_fns, passthrough_slot, USER_PIN),
                ec_key: 0,
                aes_key: 0,
            },
        ];
        for t in &mut targets {
            t.ec_key = find_key(t, CKO_PRIVATE_KEY, EC_ID);
            t.aes_key = find_key(t, CKO_SECRET_KEY, AES_ID);
        }
        targets.push(virt);
        targets.push(pair);
        Bench {
            targets,
            ha_fns,
            _ha_lib: ha_lib,
            _softhsm_lib: softhsm_lib,
            _tokens: tokens,
        }
    }
}

// ---------------------------------------------------------------------------
// Measuring
// ---------------------------------------------------------------------------

/// Nanoseconds per call of `op` on `t`, over `calls` calls.
fn time_per_call(op: &Operation, t: &Target, b: &mut Buffers, calls: u32) -> f64 {
    let start = Instant::now();
    for _ in 0..calls {
        (op.run)(t, b);
    }
    start.elapsed().as_nanos() as f64 / f64::from(calls)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// One operation measured on every target: per target, the median and the
/// best ns/call over the slices, and the medians over cycles of
/// `direct time / target time` and `target time - direct time` taken
/// within the same cycle.
struct Figures {
    median_ns: Vec<f64>,
    best_ns: Vec<f64>,
    paired_ratio: Vec<f64>,
    paired_extra_ns: Vec<f64>,
}

/// Measures `op` on every target for about `per_target` each, in cycles of
/// one [`SLICE`] per target, the order rotating every cycle. Neighbours on
/// the machine come and go over seconds; slices of a few milliseconds,
/// compared within their cycle, let such drift hit all targets alike.
fn measure(op: &Operation, targets: &[Target], b: &mut Buffers, per_target: Duration) -> Figures {
    // Calibrate the calls per slice on the slowest target.
    let mut slowest: f64 = 1.0;
    for t in targets {
        (op.run)(t, b);
        let calls = (1_000_000.0 / time_per_call(op, t, b, 1)).clamp(1.0, 10_000.0) as u32;
        slowest = slowest.max(time_per_call(op, t, b, calls));
    }
    let calls = ((SLICE.as_nanos() as f64 / slowest) as u32).max(1);
    let cycles = ((per_target.as_nanos() as f64 / (slowest * f64::from(calls))) as usize).max(3);
    let mut ns = vec![Vec::with_capacity(cycles); targets.len()];
    for cycle in 0..cycles {
        for i in 0..targets.len() {
            let k = (i + cycle) % targets.len();
            ns[k].push(time_per_call(op, &targets[k], b, calls));
        }
    }
    Figures {
        median_ns: ns.iter().map(|v| median(v.clone())).collect(),
        best_ns: ns
            .iter()
            .map(|v| v.iter().copied().fold(f64::INFINITY, f64::min))
            .collect(),
        paired_ratio: ns
            .iter()
            .map(|v| median(v.iter().zip(&ns[0]).map(|(t, d)| d / t).collect()))
            .collect(),
        paired_extra_ns: ns
            .iter()
            .map(|v| median(v.iter().zip(&ns[0]).map(|(t, d)| t - d).collect()))
            .collect(),
    }
}

/// The ops/s and ratio table (targets in the order direct, passthrough,
/// virtual, virtual2).
/// In `test_mode` the rounds are too short to judge the targets.
fn ratio_table(bench: &Bench, per_target: Duration, test_mode: bool) -> String {
    let mut b = Buffers::new();
    let mut out = String::new();
    writeln!(
        out,
        "\nops/s (median over {SLICE:?} slices, {per_target:?} per target, 1 thread); \
         ratio = median of same-cycle time ratios, (best) = ratio of fastest slices;\n\
         +ns = median of same-cycle extra time per operation over direct"
    )
    .unwrap();
    const COLUMNS: [(usize, &str); 3] = [(1, "pt"), (2, "vt"), (3, "vt2")];
    write!(
        out,
        "{:<22} {:>8} {:>8} {:>8} {:>8} |",
        "operation", "direct", "passthr", "virtual", "virtual2"
    )
    .unwrap();
    for (_, name) in COLUMNS {
        write!(
            out,
            " {:>6} {:>8} {:>6} |",
            format!("{name}/dir"),
            "(best)",
            "+ns"
        )
        .unwrap();
    }
    writeln!(out, " {:>6}", "target").unwrap();
    for op in &OPERATIONS {
        let f = measure(op, &bench.targets, &mut b, per_target);
        let ops = |k: usize| 1e9 / f.median_ns[k];
        write!(
            out,
            "{:<22} {:>8.0} {:>8.0} {:>8.0} {:>8.0} |",
            op.name,
            ops(0),
            ops(1),
            ops(2),
            ops(3)
        )
        .unwrap();
        let mut misses = Vec::new();
        for (k, name) in COLUMNS {
            write!(
                out,
                " {:>6.3} {:>8} {:>6.0} |",
                f.paired_ratio[k],
                format!("({:.3})", f.best_ns[0] / f.best_ns[k]),
                f.paired_extra_ns[k]
            )
            .unwrap();
            if f.paired_ratio[k] < op.target_ratio {
                misses.push(name);
            }
        }
        let verdict = if test_mode {
            "(test mode: not judged)".to_string()
        } else if misses.is_empty() {
            "met".to_string()
        } else {
            format!("MISSED by {}", misses.join(", "))
        };
        writeln!(out, " {:>6.2} {verdict}", op.target_ratio).unwrap();
    }
    out
}

fn main() {
    let args: Vec<String> = env::args().collect();
    let test_mode = args.iter().any(|a| a == "--test");
    let list_mode = args.iter().any(|a| a == "--list");

    let bench = Bench::start();
    assert_eq!(
        bench.targets.iter().map(|t| t.name).collect::<Vec<_>>(),
        ["direct", "passthrough", "virtual", "virtual2"]
    );
    let mut c = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    let mut buffers = Buffers::new();
    for op in &OPERATIONS {
        let mut group = c.benchmark_group(op.name);
        for t in &bench.targets {
            group.bench_function(t.name, |bencher| bencher.iter(|| (op.run)(t, &mut buffers)));
        }
        group.finish();
    }
    c.final_summary();

    if !list_mode {
        let time = if test_mode {
            TEST_TABLE_TIME
        } else {
            TABLE_TIME
        };
        print!("{}", ratio_table(&bench, time, test_mode));
    }
}
