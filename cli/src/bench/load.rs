//! `edgepack bench --url`: a load client for a running `edgepack serve` (or any KServe v2 HTTP server), after
//! Triton's `perf_analyzer`: it reads the model's metadata, builds one request of synthetic tensors (JSON, or the
//! binary extension with `--binary`), then for each concurrency level keeps that many keep-alive connections busy
//! for `--duration` seconds and reports throughput, latency percentiles and errors.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use edgepack_runtime::onnx::Dim;
use edgepack_runtime::{DType, Tensor, kserve};
use serde_json::{Value, json};

use super::{BenchArgs, Stats, input_shape};
use crate::commands::{BadInput, Usage};

/// Seconds per concurrency level when `--duration` is not given.
const DEFAULT_SECONDS: f64 = 3.0;

/// `http://HOST:PORT[/PREFIX]`: the address to connect to and the path prefix.
struct Target {
    host: String,
    prefix: String,
}

fn parse_url(url: &str) -> Result<Target> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        Usage(format!("--url {url}: only http:// URLs are supported (put a TLS-terminating proxy in front)"))
    })?;
    let (host, prefix) = match rest.split_once('/') {
        Some((h, p)) => (h, format!("/{}", p.trim_end_matches('/'))),
        None => (rest, String::new()),
    };
    if host.is_empty() {
        bail!(Usage(format!("--url {url}: no host")));
    }
    let host = if host.contains(':') { host.to_string() } else { format!("{host}:80") };
    Ok(Target { host, prefix: if prefix == "/" { String::new() } else { prefix } })
}

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    host: String,
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn open(host: &str) -> Result<Conn> {
        let s = TcpStream::connect(host).with_context(|| format!("connecting to {host}"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(Conn { host: host.to_string(), reader: BufReader::new(s) })
    }

    /// Sends a request and reads the whole response: (status, body).
    fn request(&mut self, method: &str, path: &str, headers: &[(&str, String)], body: &[u8]) -> Result<(u16, Vec<u8>)> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n", self.host, body.len());
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let s = self.reader.get_mut();
        s.write_all(head.as_bytes())?;
        s.write_all(body)?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("not an HTTP response: {:?}", line.trim()))?;
        let (mut length, mut chunked) = (None, false);
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                bail!("the connection closed in the response headers");
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                if k == "content-length" {
                    length = v.parse::<usize>().ok();
                } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                    chunked = true;
                }
            }
        }
        let mut out = Vec::new();
        if chunked {
            loop {
                line.clear();
                self.reader.read_line(&mut line)?;
                let n = usize::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16)
                    .context("bad chunk size")?;
                let mut chunk = vec![0; n + 2];
                self.reader.read_exact(&mut chunk)?;
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(n) = length {
            out.resize(n, 0);
            self.reader.read_exact(&mut out)?;
        }
        Ok((status, out))
    }
}

/// The request every client sends: (path, headers, body).
struct Request {
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    batch: usize,
}

fn build_request(meta: &Value, t: &Target, a: &BenchArgs) -> Result<Request> {
    let name = meta["name"].as_str().unwrap_or(&a.model).to_string();
    let inputs = meta["inputs"].as_array().context("the model's metadata lists no inputs")?;
    let mut specs = Vec::new();
    let mut raw = Vec::new();
    let mut batch = 1;
    for (k, i) in inputs.iter().enumerate() {
        let iname = i["name"].as_str().context("an input without a name")?;
        let datatype = i["datatype"].as_str().unwrap_or("FP32");
        let dt = DType::from_kserve_name(datatype).with_context(|| format!("input `{iname}`: datatype {datatype}"))?;
        let dims: Vec<Dim> = i["shape"]
            .as_array()
            .map(|s| {
                s.iter()
                    .map(|d| match d.as_i64() {
                        Some(n) if n >= 0 => Dim::Fixed(n as usize),
                        _ => Dim::Symbolic("?".into()),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let shown = i["shape"].to_string();
        let shape = input_shape(iname, &dims, &shown, &a.shapes, a.batch as usize)?;
        if k == 0 {
            batch = shape.first().copied().unwrap_or(1).max(1);
        }
        let tensor = Tensor::synthetic(dt, shape.clone(), k as u64 + 1)?;
        if a.binary {
            let bytes = tensor.to_le_bytes();
            specs.push(json!({"name": iname, "datatype": datatype, "shape": shape,
                              "parameters": {"binary_data_size": bytes.len()}}));
            raw.extend_from_slice(&bytes);
        } else {
            specs.push(json!({"name": iname, "datatype": datatype, "shape": shape,
                              "data": kserve::tensor_data_json(&tensor)}));
        }
    }
    let path = format!("{}/v2/models/{name}/infer", t.prefix);
    let header = serde_json::to_vec(&json!({"inputs": specs}))?;
    Ok(if a.binary {
        let mut body = header.clone();
        body.extend_from_slice(&raw);
        Request {
            path,
            headers: vec![
                ("Content-Type", "application/octet-stream".into()),
                ("Inference-Header-Content-Length", header.len().to_string()),
            ],
            body,
            batch,
        }
    } else {
        Request { path, headers: vec![("Content-Type", "application/json".into())], body: header, batch }
    })
}

/// One concurrency level: `clients` connections sending `req` back to back until `until`.
fn level(host: &str, req: &Arc<Request>, clients: usize, seconds: f64) -> Value {
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (host, req) = (host.to_string(), req.clone());
            std::thread::spawn(move || {
                let (mut times, mut errors, mut last_error) = (Vec::new(), 0usize, None::<String>);
                let mut conn = Conn::open(&host).ok();
                // One untimed request per connection (connection set-up, first-use work).
                if let Some(c) = conn.as_mut() {
                    let _ = c.request("POST", &req.path, &req.headers, &req.body);
                }
                while Instant::now() < until {
                    let c = match conn.as_mut() {
                        Some(c) => c,
                        None => match Conn::open(&host) {
                            Ok(c) => conn.insert(c),
                            Err(e) => {
                                errors += 1;
                                last_error = Some(e.to_string());
                                std::thread::sleep(Duration::from_millis(10));
                                continue;
                            }
                        },
                    };
                    let t = Instant::now();
                    match c.request("POST", &req.path, &req.headers, &req.body) {
                        Ok((200, _)) => times.push(t.elapsed().as_secs_f64() * 1e3),
                        Ok((status, body)) => {
                            errors += 1;
                            last_error = Some(format!("HTTP {status}: {}", String::from_utf8_lossy(&body)));
                        }
                        Err(e) => {
                            errors += 1;
                            last_error = Some(e.to_string());
                            conn = None;
                        }
                    }
                }
                (times, errors, last_error)
            })
        })
        .collect();
    let (mut times, mut errors, mut last_error) = (Vec::new(), 0, None);
    for w in workers {
        if let Ok((t, e, l)) = w.join() {
            times.extend(t);
            errors += e;
            last_error = last_error.or(l);
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let ok = times.len();
    json!({
        "concurrency": clients,
        "requests": ok,
        "errors": errors,
        "last_error": last_error,
        "seconds": wall,
        "requests_per_s": ok as f64 / wall,
        "throughput_per_s": (ok * req.batch) as f64 / wall,
        "latency": Stats::of(&times),
    })
}

pub fn bench_url(url: &str, a: &BenchArgs) -> Result<()> {
    let t = parse_url(url)?;
    if a.concurrency.is_empty() || a.concurrency.contains(&0) || a.concurrency.iter().any(|&c| c > 4096) {
        bail!(Usage("--concurrency takes levels from 1 to 4096, e.g. 1,2,4,8".into()));
    }
    let mut conn = Conn::open(&t.host).map_err(|e| BadInput(format!("{url}: {e:#}")))?;
    let (status, body) = conn.request("GET", &format!("{}/v2/models/{}", t.prefix, a.model), &[], &[])?;
    if status != 200 {
        bail!(BadInput(format!(
            "{url}: model `{}`: HTTP {status}: {}",
            a.model,
            String::from_utf8_lossy(&body).trim()
        )));
    }
    let meta: Value = serde_json::from_slice(&body).context("the model's metadata is not JSON")?;
    let req = Arc::new(build_request(&meta, &t, a)?);
    // One request first: a server that refuses it would only fill the table with errors.
    let (status, body) = conn.request("POST", &req.path, &req.headers, &req.body)?;
    if status != 200 {
        bail!(BadInput(format!("{url}: the first request failed: HTTP {status}: {}", String::from_utf8_lossy(&body))));
    }
    drop(conn);
    let seconds = a.duration.unwrap_or(DEFAULT_SECONDS);
    let mut rows = Vec::new();
    for &c in &a.concurrency {
        let row = level(&t.host, &req, c, seconds);
        if !a.json && !crate::output::quiet() {
            eprintln!("  concurrency {c}: {:.1} requests/s", row["requests_per_s"].as_f64().unwrap_or(0.0));
        }
        rows.push(row);
    }
    let errors: u64 = rows.iter().map(|r| r["errors"].as_u64().unwrap_or(0)).sum();
    let res = json!({"url": url, "model": a.model, "protocol": "http",
                     "encoding": if a.binary { "binary" } else { "json" }, "batch": req.batch,
                     "seconds_per_level": seconds, "sweep": rows});
    if a.json {
        crate::output::json(res)?;
    } else {
        println!(
            "{url} model {} ({} tensors, batch {}, {seconds} s per level)",
            a.model,
            if a.binary { "binary" } else { "JSON" },
            req.batch
        );
        println!(
            "  {:>11} {:>12} {:>10} {:>10} {:>10} {:>10} {:>7}",
            "concurrency", "requests/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors"
        );
        for r in &rows {
            let l = &r["latency"];
            let f = |k: &str| l[k].as_f64().map(|x| format!("{x:.2}")).unwrap_or("—".into());
            println!(
                "  {:>11} {:>12.1} {:>10} {:>10} {:>10} {:>10} {:>7}",
                r["concurrency"],
                r["requests_per_s"].as_f64().unwrap_or(0.0),
                f("p50_ms"),
                f("p90_ms"),
                f("p99_ms"),
                f("max_ms"),
                r["errors"]
            );
        }
    }
    if errors > 0 {
        let last = rows.iter().find_map(|r| r["last_error"].as_str()).unwrap_or("").to_string();
        crate::output::warn(format!("{errors} request(s) failed; last: {last}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_the_host_and_the_path_prefix() {
        let t = parse_url("http://127.0.0.1:8000").unwrap();
        assert_eq!((t.host.as_str(), t.prefix.as_str()), ("127.0.0.1:8000", ""));
        let t = parse_url("http://models.local/edge/").unwrap();
        assert_eq!((t.host.as_str(), t.prefix.as_str()), ("models.local:80", "/edge"));
        assert!(parse_url("https://x").is_err());
    }
}
