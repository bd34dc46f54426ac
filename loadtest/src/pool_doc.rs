//! The generated warm-pool part of `docs/benchmarks.md`: the same cold sweep (every client a
//! brand-new user, all at once) with the environment's warm pool off and on, back to back in
//! one run of `deploy/local/fleet bench`, and the ratio of their turnarounds. Only the text
//! between [`BEGIN`] and [`END`] is replaced.

use std::fmt::Write as _;

use crate::bench_doc;
use crate::stats::{Distribution, LevelSummary};
use crate::sweep::{SweepResult, TARGET};

pub const BEGIN: &str = "<!-- fleet bench pool: generated from here -->";
pub const END: &str = "<!-- fleet bench pool: generated up to here -->";

/// The two sweeps of one run.
pub struct PoolRun<'a> {
    /// `(name, value)` lines: date, machine, versions, command.
    pub meta: &'a [(String, String)],
    pub off: &'a SweepResult,
    pub on: &'a SweepResult,
    /// `warm_pool_size` during the "on" sweep.
    pub pool_size: u32,
}

/// Replaces the generated region of `doc` with `generated`, or appends it (with its
/// markers) when the document has none yet.
pub fn splice(doc: &str, generated: &str) -> String {
    bench_doc::splice_region(doc, BEGIN, END, generated)
}

/// The target's summary at its highest level.
fn top(result: &SweepResult) -> Option<&LevelSummary> {
    bench_doc::summary(result, TARGET, bench_doc::top_level(result))
}

/// Server-side `placement` phases of the target's highest level, e.g. `outcome=warm`.
fn placements(result: &SweepResult) -> String {
    let phases: Vec<String> = bench_doc::phases_by_mean(result, bench_doc::top_level(result))
        .into_iter()
        // Only the series by outcome (created, warm, reused), not other labellings of it.
        .filter(|p| p.phase == "placement" && p.labels.starts_with("outcome="))
        .map(|p| {
            let outcome = p.labels.trim_start_matches("outcome=");
            format!("{outcome}: {:.0} × {:.0} ms", p.count, p.mean_ms)
        })
        .collect();
    if phases.is_empty() {
        "-".into()
    } else {
        phases.join(", ")
    }
}

fn failures(summary: &LevelSummary) -> String {
    if summary.failures.is_empty() {
        return summary.failed.to_string();
    }
    let kinds: Vec<String> = summary
        .failures
        .iter()
        .map(|(kind, n)| format!("{n} {kind:?}"))
        .collect();
    format!("{} ({})", summary.failed, kinds.join(", "))
}

/// Picks one figure of a turnaround distribution.
type Figure = fn(&Distribution) -> f64;

pub fn render(run: &PoolRun<'_>) -> String {
    let mut out = String::new();
    let (off, on) = (top(run.off), top(run.on));
    let users = off.or(on).map(|s| s.level).unwrap_or(0);
    let _ = writeln!(
        out,
        "#### Latest run: {users} brand-new users at once, warm pool off and on\n"
    );
    for (name, value) in run.meta {
        let _ = writeln!(out, "- {name}: {value}");
    }
    let _ = writeln!(
        out,
        "\nTurnaround per connection (connect → exit status of `date`), ms. Off: every user's \
         container is created while they wait. On: `warm_pool_size: {}` on the same \
         environment, the pool full before the sweep; it refills while the sweep runs.\n",
        run.pool_size
    );
    let _ = writeln!(out, "| | pool off | pool on | on ÷ off |");
    let _ = writeln!(out, "|---|---|---|---|");
    let count = |s: Option<&LevelSummary>| {
        s.map(|s| format!("{} / {}", s.succeeded, failures(s)))
            .unwrap_or_else(|| "not measured".into())
    };
    let _ = writeln!(
        out,
        "| succeeded / failed | {} | {} | |",
        count(off),
        count(on)
    );
    let figure =
        |s: Option<&LevelSummary>, pick: Figure| s.and_then(|s| s.turnaround.as_ref()).map(pick);
    let rows: [(&str, Figure); 4] = [
        ("p50", |d| d.p50),
        ("p99", |d| d.p99),
        ("mean", |d| d.mean),
        ("max", |d| d.max),
    ];
    for (name, pick) in rows {
        let (a, b) = (figure(off, pick), figure(on, pick));
        let cell = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into());
        let ratio = match (a, b) {
            (Some(a), Some(b)) if a > 0.0 => format!("**{:.3}x**", b / a),
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "| turnaround {name} | {} | {} | {ratio} |",
            cell(a),
            cell(b)
        );
    }
    let _ = writeln!(
        out,
        "| server `placement` (count × mean) | {} | {} | |",
        placements(run.off),
        placements(run.on)
    );
    for phase in ["create_queue", "container_create"] {
        let _ = writeln!(
            out,
            "| server `{phase}` (count × mean) | {} | {} | |",
            phase_line(run.off, phase),
            phase_line(run.on, phase)
        );
    }
    out
}

/// One server-side phase of the target's highest level, all its labels together.
fn phase_line(result: &SweepResult, phase: &str) -> String {
    let (count, total_ms) = bench_doc::phases_by_mean(result, bench_doc::top_level(result))
        .into_iter()
        .filter(|p| p.phase == phase)
        .fold((0.0, 0.0), |(n, t), p| {
            (n + p.count, t + p.count * p.mean_ms)
        });
    if count == 0.0 {
        "-".into()
    } else {
        format!("{count:.0} × {:.0} ms", total_ms / count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_compares_the_top_level_of_both_sweeps() {
        // The sample's top level: 2 clients of the target, 1 succeeded in 40 ms.
        let off = crate::report::tests::sample_result();
        let mut on = off.clone();
        for level in &mut on.levels {
            if let Some(t) = level.summary.turnaround.as_mut() {
                t.p50 /= 4.0;
                t.p99 /= 4.0;
            }
            for phase in &mut level.server_phases {
                phase.labels = "outcome=warm".into();
            }
        }
        let meta = [("date".to_owned(), "2026-11-26 18:00 UTC".to_owned())];
        let text = render(&PoolRun {
            meta: &meta,
            off: &off,
            on: &on,
            pool_size: 100,
        });
        for expected in [
            "#### Latest run: 2 brand-new users at once, warm pool off and on",
            "- date: 2026-11-26 18:00 UTC",
            "`warm_pool_size: 100`",
            "| turnaround p50 | 40 | 10 | **0.250x** |",
            "| turnaround p99 | 40 | 10 | **0.250x** |",
            "| turnaround mean | 40 | 40 | **1.000x** |",
            "| server `placement` (count × mean) | - | warm: 1 × 9 ms | |",
        ] {
            assert!(text.contains(expected), "{expected:?} not in:\n{text}");
        }
    }

    #[test]
    fn splice_keeps_everything_outside_its_own_markers() {
        let doc = format!(
            "# B\n\n{}\nwarm figures\n{}\n\n## Warm pool\n\n{BEGIN}\nold\n{END}\n\nkept\n",
            crate::bench_doc::BEGIN,
            crate::bench_doc::END
        );
        // The other region (bench-doc's) and the text around both are kept byte for byte.
        assert_eq!(splice(&doc, "new"), doc.replace("\nold\n", "\nnew\n"));
        assert_eq!(splice("# B\n", "x"), format!("# B\n\n{BEGIN}\nx\n{END}\n"));
    }
}
