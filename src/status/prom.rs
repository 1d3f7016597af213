//! Reading back the Prometheus text that `/metrics` serves, so the status
//! document shows exactly the counters a scrape at the same moment would.
//!
//! Hand-written rather than a parser crate: the input is only ever the
//! text our own exporter renders (`name{label="value",...} number` lines,
//! with `\\`, `\"` and `\n` escapes in values), and this needs no regex
//! engine or second metrics model beside the one we have.

use std::collections::HashMap;

/// One series: its labels (unescaped) and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Series {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn has(&self, want: &[(&str, &str)]) -> bool {
        want.iter().all(|(k, v)| self.label(k) == Some(v))
    }
}

/// Every series of one rendering, by metric name.
#[derive(Debug, Default)]
pub struct Snapshot {
    by_name: HashMap<String, Vec<Series>>,
}

impl Snapshot {
    /// Parse the exposition text; lines that do not parse are skipped.
    pub fn parse(text: &str) -> Snapshot {
        let mut by_name: HashMap<String, Vec<Series>> = HashMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if let Some((name, series)) = parse_line(line) {
                by_name.entry(name).or_default().push(series);
            }
        }
        Snapshot { by_name }
    }

    /// The series of `name` whose labels include all of `want`.
    pub fn series<'a>(
        &'a self,
        name: &str,
        want: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Series> + 'a {
        self.by_name
            .get(name)
            .into_iter()
            .flatten()
            .filter(move |s| s.has(want))
    }

    /// Sum over the matching series (0 when there is none).
    pub fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.series(name, want).map(|s| s.value).sum()
    }

    /// The value of the first matching series, if any.
    pub fn first(&self, name: &str, want: &[(&str, &str)]) -> Option<f64> {
        self.series(name, want).next().map(|s| s.value)
    }

    /// A quantile (0..1) of histogram `name` (its `_bucket` series), over
    /// the matching label sets summed, interpolated linearly inside the
    /// bucket like PromQL's `histogram_quantile`. `None` without samples.
    pub fn quantile(&self, name: &str, want: &[(&str, &str)], q: f64) -> Option<f64> {
        let bucket_name = format!("{name}_bucket");
        let mut buckets: Vec<(f64, f64)> = Vec::new();
        for s in self.series(&bucket_name, want) {
            let Some(le) = s.label("le").and_then(parse_float) else {
                continue;
            };
            match buckets.iter_mut().find(|(b, _)| *b == le) {
                Some((_, n)) => *n += s.value,
                None => buckets.push((le, s.value)),
            }
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        quantile_of(&buckets, q)
    }
}

/// `buckets`: (upper bound, cumulative count), sorted, `+Inf` last.
fn quantile_of(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = 0.0;
    let mut below = 0.0;
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                // Beyond the last finite bound: that bound is all we know.
                return Some(lower);
            }
            let inside = count - below;
            let frac = if inside > 0.0 {
                (rank - below) / inside
            } else {
                1.0
            };
            return Some(lower + (le - lower) * frac);
        }
        lower = le;
        below = count;
    }
    Some(lower)
}

fn parse_float(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        other => other.parse().ok(),
    }
}

fn parse_line(line: &str) -> Option<(String, Series)> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    let mut labels = Vec::new();
    let rest = if let Some(mut r) = rest.strip_prefix('{') {
        loop {
            r = r.trim_start_matches(',');
            if let Some(after) = r.strip_prefix('}') {
                break after;
            }
            let (key, after_key) = r.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after_key.char_indices();
            let end = loop {
                let (i, c) = chars.next()?;
                match c {
                    '"' => break i,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    other => value.push(other),
                }
            };
            labels.push((key.trim().to_string(), value));
            r = &after_key[end + 1..];
        }
    } else {
        rest
    };
    // The value, then an optional timestamp.
    let value = parse_float(rest.split_whitespace().next()?)?;
    Some((name.to_string(), Series { labels, value }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP portico_http_requests_total HTTP requests
# TYPE portico_http_requests_total counter
portico_http_requests_total{site="api",location="/v1",status="200"} 7
portico_http_requests_total{site="api",location="/v1",status="502"} 2
portico_http_requests_total{site="we\"ird\\x",location="/",status="200"} 1
portico_config_reloads_total{result="ok"} 3
plain 4.5
portico_http_first_byte_seconds_bucket{site="api",location="/v1",le="0.01"} 5
portico_http_first_byte_seconds_bucket{site="api",location="/v1",le="0.1"} 9
portico_http_first_byte_seconds_bucket{site="api",location="/v1",le="+Inf"} 10
portico_http_first_byte_seconds_sum{site="api",location="/v1"} 0.3
portico_http_first_byte_seconds_count{site="api",location="/v1"} 10
"#;

    #[test]
    fn sums_and_labels() {
        let s = Snapshot::parse(TEXT);
        let want = [("site", "api"), ("location", "/v1")];
        assert_eq!(s.sum("portico_http_requests_total", &want), 9.0);
        assert_eq!(
            s.sum(
                "portico_http_requests_total",
                &[("site", "api"), ("status", "502")]
            ),
            2.0
        );
        assert_eq!(
            s.sum("portico_http_requests_total", &[("site", "we\"ird\\x")]),
            1.0
        );
        assert_eq!(s.first("plain", &[]), Some(4.5));
        assert_eq!(s.first("absent", &[]), None);
        assert_eq!(s.sum("portico_config_reloads_total", &[]), 3.0);
    }

    #[test]
    fn quantiles_interpolate_in_buckets() {
        let s = Snapshot::parse(TEXT);
        let want = [("site", "api"), ("location", "/v1")];
        let name = "portico_http_first_byte_seconds";
        // Rank 5 of 10 is the top of the first bucket.
        let p50 = s.quantile(name, &want, 0.5).unwrap();
        assert!((p50 - 0.01).abs() < 1e-9, "{p50}");
        // Rank 7 of 10: half-way into (0.01, 0.1].
        let p70 = s.quantile(name, &want, 0.7).unwrap();
        assert!((p70 - 0.055).abs() < 1e-9, "{p70}");
        // Rank 9.9 falls in +Inf: the last finite bound.
        assert_eq!(s.quantile(name, &want, 0.99), Some(0.1));
        assert_eq!(s.quantile(name, &[("site", "none")], 0.5), None);
    }

    #[test]
    fn empty_histogram_has_no_quantile() {
        assert_eq!(quantile_of(&[(0.1, 0.0), (f64::INFINITY, 0.0)], 0.5), None);
        assert_eq!(quantile_of(&[], 0.5), None);
    }
}
