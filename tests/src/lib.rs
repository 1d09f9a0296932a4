//! Test support shared by the end-to-end tests of every fleetgate crate.
//!
//! - [`PgCluster`]: a throwaway PostgreSQL server in a temporary directory, reachable through a
//!   Unix socket in that directory (no fixed TCP port, so tests never collide; `start_tcp` adds a
//!   free loopback port), stopped on drop.
//! - [`require_program`]: fail (never skip) with an install hint when an external peer is missing.
//! - [`rogue_tls`]: a hostile TLS 1.3 server that omits or reorders server authentication.
//! - [`fixture`]: a provisioned fleet, a broker process, a Mosquitto peer and a cluster
//!   (PostgreSQL + NATS + N nodes + HAProxy), shared by the tests and the `peers` bench.
//! - [`fault`]: a seeded fault-injecting transport (drop, delay, stall inside a TLS record, cut)
//!   for the SDK tests.
//! - [`ota_flash`]: the QEMU board's update flash file for its A/B bootloader (images, signing,
//!   embassy-boot's state), built and read on the host.

pub mod fault;
pub mod fixture;
pub mod ota_flash;
pub mod rogue_tls;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Panics with an install hint unless `program` is on PATH.
pub fn require_program(program: &str, debian_package: &str) -> PathBuf {
    let found = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|p| p.join(program)).find(|p| p.is_file()));
    match found {
        Some(p) => p,
        None => panic!(
            "`{program}` is required by this test but is not installed: run `apt-get install -y {debian_package}` \
             (./scripts/test installs it)"
        ),
    }
}

/// Panics unless `text` (a program's output) is plain words for a person: no colour codes, no
/// Rust `Debug` syntax (`Some(..)`, `Io(BrokenPipe)`, `CrlInfo { .. }`), and no clause said
/// twice in one line (an error whose message repeats its cause's).
pub fn assert_plain_words(text: &str) {
    assert!(!text.contains('\x1b'), "colour codes in output:\n{text}");
    for line in text.lines() {
        if let Some(bad) = debug_syntax(line) {
            panic!("Rust Debug syntax `{bad}` in: {line}");
        }
        let clauses: Vec<&str> = line.split([':', ';']).map(str::trim).filter(|c| c.len() >= 12).collect();
        for (i, c) in clauses.iter().enumerate() {
            assert!(!clauses[i + 1..].contains(c), "`{c}` said twice in: {line}");
        }
    }
}

/// The first `Word(` or `Word { ident:` in `line`: an enum variant or struct printed with `{:?}`.
fn debug_syntax(line: &str) -> Option<&str> {
    let b = line.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let starts_word = b[i].is_ascii_uppercase() && (i == 0 || !b[i - 1].is_ascii_alphanumeric());
        if !starts_word {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
            j += 1;
        }
        let rest = &line[j..];
        let is_struct = rest.strip_prefix(" { ").is_some_and(|r| {
            let field: String = r.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
            !field.is_empty() && r[field.len()..].starts_with(": ")
        });
        if rest.starts_with('(') || is_struct {
            return Some(&line[i..(j + 1).min(line.len())]);
        }
        i = j;
    }
    None
}

/// Runs a command, returning its output; panics if it cannot be started.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn is_root() -> bool {
    run(Command::new("id").arg("-u")).stdout.starts_with(b"0\n")
}

fn pg_bindir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").is_file() {
            return dir;
        }
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).filter(|p| p.join("initdb").is_file()).collect())
        .unwrap_or_default();
    candidates.sort();
    candidates.pop().unwrap_or_else(|| {
        panic!("PostgreSQL server binaries (initdb, pg_ctl) not found: run `apt-get install -y postgresql`")
    })
}

/// A private PostgreSQL server for one test.
#[derive(Debug)]
pub struct PgCluster {
    dir: tempfile::TempDir,
    bindir: PathBuf,
    as_postgres: bool,
    port: u16,
    tcp: bool,
}

impl PgCluster {
    /// initdb + start. Takes a second or two.
    pub fn start() -> PgCluster {
        Self::start_on(false)
    }

    /// Like [`PgCluster::start`], also listening on TCP 127.0.0.1 (a free port picked by the
    /// OS), for behaviour that differs over TCP (a stopped server refuses connections).
    pub fn start_tcp() -> PgCluster {
        Self::start_on(true)
    }

    fn start_on(tcp: bool) -> PgCluster {
        let port = if tcp {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("a free TCP port")
        } else {
            5432
        };
        let bindir = pg_bindir();
        let as_postgres = is_root();
        let dir = tempfile::Builder::new().prefix("fleet-pg-").tempdir().expect("tempdir");
        if as_postgres {
            let ok = run(Command::new("chown").arg("-R").arg("postgres:postgres").arg(dir.path()))
                .status
                .success();
            assert!(ok, "cannot chown the PostgreSQL test directory to user postgres");
        }
        let c = PgCluster { dir, bindir, as_postgres, port, tcp };
        let data = c.data_dir();
        let out = c.pg(
            &["initdb", "-D"],
            &[
                data.as_os_str(),
                "-A".as_ref(),
                "trust".as_ref(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "--no-sync".as_ref(),
            ],
        );
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        c.launch();
        c
    }

    fn launch(&self) {
        let data = self.data_dir();
        let opts = format!(
            "-c listen_addresses='{}' -k {} -p {} -c fsync=off -c max_connections=200",
            if self.tcp { "127.0.0.1" } else { "" },
            self.dir.path().display(),
            self.port
        );
        let log = self.dir.path().join("server.log");
        let out = self.pg(
            &["pg_ctl", "-D"],
            &[
                data.as_os_str(),
                "-o".as_ref(),
                opts.as_ref(),
                "-l".as_ref(),
                log.as_os_str(),
                "-w".as_ref(),
                "start".as_ref(),
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Starts the server again after [`PgCluster::stop`], same data and socket.
    pub fn restart(&self) {
        self.launch();
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn pg(&self, prog_and_first: &[&str], rest: &[&std::ffi::OsStr]) -> Output {
        let prog = self.bindir.join(prog_and_first[0]);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(prog);
            c
        } else {
            Command::new(prog)
        };
        cmd.args(&prog_and_first[1..]).args(rest).current_dir(self.dir.path());
        run(&mut cmd)
    }

    /// Socket directory.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Creates a database and returns its sqlx URL.
    pub fn create_database(&self, name: &str) -> String {
        let out = self.pg(
            &["createdb", "-h"],
            &[
                self.dir.path().as_os_str(),
                "-p".as_ref(),
                self.port.to_string().as_ref(),
                "-U".as_ref(),
                "postgres".as_ref(),
                name.as_ref(),
            ],
        );
        assert!(out.status.success(), "createdb failed: {}", String::from_utf8_lossy(&out.stderr));
        self.url(name)
    }

    /// sqlx URL of database `name`.
    pub fn url(&self, name: &str) -> String {
        if self.tcp {
            format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
        } else {
            format!("postgres://postgres@localhost/{name}?host={}&port=5432", self.dir.path().display())
        }
    }

    /// Stops the server now (simulates the database going away).
    pub fn stop(&self) {
        let data = self.data_dir();
        let _ = self.pg(
            &["pg_ctl", "-D"],
            &[data.as_os_str(), "-m".as_ref(), "immediate".as_ref(), "-w".as_ref(), "stop".as_ref()],
        );
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `target/<profile>/` of the running test (its binary lives in `deps/`), checked to hold the
/// given workspace binaries. `cargo test` builds only the binaries of packages it tests; the test
/// command builds them all first (`cargo build --workspace --bins`).
pub fn workspace_bin_dir(binaries: &[&str]) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("unexpected test binary location {}", exe.display()))
        .to_path_buf();
    for b in binaries {
        let bin = dir.join(b);
        let built = std::fs::metadata(&bin).and_then(|m| m.modified()).unwrap_or_else(|_| {
            panic!(
                "{b} is not built in {}: run `cargo build --workspace --bins --examples` (./scripts/test does) first",
                dir.display()
            )
        });
        // `cargo test -p fleet-tests` does not rebuild other packages' binaries: never test a
        // stale one. Checked once per binary per test process (a broker starts many times).
        static CHECKED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
        let checked = |c: &std::sync::Mutex<Vec<String>>| {
            c.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|x| x == b)
        };
        if checked(&CHECKED) {
            continue;
        }
        if let Some((newest, path)) = newest_source(b) {
            assert!(
                built >= newest,
                "{} is older than {}: run `cargo build --workspace --bins --examples` (./scripts/test does) first",
                bin.display(),
                path.display()
            );
        }
        // Remembered only once it passed: every later call of a stale binary fails too.
        CHECKED.lock().unwrap_or_else(|p| p.into_inner()).push((*b).to_owned());
    }
    dir
}

/// The most recently modified source of workspace binary `bin` (its crate and the workspace
/// crates it links).
fn newest_source(bin: &str) -> Option<(std::time::SystemTime, PathBuf)> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?.to_path_buf();
    let crates: &[&str] = match bin {
        "fleet-broker" | "examples/stream_consumer" => &["broker", "registry"],
        "fleet-provision" => &["provisioning", "registry", "device"],
        "fleet-sim" => &["firmware-examples/fleet-sim", "device"],
        _ => &[],
    };
    // A binary is not rebuilt when only an example of its crate changed.
    newest_file(crates.iter().map(|d| repo.join(d)).collect(), &["rs", "sql", "toml"], bin == "fleet-broker")
}

/// The firmware image `elf` of the crate `firmware-examples/<example>`, checked to exist and
/// to be newer than every file it was built from: the sources cargo records for it in the
/// dep-info file next to it (`<elf>.d`: the example's own modules, the device crate's sources,
/// build.rs and its inputs such as memory.x and the Wycheproof vectors the cross-check embeds).
/// That crate is outside the workspace, so `cargo test` never rebuilds it: a test must not boot
/// the image of older sources. Panics saying what to rebuild. (Manifest edits are not compared:
/// cargo rebuilds on what they change, not on every edit.)
pub fn firmware_image(example: &str, elf: &Path) -> PathBuf {
    let rebuild =
        format!("`cargo build --release --bins` in firmware-examples/{example} (./scripts/test does)");
    let built = std::fs::metadata(elf)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("firmware not built: {} is missing: run {rebuild}", elf.display()));
    let dep_info = elf.with_extension("d");
    let deps = std::fs::read_to_string(&dep_info)
        .unwrap_or_else(|e| panic!("{}: {e}: run {rebuild}", dep_info.display()));
    if let Some((newest, path)) = newest_file(dep_info_sources(&deps), &["rs", "x", "json"], false) {
        assert!(
            built >= newest,
            "stale firmware image: {} is older than {}: run {rebuild}",
            elf.display(),
            path.display()
        );
    }
    elf.to_path_buf()
}

/// The prerequisites of a Makefile-style dep-info file (`target: a.rs b.rs ...`, spaces in
/// names escaped with `\`).
fn dep_info_sources(deps: &str) -> Vec<PathBuf> {
    let first = deps.lines().next().unwrap_or_default();
    let list = first.split_once(": ").map_or("", |(_, l)| l);
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = list.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.extend(chars.next()),
            ' ' if !cur.is_empty() => out.push(PathBuf::from(std::mem::take(&mut cur))),
            ' ' => {}
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(PathBuf::from(cur));
    }
    out
}

/// The most recently modified file with one of the `extensions` under `stack` (files or
/// directories; `target/` skipped, and `examples/` with `skip_examples`).
fn newest_file(
    mut stack: Vec<PathBuf>,
    extensions: &[&str],
    skip_examples: bool,
) -> Option<(std::time::SystemTime, PathBuf)> {
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&p) else { continue };
        if meta.is_dir() {
            let skipped = p.file_name().is_some_and(|n| n == "target")
                || (skip_examples && p.file_name().is_some_and(|n| n == "examples"));
            if skipped {
                continue;
            }
            if let Ok(entries) = std::fs::read_dir(&p) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
            continue;
        }
        let relevant = p.extension().is_some_and(|e| extensions.iter().any(|x| e == *x));
        if let (true, Ok(t)) = (relevant, meta.modified()) {
            if newest.as_ref().is_none_or(|(n, _)| t > *n) {
                newest = Some((t, p));
            }
        }
    }
    newest
}

/// A private `nats-server` on free loopback ports (client and HTTP monitoring), with JetStream
/// in a temporary directory, stopped on drop.
///
/// [`NatsServer::start`] runs the configuration fleetgate ships (`deploy/nats/nats-server.conf`:
/// TLS, certificates mapped to users, per-user permissions) with a server certificate and the
/// cluster-bus identities [`NODES`] and [`READER`] made by `fleet-provision` from the fleet in
/// `home`. [`NatsServer::start_open`] runs one with no authentication at all (what a node must
/// refuse to join unless told it is insecure).
#[derive(Debug)]
pub struct NatsServer {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    /// Client port.
    pub port: u16,
    /// HTTP monitoring port (`/connz?subs=1`, `/varz`).
    pub monitor_port: u16,
    /// With the shipped configuration: the directory it runs in (config, `tls/`, JetStream).
    conf: Option<PathBuf>,
}

/// The broker nodes the shipped configuration lists (`urn:fleetgate:node:<name>`).
pub const NODES: [&str; 3] = ["n1", "n2", "n3"];
/// The stream reader it lists (`urn:fleetgate:stream-reader:analytics`), whose consumer is
/// named the same.
pub const READER: &str = "analytics";

impl NatsServer {
    /// The shipped configuration, its TLS material and identities from the fleet in `home`
    /// (registry `database_url`, if not the home's SQLite), started; waits until it listens.
    pub fn start(home: &Path, database_url: Option<&str>) -> NatsServer {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let conf = dir.path().join("conf");
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats/nats-server.conf");
        std::fs::create_dir_all(&conf).unwrap_or_else(|e| panic!("{}: {e}", conf.display()));
        std::fs::copy(&shipped, conf.join("nats-server.conf"))
            .unwrap_or_else(|e| panic!("{}: {e}", shipped.display()));
        let provision = |args: &[&str]| {
            let bin = workspace_bin_dir(&["fleet-provision"]).join("fleet-provision");
            let mut cmd = Command::new(bin);
            cmd.arg("--home").arg(home);
            if let Some(db) = database_url {
                cmd.args(["--database-url", db]);
            }
            let out = run(cmd.args(args));
            assert!(
                out.status.success(),
                "fleet-provision {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let path = |p: PathBuf| p.to_string_lossy().into_owned();
        provision(&[
            "server-cert",
            "--dns",
            "localhost",
            "--ip",
            "127.0.0.1",
            "--out",
            &path(conf.join("tls")),
        ]);
        std::fs::copy(home.join("server-ca.pem"), conf.join("tls/server-ca.pem"))
            .unwrap_or_else(|e| panic!("server-ca.pem: {e}"));
        for n in NODES {
            provision(&["node-cert", "--name", n, "--out", &path(dir.path().join("ids").join(n))]);
        }
        provision(&[
            "node-cert",
            "--stream-reader",
            "--name",
            READER,
            "--out",
            &path(dir.path().join("ids").join(READER)),
        ]);
        let (child, port, monitor_port) = Self::spawn(dir.path(), Some(&conf), &[], -1, -1);
        NatsServer { child, _dir: dir, port, monitor_port, conf: Some(conf) }
    }

    /// A server with no TLS and no authentication (anyone who reaches it may do anything).
    pub fn start_open() -> NatsServer {
        Self::start_open_with(&[])
    }

    /// As `start_open`, with more nats-server flags (e.g. `--user`, `--pass`).
    pub fn start_open_with(flags: &[&str]) -> NatsServer {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let (child, port, monitor_port) = Self::spawn(dir.path(), None, flags, -1, -1);
        NatsServer { child, _dir: dir, port, monitor_port, conf: None }
    }

    /// The directory of cluster-bus identity `name` ([`NODES`], [`READER`]): `cert.pem`,
    /// `key.pem`, `broker-trust.pem`.
    pub fn identity(&self, name: &str) -> PathBuf {
        self._dir.path().join("ids").join(name)
    }

    /// The flags that make a broker node `name` of this bus (`--nats`, `--nats-ca`,
    /// `--nats-cert`, `--nats-key`; `--insecure-nats-no-auth` on an open server).
    pub fn node_args(&self, name: &str) -> Vec<String> {
        if self.conf.is_none() {
            return vec!["--nats".into(), self.url(), "--insecure-nats-no-auth".into(), "true".into()];
        }
        let id = self.identity(name);
        let file = |f: &str| id.join(f).to_string_lossy().into_owned();
        vec![
            "--nats".into(),
            self.url(),
            "--nats-readers".into(),
            READER.into(),
            "--nats-ca".into(),
            file("broker-trust.pem"),
            "--nats-cert".into(),
            file("cert.pem"),
            "--nats-key".into(),
            file("key.pem"),
        ]
    }

    /// Starts nats-server on `port` (-1: any) and waits until it listens; returns the process
    /// and its client and monitoring ports. With `conf`: the shipped configuration, run in that
    /// directory (its JetStream store is there); without: JetStream in `dir`, no authentication.
    fn spawn(
        dir: &Path,
        conf: Option<&Path>,
        flags: &[&str],
        port: i32,
        monitor_port: i32,
    ) -> (std::process::Child, u16, u16) {
        use std::io::BufRead;
        let bin = require_program("nats-server", "nats-server");
        let mut cmd = Command::new(bin);
        cmd.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-m", &monitor_port.to_string()]).args(flags);
        match conf {
            Some(c) => {
                cmd.current_dir(c).args(["-c", "nats-server.conf"]);
            }
            None => {
                cmd.args(["-js", "-sd"]).arg(dir);
            }
        }
        let mut child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nats-server: {e}"));
        let stderr = child.stderr.take().unwrap_or_else(|| unreachable!("piped"));
        let (mut port, mut monitor_port) = (0, 0);
        let port_after = |line: &str, marker: &str| -> Option<u16> {
            line.split(marker).nth(1)?.trim().rsplit(':').next()?.parse().ok()
        };
        let mut lines = std::io::BufReader::new(stderr).lines();
        let mut seen = Vec::new();
        while port == 0 || monitor_port == 0 {
            let Some(Ok(line)) = lines.next() else {
                let _ = child.kill();
                panic!("nats-server exited before listening:\n{}", seen.join("\n"));
            };
            if let Some(p) = port_after(&line, "Listening for client connections on") {
                port = p;
            }
            if let Some(p) = port_after(&line, "Starting http monitor on") {
                monitor_port = p;
            }
            seen.push(line);
        }
        // Keep reading its log so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        (child, port, monitor_port)
    }

    /// Client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Body of a monitoring endpoint, e.g. `/connz?subs=1`.
    pub fn monitor(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.monitor_port))
            .unwrap_or_else(|e| panic!("nats monitor: {e}"));
        let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()
    }

    /// Messages in JetStream stream `name` (from the monitoring endpoint).
    pub fn stream_messages(&self, name: &str) -> u64 {
        let body: String = self.monitor("/jsz?streams=1").chars().filter(|c| !c.is_whitespace()).collect();
        // `"name":"FLEET", ... "state":{"messages":N`: the first "messages" after the name.
        let Some(at) = body.find(&format!("\"name\":\"{name}\"")) else { return 0 };
        let rest = &body[at..];
        let Some(m) = rest.find("\"messages\":") else { return 0 };
        rest[m + 11..].chars().take_while(|c| c.is_ascii_digit()).collect::<String>().parse().unwrap_or(0)
    }

    /// Stops it (simulates NATS going away).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same ports with the same JetStream storage.
    pub fn restart(&mut self) {
        self.stop();
        let (child, _, _) = Self::spawn(
            self._dir.path(),
            self.conf.as_deref(),
            &[],
            i32::from(self.port),
            i32::from(self.monitor_port),
        );
        self.child = child;
    }
}

/// HAProxy in TCP mode in front of broker nodes, as devices would reach a cluster: round robin,
/// each node health-checked on its `/healthz` every 200 ms. Killed on drop.
#[derive(Debug)]
pub struct HaProxy {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    /// The address devices connect to.
    pub addr: std::net::SocketAddr,
}

impl HaProxy {
    /// Fronts `nodes`: each its (MQTT address, metrics address).
    pub fn start(nodes: &[(std::net::SocketAddr, std::net::SocketAddr)]) -> HaProxy {
        Self::start_with(nodes, "")
    }

    /// As `start`, with `server_options` added to every server line (e.g. `send-proxy-v2`).
    pub fn start_with(
        nodes: &[(std::net::SocketAddr, std::net::SocketAddr)],
        server_options: &str,
    ) -> HaProxy {
        let bin = require_program("haproxy", "haproxy");
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        // HAProxy cannot bind port 0: take a free port and hand it over.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap_or_else(|e| panic!("free port: {e}"))
            .port();
        let mut cfg = format!(
            "global\n  maxconn 4096\n\
             defaults\n  mode tcp\n  timeout connect 1s\n  timeout client 1h\n  timeout server 1h\n  retries 2\n  option redispatch\n\
             frontend mqtt\n  bind 127.0.0.1:{port}\n  default_backend nodes\n\
             backend nodes\n  balance roundrobin\n  option httpchk GET /healthz\n  default-server inter 200ms fall 1 rise 1 on-marked-down shutdown-sessions\n"
        );
        for (i, (mqtt, metrics)) in nodes.iter().enumerate() {
            cfg.push_str(&format!("  server n{i} {mqtt} check port {} {server_options}\n", metrics.port()));
        }
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap_or_else(|e| panic!("haproxy.cfg: {e}"));
        let child = Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start haproxy: {e}"));
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let t = std::time::Instant::now();
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(t.elapsed() < std::time::Duration::from_secs(5), "haproxy did not listen on {addr}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        HaProxy { child, _dir: dir, addr }
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn set_mtime(path: &Path, t: SystemTime) {
        let f = std::fs::File::options().write(true).open(path).expect("open");
        f.set_modified(t).expect("set mtime");
    }

    #[test]
    fn plain_words_are_told_from_debug_output() {
        assert_plain_words("cut off (TLS handshake failed: the broker closed the connection)");
        assert_plain_words("rotation requested for 1 device(s); refused (CONNACK 5)");
        assert_eq!(debug_syntax("cut off (TLS Io(BrokenPipe))"), Some("Io("));
        assert_eq!(debug_syntax("crl=Some(CrlInfo { this_update: 1 })"), Some("Some("));
        assert_eq!(debug_syntax("CrlInfo { this_update: 1 }"), Some("CrlInfo "));
        let twice = std::panic::catch_unwind(|| {
            assert_plain_words("error: reading x.pem: No such file or directory: No such file or directory")
        });
        assert!(twice.is_err());
    }

    #[test]
    fn dep_info_lists_prerequisites_with_escaped_spaces() {
        let d = "/t/elf: /a/b.rs /c\\ d/e.rs  /f.json\n\n/a/b.rs:\n";
        let expected: Vec<PathBuf> = ["/a/b.rs", "/c d/e.rs", "/f.json"].iter().map(PathBuf::from).collect();
        assert_eq!(dep_info_sources(d), expected);
    }

    /// An image older than one of its sources fails, naming the source and what to rebuild.
    #[test]
    fn a_firmware_image_older_than_its_sources_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (elf, src, data) = (dir.path().join("fw"), dir.path().join("main.rs"), dir.path().join("v.json"));
        for f in [&elf, &src, &data] {
            std::fs::write(f, b"x").expect("write");
        }
        std::fs::write(
            elf.with_extension("d"),
            format!("{}: {} {}\n", elf.display(), src.display(), data.display()),
        )
        .expect("write dep-info");
        let t0 = SystemTime::now() - Duration::from_secs(3600);
        set_mtime(&src, t0);
        set_mtime(&data, t0);
        set_mtime(&elf, t0 + Duration::from_secs(60));
        assert_eq!(firmware_image("qemu-mps2-an386", &elf), elf, "newer than its sources: fresh");

        set_mtime(&data, t0 + Duration::from_secs(120));
        let stale = std::panic::catch_unwind(|| firmware_image("qemu-mps2-an386", &elf)).expect_err("stale");
        let msg = stale.downcast_ref::<String>().expect("message");
        assert!(msg.contains("stale firmware image") && msg.contains("v.json"), "{msg}");
        assert!(msg.contains("cargo build --release --bins` in firmware-examples/qemu-mps2-an386"), "{msg}");

        std::fs::remove_file(&elf).expect("rm");
        let missing =
            std::panic::catch_unwind(|| firmware_image("qemu-mps2-an386", &elf)).expect_err("missing");
        assert!(missing.downcast_ref::<String>().expect("message").contains("firmware not built"));
    }
}
