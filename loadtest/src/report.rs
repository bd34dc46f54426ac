//! What a sweep leaves behind: every connection as CSV and JSON, the level
//! summaries as JSON, and the table printed at the end.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::client::ConnectionRecord;
use crate::stats::Distribution;
use crate::sweep::{COMPARE, SweepResult, TARGET};

pub const RECORDS_CSV: &str = "connections.csv";
pub const RECORDS_JSON: &str = "connections.json";
pub const SUMMARY_JSON: &str = "summary.json";

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Csv { path: PathBuf, source: csv::Error },
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Writes `connections.csv`, `connections.json` and `summary.json` (the whole
/// result without the per-connection rows) into `dir`.
pub fn write_results(dir: &Path, result: &SweepResult) -> Result<Vec<PathBuf>, ReportError> {
    std::fs::create_dir_all(dir).map_err(|source| ReportError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let csv_path = dir.join(RECORDS_CSV);
    write_csv(&csv_path, &result.records)?;
    let json_path = dir.join(RECORDS_JSON);
    write_json(&json_path, &result.records)?;
    let summary_path = dir.join(SUMMARY_JSON);
    let mut summary = result.clone();
    summary.records.clear();
    write_json(&summary_path, &summary)?;
    Ok(vec![csv_path, json_path, summary_path])
}

pub fn write_csv(path: &Path, records: &[ConnectionRecord]) -> Result<(), ReportError> {
    let err = |source| ReportError::Csv {
        path: path.to_owned(),
        source,
    };
    let mut writer = csv::Writer::from_path(path).map_err(err)?;
    for record in records {
        writer.serialize(record).map_err(err)?;
    }
    writer.flush().map_err(|source| ReportError::Io {
        path: path.to_owned(),
        source,
    })
}

pub fn read_csv(path: &Path) -> Result<Vec<ConnectionRecord>, ReportError> {
    let err = |source| ReportError::Csv {
        path: path.to_owned(),
        source,
    };
    let mut reader = csv::Reader::from_path(path).map_err(err)?;
    reader.deserialize().collect::<Result<_, _>>().map_err(err)
}

fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), ReportError> {
    let file = std::fs::File::create(path).map_err(|source| ReportError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::to_writer_pretty(std::io::BufWriter::new(file), value).map_err(|source| {
        ReportError::Json {
            path: path.to_owned(),
            source,
        }
    })
}

pub fn read_json(path: &Path) -> Result<Vec<ConnectionRecord>, ReportError> {
    let file = std::fs::File::open(path).map_err(|source| ReportError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_reader(std::io::BufReader::new(file)).map_err(|source| ReportError::Json {
        path: path.to_owned(),
        source,
    })
}

/// Reads a sweep back from the files [`write_results`] wrote.
pub fn read_results(dir: &Path) -> Result<SweepResult, ReportError> {
    let path = dir.join(SUMMARY_JSON);
    let file = std::fs::File::open(&path).map_err(|source| ReportError::Io {
        path: path.clone(),
        source,
    })?;
    let mut result: SweepResult =
        serde_json::from_reader(std::io::BufReader::new(file)).map_err(|source| {
            ReportError::Json {
                path: path.clone(),
                source,
            }
        })?;
    result.records = read_json(&dir.join(RECORDS_JSON))?;
    Ok(result)
}

fn cell(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into())
}

fn ratio_cell(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.2}x")).unwrap_or_else(|| "-".into())
}

/// The table printed after a sweep: turnaround per level and endpoint, ratio
/// rows when comparing, failures by kind, client-side step means and the
/// server-side phase means.
pub fn summary_table(result: &SweepResult) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "envgate-loadtest: {:?} with the {} client (key exchange: {}) against {}{}",
        result.command,
        result.client.as_str(),
        result.kex.as_deref().unwrap_or("client default"),
        result.target,
        result
            .compare
            .as_ref()
            .map(|c| format!(" (compare: {c})"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "\nturnaround per connection (ms; successful connections only)"
    );
    let _ = writeln!(
        out,
        "{:<8} {:>6} {:>5} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "endpoint", "level", "ok", "fail", "min", "mean", "p50", "p90", "p99", "max"
    );
    for level in &result.levels {
        let s = &level.summary;
        let d: Option<&Distribution> = s.turnaround.as_ref();
        let _ = writeln!(
            out,
            "{:<8} {:>6} {:>5} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            s.endpoint,
            s.level,
            s.succeeded,
            s.failed,
            cell(d.map(|d| d.min)),
            cell(d.map(|d| d.mean)),
            cell(d.map(|d| d.p50)),
            cell(d.map(|d| d.p90)),
            cell(d.map(|d| d.p99)),
            cell(d.map(|d| d.max)),
        );
        if s.endpoint == TARGET || result.compare.is_none() {
            continue;
        }
        if let Some(c) = result.comparisons.iter().find(|c| c.level == s.level) {
            let r = c.turnaround.as_ref();
            let _ = writeln!(
                out,
                "{:<8} {:>6} {:>5} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
                "ratio",
                s.level,
                "",
                "",
                ratio_cell(r.and_then(|r| r.min)),
                ratio_cell(r.and_then(|r| r.mean)),
                ratio_cell(r.and_then(|r| r.p50)),
                ratio_cell(r.and_then(|r| r.p90)),
                ratio_cell(r.and_then(|r| r.p99)),
                ratio_cell(r.and_then(|r| r.max)),
            );
        }
    }
    if result.compare.is_some() {
        let _ = writeln!(
            out,
            "(ratio = {TARGET} / {COMPARE}, measured in the same run)"
        );
    }

    let failed: Vec<_> = result
        .levels
        .iter()
        .filter(|l| l.summary.failed > 0)
        .collect();
    if !failed.is_empty() {
        let _ = writeln!(out, "\nfailures");
        for level in failed {
            let kinds: Vec<String> = level
                .summary
                .failures
                .iter()
                .map(|(kind, n)| format!("{}={n}", kind.as_str()))
                .collect();
            let example = result
                .records
                .iter()
                .find(|r| {
                    r.endpoint == level.summary.endpoint
                        && r.level == level.summary.level
                        && !r.succeeded()
                })
                .map(|r| r.failure_detail.as_str())
                .unwrap_or("");
            let _ = writeln!(
                out,
                "{:<8} {:>6}  {}  e.g. {example}",
                level.summary.endpoint,
                level.summary.level,
                kinds.join(" ")
            );
        }
    }

    let with_steps: Vec<_> = result
        .levels
        .iter()
        .filter(|l| !l.summary.steps.is_empty())
        .collect();
    if !with_steps.is_empty() && with_steps.iter().any(|l| l.summary.steps.len() > 1) {
        let names = [
            "tcp_connect",
            "handshake",
            "auth",
            "first_byte",
            "exit_wait",
            "close",
        ];
        let _ = writeln!(out, "\nclient-side mean per step (ms)");
        let _ = write!(out, "{:<8} {:>6}", "endpoint", "level");
        for name in names {
            let _ = write!(out, " {name:>11}");
        }
        let _ = writeln!(out);
        for level in with_steps {
            let _ = write!(
                out,
                "{:<8} {:>6}",
                level.summary.endpoint, level.summary.level
            );
            for name in names {
                let _ = write!(
                    out,
                    " {:>11}",
                    cell(level.summary.steps.get(name).map(|d| d.mean))
                );
            }
            let _ = writeln!(out);
        }
    }

    let with_server: Vec<_> = result
        .levels
        .iter()
        .filter(|l| !l.server_phases.is_empty() || l.scrape_error.is_some())
        .collect();
    if !with_server.is_empty() {
        let _ = writeln!(
            out,
            "\nserver-side mean per phase (ms, from /metrics deltas; n = observations)"
        );
        for level in with_server {
            let mut line = format!("{:<8} {:>6} ", level.summary.endpoint, level.summary.level);
            if let Some(e) = &level.scrape_error {
                let _ = write!(line, " scrape failed: {e}");
            }
            for phase in &level.server_phases {
                let _ = write!(
                    line,
                    " {}={:.1} (n={})",
                    phase.key(),
                    phase.mean_ms,
                    phase.count
                );
            }
            let _ = writeln!(out, "{line}");
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::client::{ClientKind, FailureKind, Step};
    use crate::scrape::PhaseMean;
    use crate::stats::LevelSummary;
    use crate::sweep::{Comparison, LevelResult};

    fn record(
        endpoint: &str,
        level: u32,
        index: u32,
        total: f64,
        failure: Option<FailureKind>,
    ) -> ConnectionRecord {
        let ok = failure.is_none();
        ConnectionRecord {
            endpoint: endpoint.into(),
            level,
            index,
            client: ClientKind::Russh,
            user: "demo".into(),
            start_offset_ms: 0.25,
            tcp_connect_ms: Some(0.5),
            handshake_ms: Some(3.0),
            auth_ms: if ok { Some(1.0) } else { None },
            first_byte_ms: if ok { Some(total - 6.0) } else { None },
            exit_wait_ms: if ok { Some(0.75) } else { None },
            close_ms: if ok { Some(0.5) } else { None },
            total_ms: total,
            exit_status: if ok { Some(0) } else { None },
            output_bytes: if ok { 29 } else { 0 },
            failure,
            failure_step: failure.map(|_| Step::Auth),
            failure_detail: if ok {
                String::new()
            } else {
                "publickey rejected, \"quoted\"\nline".into()
            },
        }
    }

    pub(crate) fn sample_result() -> SweepResult {
        let records = vec![
            record(TARGET, 1, 0, 20.0, None),
            record(COMPARE, 1, 0, 10.0, None),
            record(TARGET, 2, 0, 40.0, None),
            record(TARGET, 2, 1, 50.0, Some(FailureKind::AuthRejected)),
            record(COMPARE, 2, 0, 12.0, None),
            record(COMPARE, 2, 1, 14.0, None),
        ];
        let mut levels = Vec::new();
        let mut comparisons = Vec::new();
        for level in [1, 2] {
            let mut summaries = BTreeMap::new();
            for endpoint in [TARGET, COMPARE] {
                let refs: Vec<&ConnectionRecord> = records
                    .iter()
                    .filter(|r| r.level == level && r.endpoint == endpoint)
                    .collect();
                let summary = LevelSummary::of(endpoint, level, &refs);
                summaries.insert(endpoint, summary.clone());
                let server_phases = if endpoint == TARGET {
                    vec![
                        PhaseMean {
                            phase: "auth".into(),
                            labels: "cache=miss".into(),
                            count: 1.0,
                            mean_ms: 4.0 * level as f64,
                        },
                        PhaseMean {
                            phase: "placement".into(),
                            labels: String::new(),
                            count: 1.0,
                            mean_ms: 9.0,
                        },
                    ]
                } else {
                    Vec::new()
                };
                levels.push(LevelResult {
                    summary,
                    wall_ms: 55.0,
                    server_phases,
                    server_connections: BTreeMap::new(),
                    scrape_error: None,
                });
            }
            let t = summaries[TARGET].turnaround.unwrap();
            let c = summaries[COMPARE].turnaround.unwrap();
            comparisons.push(Comparison {
                level,
                turnaround: Some(t.ratio(&c)),
                step_means: BTreeMap::new(),
            });
        }
        SweepResult {
            command: "date".into(),
            client: ClientKind::Russh,
            kex: Some("curve25519-sha256".into()),
            target: "127.0.0.1:2222".into(),
            compare: Some("127.0.0.1:2022".into()),
            levels,
            comparisons,
            records,
        }
    }

    #[test]
    fn csv_and_json_round_trip_every_record() {
        let dir = tempfile::tempdir().unwrap();
        let result = sample_result();
        let files = write_results(dir.path(), &result).unwrap();
        assert_eq!(files.len(), 3);
        assert_eq!(
            read_csv(&dir.path().join(RECORDS_CSV)).unwrap(),
            result.records
        );
        assert_eq!(
            read_json(&dir.path().join(RECORDS_JSON)).unwrap(),
            result.records
        );
        let header = std::fs::read_to_string(dir.path().join(RECORDS_CSV)).unwrap();
        assert!(
            header.starts_with("endpoint,level,index,client,user,start_offset_ms,tcp_connect_ms,"),
            "{header}"
        );
        assert!(header.contains(",auth_rejected,auth,"), "{header}");
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(SUMMARY_JSON)).unwrap())
                .unwrap();
        assert_eq!(summary["levels"].as_array().unwrap().len(), 4);
        assert_eq!(
            summary["levels"][2]["summary"]["failures"]["auth_rejected"],
            1
        );
        assert!(summary["records"].as_array().unwrap().is_empty());
        let back = read_results(dir.path()).unwrap();
        assert_eq!(back.records, result.records);
        assert_eq!(summary_table(&back), summary_table(&result));
    }

    #[test]
    fn table_shows_levels_ratios_failures_and_phases() {
        let table = summary_table(&sample_result());
        let ratio_row = table
            .lines()
            .find(|l| l.starts_with("ratio") && l.contains(" 1 "))
            .unwrap();
        assert!(ratio_row.contains("2.00x"), "{table}");
        let target_2 = table
            .lines()
            .find(|l| l.starts_with("target") && l.contains("40.0"))
            .unwrap();
        assert!(
            target_2.split_whitespace().collect::<Vec<_>>()[..4] == ["target", "2", "1", "1"],
            "{table}"
        );
        assert!(table.contains("auth_rejected=1"), "{table}");
        assert!(table.contains("auth{cache=miss}=8.0"), "{table}");
        assert!(table.contains("client-side mean per step"), "{table}");
    }
}
