//! `ota` (only when named; `--devices`, default 1,000, at most 2,000): a firmware campaign of a
//! 256 KiB image in waves 1%,10%,100% to N simulated devices (`fleet-sim run --ota-key`: the SDK's
//! `fleet_device::ota` and embassy-boot's checks over flash in memory, one thread each) through
//! the release `fleet-broker`: the time from `ota start` until every device confirmed, and the
//! broker's CPU per MiB of chunks it served. No peer runs the same campaign (Mosquitto and
//! rumqttd have no firmware delivery); the figure stands alone.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::servers;
use crate::{Args, Env, Report};

/// The image: 256 KiB.
const IMAGE: usize = 256 * 1024;

fn bin(name: &str) -> PathBuf {
    fleet_tests::workspace_bin_dir(&[name]).join(name)
}

/// `fleet-provision --home <env> args`; stdout, or why it failed.
fn station(env: &Env, args: &[&str]) -> Result<String, String> {
    let out = Command::new(bin("fleet-provision"))
        .arg("--home")
        .arg(&env.home)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("fleet-provision {args:?}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) async fn scenario_ota(a: &Args, report: &mut Report) {
    let n = if a.devices_set { a.devices.min(2_000) } else { 1_000 };
    println!("\n== ota: a 256 KiB firmware campaign in waves 1%,10%,100% to {n} simulated devices (fleet-sim, fleet-broker)");
    let env = Env::new().await;
    let _ = env.mint("ota", n).await;
    let image = fleet_tests::ota_flash::test_image(IMAGE, 5);
    let path = env.dir().join("app.bin");
    let prepared = std::fs::write(&path, &image).map_err(|e| e.to_string()).and_then(|()| {
        station(&env, &["firmware-key"])?;
        station(
            &env,
            &[
                "release",
                "--image",
                path.to_str().unwrap_or_default(),
                "--version",
                "1.1.0",
                "--board",
                "fleet-sim",
            ],
        )?;
        station(&env, &["ota", "publish", "--release", "fleet-sim/1.1.0"])
    });
    if let Err(e) = prepared {
        println!("  {e}");
        return;
    }
    let server = match servers::start_fleet_broker_on(
        &env.home,
        0,
        &["--max-pre-admission-per-source", "4096", "--ota-poll-ms", "200"],
    ) {
        Ok(s) => s,
        Err(e) => {
            println!("  fleet-broker did not start: {e}");
            return;
        }
    };
    let port = server.addr.port().to_string();
    let sim = std::thread::spawn({
        let (port, key, dir) = (port.clone(), env.home.join("firmware.pub"), env.dir().join("ota"));
        move || {
            Command::new(bin("fleet-sim"))
                .args(["run", "--port", &port, "--rate", "0.05", "--duration", "600", "--exit-when-updated"])
                .args(["--ota-capacity", "327680"])
                .arg("--ota-key")
                .arg(key)
                .arg("--devices")
                .arg(dir)
                .stdout(Stdio::piped())
                .output()
        }
    });
    // The devices connect first; the campaign starts once they are up (as on a live fleet).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let cpu0 = server.cpu_secs();
    let started = Instant::now();
    let out = match station(
        &env,
        &[
            "ota",
            "start",
            "--release",
            "fleet-sim/1.1.0",
            "--devices",
            "all",
            "--waves",
            "1%,10%,100%",
            "--abort-if-failed",
            "2%",
        ],
    ) {
        Ok(o) => o,
        Err(e) => {
            println!("  {e}");
            return;
        }
    };
    let id = out.split_whitespace().find(|w| w.starts_with("ota-")).unwrap_or_default().to_owned();
    let mut confirmed = 0;
    while started.elapsed() < Duration::from_secs(600) {
        let status = station(&env, &["ota", "status", "--campaign", &id, "--json"]).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&status).unwrap_or_default();
        confirmed = v[0]["counts"]["confirmed"].as_u64().unwrap_or(0);
        let failed = v[0]["counts"]["failed"].as_u64().unwrap_or(0);
        if confirmed + failed >= n as u64 || v[0]["state"] == "aborted" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = server.cpu_secs() - cpu0;
    drop(server);
    let _ = sim.join();
    let mib = (confirmed as usize * IMAGE) as f64 / (1024.0 * 1024.0);
    report.add(
        "ota",
        format!(
            "| {n} devices, 256 KiB, waves 1%,10%,100% | {confirmed}/{n} confirmed in {wall:.1} s | {mib:.0} MiB served | broker CPU {:.2} s per MiB ({cpu:.1} s in all) |",
            cpu / mib.max(1e-9),
        ),
    );
}
