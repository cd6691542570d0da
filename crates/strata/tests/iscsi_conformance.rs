//! libiscsi's conformance suite (`iscsi-test-cu` from Debian's libiscsi-bin) against a
//! Strata volume served by a real `strata serve`, counted strictly: a test that prints
//! [SKIPPED] did not pass, whatever CUnit's own summary says.
//!
//! `iscsi-conformance.expected` lists every test that passed when it was last raised; each
//! must still pass, so the strict pass count can only rise. A test that newly passes is
//! reported so the list can grow with it.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{Server, data_dir};

/// How one test ended, counted strictly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Passed,
    Skipped,
    Failed,
}

/// Reads `iscsi-test-cu` output: every `Suite:` and `  Test: NAME ...` line starts a test,
/// and what it printed up to the next test decides its verdict (CUnit prints `passed` or
/// `FAILED`; a test that cannot run prints `[SKIPPED]` and is still counted as passed by
/// CUnit).
fn parse(output: &str) -> BTreeMap<String, Verdict> {
    let mut results = BTreeMap::new();
    let mut suite = String::new();
    let mut current: Option<(String, String)> = None;
    let mut finish = |current: &mut Option<(String, String)>| {
        if let Some((name, text)) = current.take() {
            let failed = text.lines().any(|l| l.trim() == "FAILED" || l.trim_end().ends_with("...FAILED"))
                || text.starts_with("FAILED");
            let verdict = if failed {
                Verdict::Failed
            } else if text.contains("[SKIPPED]") {
                Verdict::Skipped
            } else if text.contains("passed") {
                Verdict::Passed
            } else {
                Verdict::Failed
            };
            results.insert(name, verdict);
        }
    };
    for line in output.lines() {
        if let Some(name) = line.strip_prefix("Suite: ") {
            finish(&mut current);
            suite = name.trim().to_string();
        } else if let Some(rest) = line.strip_prefix("  Test: ") {
            finish(&mut current);
            let (name, after) = rest.split_once(" ...").unwrap_or((rest, ""));
            current = Some((format!("{suite}.{}", name.trim()), after.to_string()));
        } else if line.starts_with("Run Summary") {
            finish(&mut current);
        } else if let Some((_, text)) = &mut current {
            text.push('\n');
            text.push_str(line);
        }
    }
    finish(&mut current);
    results
}

#[test]
fn parser_counts_skipped_tests_as_not_passed() {
    let sample = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cunit-sample.txt"),
    )
    .unwrap();
    let results = parse(&sample);
    let count = |v: Verdict| results.values().filter(|r| **r == v).count();
    assert_eq!(results.len(), 25);
    assert_eq!((count(Verdict::Passed), count(Verdict::Failed), count(Verdict::Skipped)), (9, 2, 14));
    assert_eq!(results["GetLBAStatus.BeyondEol"], Verdict::Failed);
    assert_eq!(results["MultipathIO.CompareAndWrite"], Verdict::Skipped);
    assert_eq!(results["MultipathIO.CompareAndWriteAsync"], Verdict::Failed);
    assert_eq!(results["Inquiry.VersionDescriptors"], Verdict::Passed);
}

/// Runs `iscsi-test-cu --test=TEST` against a fresh volume exported with `export_args`,
/// and checks the strict verdicts against the tests listed for `config` in
/// `iscsi-conformance.expected`.
fn conformance(config: &str, size: &str, export_args: &[&str], tests: &[&str], two_sessions: bool) {
    let (_tmp, dir) = data_dir();
    let server = Server::start(&dir);
    server.add_devices(1, "1G");
    server.ok(&["volume", "create", "conformance", "--size", size, "--layout", "linear"]);
    let iqn = format!("iqn.2026-11.io.strata:conformance-{config}");
    let mut args = vec!["export", "add", "conformance", "--iscsi", "--iqn", &iqn];
    args.extend_from_slice(export_args);
    server.ok(&args);
    let url = format!("iscsi://{}/{iqn}/0", server.iscsi);
    let mut results = BTreeMap::new();
    let mut text = String::new();
    for test in tests {
        let mut args = vec!["--dataloss", "--allow-sanitize"];
        let filter = format!("--test={test}");
        args.push(&filter);
        args.push(&url);
        if two_sessions {
            // The second URL feeds the MultipathIO suite (one portal for now).
            args.push(&url);
        }
        let out = std::process::Command::new("iscsi-test-cu")
            .args(&args)
            .output()
            .expect("iscsi-test-cu runs (Debian package libiscsi-bin)");
        let run = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        results.extend(parse(&run));
        text += &run;
    }
    let log = dir.with_extension("cunit.txt");
    std::fs::write(&log, &text).unwrap();
    assert!(!results.is_empty(), "iscsi-test-cu ran nothing; output:\n{text}");
    let expected_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/iscsi-conformance.expected");
    let expected: Vec<String> = std::fs::read_to_string(&expected_path)
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().strip_prefix(config)?.strip_prefix(' ').map(|t| t.trim().to_string()))
        .collect();
    let count = |v: Verdict| results.values().filter(|r| **r == v).count();
    eprintln!(
        "iscsi-test-cu ({config}), counted strictly: {} passed, {} failed, {} skipped of {}",
        count(Verdict::Passed),
        count(Verdict::Failed),
        count(Verdict::Skipped),
        results.len()
    );
    let not_passing: Vec<String> =
        results.iter().filter(|(_, v)| **v != Verdict::Passed).map(|(k, v)| format!("{k} ({v:?})")).collect();
    eprintln!("not passing ({config}): {not_passing:#?}");
    let newly: Vec<String> = results
        .iter()
        .filter(|(k, v)| **v == Verdict::Passed && !expected.contains(k))
        .map(|(k, _)| format!("{config} {k}"))
        .collect();
    if !newly.is_empty() {
        eprintln!("newly passing (add them to {}): {newly:#?}", expected_path.display());
    }
    let regressed: Vec<&String> =
        expected.iter().filter(|t| results.get(*t) != Some(&Verdict::Passed)).collect();
    assert!(
        regressed.is_empty(),
        "{config}: tests that passed before no longer pass: {regressed:#?}\n(full output in {})",
        log.display()
    );
}

/// The run: every test, two sessions, a 4 KiB-block (4Kn) thin volume.
#[test]
fn libiscsi_conformance_4kn() {
    conformance("4kn", "512M", &[], &["ALL"], true);
}

/// Every test again on the same kind of volume seen with 512-byte logical blocks (512e),
/// which the tests that need several logical blocks per physical block require.
#[test]
fn libiscsi_conformance_512e() {
    conformance("512e", "512M", &["--block-size", "512"], &["ALL"], true);
}

/// The suites that only apply to a write-protected or a removable logical unit.
#[test]
fn libiscsi_conformance_read_only_and_removable() {
    conformance("read-only", "64M", &["--read-only"], &["ALL.ReadOnly"], false);
    conformance(
        "removable",
        "64M",
        &["--removable"],
        &["ALL.PreventAllow", "ALL.StartStopUnit", "ALL.NoMedia"],
        true,
    );
}
