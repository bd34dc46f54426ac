//! The generated part of `docs/benchmarks.md`: what `deploy/local/fleet bench`
//! measured (warm and cold sweep against the OpenSSH floor, proxy memory per
//! idle session) and each target of issue 3 as met or missed. Only the text
//! between [`BEGIN`] and [`END`] is replaced; every other section of the
//! document (the hand-written method, other engineers' sections) is kept.

use std::fmt::Write as _;

use crate::hold::HoldResult;
use crate::scrape::PhaseMean;
use crate::stats::LevelSummary;
use crate::sweep::{COMPARE, SweepResult, TARGET};

pub const BEGIN: &str = "<!-- fleet bench: generated from here -->";
pub const END: &str = "<!-- fleet bench: generated up to here -->";

/// Limits of the targets: warm p99 and mean at the top level against the floor.
pub const P99_LIMIT: f64 = 2.0;
pub const MEAN_LIMIT: f64 = 1.5;

/// Everything one bench run produced.
pub struct BenchRun<'a> {
    /// `(name, value)` lines: date, machine, versions, command.
    pub meta: &'a [(String, String)],
    pub warm: &'a SweepResult,
    pub cold: &'a SweepResult,
    pub memory: &'a HoldResult,
    /// Plot path prefix relative to the document, e.g. `img/bench-`.
    pub img_prefix: &'a str,
}

/// Replaces the generated region of `doc` with `generated`, or appends it
/// (with its markers) when the document has none yet.
pub fn splice(doc: &str, generated: &str) -> String {
    splice_region(doc, BEGIN, END, generated)
}

/// Replaces the text from `begin` to `end` (markers included) with `generated` between
/// the same markers, or appends that region when the document has none yet. Shared by
/// every generated part of `docs/benchmarks.md`, each with markers of its own.
pub fn splice_region(doc: &str, begin: &str, end: &str, generated: &str) -> String {
    let region = format!("{begin}\n{}\n{end}", generated.trim_end());
    match (doc.find(begin), doc.find(end)) {
        (Some(b), Some(e)) if e > b => {
            format!("{}{region}{}", &doc[..b], &doc[e + end.len()..])
        }
        _ => format!("{}\n\n{region}\n", doc.trim_end()),
    }
}

pub(crate) fn summary<'a>(
    result: &'a SweepResult,
    endpoint: &'a str,
    level: u32,
) -> Option<&'a LevelSummary> {
    result
        .levels_of(endpoint)
        .find(|l| l.summary.level == level)
        .map(|l| &l.summary)
}

pub(crate) fn top_level(result: &SweepResult) -> u32 {
    result
        .levels
        .iter()
        .map(|l| l.summary.level)
        .max()
        .unwrap_or(0)
}

fn failures(result: &SweepResult, endpoint: &str) -> usize {
    result.levels_of(endpoint).map(|l| l.summary.failed).sum()
}

/// The target's server-side phases at one level, longest mean first.
pub(crate) fn phases_by_mean(result: &SweepResult, level: u32) -> Vec<&PhaseMean> {
    let mut phases: Vec<&PhaseMean> = result
        .levels_of(TARGET)
        .filter(|l| l.summary.level == level)
        .flat_map(|l| l.server_phases.iter())
        .collect();
    phases.sort_by(|a, b| b.mean_ms.total_cmp(&a.mean_ms));
    phases
}

/// The longest phase a client waits through. `session` (the whole command) and
/// `teardown` (after the client has its exit status) are not part of what a client
/// waits for before its output, so they never dominate.
fn dominant_phase(result: &SweepResult, level: u32) -> Option<&PhaseMean> {
    phases_by_mean(result, level)
        .into_iter()
        .find(|p| p.phase != "session" && p.phase != "teardown")
}

/// The client-side step where envgate spends the most time beyond the floor
/// (mean ms, envgate minus floor), at `level`.
fn costliest_step(result: &SweepResult, level: u32) -> Option<(String, f64)> {
    let target = summary(result, TARGET, level)?;
    let floor = summary(result, COMPARE, level)?;
    target
        .steps
        .iter()
        .filter_map(|(step, d)| {
            floor
                .steps
                .get(step)
                .map(|f| (step.clone(), d.mean - f.mean))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
}

fn verdict(ratio: Option<f64>, limit: f64) -> String {
    match ratio {
        None => "not measured (no successful connection at one endpoint)".to_owned(),
        Some(r) if r <= limit => format!("**met** ({r:.2}x, limit {limit}x)"),
        Some(r) => format!(
            "**missed** by {:.0} % ({r:.2}x, limit {limit}x)",
            (r / limit - 1.0) * 100.0
        ),
    }
}

fn blame(result: &SweepResult, level: u32) -> String {
    let mut text = String::new();
    if let Some((step, excess)) = costliest_step(result, level) {
        let _ = write!(
            text,
            "client step with the largest excess over the floor: `{step}` (+{excess:.0} ms mean)"
        );
    }
    if let Some(p) = dominant_phase(result, level) {
        if !text.is_empty() {
            text.push_str("; ");
        }
        let _ = write!(
            text,
            "longest server-side phase: `{}` ({:.0} ms mean)",
            p.key(),
            p.mean_ms
        );
    }
    text
}

fn ms(v: f64) -> String {
    format!("{v:.0}")
}

fn sweep_table(out: &mut String, result: &SweepResult) {
    out.push_str(
        "| level | envgate mean | floor mean | ratio | envgate p99 | floor p99 | ratio | envgate max | floor max | failures (envgate / floor) |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for c in &result.comparisons {
        let (Some(t), Some(f)) = (
            summary(result, TARGET, c.level),
            summary(result, COMPARE, c.level),
        ) else {
            continue;
        };
        let cell = |s: &LevelSummary, pick: fn(&crate::stats::Distribution) -> f64| {
            s.turnaround.as_ref().map(pick).map_or("-".to_owned(), ms)
        };
        let ratio = |r: Option<f64>| r.map_or("-".to_owned(), |r| format!("{r:.2}"));
        let turnaround = c.turnaround.as_ref();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} |",
            c.level,
            cell(t, |d| d.mean),
            cell(f, |d| d.mean),
            ratio(turnaround.and_then(|r| r.mean)),
            cell(t, |d| d.p99),
            cell(f, |d| d.p99),
            ratio(turnaround.and_then(|r| r.p99)),
            cell(t, |d| d.max),
            cell(f, |d| d.max),
            t.failed,
            f.failed,
        );
    }
}

fn phase_table(out: &mut String, result: &SweepResult) {
    let level = top_level(result);
    let phases = phases_by_mean(result, level);
    if phases.is_empty() {
        out.push_str("No server-side phases were scraped.\n");
        return;
    }
    let _ = writeln!(
        out,
        "Server-side phases at {level} clients (mean over the level, both proxies and the control plane):\n\n\
         | phase | observations | mean ms |\n|---|---|---|"
    );
    for p in phases {
        let _ = writeln!(out, "| `{}` | {:.0} | {:.1} |", p.key(), p.count, p.mean_ms);
    }
}

fn plots(out: &mut String, img_prefix: &str, kind: &str) {
    let _ = writeln!(
        out,
        "\n![{kind}: turnaround vs concurrency]({img_prefix}{kind}-turnaround.svg) \
         ![{kind}: server-side phases vs concurrency]({img_prefix}{kind}-phases.svg)"
    );
}

/// The generated section.
pub fn render(run: &BenchRun) -> String {
    let mut out = String::from("#### Latest run of `deploy/local/fleet bench`\n\n");
    for (name, value) in run.meta {
        let _ = writeln!(out, "- {name}: {value}");
    }
    let warm_top = top_level(run.warm);
    let cold_top = top_level(run.cold);
    let warm_ratio = run
        .warm
        .comparisons
        .iter()
        .find(|c| c.level == warm_top)
        .and_then(|c| c.turnaround);
    let warm_fail = failures(run.warm, TARGET);
    let cold_fail = failures(run.cold, TARGET);
    let cold_total: usize = run
        .cold
        .levels_of(TARGET)
        .map(|l| l.summary.connections)
        .sum();

    out.push_str("\n#### Targets\n\n| target | result |\n|---|---|\n");
    let zero = |n: usize| {
        if n == 0 {
            "**met** (0 failed)".to_owned()
        } else {
            format!("**missed**: {n} failed (see the table)")
        }
    };
    let _ = writeln!(
        out,
        "| 0 failed connections, warm, every level up to {warm_top} | {} |",
        zero(warm_fail)
    );
    let _ = writeln!(
        out,
        "| 0 failed connections, cold, every level up to {cold_top} | {} |",
        zero(cold_fail)
    );
    let p99 = warm_ratio.and_then(|r| r.p99);
    let mean = warm_ratio.and_then(|r| r.mean);
    let blame_warm = blame(run.warm, warm_top);
    let with_blame = |v: String, r: Option<f64>, limit: f64| {
        if r.is_some_and(|r| r > limit) && !blame_warm.is_empty() {
            format!("{v}; {blame_warm}")
        } else {
            v
        }
    };
    let _ = writeln!(
        out,
        "| warm, {warm_top} clients: p99 turnaround ≤ {P99_LIMIT}x the floor's | {} |",
        with_blame(verdict(p99, P99_LIMIT), p99, P99_LIMIT)
    );
    let _ = writeln!(
        out,
        "| warm, {warm_top} clients: mean turnaround ≤ {MEAN_LIMIT}x the floor's | {} |",
        with_blame(verdict(mean, MEAN_LIMIT), mean, MEAN_LIMIT)
    );
    let dominant = dominant_phase(run.cold, cold_top)
        .map(|p| format!("`{}` dominates ({:.0} ms mean)", p.key(), p.mean_ms))
        .unwrap_or_else(|| "no server-side phases scraped".to_owned());
    let _ = writeln!(
        out,
        "| cold: every fresh user succeeds; which phase dominates | {} of {cold_total} succeeded; at {cold_top} fresh users {dominant}; {} |",
        cold_total - cold_fail,
        blame(run.cold, cold_top)
    );
    let m = run.memory;
    let _ = writeln!(
        out,
        "| proxy memory, {} idle authenticated sessions | {:.1} KiB per session (proxies' RSS {:.1} MiB → {:.1} MiB) |",
        m.sessions,
        m.kib_per_session,
        m.rss_before_kib as f64 / 1024.0,
        m.rss_after_kib as f64 / 1024.0
    );

    for (title, kind, result) in [
        ("Warm: users whose container exists", "warm", run.warm),
        ("Cold: every client a fresh user", "cold", run.cold),
    ] {
        let _ = writeln!(
            out,
            "\n#### {title}\n\nTurnaround in ms, russh client, `{}`, key exchange {}.\n",
            result.command,
            result.kex.as_deref().unwrap_or("client defaults")
        );
        sweep_table(&mut out, result);
        out.push('\n');
        phase_table(&mut out, result);
        plots(&mut out, run.img_prefix, kind);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_replaces_only_the_generated_region() {
        let doc = format!(
            "# Benchmarks\n\nmethod\n\n{BEGIN}\nold figures\n{END}\n\n## Fast data path (agent)\n\nkept\n"
        );
        let new = splice(&doc, "new figures\n");
        assert_eq!(new, doc.replace("old figures", "new figures"));
        // Splicing again changes nothing more.
        assert_eq!(splice(&new, "new figures"), new);
    }

    #[test]
    fn splice_appends_when_there_are_no_markers() {
        let new = splice("# Benchmarks\n\n## Fast data path (agent)\n", "figures");
        assert_eq!(
            new,
            format!("# Benchmarks\n\n## Fast data path (agent)\n\n{BEGIN}\nfigures\n{END}\n")
        );
    }

    #[test]
    fn render_states_each_target_and_blames_a_step_and_a_phase() {
        // Level 2 of the sample: envgate 40 ms (and one auth failure), floor 12 and 14 ms.
        let result = crate::report::tests::sample_result();
        let memory = HoldResult {
            sessions: 1000,
            pids: vec![1, 2],
            rss_before_kib: 20_480,
            rss_after_kib: 59_700,
            kib_per_session: 39.2,
        };
        let meta = [("date".to_owned(), "2026-11-26 15:00 UTC".to_owned())];
        let text = render(&BenchRun {
            meta: &meta,
            warm: &result,
            cold: &result,
            memory: &memory,
            img_prefix: "img/bench-",
        });
        for expected in [
            "- date: 2026-11-26 15:00 UTC",
            "| 0 failed connections, warm, every level up to 2 | **missed**: 1 failed",
            "p99 turnaround ≤ 2x the floor's | **missed** by 43 % (2.86x, limit 2x)",
            "mean turnaround ≤ 1.5x the floor's | **missed** by 105 % (3.08x, limit 1.5x)",
            "`first_byte` (+27 ms mean)",
            "longest server-side phase: `placement` (9 ms mean)",
            "2 of 3 succeeded; at 2 fresh users `placement` dominates (9 ms mean)",
            "39.2 KiB per session (proxies' RSS 20.0 MiB → 58.3 MiB)",
            "| 2 | 40 | 13 | 3.08 | 40 | 14 | 2.86 | 40 | 14 | 1 / 0 |",
            "![cold: turnaround vs concurrency](img/bench-cold-turnaround.svg)",
        ] {
            assert!(text.contains(expected), "{expected:?} not in:\n{text}");
        }
    }

    #[test]
    fn verdicts_say_by_how_much_a_target_is_missed() {
        assert_eq!(verdict(Some(1.5), 2.0), "**met** (1.50x, limit 2x)");
        assert_eq!(
            verdict(Some(3.0), 2.0),
            "**missed** by 50 % (3.00x, limit 2x)"
        );
        assert!(verdict(None, 2.0).starts_with("not measured"));
    }
}
