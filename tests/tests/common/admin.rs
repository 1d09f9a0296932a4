//! The admin API's client side for tests: curl with a client identity, the OpenAPI check, an
//! operator identity.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use fleet_tests::require_program;
use serde_json::{json, Value};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{client_config, tcp_from, BrokerProc, Fleet};

pub const OPENAPI: &str = include_str!("../../../broker/src/admin/openapi.json");

/// Checks `v` against the document's schema `name`.
pub fn conforms(name: &str, v: &Value) {
    let doc: Value = serde_json::from_str(OPENAPI).unwrap();
    let schema = json!({ "$ref": format!("#/components/schemas/{name}"), "components": doc["components"] });
    if let Err(e) = jsonschema::validate(&schema, v) {
        panic!("answer does not match schema {name}: {e}\n{v:#}");
    }
}

/// curl with a client identity (`cert.pem` + `key.pem` in `dir`), or none.
pub struct Client {
    base: String,
    trust: PathBuf,
    identity: Option<PathBuf>,
}

impl Client {
    pub fn new(broker: &BrokerProc, fleet: &Fleet, identity: Option<&Path>) -> Self {
        Client {
            base: format!("https://{}", broker.admin.expect("admin listener")),
            trust: fleet.service.join("broker-trust.pem"),
            identity: identity.map(Path::to_path_buf),
        }
    }

    /// (HTTP status, JSON body); status 0 when no HTTP answer came (TLS refused). A body goes
    /// as a client of the API sends it (`docs/spec/admin-api.md`): JSON, with the request header.
    pub fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> (u16, Value) {
        let headers: &[&str] = match body {
            Some(_) => &["content-type: application/json", "x-fleetgate-request: 1"],
            None => &[],
        };
        self.call_with(method, path, headers, body)
    }

    /// As `call`, with exactly these request headers (curl's `-H`).
    pub fn call_with(&self, method: &str, path: &str, headers: &[&str], body: Option<&[u8]>) -> (u16, Value) {
        let curl = require_program("curl", "curl");
        let mut c = Command::new(curl);
        c.args(["-s", "--max-time", "10", "-X", method, "-w", "\n%{http_code}", "--cacert"]).arg(&self.trust);
        if let Some(d) = &self.identity {
            c.arg("--cert").arg(d.join("cert.pem")).arg("--key").arg(d.join("key.pem"));
        }
        for h in headers {
            c.args(["-H", h]);
        }
        if body.is_some() {
            c.args(["--data-binary", "@-"]);
        }
        c.arg(format!("{}{path}", self.base))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = c.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        if let Some(b) = body {
            std::io::Write::write_all(&mut stdin, b).unwrap();
        }
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        let code: u16 = code.trim().parse().unwrap_or(0);
        let json = if body.trim_start().starts_with(['{', '[']) {
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {body}"))
        } else {
            Value::String(body.to_owned())
        };
        (code, json)
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, None)
    }
}

pub async fn operator(fleet: &Fleet, name: &str) -> PathBuf {
    let out = fleet.dir.path().join(format!("operator-{name}"));
    fleet.station().await.operator_cert(name, &out, "correct horse battery").await.unwrap();
    out
}

/// HTTP/1.1 over one kept-alive TLS connection (rustls), for what curl cannot show: the same
/// connection before and after a revocation, a connection that sends nothing.
pub struct Https {
    pub tls: tokio_rustls::client::TlsStream<TcpStream>,
    buf: Vec<u8>,
}

impl Https {
    /// A TLS connection to the admin listener from loopback address `src`, as `identity`.
    pub async fn connect(
        broker: &BrokerProc,
        fleet: &Fleet,
        identity: &Path,
        src: [u8; 4],
    ) -> std::io::Result<Https> {
        let tcp = tcp_from(src, broker.admin.expect("admin listener")).await?;
        let cfg = client_config(
            &fleet.service.join("broker-trust.pem"),
            Some((&identity.join("cert.pem"), &identity.join("key.pem"))),
        );
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await?;
        Ok(Https { tls, buf: Vec::new() })
    }

    /// Sends a GET and reads its answer: `None` if the connection ended first.
    pub async fn get(&mut self, path: &str) -> Option<(u16, String)> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        self.tls.write_all(req.as_bytes()).await.ok()?;
        self.tls.flush().await.ok()?;
        self.answer(Duration::from_secs(10)).await
    }

    /// The next answer (status, body; a Content-Length body), `None` on EOF or timeout.
    pub async fn answer(&mut self, within: Duration) -> Option<(u16, String)> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
                let status: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                if self.buf.len() >= end + 4 + len {
                    let body = String::from_utf8_lossy(&self.buf[end + 4..end + 4 + len]).to_string();
                    self.buf.drain(..end + 4 + len);
                    return Some((status, body));
                }
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.tls.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }

    /// True if the server closed the connection within `within` (whatever it sent before).
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.tls.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => return false,
            }
        }
    }

    /// What the server sent so far and nobody read.
    pub fn unread(&self) -> String {
        String::from_utf8_lossy(&self.buf).to_string()
    }
}
