//! The QEMU board (mps2-an386) running a firmware image against a broker, for the firmware
//! tests (qemu_firmware.rs, qemu_boot.rs): the UART is a TCP client of `port`, the
//! credentials bundle is loaded into the credentials region, and the semihosting console is read
//! line by line.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What the caller wants after a console line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Go,
    /// Kill QEMU now (a power cut).
    Kill,
}

/// One run of QEMU.
pub struct Qemu<'a> {
    /// The `-kernel` image.
    pub elf: &'a Path,
    /// Virtual time counts instructions (1 ns each) instead of following real time.
    pub icount: bool,
    /// QEMU is killed after this long.
    pub limit: Duration,
    /// The broker's (or a stand-in's) port on 127.0.0.1.
    pub port: u16,
    /// credentials.bin, loaded at 0x003f0000.
    pub bundle: &'a Path,
    /// QEMU's working directory (semihosting opens relative paths there).
    pub cwd: Option<&'a Path>,
}

impl Qemu<'_> {
    /// Runs QEMU until the firmware exits (through semihosting), `on_line` asks for a kill, or
    /// the limit passes; returns (exit ok, console lines). A kill or a timeout counts as not ok;
    /// a timeout adds the line `(timed out)`.
    pub fn run(&self, mut on_line: impl FnMut(&str) -> Flow) -> (bool, Vec<String>) {
        let qemu = fleet_tests::require_program("qemu-system-arm", "qemu-system-arm");
        // The emulated UART moves one byte per turn of QEMU's main loop: on a loaded host (a full
        // test run, a CPU hog on every core) a starved emulator turns into a link that stalls for
        // seconds, which no device on a real MCU sees, and the firmware's 3 s keep-alive (real time
        // here) fails for the host's sake. The emulator runs ahead of the load, as the device's own
        // CPU would (as root; elsewhere `nice` says it cannot and runs QEMU as it is).
        let mut cmd = Command::new("nice");
        cmd.args(["-n", "-10"]).arg(qemu);
        cmd.args(["-machine", "mps2-an386", "-nographic", "-monitor", "none"])
            .args(["-semihosting-config", "enable=on,target=native"]);
        if self.icount {
            cmd.args(["-icount", "shift=0,align=off,sleep=off"]);
        }
        if let Some(dir) = self.cwd {
            cmd.current_dir(dir);
        }
        let mut child = cmd
            // The UART is a TCP client of the broker; after the firmware ends a session (to
            // reconnect with a new identity) QEMU connects again 1 s later.
            .arg("-chardev")
            .arg(format!("socket,id=net,host=127.0.0.1,port={},reconnect=1", self.port))
            .args(["-serial", "chardev:net"])
            .arg("-device")
            .arg(format!("loader,file={},addr=0x003f0000,force-raw=on", self.bundle.display()))
            .arg("-kernel")
            .arg(self.elf)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + self.limit;
        let mut lines = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(l) => {
                    if l.contains("TLS established") || l.contains("peak stack") || l.contains("bootloader:")
                    {
                        eprintln!("{l}");
                    }
                    let flow = on_line(&l);
                    lines.push(l);
                    if flow == Flow::Kill {
                        let _ = child.kill();
                        let _ = child.wait();
                        lines.push("(killed)".into());
                        return (false, lines);
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                lines.push("(timed out)".into());
                return (false, lines);
            }
        }
        let status = child.wait().unwrap();
        (status.success(), lines)
    }
}

/// `fleet-sim command`: the fleet's `service` identity sends command `name` with `payload` to
/// `device` through the broker on `port`.
pub fn send_command(bins: &Path, service: &Path, port: u16, device: &str, name: &str, payload: &str) {
    let out = Command::new(bins.join("fleet-sim"))
        .args(["command", "--identity"])
        .arg(service)
        .args(["--port", &port.to_string(), "--device", device, "--name", name, "--payload", payload])
        .output()
        .unwrap();
    assert!(out.status.success(), "fleet-sim command: {}", String::from_utf8_lossy(&out.stderr));
}
