//! The README, executed: every shell block of `README.md` (and of every Markdown file under
//! `docs/`: the commands a reader is told to run) runs in order, in one bash, in a temporary
//! directory that looks like a checkout, with the real binaries and the real peers (mosquitto
//! clients, openssl, PostgreSQL, nats-server, HAProxy, QEMU, NSS tools, curl).
//!
//! Why a runner of our own and not `trycmd`: trycmd runs one command per `$` line with its own
//! tiny parser, keeps no shell state between commands (variables, `cd`, `export`), and has no
//! background processes, heredocs, pipes or loops. The README's blocks are bash sessions that
//! build on each other (a broker started with `&` in one section is stopped in a later one), so
//! they are run by bash itself; this file only arranges them.
//!
//! What the README's source says to the runner, in HTML comments (invisible when rendered):
//! - `<!-- readme-test-global ... -->`: `sub:` and `before:` lines for every block.
//! - `<!-- readme-test ... -->` just before a block:
//!   - `sub: FROM => TO`: a marked placeholder (a port, a host name, a path) replaced in the
//!     block's text. Numbers are replaced only as whole numbers. `{port:NAME}` is a free loopback
//!     port (one per name), `{bin}` the freshly built binaries, `{work}` the temporary directory.
//!   - `bg: PATTERN => READY`: the line holding PATTERN is a long-running program: it runs in the
//!     background with its own log, and the block goes on once that log holds READY (or, when
//!     READY is empty, once it has stayed alive for two seconds).
//!   - `before:` / `after:`: hidden lines run before / after the block (e.g. waiting for a
//!     device message through the cluster).
//!   - `expect: TEXT`: the block's output holds TEXT. A trailing comment `# prints "TEXT"` in
//!     the block says the same to readers and is checked the same way.
//!   - `skip: REASON` (required for any block that does not run here) with `instead:` lines that
//!     check it as far as possible, or `sandbox: deploy` to run it with the VM's paths in the
//!     temporary directory and stand-ins for sudo, useradd, scp, systemctl and journalctl.
//!
//! `FLEET_README_KEEP=1` keeps the temporary directory (the script, each block's log) after a
//! pass too; after a failure it is always kept.
//!
//! Everything the blocks start runs in one process group, which the test created; it is
//! stopped (SIGTERM, then SIGKILL) when the test ends, whatever the outcome. A missing peer makes
//! the test fail with what to install.
#![allow(clippy::unwrap_used)] // test code

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fleet_tests::{require_program, workspace_bin_dir, PgCluster};

/// The files whose blocks run, in this order: the README, then every Markdown file under
/// `docs/` by path (they use the state the README's commands left).
fn files(repo: &Path) -> Vec<PathBuf> {
    let mut docs = Vec::new();
    let mut stack = vec![repo.join("docs")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "md") {
                docs.push(p.strip_prefix(repo).unwrap().to_path_buf());
            }
        }
    }
    docs.sort();
    std::iter::once(PathBuf::from("README.md")).chain(docs).collect()
}

/// The whole run's limit.
const DEADLINE: Duration = Duration::from_secs(600);

#[derive(Debug, Default, Clone)]
struct Directives {
    skip: Option<String>,
    instead: Vec<String>,
    sandbox: Option<String>,
    subs: Vec<(String, String)>,
    before: Vec<String>,
    after: Vec<String>,
    bg: Vec<(String, String)>,
    expect: Vec<String>,
}

#[derive(Debug)]
struct Block {
    origin: String,
    text: String,
    directives: Directives,
}

/// Parses `key: value` directive lines; `global` allows free prose lines.
fn directives(lines: &[&str], origin: &str, global: bool) -> Directives {
    let mut d = Directives::default();
    for line in lines {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once(':').filter(|(k, _)| {
            ["skip", "instead", "sandbox", "sub", "before", "after", "bg", "expect"].contains(&k.trim())
        }) else {
            assert!(global, "{origin}: unknown readme-test directive line `{line}`");
            continue;
        };
        let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
        // `A => B`; B may be empty (the line is trimmed: `A =>`), A may end in a space.
        let pair = |v: &str| {
            let (a, b) =
                v.split_once(" =>").unwrap_or_else(|| panic!("{origin}: `{line}`: expected `A => B`"));
            (a.to_owned(), b.strip_prefix(' ').unwrap_or(b).to_owned())
        };
        match key.trim() {
            "skip" => d.skip = Some(value),
            "instead" => d.instead.push(value),
            "sandbox" => d.sandbox = Some(value),
            "sub" => d.subs.push(pair(&value)),
            "before" => d.before.push(value),
            "after" => d.after.push(value),
            "bg" => d.bg.push(pair(&value)),
            "expect" => d.expect.push(value),
            _ => unreachable!("filtered above"),
        }
    }
    d
}

/// The shell blocks of one Markdown file, with their directives, and its global directives.
fn blocks(label: &str, text: &str) -> (Directives, Vec<Block>) {
    let lines: Vec<&str> = text.lines().collect();
    let mut global = Directives::default();
    let mut out = Vec::new();
    let mut pending: Option<(usize, Directives)> = None;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let origin = format!("{label}:{}", i + 1);
        if let Some(kind) =
            ["<!-- readme-test-global", "<!-- readme-test"].into_iter().find(|k| line.starts_with(k))
        {
            let start = i;
            while !lines[i].contains("-->") {
                i += 1;
                assert!(i < lines.len(), "{origin}: unterminated readme-test comment");
            }
            let body = &lines[start + 1..i];
            if kind.ends_with("global") {
                let g = directives(body, &origin, true);
                global.subs.extend(g.subs);
                global.before.extend(g.before);
            } else {
                pending = Some((start, directives(body, &origin, false)));
            }
        } else if let Some(info) = line.trim_start().strip_prefix("```") {
            let lang = info.split_whitespace().next().unwrap_or("");
            let start = i;
            i += 1;
            while !lines[i].trim_start().starts_with("```") {
                i += 1;
                assert!(i < lines.len(), "{origin}: unterminated code block");
            }
            let body = lines[start + 1..i].join("\n") + "\n";
            let shell = ["sh", "bash", "shell", "console"].contains(&lang);
            match (shell, pending.take()) {
                (true, d) => out.push(Block { origin, text: body, directives: d.unwrap_or_default().1 }),
                (false, Some((at, _))) => {
                    panic!("{label}:{}: a readme-test comment before a `{lang}` block", at + 1)
                }
                (false, None) => {}
            }
        } else if !line.trim().is_empty() {
            if let Some((at, _)) = pending {
                panic!("{label}:{}: a readme-test comment not directly before a shell block", at + 1);
            }
        }
        i += 1;
    }
    (global, out)
}

/// Replaces `{port:NAME}`, `{bin}`, `{work}` and `{repo}`.
struct Tokens {
    ports: BTreeMap<String, u16>,
    held: Vec<std::net::TcpListener>,
    bin: PathBuf,
    work: PathBuf,
    repo: PathBuf,
}

impl Tokens {
    fn port(&mut self, name: &str) -> u16 {
        if let Some(p) = self.ports.get(name) {
            return *p;
        }
        // Held until the script starts, so that no two names get the same port.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        self.held.push(l);
        self.ports.insert(name.to_owned(), p);
        p
    }

    fn resolve(&mut self, s: &str) -> String {
        let mut out = String::new();
        let mut rest = s;
        while let Some(at) = rest.find('{') {
            out.push_str(&rest[..at]);
            let tail = &rest[at..];
            let end = tail.find('}').map(|e| e + 1).unwrap_or(tail.len());
            let token = &tail[1..end.saturating_sub(1).max(1)];
            let value = match token {
                "bin" => Some(self.bin.display().to_string()),
                "work" => Some(self.work.display().to_string()),
                "repo" => Some(self.repo.display().to_string()),
                t => t.strip_prefix("port:").map(|n| self.port(n).to_string()),
            };
            match value {
                Some(v) => {
                    out.push_str(&v);
                    rest = &tail[end..];
                }
                None => {
                    out.push('{');
                    rest = &tail[1..];
                }
            }
        }
        out.push_str(rest);
        out
    }
}

/// Replaces every `from` by its `to` in one left-to-right pass (the first pair that matches at a
/// position wins; a replacement is never searched again). A `from` that starts or ends with a
/// digit matches only a whole number there (`8883` is not replaced inside `18883`).
fn substitute(text: &str, subs: &[(String, String)]) -> String {
    let b = text.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    'outer: while i < text.len() {
        for (from, to) in subs {
            if !text[i..].starts_with(from.as_str()) {
                continue;
            }
            let end = i + from.len();
            let digit_before = from.as_bytes()[0].is_ascii_digit() && i > 0 && b[i - 1].is_ascii_digit();
            let digit_after =
                from.as_bytes()[from.len() - 1].is_ascii_digit() && end < b.len() && b[end].is_ascii_digit();
            if digit_before || digit_after {
                continue;
            }
            out.push_str(to);
            i = end;
            continue 'outer;
        }
        let c = text[i..].chars().next().unwrap();
        out.push(c);
        i += c.len_utf8();
    }
    out
}

/// Where the shell comment of `line` starts (a `#` after whitespace, outside quotes).
fn comment_start(line: &str) -> Option<usize> {
    let (mut single, mut double) = (false, false);
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && prev.is_whitespace() => return Some(i),
            _ => {}
        }
        prev = c;
    }
    None
}

/// The texts that trailing comments say a block prints: `# ... prints "TEXT"`.
fn printed(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(at) = comment_start(line) else { continue };
        let mut rest = &line[at..];
        while let Some(p) = rest.find("prints \"") {
            let from = &rest[p + 8..];
            let Some(end) = from.find('"') else { break };
            out.push(from[..end].to_owned());
            rest = &from[end..];
        }
    }
    out
}

/// Single-quotes `s` for bash.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The block's text with its long-running lines moved to the background, each followed by a
/// wait for its readiness text.
fn background(text: &str, bg: &[(String, String)], block: usize, origin: &str) -> String {
    // Logical lines: a line ending in `\` continues on the next.
    let mut logical: Vec<String> = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        cur.push_str(line);
        if line.ends_with('\\') {
            cur.push('\n');
        } else {
            logical.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        logical.push(cur);
    }
    let mut done = vec![false; logical.len()];
    for (k, (pattern, ready)) in bg.iter().enumerate() {
        let pattern = pattern.trim_end_matches(' ');
        let ready = ready.trim();
        let n = (0..logical.len())
            .find(|&n| !done[n] && logical[n].contains(pattern))
            .unwrap_or_else(|| panic!("{origin}: `bg: {pattern}` matches no line of the block"));
        done[n] = true;
        let line = &logical[n];
        let code = match comment_start(line) {
            Some(c) => &line[..c],
            None => line.as_str(),
        };
        let code = code.trim_end().trim_end_matches('&').trim_end();
        let log = format!("\"$FLEET_README_OUT/{block}-bg-{k}.log\"");
        logical[n] = format!("{code} > {log} 2>&1 &\nfleet_readme_ready $! {log} {}", quote(ready));
    }
    logical.join("\n") + "\n"
}

/// Helpers every block may call, and the sandbox a VM's commands run in.
fn prelude(t: &mut Tokens) -> String {
    let text = r#"set -eu
fleet_readme_fail() { printf '%s\n' "$*" > "$FLEET_README_OUT/failure"; exit 1; }
# PID LOG TEXT: wait until the background command's log holds TEXT (empty: alive for 2 s).
fleet_readme_ready() {
  local pid=$1 log=$2 text=$3 i
  for i in $(seq 900); do
    if [ -n "$text" ] && grep -qF -- "$text" "$log" 2>/dev/null; then return 0; fi
    kill -0 "$pid" 2>/dev/null || fleet_readme_fail "background command (pid $pid) ended before printing '$text'; its log: $(tail -n 30 "$log")"
    if [ -z "$text" ] && [ "$i" -ge 20 ]; then return 0; fi
    sleep 0.1
  done
  fleet_readme_fail "background command did not print '$text' within 90 s; its log: $(tail -n 30 "$log")"
}
# FILE TEXT: wait up to 30 s until FILE holds TEXT.
fleet_readme_wait_for() {
  local i
  for i in $(seq 300); do grep -qF -- "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  fleet_readme_fail "no '$2' in $1 within 30 s: $(tail -n 30 "$1")"
}
# TEXT: the block's output (its log and its background commands' logs) holds TEXT.
fleet_readme_expect() {
  cat "$BLOCK_LOG" "$FLEET_README_OUT/$FLEET_README_BLOCK"-bg-*.log 2>/dev/null | grep -qF -- "$1" \
    || fleet_readme_fail "the block's output lacks '$1'"
}
# PORT: wait up to 10 s until nothing listens on 127.0.0.1:PORT (a program just killed).
fleet_readme_wait_port_free() {
  local i
  for i in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null || return 0; sleep 0.1; done
  fleet_readme_fail "port $1 still taken"
}
# DIR:BIN...: what `cargo install --path DIR` would install. Checked without installing (a
# release build of each takes minutes): DIR is a member of the workspace whose package has a
# binary target BIN that needs no feature beyond the defaults, and that binary, freshly built,
# is the one on PATH here. Not checked: that the release build itself succeeds.
fleet_readme_check_install() {
  cargo metadata --offline --no-deps --format-version 1 --manifest-path {repo}/Cargo.toml > "$FLEET_README_OUT/metadata.json"
  local spec dir bin
  for spec in "$@"; do
    dir=${spec%%:*}; bin=${spec#*:}
    python3 - "$FLEET_README_OUT/metadata.json" "{repo}/$dir/Cargo.toml" "$bin" <<'PY' || fleet_readme_fail "cargo install --path $dir would not install $bin"
import json, os, sys
meta, manifest, binary = json.load(open(sys.argv[1])), os.path.realpath(sys.argv[2]), sys.argv[3]
pkg = [p for p in meta["packages"] if os.path.realpath(p["manifest_path"]) == manifest]
assert pkg and pkg[0]["id"] in meta["workspace_members"], "not a workspace member"
bins = [t for t in pkg[0]["targets"] if "bin" in t["kind"] and t["name"] == binary]
assert bins, "no binary target " + binary
default = set(pkg[0]["features"].get("default", []))
assert set(bins[0].get("required-features", [])) <= default, "needs non-default features"
PY
    [ "$(command -v "$bin")" = "{bin}/$bin" ] || fleet_readme_fail "$bin on PATH is $(command -v "$bin"), not {bin}/$bin"
  done
}
# A claim whose CSRs the issuer refuses for good (`bad_id`: the wrong prefix) ends fleet-sim at
# once, with the reason, instead of asking again until its deadline.
fleet_readme_claim_refused_for_good() {
  fleet-provision claim-cert --name batch-check --prefix sensor --quota 1 --days 1 \
    --broker-host localhost --broker-port {port:mqtt} --out claim-check > /dev/null
  local t0=$SECONDS
  if fleet-sim claim --claim claim-check --prefix wrong --count 1 --out claimed-check --duration 30 \
      > claim-check.log 2>&1; then
    fleet_readme_fail "a claim with the wrong prefix got an identity: $(cat claim-check.log)"
  fi
  grep -q "refused for good: bad_id" claim-check.log || fleet_readme_fail "no bad_id refusal: $(cat claim-check.log)"
  [ $((SECONDS - t0)) -lt 15 ] || fleet_readme_fail "fleet-sim retried a permanent refusal for $((SECONDS - t0)) s"
  fleet-provision revoke batch-check > /dev/null
}
# The cluster answers: a device message through HAProxy is acknowledged (QoS 1: stored in
# JetStream) and reaches the telemetry table, and a connection to a node without the PROXY
# header is refused and logged.
fleet_readme_cluster_check() {
  local d i
  d=$(ls cluster-devices | sed -n 1p)
  for i in $(seq 100); do
    mosquitto_pub -h localhost -p {port:mqtt} --cafile cluster-devices/$d/broker-trust.pem \
      --cert cluster-devices/$d/cert.pem --key cluster-devices/$d/key.pem -i "$d" \
      -t "devices/$d/telemetry" -m '{"t":1}' -q 1 2>/dev/null && break
    [ "$i" -lt 100 ] || fleet_readme_fail "no device message acknowledged through HAProxy in 30 s"
    sleep 0.3
  done
  # ... and the nodes, on the brokers' least-privilege role, feed it into the SQL table.
  for i in $(seq 100); do
    [ "$(psql -d fleet -tAc 'SELECT count(*) FROM telemetry')" -ge 1 ] && break
    [ "$i" -lt 100 ] || fleet_readme_fail "the SQL sink stored nothing in 30 s"
    sleep 0.3
  done
  (exec 3<>/dev/tcp/127.0.0.1/{port:n1}; printf 'no PROXY header\r\n' >&3; cat <&3 > /dev/null) || true
  fleet_readme_wait_for "$BLOCK_LOG" "no valid PROXY v2 header"
}
"#;
    t.resolve(text)
}

/// The VM of the README's deploy section, inside the temporary directory.
fn sandbox_deploy(t: &mut Tokens) -> (String, Vec<(String, String)>) {
    let vm = t.work.join("vm").display().to_string();
    let bin = t.bin.display().to_string();
    let subs = vec![
        ("vm:/tmp/".to_owned(), format!("{vm}/tmp/")),
        ("/tmp/".to_owned(), format!("{vm}/tmp/")),
        ("/usr/local/bin/".to_owned(), format!("{vm}/usr/local/bin/")),
        ("/etc/systemd/system/".to_owned(), format!("{vm}/etc/systemd/system/")),
        ("/etc/fleetgate".to_owned(), format!("{vm}/etc/fleetgate")),
        ("/var/lib/fleetgate".to_owned(), format!("{vm}/var/lib/fleetgate")),
        ("target/release/".to_owned(), format!("{bin}/")),
        // The station of this run whose registry is the PostgreSQL `db.internal` stands for.
        ("-C fleet-pki".to_owned(), "-C cluster-pki".to_owned()),
        ("127.0.0.1:9464".to_owned(), format!("127.0.0.1:{}", t.port("vm_metrics"))),
    ];
    let prelude = r#"VM={work}/vm
mkdir -p $VM/tmp $VM/usr/local/bin $VM/etc/systemd/system $VM/var/lib
sudo() { while [ "${1:-}" = -u ]; do shift 2; done; "$@"; }
useradd() { echo "(sandbox) useradd $*"; }
chown() { echo "(sandbox) chown $*"; }
install() {
  local a=()
  while [ $# -gt 0 ]; do case $1 in -o|-g) shift 2 ;; *) a+=("$1"); shift ;; esac; done
  command install "${a[@]}"
}
cargo() { echo "(sandbox) cargo $*: the test's debug build stands in for it"; }
scp() { local n=$#; cp -r "${@:1:$((n - 1))}" "${!n}"; }
journalctl() { cat "$VM/$2.journal"; }
systemctl() {
  case "$1" in
    enable) fleet_readme_unit_start "${@: -1}" ;;
    status) kill -0 "$(cat "$VM/$2.pid")" && echo "$2.service: active (running), pid $(cat "$VM/$2.pid")" ;;
    *) echo "(sandbox) systemctl $*" ;;
  esac
}
# The unit's own command lines, with the VM's paths here and its environment files read.
fleet_readme_unit_start() {
  local unit="$VM/etc/systemd/system/$1.service" map pid
  map="s#/usr/local/bin/#$VM/usr/local/bin/#g; s#/etc/fleetgate#$VM/etc/fleetgate#g; s#/var/lib/fleetgate#$VM/var/lib/fleetgate#g"
  (
    for f in $(sed -n 's/^EnvironmentFile=-\{0,1\}//p' "$unit" | sed "$map"); do
      [ -f "$f" ] && { set -a; . "$f"; set +a; }
    done
    export FLEET_LISTEN=127.0.0.1:{port:vm} FLEET_METRICS_LISTEN=127.0.0.1:{port:vm_metrics}
    $(sed -n 's/^ExecStartPre=//p' "$unit" | sed "$map") > "$VM/$1.journal" 2>&1 \
      || fleet_readme_fail "ExecStartPre of $1 failed: $(cat "$VM/$1.journal")"
    $(sed -n 's/^ExecStart=//p' "$unit" | sed "$map") >> "$VM/$1.journal" 2>&1 &
    echo $! > "$VM/$1.pid"
  )
  fleet_readme_ready "$(cat "$VM/$1.pid")" "$VM/$1.journal" "listening on"
}
"#;
    (t.resolve(prelude), subs)
}

/// A temporary directory that looks like a checkout: the repository's files the README's
/// commands read, linked in; everything the commands write stays here.
fn checkout(repo: &Path, work: &Path) {
    for entry in ["README.md", "docs", "deploy", "scripts", "firmware-examples"] {
        std::os::unix::fs::symlink(repo.join(entry), work.join(entry)).unwrap();
    }
    std::fs::create_dir_all(work.join("home")).unwrap();
}

/// Kills the process group the script runs in (every program the blocks started) on drop.
struct Group(u32);

impl Drop for Group {
    fn drop(&mut self) {
        let group = format!("-{}", self.0);
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        std::thread::sleep(Duration::from_millis(500));
        let _ = Command::new("kill").args(["-KILL", "--", &group]).stderr(Stdio::null()).status();
    }
}

#[test]
fn every_command_the_readme_gives_runs_as_written() {
    for (program, package) in [
        ("mosquitto_pub", "mosquitto-clients"),
        ("mosquitto_sub", "mosquitto-clients"),
        ("openssl", "openssl"),
        ("nats-server", "nats-server"),
        ("haproxy", "haproxy"),
        ("qemu-system-arm", "qemu-system-arm"),
        ("certutil", "libnss3-tools"),
        ("pk12util", "libnss3-tools"),
        ("curl", "curl"),
        ("createuser", "postgresql-client"),
        ("psql", "postgresql-client"),
        ("python3", "python3"),
        ("tar", "tar"),
    ] {
        require_program(program, package);
    }
    let bin =
        workspace_bin_dir(&["fleet-provision", "fleet-broker", "fleet-sim", "examples/stream_consumer"]);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap();
    let firmware = repo.join("firmware-examples/qemu-mps2-an386/target/thumbv7em-none-eabihf/release");
    // The README builds it (`cargo build --release` there): a fresh image makes that a no-op.
    fleet_tests::firmware_image("qemu-mps2-an386", &firmware.join("async_device"));
    let pg = PgCluster::start_tcp();
    let pg_port = pg.url("x").rsplit(':').next().unwrap().split('/').next().unwrap().to_owned();

    let tmp = tempfile::Builder::new().prefix("fleet-readme-").tempdir().unwrap();
    let work = tmp.path().join("work");
    let out_dir = tmp.path().join("out");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(&out_dir).unwrap();
    checkout(&repo, &work);
    let mut t =
        Tokens { ports: BTreeMap::new(), held: Vec::new(), bin: bin.clone(), work: work.clone(), repo };
    t.ports.insert("pg".into(), pg_port.parse().unwrap());

    let mut script = prelude(&mut t);
    let mut global = Directives::default();
    let mut all = Vec::new();
    for file in files(&t.repo) {
        let text = std::fs::read_to_string(t.repo.join(&file)).unwrap();
        let (g, b) = blocks(&file.display().to_string(), &text);
        global.subs.extend(g.subs);
        global.before.extend(g.before);
        all.extend(b);
    }
    assert!(all.len() >= 15, "only {} shell blocks found", all.len());
    let global_subs: Vec<(String, String)> =
        global.subs.iter().map(|(a, b)| (a.clone(), t.resolve(b))).collect();
    for line in &global.before {
        script.push_str(&t.resolve(line));
        script.push('\n');
    }
    for (n, block) in all.iter().enumerate() {
        let d = &block.directives;
        let _ = writeln!(
            script,
            "\nFLEET_README_BLOCK={n}; BLOCK_LOG=\"$FLEET_README_OUT/{n}.log\"; echo {} > \"$FLEET_README_OUT/current\"",
            quote(&block.origin)
        );
        script.push_str("{\n");
        let mut subs: Vec<(String, String)> = d.subs.iter().map(|(a, b)| (a.clone(), t.resolve(b))).collect();
        let sandbox = match d.sandbox.as_deref() {
            None => None,
            Some("deploy") => {
                let (prelude, s) = sandbox_deploy(&mut t);
                subs.extend(s);
                Some(prelude)
            }
            Some(other) => panic!("{}: unknown sandbox {other}", block.origin),
        };
        subs.extend(global_subs.iter().cloned());
        for line in &d.before {
            script.push_str(&t.resolve(line));
            script.push('\n');
        }
        let text = substitute(&block.text, &subs);
        // What a skipped block's comments say it prints is not checked: it did not run.
        let runs = d.skip.is_none() || d.sandbox.is_some();
        let said = if runs { printed(&text) } else { Vec::new() };
        let expected: Vec<String> = said.into_iter().chain(d.expect.iter().cloned()).collect();
        match (&d.skip, sandbox) {
            (Some(reason), None) => {
                assert!(!reason.trim().is_empty(), "{}: skip without a reason", block.origin);
                assert!(!d.instead.is_empty(), "{}: a skipped block needs `instead:` checks", block.origin);
                for line in &d.instead {
                    script.push_str(&t.resolve(line));
                    script.push('\n');
                }
            }
            (reason, Some(prelude)) => {
                assert!(reason.is_some(), "{}: a sandboxed block says why (skip:)", block.origin);
                script.push_str("(\n");
                script.push_str(&prelude);
                script.push_str(&background(&text, &d.bg, n, &block.origin));
                script.push_str(")\n");
            }
            (None, None) => script.push_str(&background(&text, &d.bg, n, &block.origin)),
        }
        for line in &d.after {
            script.push_str(&t.resolve(line));
            script.push('\n');
        }
        script.push_str("} > \"$BLOCK_LOG\" 2>&1\n");
        for e in expected {
            let _ = writeln!(script, "fleet_readme_expect {}", quote(&e));
        }
        let _ = writeln!(script, "echo \"{n} $SECONDS\" >> \"$FLEET_README_OUT/timeline\"");
    }
    script.push_str("echo done > \"$FLEET_README_OUT/done\"\n");
    let script_path = out_dir.join("readme.sh");
    std::fs::write(&script_path, &script).unwrap();

    // The binaries under test first; PostgreSQL's client tools reach the test's server.
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let real_home = std::env::var("HOME").unwrap_or_default();
    let cargo_home = std::env::var("CARGO_HOME").unwrap_or_else(|_| format!("{real_home}/.cargo"));
    let rustup_home = std::env::var("RUSTUP_HOME").unwrap_or_else(|_| format!("{real_home}/.rustup"));
    drop(std::mem::take(&mut t.held));
    let started = Instant::now();
    let mut child = {
        use std::os::unix::process::CommandExt as _;
        Command::new("bash")
            .arg(&script_path)
            .current_dir(&work)
            .env("PATH", path)
            .env("HOME", work.join("home"))
            .env("CARGO_HOME", cargo_home)
            .env("RUSTUP_HOME", rustup_home)
            .env("FLEET_README_OUT", &out_dir)
            .env("FLEET_BIN_DIR", &bin)
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", &pg_port)
            .env("PGUSER", "postgres")
            .env_remove("FLEET_HOME")
            .env_remove("FLEET_DATABASE_URL")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap()
    };
    let group = Group(child.id());
    let (stdout, stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let read = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let (stdout, stderr) = (read(Box::new(stdout)), read(Box::new(stderr)));
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if started.elapsed() > DEADLINE {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let elapsed = started.elapsed();
    drop(group);
    let _ = child.wait();
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    let timeline = std::fs::read_to_string(out_dir.join("timeline")).unwrap_or_default();
    for line in timeline.lines() {
        let mut f = line.split(' ');
        let (n, secs) = (f.next().unwrap().parse::<usize>().unwrap(), f.next().unwrap());
        println!("{:>4} s  {}", secs, all[n].origin);
    }
    println!("README run: {:.0} s", elapsed.as_secs_f64());
    if out_dir.join("done").exists() && status.is_some_and(|s| s.success()) {
        if std::env::var_os("FLEET_README_KEEP").is_some() {
            println!("kept: {}", tmp.keep().display());
        }
        return;
    }
    // What failed: the block, the reason, its output and its background commands' logs.
    let current = std::fs::read_to_string(out_dir.join("current")).unwrap_or_default();
    let failure = std::fs::read_to_string(out_dir.join("failure")).unwrap_or_default();
    let n = all.iter().position(|b| b.origin == current.trim());
    let mut report = format!(
        "the block at {} failed ({}):\n{failure}\n",
        current.trim(),
        status.map_or("timed out".to_string(), |s| s.to_string())
    );
    if let Some(n) = n {
        let _ = writeln!(report, "--- the block as written:\n{}", all[n].text);
        for entry in std::fs::read_dir(&out_dir).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == format!("{n}.log") || name.starts_with(&format!("{n}-bg-")) {
                let log = std::fs::read_to_string(entry.path()).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                let _ = writeln!(report, "--- {name} (last 60 lines):\n{}", tail.join("\n"));
            }
        }
    }
    let _ = writeln!(
        report,
        "--- stdout:\n{stdout}\n--- stderr:\n{stderr}\n--- script: {}",
        script_path.display()
    );
    // Kept for a look at the script and the logs.
    let _ = tmp.keep();
    panic!("{report}");
}

/// The runner's own pieces, on small inputs.
mod runner {
    use super::*;

    #[test]
    fn placeholders_are_replaced_once_and_numbers_only_whole() {
        let subs = vec![
            ("0.0.0.0:8883".to_owned(), "127.0.0.1:4000".to_owned()),
            ("8883".to_owned(), "4000".to_owned()),
            ("/tmp/".to_owned(), "/tmp/work/vm/tmp/".to_owned()),
        ];
        assert_eq!(
            substitute("--listen 0.0.0.0:8883 -p 8883 port 18883 88830", &subs),
            "--listen 127.0.0.1:4000 -p 4000 port 18883 88830"
        );
        // A replacement is not searched again (its /tmp/ stays as it is).
        assert_eq!(substitute("cp a /tmp/", &subs), "cp a /tmp/work/vm/tmp/");
    }

    #[test]
    fn comments_and_what_they_say_is_printed() {
        assert_eq!(comment_start("echo '# not' \"# not\" # yes"), Some(21));
        assert_eq!(comment_start("ls a#b"), None);
        assert_eq!(
            printed("fleet-broker &   # prints \"listening on\" and \"x\"\necho '# prints \"no\"'\n"),
            vec!["listening on".to_owned()]
        );
    }

    #[test]
    fn a_long_running_line_goes_to_the_background_and_is_waited_for() {
        let text = "a \\\n  --flag &   # keeps running\nb\n";
        let out = background(text, &[("a".into(), "ready".into())], 3, "t");
        assert_eq!(
            out,
            "a \\\n  --flag > \"$FLEET_README_OUT/3-bg-0.log\" 2>&1 &\n\
             fleet_readme_ready $! \"$FLEET_README_OUT/3-bg-0.log\" 'ready'\nb\n"
        );
    }

    #[test]
    fn directives_attach_to_the_next_shell_block_only() {
        let md =
            "<!-- readme-test\nskip: why\ninstead: true\n-->\n```sh\nx\n```\n\n```rust\nfn f() {}\n```\n";
        let (_, b) = blocks("f.md", md);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].directives.skip.as_deref(), Some("why"));
        assert_eq!(b[0].origin, "f.md:5");
        let stray = "<!-- readme-test\nexpect: x\n-->\n```rust\nfn f() {}\n```\n";
        assert!(std::panic::catch_unwind(|| blocks("f.md", stray)).is_err());
    }
}
