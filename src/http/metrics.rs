//! Request counters and latency histograms for `/metrics`, by method, matched route and status.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

const BUCKETS: [f64; 12] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Default)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    latency: Mutex<BTreeMap<(String, String), Histogram>>,
}

impl Metrics {
    fn observe(&self, method: &str, path: &str, status: u16, seconds: f64) {
        if let Ok(mut r) = self.requests.lock() {
            *r.entry((method.to_string(), path.to_string(), status)).or_default() += 1;
        }
        if let Ok(mut l) = self.latency.lock() {
            let h = l.entry((method.to_string(), path.to_string())).or_default();
            for (i, le) in BUCKETS.iter().enumerate() {
                if seconds <= *le {
                    h.buckets[i] += 1;
                }
            }
            h.sum += seconds;
            h.count += 1;
        }
    }

    /// The request metrics in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        out.push_str("# HELP arbiter_http_requests_total HTTP requests by method, route and status.\n");
        out.push_str("# TYPE arbiter_http_requests_total counter\n");
        if let Ok(r) = self.requests.lock() {
            for ((m, p, s), n) in r.iter() {
                let _ = writeln!(out, "arbiter_http_requests_total{{method=\"{m}\",path=\"{}\",status=\"{s}\"}} {n}", esc(p));
            }
        }
        out.push_str("# HELP arbiter_http_request_duration_seconds HTTP request latency by method and route.\n");
        out.push_str("# TYPE arbiter_http_request_duration_seconds histogram\n");
        if let Ok(l) = self.latency.lock() {
            for ((m, p), h) in l.iter() {
                let p = esc(p);
                for (i, le) in BUCKETS.iter().enumerate() {
                    let _ = writeln!(
                        out,
                        "arbiter_http_request_duration_seconds_bucket{{method=\"{m}\",path=\"{p}\",le=\"{le}\"}} {}",
                        h.buckets[i]
                    );
                }
                let _ = writeln!(
                    out,
                    "arbiter_http_request_duration_seconds_bucket{{method=\"{m}\",path=\"{p}\",le=\"+Inf\"}} {}",
                    h.count
                );
                let _ = writeln!(out, "arbiter_http_request_duration_seconds_sum{{method=\"{m}\",path=\"{p}\"}} {}", h.sum);
                let _ = writeln!(out, "arbiter_http_request_duration_seconds_count{{method=\"{m}\",path=\"{p}\"}} {}", h.count);
            }
        }
    }
}

/// Middleware: times each request and counts it under its matched route.
pub async fn track(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    // any token is a valid method: the rest are counted together, so a client cannot grow the
    // table without bound
    let method = match *req.method() {
        Method::GET | Method::POST | Method::PUT | Method::PATCH | Method::DELETE | Method::HEAD | Method::OPTIONS => req.method().to_string(),
        _ => "OTHER".to_string(),
    };
    let path = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".into());
    let res = next.run(req).await;
    metrics.observe(&method, &path, res.status().as_u16(), start.elapsed().as_secs_f64());
    res
}
