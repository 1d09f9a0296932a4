//! Firmware updates of simulated devices (`fleet-sim run --ota-key`, the SDK's
//! `fleet_device::ota` over flash in memory): offered a signed release, each device downloads it
//! in chunks, verifies it (SHA-512, embassy-boot's signature check), "resets" into it (a
//! simulated A/B swap), reconnects and confirms; an offer for another board is refused.
//!
//! This test holds the device side to docs/spec/ota.md on its own: Mosquitto with the fleet's
//! PKI carries the sessions and `fleet-sim ota-standin` answers `ota/get` as the spec says.
//! Offers go out as `fleet-sim command --name ota/offer`. The same devices updated by
//! fleet-broker's chunk server and campaign runner are in ota_delivery.rs.
#![allow(clippy::unwrap_used)] // test code

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_tests::fixture::{Fleet, Mosquitto};
use fleet_tests::ota_flash::{self, Image};

fn bins() -> PathBuf {
    fleet_tests::workspace_bin_dir(&["fleet-sim"])
}

fn offer(fleet: &Fleet, port: u16, device: &str, manifest: &Path) {
    let out = Command::new(bins().join("fleet-sim"))
        .args(["command", "--identity"])
        .arg(&fleet.service)
        .args(["--port", &port.to_string(), "--device", device, "--name", "ota/offer", "--payload-file"])
        .arg(manifest)
        .output()
        .unwrap();
    assert!(out.status.success(), "fleet-sim command: {}", String::from_utf8_lossy(&out.stderr));
}

/// Lines of a child's stdout, collected by a thread.
fn collect(stdout: std::process::ChildStdout) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let l = lines.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            l.lock().unwrap().push(line);
        }
    });
    lines
}

#[test]
fn simulated_devices_take_an_offer_download_verify_swap_and_confirm() {
    fleet_tests::require_program("mosquitto", "mosquitto");
    let fleet = Fleet::with_lifetime_blocking(3, None, None);
    let mosquitto = Mosquitto::start(&fleet);
    let port = mosquitto.addr.port();
    let key = ota_flash::generate_key();
    let dir = fleet.dir.path();
    std::fs::write(dir.join("firmware.pub"), key.verifying_key().as_bytes()).unwrap();
    // 40 KiB and a few bytes: ten sectors and a short last chunk.
    let image = Image::from_bytes((0..40 * 1024 + 13).map(|i| (i * 7 % 253) as u8).collect());
    let release = dir.join("release");
    std::fs::create_dir_all(&release).unwrap();
    std::fs::write(release.join("image.bin"), image.bytes()).unwrap();
    std::fs::write(release.join("manifest.bin"), ota_flash::manifest(&image, "1.1.0", "fleet-sim", &key))
        .unwrap();
    let other_board = dir.join("other-board.bin");
    std::fs::write(&other_board, ota_flash::manifest(&image, "1.1.0", "nucleo-f429zi", &key)).unwrap();

    let mut standin = Command::new(bins().join("fleet-sim"))
        .args(["ota-standin", "--identity"])
        .arg(&fleet.service)
        .args(["--port", &port.to_string(), "--release"])
        .arg(&release)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let statuses = collect(standin.stdout.take().unwrap());
    let mut sim = Command::new(bins().join("fleet-sim"))
        .args(["run", "--port", &port.to_string(), "--duration", "60", "--rate", "1", "--exit-when-updated"])
        .arg("--ota-key")
        .arg(dir.join("firmware.pub"))
        .arg("--devices")
        .arg(dir.join("devices"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let sim_out = collect(sim.stdout.take().unwrap());

    // The sessions are clean (nothing queued for an absent device): offer until each answered.
    let ids: Vec<String> = (0..3).map(|i| fleet.id(i)).collect();
    let said = |id: &str, what: &str| {
        statuses
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with(&format!("ota-status {id} ")) && l.contains(what))
    };
    let t = Instant::now();
    // The first device is offered the other board's release until it refused it, and only then
    // its own: once a job is being applied (verified, swapped, on trial) an offer is ignored, and
    // a fast download would otherwise leave no moment to refuse one.
    let done = || said(&ids[0], "wrong_board") && ids.iter().all(|id| said(id, "\"state\":\"confirmed\""));
    while !done() && t.elapsed() < Duration::from_secs(55) {
        let refused = said(&ids[0], "wrong_board");
        if !refused {
            offer(&fleet, port, &ids[0], &other_board);
        }
        for id in &ids {
            if !said(id, "\"state\":\"downloading\"") && (refused || *id != ids[0]) {
                offer(&fleet, port, id, &release.join("manifest.bin"));
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let status = sim.wait().unwrap();
    let _ = standin.kill();
    let _ = standin.wait();
    let out = sim_out.lock().unwrap().join("\n");
    let st = statuses.lock().unwrap().join("\n");
    assert!(status.success(), "fleet-sim failed:\n{out}");
    assert!(out.contains("fleet-sim: 3 firmware updates confirmed; 3 on 1.1.0"), "{out}\n{st}");
    let first = |id: &str, what: &str| {
        st.lines().position(|l| l.starts_with(&format!("ota-status {id} ")) && l.contains(what))
    };
    for id in &ids {
        // downloading from 0, verified, then (after the simulated swap) rebooted and confirmed.
        let steps = [
            "\"state\":\"downloading\",\"offset\":0,",
            "\"state\":\"verified\"",
            "\"state\":\"rebooted\"",
            "\"state\":\"confirmed\",\"offset\":40973,\"size\":40973,\"running\":\"1.1.0\"}",
        ];
        let at: Vec<Option<usize>> = steps.iter().map(|s| first(id, s)).collect();
        assert!(at.iter().all(Option::is_some) && at.windows(2).all(|w| w[0] < w[1]), "{id}: {at:?}\n{st}");
    }
    assert!(
        st.lines().any(|l| l.starts_with(&format!("ota-status {} ", ids[0]))
            && l.contains("\"state\":\"failed\"")
            && l.contains("\"reason\":\"wrong_board\"")),
        "{st}\n{out}"
    );
    drop(mosquitto);
}
