//! The metric-name contract: `docs/metrics.md` lists every metric the operator, trainer and
//! sidecar export; alert rules and the dashboard may use only those.

use std::collections::{BTreeMap, BTreeSet};

/// Prometheus metric types as the contract names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
}

/// The metrics of `docs/metrics.md`: the first two cells of every table row whose first cell
/// is a backquoted `selfplay_` name.
pub fn documented_metrics(markdown: &str) -> Result<BTreeMap<String, MetricType>, String> {
    let mut out = BTreeMap::new();
    for line in markdown.lines() {
        let cells: Vec<&str> = line
            .trim()
            .trim_matches('|')
            .split('|')
            .map(str::trim)
            .collect();
        let Some(name) = cells
            .first()
            .and_then(|c| c.strip_prefix("`selfplay_"))
            .and_then(|c| c.strip_suffix('`'))
        else {
            continue;
        };
        let kind = match cells.get(1).copied() {
            Some("counter") => MetricType::Counter,
            Some("gauge") => MetricType::Gauge,
            Some("histogram") => MetricType::Histogram,
            other => return Err(format!("metric selfplay_{name}: unknown type {other:?}")),
        };
        if out.insert(format!("selfplay_{name}"), kind).is_some() {
            return Err(format!("metric selfplay_{name} is listed twice"));
        }
    }
    if out.is_empty() {
        return Err("no metrics found in docs/metrics.md".into());
    }
    Ok(out)
}

/// Every `selfplay_…` token in a text (PromQL, dashboard JSON, rule files).
pub fn selfplay_tokens(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut out = BTreeSet::new();
    let mut i = 0;
    while let Some(pos) = text[i..].find("selfplay_") {
        let start = i + pos;
        let boundary = start == 0 || !is_name_byte(bytes[start - 1]);
        let mut end = start;
        while end < bytes.len() && is_name_byte(bytes[end]) {
            end += 1;
        }
        if boundary {
            out.insert(text[start..end].to_string());
        }
        i = end.max(start + 1);
    }
    out
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b':'
}

/// Resolves a series name to its documented metric: histograms are used through their
/// `_bucket`, `_sum` and `_count` series. `None` when the name is not in the contract.
pub fn resolve<'a>(series: &str, documented: &'a BTreeMap<String, MetricType>) -> Option<&'a str> {
    if let Some((name, _)) = documented.get_key_value(series) {
        return Some(name);
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        let base = series.strip_suffix(suffix)?;
        match documented.get_key_value(base) {
            Some((name, MetricType::Histogram)) => Some(name.as_str()),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_histogram_series() {
        let doc =
            "| `selfplay_a_total` | counter | | x |\n| `selfplay_d_seconds` | histogram | | y |\n";
        let m = documented_metrics(doc).unwrap();
        let t = selfplay_tokens(
            "rate(selfplay_a_total[5m]) + x_selfplay_no + selfplay_d_seconds_bucket{le=\"1\"}",
        );
        assert_eq!(
            t.into_iter().collect::<Vec<_>>(),
            ["selfplay_a_total", "selfplay_d_seconds_bucket"]
        );
        assert_eq!(
            resolve("selfplay_d_seconds_bucket", &m),
            Some("selfplay_d_seconds")
        );
        assert_eq!(resolve("selfplay_a_total_bucket", &m), None);
        assert_eq!(resolve("selfplay_nope", &m), None);
    }
}
