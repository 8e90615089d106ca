//! The fuzz targets' short smoke on stable (what CI runs through `make test`): each target gets its seeds, the
//! inputs that once broke something, and a few thousand deterministic mutations of the seeds (bit flips,
//! byte insertions and deletions, truncations, splices). `make fuzz` runs the coverage-guided version.

use celeriac_fuzz_harness as h;

/// A small deterministic PRNG (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: &[&[u8]] = &[
    b"0", b"-1", b"1e400", b"\"", b"{", b"[", b"null", b"\xff", b"\x00", b"*", b"?",
];

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], input: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        match rng.below(6) {
            0 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(input.len() + 1);
                input.insert(i, rng.next() as u8);
            }
            2 if !input.is_empty() => {
                let i = rng.below(input.len());
                input.remove(i);
            }
            3 => {
                let n = rng.below(input.len() + 1);
                input.truncate(n);
            }
            4 => {
                let other = &seeds[rng.below(seeds.len())];
                let (i, j) = (rng.below(input.len() + 1), rng.below(other.len() + 1));
                input.splice(i.., other[j..].iter().copied());
            }
            _ => {
                let i = rng.below(input.len() + 1);
                let word = INTERESTING[rng.below(INTERESTING.len())];
                input.splice(i..i, word.iter().copied());
            }
        }
    }
}

fn smoke(name: &str, target: fn(&[u8]), seeds: &[Vec<u8>], rounds: usize) {
    for s in seeds {
        target(s);
    }
    save_seeds(name, seeds);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for _ in 0..rounds {
        let mut input = seeds[rng.below(seeds.len())].clone();
        mutate(&mut rng, seeds, &mut input);
        target(&input);
    }
}

/// With `CELERIAC_FUZZ_SEEDS=dir` (what `make fuzz` sets), writes each target's seeds to `dir/<target>/` as
/// the starting corpus of cargo fuzz.
fn save_seeds(name: &str, seeds: &[Vec<u8>]) {
    let Some(dir) = std::env::var_os("CELERIAC_FUZZ_SEEDS") else {
        return;
    };
    let dir = std::path::Path::new(&dir).join(name);
    std::fs::create_dir_all(&dir).expect("seed dir");
    for (i, s) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i}")), s).expect("seed");
    }
}

fn b64(s: &str) -> String {
    // A dependency-free base64 (standard alphabet, padded) for building envelopes.
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = s.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(A[(n >> (18 - 6 * k)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn envelope_seeds() -> Vec<Vec<u8>> {
    let v2 = format!(
        r#"{{"body": "{}", "content-encoding": "utf-8", "content-type": "application/json", "headers": {{"lang": "py", "task": "bench.add", "id": "a1", "root_id": "a1", "parent_id": null, "group": null, "retries": 0, "timelimit": [null, null], "eta": null, "expires": null, "argsrepr": "(2, 3)", "kwargsrepr": "{{}}", "origin": "gen1@host"}}, "properties": {{"correlation_id": "a1", "reply_to": "r", "delivery_mode": 2, "delivery_info": {{"exchange": "", "routing_key": "celery"}}, "priority": 0, "body_encoding": "base64", "delivery_tag": "t1"}}}}"#,
        b64(r#"[[2, 3], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#)
    );
    let v1 = format!(
        r#"{{"body": "{}", "content-encoding": "utf-8", "content-type": "application/json", "headers": {{}}, "properties": {{"body_encoding": "base64", "delivery_tag": "t2", "delivery_info": {{"exchange": "celery", "routing_key": "celery"}}}}}}"#,
        b64(
            r#"{"task": "bench.add", "id": "b2", "args": [1, 2], "kwargs": {}, "retries": 0, "eta": null, "utc": true}"#
        )
    );
    let pickle = r#"{"body": "gAN9cQAu", "content-type": "application/x-python-serialize", "content-encoding": "binary", "headers": {"task": "x", "id": "p"}, "properties": {"body_encoding": "base64"}}"#;
    vec![v2.into_bytes(), v1.into_bytes(), pickle.as_bytes().to_vec()]
}

#[test]
fn envelope_smoke() {
    smoke("envelope", h::envelope, &envelope_seeds(), 20_000);
}

#[test]
fn message_smoke() {
    let seeds: Vec<Vec<u8>> = vec![
        b"\x00\x00{\"task\": \"bench.add\", \"id\": \"x\"}\x00[[1, 2], {}, {}]".to_vec(),
        b"\x00\x00{}\x00{\"task\": \"t\", \"id\": \"i\", \"args\": [], \"kwargs\": {}}".to_vec(),
        b"\x01\x00{\"task\": \"t\", \"id\": \"i\"}\x00\x93\x92\x01\x02\x80\x80".to_vec(),
        b"\x02\x00{\"task\": \"t\", \"id\": \"i\"}\x00- [1, 2]\n- {}\n- {}\n".to_vec(),
        // YAML aliases that multiply (billion laughs) must be refused or bounded, not expanded.
        b"\x02\x00{\"task\": \"t\", \"id\": \"i\"}\x00a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\ng: [*f, *f, *f, *f, *f, *f, *f, *f, *f]\n".to_vec(),
        b"\x00\x01{\"task\": \"t\", \"id\": \"i\"}\x00x\x9c\x8b\x8e\x8e\x05\x00\x01\x35\x00\xb9".to_vec(),
    ];
    smoke("message", h::message, &seeds, 20_000);
}

#[test]
fn signature_smoke() {
    let seeds: Vec<Vec<u8>> = vec![
        br#"{"task": "bench.add", "args": [2, 2], "kwargs": {}, "options": {"link": [{"task": "bench.mul", "args": [3], "kwargs": {}, "options": {}, "subtask_type": null, "immutable": false}]}, "subtask_type": null, "immutable": false}"#.to_vec(),
        br#"{"task": "celery.chain", "args": [], "kwargs": {"tasks": [{"task": "a", "args": [], "kwargs": {}, "options": {}}, {"task": "b", "args": [], "kwargs": {}, "options": {}}]}, "options": {}, "subtask_type": "chain", "immutable": false}"#.to_vec(),
        br#"{"task": "celery.chord", "args": [], "kwargs": {"header": {"task": "celery.group", "args": [], "kwargs": {"tasks": [{"task": "a", "args": [1], "kwargs": {}, "options": {}}]}, "options": {}, "subtask_type": "group"}, "body": {"task": "b", "args": [], "kwargs": {}, "options": {}}}, "options": {}, "subtask_type": "chord"}"#.to_vec(),
    ];
    smoke("signature", h::signature, &seeds, 20_000);
}

#[test]
fn pidbox_smoke() {
    let req = b64(
        r#"{"method": "ping", "arguments": {}, "destination": null, "pattern": "w*@h?st", "matcher": "glob", "ticket": "t", "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": "k"}}"#,
    );
    let seeds: Vec<Vec<u8>> = vec![
        format!("w1@host\n{{\"body\": \"{req}\", \"content-type\": \"application/json\", \"content-encoding\": \"utf-8\", \"headers\": {{\"clock\": 3}}, \"properties\": {{\"body_encoding\": \"base64\"}}}}").into_bytes(),
        // A multibyte worker name used to cut a character in half in the glob (a panic).
        format!("wé@vm\n{{\"body\": \"{}\", \"properties\": {{\"body_encoding\": \"base64\"}}}}", b64(r#"{"method": "ping", "pattern": "w*x"}"#)).into_bytes(),
        format!("{}\n{{\"body\": \"{}\", \"properties\": {{\"body_encoding\": \"base64\"}}}}", "a".repeat(300), b64(&format!(r#"{{"method": "ping", "pattern": "{}b"}}"#, "*a".repeat(60)))).into_bytes(),
    ];
    smoke("pidbox", h::pidbox, &seeds, 20_000);
}

#[test]
fn amqp_table_smoke() {
    // A table: long length, then short-string key + type tag + value entries.
    let entry = |key: &str, tag: u8, value: &[u8]| {
        let mut e = vec![key.len() as u8];
        e.extend_from_slice(key.as_bytes());
        e.push(tag);
        e.extend_from_slice(value);
        e
    };
    let mut body = Vec::new();
    body.extend(entry(
        "task",
        b'S',
        &[&[0, 0, 0, 9][..], b"bench.add"].concat(),
    ));
    body.extend(entry("retries", b'l', &7i64.to_be_bytes()));
    body.extend(entry("flag", b't', &[1]));
    body.extend(entry("f", b'd', &1.5f64.to_be_bytes()));
    let mut nested = (body.len() as u32).to_be_bytes().to_vec();
    nested.extend(&body);
    body.extend(entry("inner", b'F', &nested));
    let mut table = (body.len() as u32).to_be_bytes().to_vec();
    table.extend(&body);
    // A length prefix of 1 GB must not be allocated.
    let huge = [&[0x40, 0, 0, 0][..], b"\x01aS\xff\xff\xff\xff"].concat();
    smoke("amqp_table", h::amqp_table, &[table, huge], 20_000);
}

#[test]
fn config_smoke() {
    let seeds: Vec<Vec<u8>> = vec![
        include_bytes!("../../compose/celeriac.toml").to_vec(),
        include_bytes!("../../compose/ha/rabbitmq.toml").to_vec(),
        b"task_annotations = { \"bench.add\" = { rate_limit = \"4/s\", time_limit = 3 } }\nworker_prefetch_multiplier = 4\n[broker_transport_options]\nvisibility_timeout = 30\n".to_vec(),
    ];
    smoke("config", h::config, &seeds, 5_000);
}

/// Inputs that crashed a fuzz target once (`make fuzz` saves them under fuzz/artifacts/): each must pass now.
#[test]
fn past_crashes() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/regressions");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("regressions") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let data = std::fs::read(&path).expect("input");
        let target: fn(&[u8]) = match name.split('-').next() {
            Some("envelope") => h::envelope,
            Some("message") => h::message,
            Some("signature") => h::signature,
            Some("pidbox") => h::pidbox,
            Some("amqp_table") => h::amqp_table,
            Some("config") => h::config,
            _ => panic!("{name}: name it <target>-<what>"),
        };
        target(&data);
        seen += 1;
    }
    assert!(seen >= 1);
}
