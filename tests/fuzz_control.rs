//! Fuzzing the control protocol: whatever a client sends, every request line gets exactly
//! one reply line, a well-formed version-1 reply, and nothing panics.
//!
//! - `answer_line` with arbitrary text (from arbitrary bytes) and with arbitrary JSON shapes
//!   built from the protocol's own keys and commands: the reply serializes to one line that
//!   parses back; the handler is called exactly for lines that are valid version-1 requests,
//!   and gets the request the line says.
//! - The socket server with arbitrary bytes, several lines per connection (invalid UTF-8,
//!   blank lines, partial last line): one reply line per non-blank line, in order, and the
//!   connection stays usable.
//!
//! `SNAPBLK_FUZZ_CASES=N` runs N cases per harness with a random seed; the default run uses
//! a fixed seed (docs/testing.md).

use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use serde_json::{json, Map, Value};
use snapblk::control::protocol::{Reply, Request};
use snapblk::control::server::{answer_line, ControlHandler};
use snapblk::control::ControlServer;
use snapblk::testkit::fuzz;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Answers every request with the request itself, and remembers it.
#[derive(Default)]
struct Recorder(Mutex<Vec<Request>>);

impl ControlHandler for Recorder {
    fn handle(&self, request: Request) -> Reply {
        self.0.lock().unwrap().push(request.clone());
        Reply::ok(request)
    }
}

/// A reply is one line of JSON that parses back as a version-1 reply: `ok` with a result, or
/// not ok with an error code and message.
fn check_reply(reply: &Reply) -> Result<Value, TestCaseError> {
    let text = serde_json::to_string(reply).expect("a reply serializes");
    prop_assert!(!text.contains('\n'), "a reply is one line: {}", text);
    let v: Value = serde_json::from_str(&text).expect("a reply parses back");
    prop_assert_eq!(&v["v"], &json!(1));
    match v["ok"].as_bool() {
        Some(true) => prop_assert!(v.get("result").is_some()),
        Some(false) => {
            prop_assert!(v["error"]["code"].is_string(), "{}", text);
            prop_assert!(v["error"]["message"].is_string(), "{}", text);
        }
        None => prop_assert!(false, "no ok field: {}", text),
    }
    let back: Reply = serde_json::from_value(v.clone()).expect("a reply deserializes");
    prop_assert_eq!(back.ok, reply.ok);
    Ok(v)
}

/// Answers `line`; checks the reply, and that the handler ran iff the line is a valid
/// version-1 request, with that request.
fn check_line(line: &str) -> Result<(), TestCaseError> {
    let rec = Recorder::default();
    let reply = answer_line(line, &rec);
    check_reply(&reply)?;
    let calls = rec.0.into_inner().unwrap();
    let expected: Option<Request> = serde_json::from_str::<Value>(line)
        .ok()
        .filter(|v| v.get("v").and_then(Value::as_u64) == Some(1))
        .and_then(|v| serde_json::from_value(v).ok());
    match expected {
        Some(req) => {
            prop_assert_eq!(calls, vec![req]);
            prop_assert!(reply.ok);
        }
        None => {
            prop_assert!(calls.is_empty(), "dispatched an invalid line: {}", line);
            prop_assert!(!reply.ok);
        }
    }
    Ok(())
}

const KEYS: &[&str] = &[
    "v", "cmd", "name", "parent", "writable", "socket", "serial", "force", "extra",
];
const CMDS: &[&str] = &[
    "snapshot-create",
    "serve",
    "unserve",
    "list",
    "snapshot-delete",
    "restore",
    "stats",
    "cache-info",
    "explode",
    "",
];

/// Arbitrary JSON, biased towards the protocol's shapes: objects with its keys, its
/// commands, version 1, strings of all kinds (long, empty, NUL, slashes), huge numbers.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        prop_oneof![Just(1u64), Just(0), Just(2), any::<u64>()].prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop::sample::select(CMDS).prop_map(|s| Value::from(s.to_string())),
        ".{0,40}".prop_map(Value::from),
        prop_oneof![Just("origin"), Just("/tmp/x.sock"), Just("a/b"), Just("\0")]
            .prop_map(|s| Value::from(s.to_string())),
        (0usize..300).prop_map(|n| Value::from("x".repeat(n))),
    ];
    leaf.prop_recursive(4, 48, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        4 => prop::sample::select(KEYS).prop_map(str::to_string),
                        1 => ".{0,8}"
                    ],
                    inner
                ),
                0..8
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A request-shaped object: version (mostly 1), a command (mostly known) and fields of
/// arbitrary shapes.
fn request_like() -> impl Strategy<Value = Value> {
    (
        prop_oneof![4 => Just(json!(1)), 1 => json_value()],
        prop_oneof![4 => prop::sample::select(CMDS).prop_map(|c| json!(c)), 1 => json_value()],
        prop::collection::vec(
            (
                prop::sample::select(KEYS),
                prop_oneof![2 => "[a-z0-9/._-]{0,12}".prop_map(Value::from), 1 => json_value()],
            ),
            0..6,
        ),
    )
        .prop_map(|(v, cmd, fields)| {
            let mut m = Map::new();
            for (k, val) in fields {
                m.insert(k.to_string(), val);
            }
            m.insert("v".into(), v);
            m.insert("cmd".into(), cmd);
            Value::Object(m)
        })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: fuzz::cases(2000),
        failure_persistence: None,
        rng_seed: fuzz::seed().map_or(RngSeed::Random, RngSeed::Fixed),
        ..ProptestConfig::default()
    })]

    /// Arbitrary bytes, as the text a line carries.
    #[test]
    fn arbitrary_text_gets_one_well_formed_reply(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        check_line(&String::from_utf8_lossy(&bytes))?;
    }

    /// Arbitrary JSON shapes and request-like objects, whole or cut short.
    #[test]
    fn arbitrary_json_gets_one_well_formed_reply(
        v in prop_oneof![json_value(), request_like(), request_like()],
        cut in prop_oneof![3 => Just(None), 1 => any::<prop::sample::Index>().prop_map(Some)],
    ) {
        let text = v.to_string();
        let line = match cut {
            Some(i) => {
                let mut at = i.index(text.len() + 1);
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                text[..at].to_string()
            }
            None => text,
        };
        check_line(&line)?;
    }
}

/// The generator reaches valid requests of every command (else the dispatch checks above
/// would test nothing).
#[test]
fn the_generator_reaches_every_command() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..5000 {
        let v = request_like().new_tree(&mut runner).unwrap().current();
        if let Ok(req) = serde_json::from_value::<Request>(v.clone()) {
            if req.v == 1 {
                seen.insert(v["cmd"].as_str().unwrap_or_default().to_string());
            }
        }
    }
    assert_eq!(seen.len(), 8, "commands reached: {seen:?}");
}

/// Reads reply lines until `n` arrived or the connection ended.
fn read_replies(reader: &mut BufReader<UnixStream>, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < n {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => out.push(line),
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: fuzz::cases(150),
        failure_persistence: None,
        rng_seed: fuzz::seed().map_or(RngSeed::Random, RngSeed::Fixed),
        ..ProptestConfig::default()
    })]

    /// Over the socket: lines of arbitrary bytes (no line feed inside), some valid requests
    /// among them; one reply line per non-blank line, in order, then a valid request still
    /// works on the same connection.
    #[test]
    fn every_line_on_the_socket_gets_one_reply(
        lines in prop::collection::vec(
            prop_oneof![
                3 => prop::collection::vec(any::<u8>().prop_filter("no line feed", |b| *b != b'\n'), 0..80),
                1 => Just(br#"{"v":1,"cmd":"list"}"#.to_vec()),
                1 => Just(b"  \t ".to_vec()),
            ],
            1..8,
        ),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let server = ControlServer::start(&path, 0o600, Arc::new(Recorder::default())).unwrap();
        let stream = UnixStream::connect(&path).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        let mut payload = Vec::new();
        let mut expected = 0;
        for l in &lines {
            payload.extend_from_slice(l);
            payload.push(b'\n');
            // A line that is blank once decoded gets no reply (blank lines are skipped).
            if !String::from_utf8_lossy(l).trim().is_empty() {
                expected += 1;
            }
        }
        payload.extend_from_slice(b"{\"v\":1,\"cmd\":\"stats\"}\n");
        writer.write_all(&payload).unwrap();
        let replies = read_replies(&mut reader, expected + 1);
        prop_assert_eq!(replies.len(), expected + 1, "replies: {:?}", replies);
        for r in &replies {
            let reply: Reply = serde_json::from_str(r.trim_end()).expect("a reply line parses");
            check_reply(&reply)?;
        }
        let last: Value = serde_json::from_str(replies[expected].trim_end()).unwrap();
        prop_assert_eq!(&last["result"]["cmd"], &json!("stats"));
        drop(server);
    }
}
