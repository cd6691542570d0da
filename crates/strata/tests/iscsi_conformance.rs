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

#[test]
fn libiscsi_conformance_suite() {
    let (_tmp, dir) = data_dir();
    let server = Server::start(&dir);
    server.add_devices(1, "1G");
    server.ok(&["volume", "create", "conformance", "--size", "512M", "--layout", "linear"]);
    let iqn = "iqn.2026-11.io.strata:conformance";
    server.ok(&["export", "add", "conformance", "--iscsi", "--iqn", iqn]);
    let url = format!("iscsi://{}/{iqn}/0", server.iscsi);
    let out = std::process::Command::new("iscsi-test-cu")
        .args(["--dataloss", "--allow-sanitize", "--test=ALL", &url, &url])
        .output()
        .expect("iscsi-test-cu runs (Debian package libiscsi-bin)");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    std::fs::write(dir.with_extension("cunit.txt"), &text).unwrap();
    let results = parse(&text);
    assert!(results.len() >= 230, "the suite ran {} tests; output:\n{text}", results.len());
    let expected_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/iscsi-conformance.expected");
    let expected: Vec<String> = std::fs::read_to_string(&expected_path)
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    let passed: Vec<&String> =
        results.iter().filter(|(_, v)| **v == Verdict::Passed).map(|(k, _)| k).collect();
    let not_passing: Vec<String> =
        results.iter().filter(|(_, v)| **v != Verdict::Passed).map(|(k, v)| format!("{k} ({v:?})")).collect();
    let regressed: Vec<&String> =
        expected.iter().filter(|t| results.get(*t) != Some(&Verdict::Passed)).collect();
    let newly: Vec<&&String> = passed.iter().filter(|t| !expected.contains(t)).collect();
    eprintln!(
        "iscsi-test-cu, counted strictly: {} passed, {} failed, {} skipped of {}",
        passed.len(),
        results.values().filter(|v| **v == Verdict::Failed).count(),
        results.values().filter(|v| **v == Verdict::Skipped).count(),
        results.len()
    );
    eprintln!("not passing: {not_passing:#?}");
    if !newly.is_empty() {
        eprintln!("newly passing (add them to {}): {newly:#?}", expected_path.display());
    }
    assert!(
        regressed.is_empty(),
        "tests that passed before no longer pass: {regressed:#?}\n(full output in {})",
        dir.with_extension("cunit.txt").display()
    );
}
