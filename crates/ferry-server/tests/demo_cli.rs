//! Runs the built `ferry` binary's `demo` command end to end.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A run that takes longer than this is hung (a small demo takes a second or two).
const LIMIT: Duration = Duration::from_secs(120);

struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = pipe.read_to_string(&mut s);
        s
    })
}

/// Runs `ferry` with `args`, killing it if it outlives [`LIMIT`].
fn ferry(args: &[&str]) -> Run {
    let mut child: Child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .env("FERRY_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the ferry binary");
    let out = drain(child.stdout.take().expect("stdout is piped"));
    let err = drain(child.stderr.take().expect("stderr is piped"));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for ferry") {
            break status;
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ferry {args:?} did not finish within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// The number on the `published` line of the totals block (`  published      1,234`).
fn published_total(stdout: &str) -> Option<u64> {
    stdout.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("published"), Some(n), None) => n.replace(',', "").parse().ok(),
            _ => None,
        }
    })
}

/// The JSON report of a successful `--json` run whose accounting is OK, and the run's output
/// (prefixed with `label`) for assertion messages.
fn json_report(run: &Run, label: &str) -> (serde_json::Value, String) {
    let context = format!("{label}\nstdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert!(
        run.status.success(),
        "exit status {:?}\n{context}",
        run.status
    );
    let report: serde_json::Value =
        serde_json::from_str(&run.stdout).expect("stdout is one JSON document");
    assert_eq!(report["accounting"]["status"], "OK", "{context}");
    (report, context)
}

#[test]
fn demo_runs_and_accounts_for_every_message() {
    let run = ferry(&["demo", "--duration", "1", "--rate", "2000"]);
    let context = format!("stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert!(
        run.status.success(),
        "exit status {:?}\n{context}",
        run.status
    );
    assert!(run.stdout.contains("accounting: OK"), "{context}");
    assert!(!run.stdout.contains("MISMATCH"), "{context}");
    let published = published_total(&run.stdout).expect("a `published N` totals line");
    assert!(published > 0, "nothing was published\n{context}");
    // The live table was printed.
    assert!(run.stdout.contains("pub/s"), "{context}");
}

#[test]
fn demo_json_report_counts_exactly_with_a_message_limit() {
    let run = ferry(&[
        "demo",
        "--producers",
        "4",
        "--collectors",
        "2",
        "--workers",
        "2",
        "--messages",
        "250",
        "--rate",
        "0",
        "--json",
    ]);
    let (report, context) = json_report(&run, "");
    assert_eq!(report["accounting"]["ok"], true);
    assert_eq!(report["published"], 1000, "4 producers x 250 points");
    assert_eq!(report["shutdown"]["published"], 1000);
    assert_eq!(report["shutdown"]["dropped"], 0);
    // 2 collectors and the group each settle every point.
    assert_eq!(report["shutdown"]["acked"], 3000);
    let subs = report["subscriptions"].as_array().expect("subscriptions");
    assert_eq!(subs.len(), 3);
    for s in subs {
        assert_eq!(s["unaccounted"], 0, "{s}");
        assert_eq!(s["assigned"], 1000, "{s}");
    }
    let collectors = report["collectors"].as_array().expect("collectors");
    assert_eq!(collectors.len(), 2);
    for c in collectors {
        assert_eq!(c["received"], 1000, "{c}");
        assert_eq!(c["complete"], true, "{c}");
    }
    let acked: u64 = report["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| w["acked"].as_u64().expect("acked"))
        .sum();
    assert_eq!(acked, 1000);
    // The live lines went to stderr, so stdout stayed parseable.
    assert!(run.stderr.contains("ferry demo"), "{context}");
}

#[test]
fn demo_on_a_data_directory_is_durable_and_resumes() {
    let dir = std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id()));
    let dir_arg = dir.to_str().expect("a UTF-8 temp path");
    let args = [
        "demo",
        "--producers",
        "2",
        "--collectors",
        "1",
        "--workers",
        "1",
        "--messages",
        "100",
        "--rate",
        "0",
        "--json",
        "--data-dir",
        dir_arg,
    ];
    for round in 1..=2u64 {
        let (report, context) = json_report(&ferry(&args), &format!("round {round}"));
        // The second run appends after the first: its offsets continue on disk.
        assert_eq!(report["published"], 200, "{context}");
    }
    let positions = std::fs::read_to_string(dir.join("positions.json")).expect("positions saved");
    let positions: serde_json::Value = serde_json::from_str(&positions).expect("JSON positions");
    // The group's position on each host's topic is past both runs' 100 points.
    let group = positions["group:alerts"]
        .as_object()
        .expect("the group's positions");
    assert_eq!(group.len(), 2, "{positions}");
    assert!(
        group.values().all(|p| p.as_u64() == Some(200)),
        "{positions}"
    );
    std::fs::remove_dir_all(&dir).expect("clean up");
}

#[test]
fn demo_rejects_invalid_options() {
    for args in [
        &["demo", "--producers", "0"][..],
        &["demo", "--duration", "0"],
        &["demo", "--duration", "soon"],
        &["demo", "--messages", "0"],
    ] {
        let run = ferry(args);
        assert_eq!(
            run.status.code(),
            Some(2),
            "{args:?} should be a usage error: {}",
            run.stderr
        );
        assert!(run.stdout.is_empty(), "{args:?}: {}", run.stdout);
    }
}
