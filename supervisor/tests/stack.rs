//! The supervisor against real processes (`sh`, `python3 -m http.server`): start order by health, restarts
//! with backoff, one SIGTERM to stop, SIGKILL after the stop timeout, a failing one-shot stopping the stack.

use celeriac_supervisor::{Options, Phase, Stack, run};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("celeriac-supervisor-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn fast() -> Options {
    Options {
        stop_timeout: Duration::from_secs(5),
        backoff_start: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        poll: Duration::from_millis(50),
        ..Options::default()
    }
}

fn stack(text: &str, vars: &[(&str, String)]) -> Stack {
    let vars: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    Stack::parse(text, &vars).unwrap()
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..300 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependents_start_after_health_and_stop_takes_one_sigterm() {
    let d = dir("order");
    let log = d.join("log");
    let port = free_port();
    let s = stack(
        r#"
        [services.api]
        command = ["sh", "-c", "sleep 0.5; echo api-listening >> ${log}; exec python3 -m http.server ${port} --bind 127.0.0.1"]
        health = { http = "http://127.0.0.1:${port}/" }
        [services.worker]
        command = ["sh", "-c", "echo worker-started >> ${log}; trap 'echo worker-got-term >> ${log}; exit 0' TERM; while true; do sleep 0.05; done"]
        depends_on = ["api"]
        "#,
        &[
            ("log", log.display().to_string()),
            ("port", port.to_string()),
        ],
    );
    let stop = CancellationToken::new();
    let handle = tokio::spawn(run(s, fast(), stop.clone(), CancellationToken::new()));
    wait_until("the worker to start", || {
        lines(&log).contains(&"worker-started".to_string())
    })
    .await;
    assert_eq!(lines(&log), vec!["api-listening", "worker-started"]);
    stop.cancel();
    let summary = handle.await.unwrap().unwrap();
    assert_eq!(summary.failed, None);
    let mut phases = summary.phases.clone();
    phases.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        phases,
        vec![
            ("api".to_string(), Phase::Stopped),
            ("worker".to_string(), Phase::Stopped)
        ]
    );
    assert_eq!(
        lines(&log)
            .iter()
            .filter(|l| *l == "worker-got-term")
            .count(),
        1,
        "exactly one SIGTERM reached the worker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_service_is_restarted_with_backoff() {
    let d = dir("restart");
    let log = d.join("log");
    let s = stack(
        r#"
        [services.flaky]
        command = ["sh", "-c", "echo run >> ${log}; exit 3"]
        "#,
        &[("log", log.display().to_string())],
    );
    let stop = CancellationToken::new();
    let handle = tokio::spawn(run(s, fast(), stop.clone(), CancellationToken::new()));
    wait_until("three runs", || lines(&log).len() >= 3).await;
    stop.cancel();
    let summary = handle.await.unwrap().unwrap();
    assert_eq!(summary.phases, vec![("flaky".to_string(), Phase::Stopped)]);
    assert!(lines(&log).len() >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_ignoring_sigterm_is_killed_after_the_stop_timeout() {
    let d = dir("kill");
    let pidfile = d.join("pid");
    let s = stack(
        r#"
        [services.stubborn]
        command = ["sh", "-c", "echo $$ > ${pidfile}; trap '' TERM; while true; do sleep 0.05; done"]
        "#,
        &[("pidfile", pidfile.display().to_string())],
    );
    let stop = CancellationToken::new();
    let options = Options {
        stop_timeout: Duration::from_millis(300),
        ..fast()
    };
    let handle = tokio::spawn(run(s, options, stop.clone(), CancellationToken::new()));
    wait_until("the pid file", || !lines(&pidfile).is_empty()).await;
    let pid: i32 = lines(&pidfile)[0].parse().unwrap();
    stop.cancel();
    let summary = handle.await.unwrap().unwrap();
    assert_eq!(
        summary.phases,
        vec![("stubborn".to_string(), Phase::Stopped)]
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the process is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shots_gate_their_dependents_and_a_failing_one_stops_the_stack() {
    let d = dir("oneshot");
    let log = d.join("log");
    let s = stack(
        r#"
        [services.migrate]
        command = ["sh", "-c", "echo migrated >> ${log}"]
        oneshot = true
        [services.app]
        command = ["sh", "-c", "echo app >> ${log}; exec sleep 60"]
        depends_on = ["migrate"]
        [services.broken]
        command = ["sh", "-c", "sleep 0.5; exit 2"]
        oneshot = true
        [services.never]
        command = ["sh", "-c", "echo never >> ${log}"]
        depends_on = ["broken"]
        "#,
        &[("log", log.display().to_string())],
    );
    let summary = run(
        s,
        fast(),
        CancellationToken::new(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(
        summary.failed.as_deref(),
        Some("broken exited with status 2")
    );
    assert_eq!(lines(&log), vec!["migrated", "app"]);
    let phase = |n: &str| summary.phases.iter().find(|(s, _)| s == n).unwrap().1;
    assert_eq!(phase("migrate"), Phase::Done);
    assert_eq!(phase("broken"), Phase::Failed);
    assert_eq!(phase("app"), Phase::Stopped);
    assert_eq!(phase("never"), Phase::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_services_whose_program_is_missing_are_skipped() {
    let s = stack(
        r#"
        [services.prometheus]
        command = ["celeriac-test-no-such-program", "--x"]
        optional = "apt-get install it"
        [services.after]
        command = ["true"]
        oneshot = true
        depends_on = ["prometheus"]
        "#,
        &[],
    );
    let summary = run(
        s,
        fast(),
        CancellationToken::new(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let phase = |n: &str| summary.phases.iter().find(|(s, _)| s == n).unwrap().1;
    assert_eq!(phase("prometheus"), Phase::Skipped);
    assert_eq!(phase("after"), Phase::Done);
}

#[test]
fn the_shipped_stack_parses_with_the_readme_ports() {
    let s = Stack::parse(include_str!("../../compose/stack.toml"), &HashMap::new()).unwrap();
    let metrics = |name: &str| {
        let svc = s.get(name).unwrap();
        let at = svc
            .command
            .iter()
            .position(|a| a == "--metrics-addr")
            .unwrap();
        svc.command[at + 1].clone()
    };
    assert_eq!(metrics("email"), "127.0.0.1:9091");
    assert_eq!(metrics("payment"), "127.0.0.1:9092");
    assert_eq!(metrics("sync"), "127.0.0.1:9093");
    assert_eq!(metrics("general"), "127.0.0.1:9094");
    assert_eq!(metrics("beat"), "127.0.0.1:9095");
    assert_eq!(s.get("migrate").unwrap().depends_on, vec!["database"]);
    assert!(s.get("migrate").unwrap().oneshot);
    assert_eq!(
        s.get("email").unwrap().env["CELERIAC_EMAIL__SMTP_URL"],
        "smtp://127.0.0.1:2525"
    );
}
