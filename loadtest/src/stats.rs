//! Summaries of a level: min, mean, percentiles and max of a set of
//! durations, failure counts, and the ratio of two summaries.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::client::{ConnectionRecord, FailureKind};

/// Distribution of one figure (milliseconds) over the successful connections
/// of a level.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Distribution {
    pub count: usize,
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Distribution {
    /// `None` for no values.
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let sum: f64 = sorted.iter().sum();
        Some(Distribution {
            count: sorted.len(),
            min: sorted[0],
            mean: sum / sorted.len() as f64,
            p50: percentile(&sorted, 50.0),
            p90: percentile(&sorted, 90.0),
            p99: percentile(&sorted, 99.0),
            max: sorted[sorted.len() - 1],
        })
    }

    /// `self / baseline`, figure by figure (a zero baseline gives no ratio).
    pub fn ratio(&self, baseline: &Distribution) -> Ratio {
        let r = |a: f64, b: f64| if b > 0.0 { Some(a / b) } else { None };
        Ratio {
            min: r(self.min, baseline.min),
            mean: r(self.mean, baseline.mean),
            p50: r(self.p50, baseline.p50),
            p90: r(self.p90, baseline.p90),
            p99: r(self.p99, baseline.p99),
            max: r(self.max, baseline.max),
        }
    }
}

/// A figure-by-figure quotient of two distributions.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ratio {
    pub min: Option<f64>,
    pub mean: Option<f64>,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
}

/// Nearest-rank percentile of sorted data: the smallest value such that at
/// least `p` percent of the values are less than or equal to it.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    assert!(!sorted.is_empty(), "percentile of no values");
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Everything said about one level at one endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LevelSummary {
    pub endpoint: String,
    pub level: u32,
    pub connections: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub failures: BTreeMap<FailureKind, usize>,
    /// Turnaround of the successful connections.
    pub turnaround: Option<Distribution>,
    /// Each client-side step of the successful connections, where the
    /// client kind can see it (`tcp_connect`, `handshake`, `auth`,
    /// `first_byte`, `exit_wait`, `close`).
    pub steps: BTreeMap<String, Distribution>,
}

impl LevelSummary {
    pub fn of(endpoint: &str, level: u32, records: &[&ConnectionRecord]) -> Self {
        let mut failures = BTreeMap::new();
        for r in records {
            if let Some(kind) = r.failure {
                *failures.entry(kind).or_insert(0) += 1;
            }
        }
        let ok: Vec<&&ConnectionRecord> = records.iter().filter(|r| r.succeeded()).collect();
        let totals: Vec<f64> = ok.iter().map(|r| r.total_ms).collect();
        let mut steps = BTreeMap::new();
        for (i, name) in [
            "tcp_connect",
            "handshake",
            "auth",
            "first_byte",
            "exit_wait",
            "close",
        ]
        .iter()
        .enumerate()
        {
            let values: Vec<f64> = ok.iter().filter_map(|r| r.steps()[i].1).collect();
            if let Some(d) = Distribution::of(&values) {
                steps.insert((*name).to_owned(), d);
            }
        }
        LevelSummary {
            endpoint: endpoint.to_owned(),
            level,
            connections: records.len(),
            succeeded: ok.len(),
            failed: records.len() - ok.len(),
            failures,
            turnaround: Distribution::of(&totals),
            steps,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_on_known_data() {
        let values: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let d = Distribution::of(&values).unwrap();
        assert_eq!(d.count, 100);
        assert_eq!(d.min, 1.0);
        assert_eq!(d.max, 100.0);
        assert_eq!(d.mean, 50.5);
        assert_eq!(d.p50, 50.0);
        assert_eq!(d.p90, 90.0);
        assert_eq!(d.p99, 99.0);

        let ten: Vec<f64> = (1..=10).map(|v| f64::from(v) * 10.0).collect();
        let sorted = ten.clone();
        assert_eq!(percentile(&sorted, 50.0), 50.0);
        assert_eq!(percentile(&sorted, 90.0), 90.0);
        assert_eq!(percentile(&sorted, 99.0), 100.0);
        assert_eq!(percentile(&sorted, 0.0), 10.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(Distribution::of(&[]), None);
    }

    #[test]
    fn ratio_divides_figure_by_figure() {
        let a = Distribution::of(&[2.0, 4.0, 6.0]).unwrap();
        let b = Distribution::of(&[1.0, 2.0, 3.0]).unwrap();
        let r = a.ratio(&b);
        assert_eq!(r.min, Some(2.0));
        assert_eq!(r.mean, Some(2.0));
        assert_eq!(r.max, Some(2.0));
        let zero = Distribution::of(&[0.0]).unwrap();
        assert_eq!(a.ratio(&zero).mean, None);
    }
}
