//! Unit tests of the config reader and writer.

use super::*;

const FILE: &str = "/test/pkcs11-ha.conf";

const EXAMPLE: &str = "\
[Libraries]
softhsm = /usr/lib/softhsm/libsofthsm2.so      ; NAME = path; one or more

[VirtualToken]
VirtualToken00Label   = myHAgroup
VirtualToken00SN      = 1154438865287          ; optional
VirtualToken00Members = 154438865287,1238700701509   ; member token serials, primary first
VirtualToken00Standby = 1238700701510          ; optional, standby member serials
VirtualToken00DomainLabel = myHAdomain         ; optional wrapping key label
VirtualToken00MinReplicas = 2

[HAConfiguration]
HAOnly = 0                                     ; 1 = show only virtual slots
MultipartReplayLimit = 4096                    ; optional, bytes; 0 = no replay
";

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new(FILE), text)
}

fn parse_err(text: &str) -> ConfigError {
    match parse(text) {
        Ok(config) => panic!("expected an error, parsed {config:?}\n--- from ---\n{text}"),
        Err(e) => e,
    }
}

/// Libraries section plus `rest`.
fn with_library(rest: &str) -> String {
    format!("[Libraries]\nsofthsm = /usr/lib/libsofthsm2.so\n{rest}")
}

fn group(members: &str) -> GroupConfig {
    GroupConfig {
        index: 0,
        label: "g".into(),
        serial: None,
        members: members.split(',').map(str::to_owned).collect(),
        standby: Vec::new(),
        domain_label: DEFAULT_DOMAIN_LABEL.into(),
        synchronize: true,
        min_replicas: 1,
    }
}

/// One group `g` with member `1`, plus `[HAConfiguration]` with `ha`.
fn with_ha(ha: &str) -> String {
    with_library(&format!(
        "[VirtualToken]\nVirtualToken00Label = g\nVirtualToken00Members = 1\n\
             [HAConfiguration]\n{ha}"
    ))
}

#[test]
fn example_parses() {
    let config = parse(EXAMPLE).unwrap();
    assert_eq!(
        config,
        Config {
            path: PathBuf::from(FILE),
            libraries: vec![LibraryConfig {
                name: "softhsm".into(),
                path: PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"),
                environment: Vec::new(),
                concurrency: None,
                instances: None,
            }],
            groups: vec![GroupConfig {
                index: 0,
                label: "myHAgroup".into(),
                serial: Some("1154438865287".into()),
                members: vec!["154438865287".into(), "1238700701509".into()],
                standby: vec!["1238700701510".into()],
                domain_label: "myHAdomain".into(),
                synchronize: true,
                min_replicas: 2,
            }],
            ha_only: false,
            multipart_replay_limit: 4096,
            recovery: RecoveryConfig {
                attempts: -1,
                interval_secs: 60,
                mode: RecoveryMode::ActiveEnhanced,
            },
            member_timeout_ms: 20_000,
            early_hang_detection: true,
            ha_log: HaLogConfig {
                enabled: false,
                path: None,
                max_len: 10_485_760,
                repeats: 3,
            },
            state_dir: None,
            reconcile_interval_secs: 300,
        }
    );
}

/// The example in the module documentation stays valid.
#[test]
fn doc_example_parses() {
    let doc: String = include_str!("../config.rs")
        .lines()
        .map_while(|line| line.strip_prefix("//!"))
        .map(|line| format!("{}\n", line.strip_prefix(' ').unwrap_or(line)))
        .collect();
    let (_, example) = doc.split_once("```ini\n").expect("an ini example");
    let (example, _) = example.split_once("```").expect("the example's end");
    let config = parse(example).unwrap();
    assert_eq!(config.groups[0].domain_label, "myHAdomain");
    assert_eq!(
        config.multipart_replay_limit,
        DEFAULT_MULTIPART_REPLAY_LIMIT
    );
    let mut expected = parse(EXAMPLE).unwrap();
    expected.multipart_replay_limit = DEFAULT_MULTIPART_REPLAY_LIMIT;
    expected.libraries[0].environment = vec![("SOFTHSM2_CONF".into(), "/etc/softhsm2.conf".into())];
    expected.libraries[0].concurrency = std::num::NonZeroUsize::new(8);
    expected.ha_log.path = Some(PathBuf::from("/var/log/pkcs11-ha"));
    expected.state_dir = Some(PathBuf::from("/var/lib/pkcs11-ha"));
    assert_eq!(config, expected);
}

#[test]
fn domain_label() {
    let config = parse(&with_ha("")).unwrap();
    assert_eq!(config.groups[0].domain_label, DEFAULT_DOMAIN_LABEL);
    assert_eq!(DEFAULT_DOMAIN_LABEL, "pkcs11-ha-domain");
    let longest = "d".repeat(MAX_LABEL_BYTES);
    for domain in ["x", "Shared domain #1", "a=b", longest.as_str()] {
        let text = with_library(&format!(
            "[VirtualToken]\nVirtualToken00Label = g\nVirtualToken00Members = 1\n\
                 virtualtoken00DOMAINLABEL = {domain}\n\
                 VirtualToken01Label = h\nVirtualToken01Members = 2\n\
                 VirtualToken01DomainLabel = {domain}\n"
        ));
        let config = parse(&text).unwrap();
        // Groups may share a domain; its members are still disjoint.
        for group in &config.groups {
            assert_eq!(group.domain_label, domain, "{text}");
        }
    }
}

#[test]
fn multipart_replay_limit() {
    assert_eq!(DEFAULT_MULTIPART_REPLAY_LIMIT, 1_048_576);
    let config = parse(&with_library("")).unwrap();
    assert_eq!(
        config.multipart_replay_limit,
        DEFAULT_MULTIPART_REPLAY_LIMIT
    );
    for (value, expected) in [
        ("0", 0),
        ("1", 1),
        ("0064", 64),
        ("1048576", 1 << 20),
        ("1073741824", 1 << 30),
    ] {
        let text = with_ha(&format!("multipartREPLAYlimit = {value}\n"));
        let config = parse(&text).unwrap();
        assert_eq!(config.multipart_replay_limit, expected, "{text}");
    }
    // Valid without a group or HAOnly.
    let text = with_library("[HAConfiguration]\nMultipartReplayLimit = 0\n");
    assert_eq!(parse(&text).unwrap().multipart_replay_limit, 0);

    for value in [
        "",
        "-1",
        "+5",
        "1073741825",
        "99999999999999999999999",
        "1e6",
        "1_000",
        "0x10",
        "1 MiB",
        "1.5",
    ] {
        let text = with_ha(&format!("MultipartReplayLimit = {value}\n"));
        let e = parse_err(&text);
        let context = format!("{e}\n--- from ---\n{text}");
        assert_eq!(e.section.as_deref(), Some("HAConfiguration"), "{context}");
        assert_eq!(e.key.as_deref(), Some("MultipartReplayLimit"), "{context}");
        assert!(e.problem.contains("from 0 to 1073741824"), "{context}");
        assert!(e.problem.contains(&format!("\"{value}\"")), "{context}");
    }
}

#[test]
fn comments_case_and_order() {
    let text = "\
# whole-line comment
   ; indented comment
[libraries]
b = /opt/b;v2/lib.so
a\t= /opt/a.so\t; tab comment
[VIRTUALTOKEN]
virtualtoken07label = seven
VirtualToken02LABEL = two
VirtualToken02Members = 1, 2
VIRTUALTOKEN07MEMBERS = 3
[haconfiguration]
haonly = Yes
";
    let config = parse(text).unwrap();
    let names: Vec<_> = config.libraries.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["b", "a"]);
    assert_eq!(config.libraries[0].path, Path::new("/opt/b;v2/lib.so"));
    assert_eq!(config.libraries[1].path, Path::new("/opt/a.so"));
    let indices: Vec<_> = config.groups.iter().map(|g| g.index).collect();
    assert_eq!(indices, [2, 7]);
    assert_eq!(config.groups[0].members, ["1", "2"]);
    assert!(config.ha_only);
}

#[test]
fn optional_sections_default() {
    let config = parse(&with_library("")).unwrap();
    assert!(config.groups.is_empty());
    assert!(!config.ha_only);
    assert!(config.early_hang_detection, "on unless turned off");
    for (value, expected) in [("0", false), ("yes", true)] {
        let text = with_library(&format!(
            "[HAConfiguration]\nearlyHangDetection = {value}\n"
        ));
        let parsed = parse(&text).unwrap().early_hang_detection;
        assert_eq!(parsed, expected, "earlyHangDetection = {value}");
    }
    for (value, expected) in [("1", true), ("TRUE", true), ("no", false), ("False", false)] {
        let text = with_library(&format!(
            "[VirtualToken]\nVirtualToken00Label = g\nVirtualToken00Members = 1\n\
                 [HAConfiguration]\nHAOnly = {value}\n"
        ));
        assert_eq!(parse(&text).unwrap().ha_only, expected, "HAOnly = {value}");
    }
}

#[test]
fn round_trip() {
    let mut second = group("a-1,b_2");
    second.index = 3;
    second.label = "Second group".into();
    second.serial = Some("99".into());
    second.standby = vec!["c".into(), "d".into()];
    second.domain_label = "Second domain".into();
    second.synchronize = false;
    let mut defaults = parse(EXAMPLE).unwrap();
    defaults.groups[0].domain_label = DEFAULT_DOMAIN_LABEL.into();
    defaults.multipart_replay_limit = DEFAULT_MULTIPART_REPLAY_LIMIT;
    let text = defaults.to_ini_string();
    for omitted in [
        "DomainLabel",
        "MultipartReplayLimit",
        "LibraryEnvironment",
        "LibraryConcurrency",
        "LibraryInstances",
        "HASynchronize",
        "ActiveRecovery",
        "reconnAtt",
        "AutoReconnectInterval",
        "memberTimeout",
        "earlyHangDetection",
        "haLog",
        "logLen",
        "logRepeats",
    ] {
        assert!(!text.contains(omitted), "{omitted} in:\n{text}");
    }
    let configs = [
        parse(EXAMPLE).unwrap(),
        defaults,
        Config {
            path: PathBuf::from(FILE),
            libraries: vec![
                LibraryConfig {
                    name: "one".into(),
                    path: PathBuf::from("/opt/x;y/lib one.so"),
                    environment: vec![
                        (
                            "P11_KIT_SERVER_ADDRESS".into(),
                            "unix:path=/run/a.sock".into(),
                        ),
                        ("_x1".into(), String::new()),
                    ],
                    concurrency: None,
                    instances: None,
                },
                LibraryConfig {
                    name: "two".into(),
                    path: PathBuf::from("C:\\hsm\\lib.dll"),
                    environment: Vec::new(),
                    concurrency: std::num::NonZeroUsize::new(8),
                    instances: None,
                },
                LibraryConfig {
                    name: "three.v2".into(),
                    path: PathBuf::from("/three.so"),
                    environment: vec![("A".into(), "b=c d".into())],
                    concurrency: None,
                    instances: None,
                },
                LibraryConfig {
                    name: "net".into(),
                    path: PathBuf::from("/usr/lib/pkcs11/p11-kit-client.so"),
                    environment: Vec::new(),
                    concurrency: None,
                    instances: std::num::NonZeroUsize::new(8),
                },
            ],
            groups: vec![group("1"), second],
            ha_only: true,
            multipart_replay_limit: 0,
            recovery: RecoveryConfig {
                attempts: 0,
                interval_secs: 1,
                mode: RecoveryMode::ActiveBasic,
            },
            member_timeout_ms: 1,
            early_hang_detection: false,
            ha_log: HaLogConfig {
                enabled: true,
                path: Some(PathBuf::from("/var/log/ha dir")),
                max_len: 0,
                repeats: 0,
            },
            state_dir: Some(PathBuf::from("/var/lib/ha state")),
            reconcile_interval_secs: 0,
        },
        Config {
            path: PathBuf::from(FILE),
            libraries: vec![LibraryConfig {
                name: "one".into(),
                path: PathBuf::from("/one.so"),
                environment: Vec::new(),
                concurrency: None,
                instances: None,
            }],
            recovery: RecoveryConfig {
                attempts: 7,
                ..RecoveryConfig::default()
            },
            ha_log: HaLogConfig {
                path: Some(PathBuf::from("/kept/while/disabled")),
                ..HaLogConfig::default()
            },
            ..Config::default()
        },
    ];
    for config in configs {
        let text = config.to_ini_string();
        assert_eq!(parse(&text).unwrap(), config, "from:\n{text}");
    }
}

#[test]
fn library_environment() {
    let text = "\
[Libraries]
hsmA = /usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so
hsmB = /usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so
[LibraryEnvironment]
hsmA.P11_KIT_SERVER_ADDRESS = unix:path=/run/hsmA.sock
HSMB.P11_KIT_SERVER_ADDRESS = unix:path=/run/hsmB.sock
hsmA._Debug2 =
";
    let config = parse(text).unwrap();
    assert_eq!(
        config.libraries[0].environment,
        [
            (
                "P11_KIT_SERVER_ADDRESS".to_owned(),
                "unix:path=/run/hsmA.sock".to_owned()
            ),
            ("_Debug2".to_owned(), String::new()),
        ]
    );
    assert_eq!(
        config.libraries[1].environment,
        [(
            "P11_KIT_SERVER_ADDRESS".to_owned(),
            "unix:path=/run/hsmB.sock".to_owned()
        )]
    );
    assert_eq!(config.library("HSMA"), Some(&config.libraries[0]));
    assert_eq!(config.library("hsmC"), None);
    assert_eq!(parse(&config.to_ini_string()).unwrap(), config);
}

#[test]
fn synchronize_recovery_timeout_and_log() {
    let config = parse(&with_ha("")).unwrap();
    assert!(config.groups[0].synchronize);
    assert_eq!(config.recovery, RecoveryConfig::default());
    assert_eq!(config.recovery.attempts, -1);
    assert_eq!(config.recovery.interval_secs, 60);
    assert_eq!(config.recovery.mode, RecoveryMode::ActiveEnhanced);
    assert_eq!(config.member_timeout_ms, 20_000);
    assert_eq!(config.ha_log, HaLogConfig::default());
    assert_eq!(config.ha_log.max_len, 10_485_760);
    assert!(!config.ha_log.enabled);

    let text = with_library(
        "[VirtualToken]\nVirtualToken00Label = First\nVirtualToken00Members = 1\n\
             VirtualToken01Label = second\nVirtualToken01Members = 2\n\
             virtualtokenactiverecovery = ACTIVEBASIC\n\
             [hasynchronize]\nfirst = 0\nSECOND = yes\n\
             [HAConfiguration]\nRECONNATT = 10\nautoReconnectInterval = 1\n\
             MemberTimeout = 250\nhaLogStatus = ENABLED\nhaLogPath = /var/log/ha\n\
             LOGLEN = 0\nlogrepeats = 10\n",
    );
    let config = parse(&text).unwrap();
    assert!(!config.groups[0].synchronize);
    assert!(config.groups[1].synchronize);
    assert_eq!(config.group("FIRST"), Some(&config.groups[0]));
    assert_eq!(
        config.recovery,
        RecoveryConfig {
            attempts: 10,
            interval_secs: 1,
            mode: RecoveryMode::ActiveBasic,
        }
    );
    assert_eq!(config.member_timeout_ms, 250);
    assert_eq!(
        config.ha_log,
        HaLogConfig {
            enabled: true,
            path: Some(PathBuf::from("/var/log/ha")),
            max_len: 0,
            repeats: 10,
        }
    );
    assert_eq!(parse(&config.to_ini_string()).unwrap(), config);

    for (value, attempts) in [("-1", -1), ("0", 0), ("0003", 3)] {
        let text = with_ha(&format!("reconnAtt = {value}\n"));
        assert_eq!(parse(&text).unwrap().recovery.attempts, attempts, "{text}");
    }
    for (value, mode) in [
        ("activeEnhanced", RecoveryMode::ActiveEnhanced),
        ("activebasic", RecoveryMode::ActiveBasic),
    ] {
        assert_eq!(RecoveryMode::from_name(value), Some(mode));
        assert_eq!(RecoveryMode::from_name(mode.as_str()), Some(mode));
    }
    assert_eq!(RecoveryMode::from_name("basic"), None);
    // Disabled with a path keeps the path.
    let text = with_ha("haLogStatus = disabled\nhaLogPath = /tmp\n");
    let log = parse(&text).unwrap().ha_log;
    assert_eq!(
        (log.enabled, log.path),
        (false, Some(PathBuf::from("/tmp")))
    );
}

#[test]
fn errors_name_file_section_and_key() {
    let members = |rest: &str| {
        with_library(&format!(
            "[VirtualToken]\nVirtualToken00Label = g\nVirtualToken00Members = 1,2\n{rest}"
        ))
    };
    let long_label = format!("[VirtualToken]\nVirtualToken00Label = {}\n", "x".repeat(33));
    // (text, section, key, part of the problem)
    let cases: Vec<(String, &str, &str, &str)> = vec![
        ("[Libraries]\n[Foo]\n".into(), "Foo", "", "unknown section"),
        (
            "[VirtualToken]\n".into(),
            "Libraries",
            "",
            "no PKCS#11 library",
        ),
        (
            "[Libraries]\n".into(),
            "Libraries",
            "",
            "no PKCS#11 library",
        ),
        (
            with_library("[Libraries]\n"),
            "Libraries",
            "",
            "more than once",
        ),
        (
            with_library("Softhsm = /x.so\n"),
            "Libraries",
            "Softhsm",
            "twice",
        ),
        (
            with_library("empty =\n"),
            "Libraries",
            "empty",
            "no library path",
        ),
        (
            with_library("junk\nb = /b.so\n"),
            "Libraries",
            "",
            "\"junk\" is not key = value",
        ),
        (
            with_library("[HAConfiguration]\nFoo = 1\n"),
            "HAConfiguration",
            "Foo",
            "the keys here are HAOnly, MultipartReplayLimit, reconnAtt, \
                 AutoReconnectInterval, memberTimeout, earlyHangDetection, haLogStatus, \
                 haLogPath, logLen, logRepeats, haStateDir and ReconcileInterval",
        ),
        (
            with_library("[HAConfiguration]\nearlyHangDetection = sometimes\n"),
            "HAConfiguration",
            "earlyHangDetection",
            "\"sometimes\" is not accepted; use 1",
        ),
        (
            with_library("[HAConfiguration]\nHAOnly = 2\n"),
            "HAConfiguration",
            "HAOnly",
            "use 1",
        ),
        (
            with_library("[HAConfiguration]\nHAOnly = 1\n"),
            "HAConfiguration",
            "HAOnly",
            "no group",
        ),
        (
            with_library("[VirtualToken]\nVirtualToken00Lable = g\n"),
            "VirtualToken",
            "VirtualToken00Lable",
            "unknown key",
        ),
        (
            with_library("[VirtualToken]\nVirtualToken0Label = g\n"),
            "VirtualToken",
            "VirtualToken0Label",
            "two digits",
        ),
        (
            members("virtualtoken00LABEL = h\n"),
            "VirtualToken",
            "virtualtoken00LABEL",
            "twice",
        ),
        (
            with_library("[VirtualToken]\nVirtualToken00Members = 1\n"),
            "VirtualToken",
            "VirtualToken00Label",
            "no label",
        ),
        (
            with_library("[VirtualToken]\nVirtualToken00Label = g\n"),
            "VirtualToken",
            "VirtualToken00Members",
            "no active members",
        ),
        (
            with_library("[VirtualToken]\nVirtualToken00Label = g\nVirtualToken00Standby = 1\n"),
            "VirtualToken",
            "VirtualToken00Members",
            "no active members",
        ),
        (
            with_library("[VirtualToken]\nVirtualToken00Label = g\nVirtualToken00Members =\n"),
            "VirtualToken",
            "VirtualToken00Members",
            "no serial",
        ),
        (
            with_library("[VirtualToken]\nVirtualToken00Label = g\nVirtualToken00Members = 1,,2\n"),
            "VirtualToken",
            "VirtualToken00Members",
            "empty item",
        ),
        (
            with_library("[VirtualToken]\nVirtualToken00Label = g\nVirtualToken00Members = 1 2\n"),
            "VirtualToken",
            "VirtualToken00Members",
            "not a token serial",
        ),
        (
            with_library(&format!(
                "[VirtualToken]\nVirtualToken00Label = g\nVirtualToken00Members = {}\n",
                "1".repeat(17)
            )),
            "VirtualToken",
            "VirtualToken00Members",
            "not a token serial",
        ),
        (
            members("VirtualToken00Standby = 2\n"),
            "VirtualToken",
            "VirtualToken00Standby",
            "twice",
        ),
        (
            members("VirtualToken01Label = h\nVirtualToken01Members = 3,1\n"),
            "VirtualToken",
            "VirtualToken01Members",
            "already in group 00",
        ),
        (
            members("VirtualToken01Label = G\nVirtualToken01Members = 3\n"),
            "VirtualToken",
            "VirtualToken01Label",
            "already used by group 00",
        ),
        (
            with_library(&long_label),
            "VirtualToken",
            "VirtualToken00Label",
            "at most 32 bytes",
        ),
        (
            with_library("[VirtualToken]\nVirtualToken00Label = ha\n"),
            "VirtualToken",
            "VirtualToken00Label",
            "reserved",
        ),
        (
            with_library("[VirtualToken]\nVirtualToken00Label =\n"),
            "VirtualToken",
            "VirtualToken00Label",
            "label is empty",
        ),
        (
            with_library("[HAConfiguration]\nMultipartReplayLimit = 1073741825\n"),
            "HAConfiguration",
            "MultipartReplayLimit",
            "from 0 to 1073741824",
        ),
        (
            with_library("[HAConfiguration]\nMultipartReplayLimit = 1\nmultipartreplaylimit = 2\n"),
            "HAConfiguration",
            "multipartreplaylimit",
            "twice",
        ),
        (
            members("VirtualToken00DomainLabel =\n"),
            "VirtualToken",
            "VirtualToken00DomainLabel",
            "domain label is empty",
        ),
        (
            members(&format!("VirtualToken00DomainLabel = {}\n", "d".repeat(33))),
            "VirtualToken",
            "VirtualToken00DomainLabel",
            "at most 32 bytes",
        ),
        (
            members(&format!("VirtualToken00DomainLabel = {}\n", "é".repeat(17))),
            "VirtualToken",
            "VirtualToken00DomainLabel",
            "at most 32 bytes",
        ),
        (
            members("VirtualToken00DomainLabel = caf\u{e9}\n"),
            "VirtualToken",
            "VirtualToken00DomainLabel",
            "not printable ASCII",
        ),
        (
            members("VirtualToken00DomainLabel = a\u{7}b\n"),
            "VirtualToken",
            "VirtualToken00DomainLabel",
            "not printable ASCII",
        ),
        (
            members("VirtualToken00DomainLabel = a\tb\n"),
            "VirtualToken",
            "VirtualToken00DomainLabel",
            "not printable ASCII",
        ),
        (
            members("VirtualToken00DomainLabel = d\nvirtualtoken00domainlabel = e\n"),
            "VirtualToken",
            "virtualtoken00domainlabel",
            "twice",
        ),
        (
            members("VirtualToken00Domain = d\n"),
            "VirtualToken",
            "VirtualToken00Domain",
            "...DomainLabel",
        ),
        (
            with_library("[VirtualToken]\nVirtualToken00DomainLabel = d\n"),
            "VirtualToken",
            "VirtualToken00Label",
            "no label",
        ),
        (
            members("VirtualToken00SN = 1 2\n"),
            "VirtualToken",
            "VirtualToken00SN",
            "not a token serial",
        ),
        (
            members("VirtualToken00SN = 2\n"),
            "VirtualToken",
            "VirtualToken00SN",
            "member token",
        ),
        (
            members(
                "VirtualToken00SN = 9\nVirtualToken01Label = h\n\
                     VirtualToken01Members = 3\nVirtualToken01SN = 9\n",
            ),
            "VirtualToken",
            "VirtualToken01SN",
            "same serial",
        ),
    ];
    let env = |rest: &str| with_library(&format!("[LibraryEnvironment]\n{rest}"));
    let calls = |rest: &str| with_library(&format!("[LibraryConcurrency]\n{rest}"));
    let instances = |rest: &str| {
        format!(
            "[Libraries]\nsofthsm = /usr/lib/softhsm/libsofthsm2.so\n\
                 net = /usr/lib/pkcs11/p11-kit-client.so\n[LibraryInstances]\n{rest}"
        )
    };
    let sync = |rest: &str| members(&format!("[HASynchronize]\n{rest}"));
    let cases = cases.into_iter().chain([
        (
            env("SOFTHSM_CONF = /x\n"),
            "LibraryEnvironment",
            "SOFTHSM_CONF",
            "<library name>.<VARIABLE>",
        ),
        (
            env("hsmA.X = 1\n"),
            "LibraryEnvironment",
            "hsmA.X",
            "no library \"hsmA\" in [Libraries] (the libraries are softhsm)",
        ),
        (
            env("softhsm.1X = 1\n"),
            "LibraryEnvironment",
            "softhsm.1X",
            "not an environment variable name",
        ),
        (
            env("softhsm.A-B = 1\n"),
            "LibraryEnvironment",
            "softhsm.A-B",
            "not an environment variable name",
        ),
        (
            env("softhsm. = 1\n"),
            "LibraryEnvironment",
            "softhsm.",
            "not an environment variable name",
        ),
        (
            env("softhsm.X = 1\nSOFTHSM.x = 2\n"),
            "LibraryEnvironment",
            "SOFTHSM.x",
            "twice",
        ),
        (
            calls("hsmA = 4\n"),
            "LibraryConcurrency",
            "hsmA",
            "no library \"hsmA\" in [Libraries] (the libraries are softhsm)",
        ),
        (
            calls("softhsm = 0\n"),
            "LibraryConcurrency",
            "softhsm",
            "\"0\" is not a number of calls from 1 to 4096",
        ),
        (
            calls("softhsm = 4097\n"),
            "LibraryConcurrency",
            "softhsm",
            "\"4097\" is not a number of calls from 1 to 4096",
        ),
        (
            calls("softhsm = many\n"),
            "LibraryConcurrency",
            "softhsm",
            "leave the key out for no limit",
        ),
        (
            instances("hsmA = 4\n"),
            "LibraryInstances",
            "hsmA",
            "no library \"hsmA\" in [Libraries] (the libraries are softhsm, net)",
        ),
        (
            instances("softhsm = 4\n"),
            "LibraryInstances",
            "softhsm",
            "/usr/lib/softhsm/libsofthsm2.so is not p11-kit's client",
        ),
        (
            instances("net = 0\n"),
            "LibraryInstances",
            "net",
            "\"0\" is not a number of instances from 1 to 64",
        ),
        (
            instances("net = 65\n"),
            "LibraryInstances",
            "net",
            "\"65\" is not a number of instances from 1 to 64",
        ),
        (
            sync("other = 1\n"),
            "HASynchronize",
            "other",
            "no group has this label (the labels are g)",
        ),
        (
            with_library("[HASynchronize]\ng = 1\n"),
            "HASynchronize",
            "g",
            "none is configured",
        ),
        (
            sync("g = 2\n"),
            "HASynchronize",
            "g",
            "\"2\" is not accepted; use 1",
        ),
        (
            members("VirtualTokenActiveRecovery = enhanced\n"),
            "VirtualToken",
            "VirtualTokenActiveRecovery",
            "use activeEnhanced",
        ),
        (
            with_library("[HAConfiguration]\nreconnAtt = -2\n"),
            "HAConfiguration",
            "reconnAtt",
            "-1 to try forever",
        ),
        (
            with_library("[HAConfiguration]\nreconnAtt = +3\n"),
            "HAConfiguration",
            "reconnAtt",
            "\"+3\" is not accepted",
        ),
        (
            with_library("[HAConfiguration]\nAutoReconnectInterval = 0\n"),
            "HAConfiguration",
            "AutoReconnectInterval",
            "from 1 to 86400",
        ),
        (
            with_library("[HAConfiguration]\nautoreconnectinterval = 86401\n"),
            "HAConfiguration",
            "autoreconnectinterval",
            "from 1 to 86400",
        ),
        (
            with_library("[HAConfiguration]\nmemberTimeout = 0\n"),
            "HAConfiguration",
            "memberTimeout",
            "from 1 to 3600000",
        ),
        (
            with_library("[HAConfiguration]\nmemberTimeout = 20s\n"),
            "HAConfiguration",
            "memberTimeout",
            "\"20s\" is not accepted",
        ),
        (
            with_library("[HAConfiguration]\nhaLogStatus = on\n"),
            "HAConfiguration",
            "haLogStatus",
            "use enabled or disabled",
        ),
        (
            with_library("[HAConfiguration]\nHALOGSTATUS = Enabled\n"),
            "HAConfiguration",
            "HALOGSTATUS",
            "haLogPath is not set",
        ),
        (
            with_library("[HAConfiguration]\nhaLogPath = logs\n"),
            "HAConfiguration",
            "haLogPath",
            "not an absolute path",
        ),
        (
            with_library("[HAConfiguration]\nlogLen = -1\n"),
            "HAConfiguration",
            "logLen",
            "0 never to rotate",
        ),
        (
            with_library("[HAConfiguration]\nlogRepeats = 4294967296\n"),
            "HAConfiguration",
            "logRepeats",
            "or 0 to write every one",
        ),
        (
            with_library("[HAConfiguration]\nhaStateDir = state\n"),
            "HAConfiguration",
            "haStateDir",
            "\"state\" is not an absolute path",
        ),
        (
            with_library("[HAConfiguration]\nReconcileInterval = 86401\n"),
            "HAConfiguration",
            "ReconcileInterval",
            "from 0 (only at start, login and a member's return) to 86400",
        ),
        (
            with_library("[HASynchronise]\n"),
            "HASynchronise",
            "",
            "the sections are [Libraries], [LibraryEnvironment], [LibraryConcurrency], \
                 [LibraryInstances], [VirtualToken], [HASynchronize] and [HAConfiguration]",
        ),
    ]);
    for (text, section, key, problem) in cases {
        let e = parse_err(&text);
        let shown = e.to_string();
        let context = format!("{shown}\n--- from ---\n{text}");
        assert!(shown.starts_with(FILE), "{context}");
        assert_eq!(e.section.as_deref(), Some(section), "{context}");
        assert!(shown.contains(&format!("[{section}]")), "{context}");
        if key.is_empty() {
            assert_eq!(e.key, None, "{context}");
        } else {
            assert_eq!(e.key.as_deref(), Some(key), "{context}");
            assert!(shown.contains(&format!("] {key}: ")), "{context}");
        }
        assert!(e.problem.contains(problem), "{context}");
    }
}

#[test]
fn syntax_error_gives_line() {
    let e = parse_err("[Libraries]\na = /a.so\n= /b.so\n");
    assert_eq!((e.section, e.key), (None, None));
    assert!(e.problem.starts_with("line 3: "), "{}", e.problem);

    let e = parse_err("[Libraries]\na = /a.so\n[VirtualToken\n");
    assert!(e.problem.starts_with("line 3: "), "{}", e.problem);

    // A last line without "=" is named too (rust-ini only says "EOF").
    let e = parse_err("[Libraries]\na = /a.so\njunk\n");
    assert_eq!(e.section.as_deref(), Some("Libraries"));
    assert!(
        e.problem
            .starts_with("line 3: the line \"junk\" is not key = value"),
        "{}",
        e.problem
    );

    let e = parse_err("x = 1\n[Libraries]\na = /a.so\n");
    assert_eq!(e.key.as_deref(), Some("x"));
    assert!(e.problem.contains("outside any section"), "{}", e.problem);
}

#[test]
fn unreadable_file_names_os_error() {
    let path = std::env::temp_dir().join(format!("pkcs11-ha-missing-{}.conf", std::process::id()));
    let e = Config::load(&path).unwrap_err();
    assert_eq!(e.file, path);
    assert_eq!((e.section.as_deref(), e.key.as_deref()), (None, None));
    let os = io::Error::from(io::ErrorKind::NotFound).to_string();
    assert!(
        e.problem.contains("No such file") || e.problem.contains(&os),
        "{e}"
    );
}

#[test]
fn save_is_private_and_atomic() {
    let dir = std::env::temp_dir().join(format!("pkcs11-ha-config-test-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join("pkcs11-ha.conf");
    fs::write(&path, "old").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();

    let mut config = parse(EXAMPLE).unwrap();
    config.path = path.clone();
    config.save(&path).unwrap();

    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(Config::load(&path).unwrap(), config);
    let files: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(files, [path.file_name().unwrap()]);

    let missing_dir = dir.join("absent").join("pkcs11-ha.conf");
    let e = config.save(&missing_dir).unwrap_err();
    assert!(e.to_string().contains("absent"), "{e}");
    fs::remove_dir_all(&dir).unwrap();
}
