//! The admin API's client side for tests: curl with a client identity, the OpenAPI check, an
//! operator identity.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use fleet_tests::require_program;
use serde_json::{json, Value};

use super::{BrokerProc, Fleet};

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

    /// (HTTP status, JSON body); status 0 when no HTTP answer came (TLS refused).
    pub fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> (u16, Value) {
        let curl = require_program("curl", "curl");
        let mut c = Command::new(curl);
        c.args(["-s", "--max-time", "10", "-X", method, "-w", "\n%{http_code}", "--cacert"]).arg(&self.trust);
        if let Some(d) = &self.identity {
            c.arg("--cert").arg(d.join("cert.pem")).arg("--key").arg(d.join("key.pem"));
        }
        if body.is_some() {
            c.args(["-H", "content-type: application/json", "--data-binary", "@-"]);
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
