//! shoal on a real node: a Debian bookworm VM (systemd as init, a real kernel that loads
//! modules) booted with qemu, the freshly built nodelet inside it as a systemd service, the
//! apiserver and the artifacts on the host. `scripts/vm-test` (`just vm-test`) builds the image,
//! says SKIPPED without /dev/kvm, and runs this with `--ignored`.
//!
//! Every version printed here is read inside the VM, from systemd, /sys/module and dpkg, not
//! from what the nodelet reports.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::support::*;

/// The host's loopback as the guest sees it (qemu user-mode networking).
const HOST_FROM_GUEST: &str = "10.0.2.2";
/// Slow guests (software emulation) take their time: bounds for one step, not the whole run.
const STEP: Duration = Duration::from_secs(240);
const NODE: &str = "vm-node";

/// The cached image `vm/image.sh` built.
struct Image {
    dir: PathBuf,
    kernel_release: String,
}

impl Image {
    fn from_env() -> Image {
        let dir = PathBuf::from(std::env::var_os("SHOAL_VM_IMAGE").expect(
            "SHOAL_VM_IMAGE is not set: run scripts/vm-test (just vm-test), which builds the image",
        ));
        let kernel_release = std::fs::read_to_string(dir.join("kernel-release"))
            .unwrap_or_else(|e| panic!("{}: not a VM image ({e})", dir.display()))
            .trim()
            .to_string();
        Image {
            dir,
            kernel_release,
        }
    }
}

/// How qemu runs the guest.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Accel {
    Kvm,
    /// Software emulation: slower, but independent of the host's virtualization support.
    Tcg,
}

/// A running VM; killed when dropped, its console log kept if the test failed.
struct Vm {
    child: Child,
    ssh_port: u16,
    key: PathBuf,
    console: PathBuf,
    accel: Accel,
}

impl Vm {
    /// Boots the image. With `SHOAL_VM_ACCEL` unset, KVM is tried first; a kernel that has not
    /// reached its init within 30 s under KVM (a healthy KVM takes 2-3 s) means this host's
    /// KVM is unusable (seen with nested virtualization: guest code ~1000x slower than native),
    /// and the VM is booted again under software emulation, loudly.
    fn boot(image: &Image, work: &Path) -> Vm {
        std::fs::create_dir_all(work).unwrap();
        let choice = std::env::var("SHOAL_VM_ACCEL").unwrap_or_else(|_| "auto".into());
        let started = Instant::now();
        let vm = match choice.as_str() {
            "kvm" => Vm::start(image, work, Accel::Kvm),
            "tcg" => Vm::start(image, work, Accel::Tcg),
            _ => {
                let mut vm = Vm::start(image, work, Accel::Kvm);
                let probe = Instant::now() + Duration::from_secs(30);
                while Instant::now() < probe && !vm.console_text().contains("Run /init") {
                    if let Ok(Some(status)) = vm.child.try_wait() {
                        panic!(
                            "qemu exited ({status}) under KVM: see {}",
                            vm.console.display()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                if vm.console_text().contains("Run /init") {
                    vm
                } else {
                    println!(
                        "WARNING: under KVM the guest kernel did not reach its init in 30 s (it takes 2-3 s on a \
                         healthy KVM): this host's /dev/kvm is unusable, booting under software emulation (TCG) instead"
                    );
                    vm.kill();
                    Vm::start(image, work, Accel::Tcg)
                }
            }
        };
        vm.wait_for_ssh(STEP);
        println!(
            "vm: booted kernel {} with systemd under {:?} in {:.0?}",
            image.kernel_release,
            vm.accel,
            started.elapsed()
        );
        vm
    }

    fn start(image: &Image, work: &Path, accel: Accel) -> Vm {
        let console = work.join(format!("console-{accel:?}.log").to_lowercase());
        let ssh_port = free_port();
        let mut command = Command::new("qemu-system-x86_64");
        match accel {
            Accel::Kvm => command.args(["-accel", "kvm"]),
            Accel::Tcg => command.args(["-accel", "tcg,thread=multi", "-cpu", "max"]),
        };
        command
            .args(["-smp", "2", "-m", "1024", "-no-reboot", "-display", "none"])
            .args(["-monitor", "none"])
            // scripts/vm-test kills exactly this qemu, whatever happens to the test process.
            .arg("-pidfile")
            .arg(
                std::env::var_os("SHOAL_VM_PIDFILE")
                    .unwrap_or_else(|| work.join("qemu.pid").into()),
            )
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(image.dir.join("vmlinuz"))
            .arg("-initrd")
            .arg(image.dir.join("initrd.img"))
            // panic=-1 with -no-reboot: a kernel panic ends qemu instead of hanging the test.
            .args(["-append", "root=/dev/vda rw console=ttyS0 panic=-1"])
            // snapshot=on: the guest's writes go to a temporary file; the cached image never changes.
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=virtio,snapshot=on",
                image.dir.join("root.img").display()
            ))
            // User-mode networking: the guest reaches the host's loopback at 10.0.2.2; ssh is
            // forwarded from a loopback port.
            .args(["-netdev"])
            .arg(format!("user,id=n0,hostfwd=tcp:127.0.0.1:{ssh_port}-:22"))
            .args(["-device", "virtio-net-pci,netdev=n0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(work.join("qemu.stderr")).unwrap());
        let child = command
            .spawn()
            .expect("qemu-system-x86_64 could not be started: apt-get install qemu-system-x86");
        Vm {
            child,
            ssh_port,
            key: image.dir.join("id_ed25519"),
            console,
            accel,
        }
    }

    fn console_text(&self) -> String {
        std::fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // SIGKILL leaves qemu's pidfile behind: scripts/vm-test must not kill a reused pid.
        if let Some(pidfile) = std::env::var_os("SHOAL_VM_PIDFILE") {
            let _ = std::fs::write(pidfile, b"");
        }
    }

    fn ssh_command(&self) -> Command {
        let mut command = Command::new("ssh");
        command
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .args([
                "-o",
                "LogLevel=ERROR",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=5",
            ])
            // A guest that stops answering ends the command within 30 s instead of hanging it.
            .args(["-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=6"])
            .arg("-i")
            .arg(&self.key)
            .args(["-p", &self.ssh_port.to_string(), "root@127.0.0.1"]);
        command
    }

    /// Runs a shell script in the guest; its stdout, or its stderr as the error.
    fn try_run(&self, script: &str) -> Result<String, String> {
        let output = self
            .ssh_command()
            .arg(script)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("ssh could not be started: {e}"))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
        } else {
            Err(format!(
                "`{script}` failed in the VM ({}): {}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr),
                String::from_utf8_lossy(&output.stdout)
            ))
        }
    }

    fn run(&self, script: &str) -> String {
        self.try_run(script).unwrap_or_else(|e| panic!("{e}"))
    }

    fn wait_for_ssh(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if self
                .try_run("systemctl is-system-running --wait >/dev/null; true")
                .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the VM did not answer on ssh within {limit:?}; console: {}",
                self.console.display()
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Copies a host file into the guest.
    fn copy_in(&self, local: &Path, remote: &str) {
        let status = Command::new("scp")
            .args([
                "-q",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .args(["-o", "LogLevel=ERROR", "-o", "BatchMode=yes"])
            .arg("-i")
            .arg(&self.key)
            .args(["-P", &self.ssh_port.to_string()])
            .arg(local)
            .arg(format!("root@127.0.0.1:{remote}"))
            .status()
            .unwrap();
        assert!(status.success(), "scp {} to the VM failed", local.display());
    }

    /// A clean poweroff through systemd, bounded; qemu is killed if it does not end.
    fn shutdown(mut self) {
        let _ = self.try_run("systemctl poweroff --no-block");
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                println!("vm: powered off");
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        println!("vm: did not power off within 60 s; killed");
        self.kill();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Keep the console where it outlives the temp dir, and show its end.
            let keep = bin_dir().join("vm-test-logs");
            let _ = std::fs::create_dir_all(&keep);
            let kept = keep.join(format!(
                "console-{}.log",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs()
            ));
            let _ = std::fs::copy(&self.console, &kept);
            let text = self.console_text();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!(
                "vm console (kept in {}), last lines:\n{}",
                kept.display(),
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
            if let Ok(journal) = self.try_run("journalctl -u shoal-nodelet --no-pager -n 60 -o cat")
            {
                eprintln!("nodelet's journal in the VM, last lines:\n{journal}");
            }
        }
        self.kill();
    }
}

/// A copy of a binary without debug info: what a node would get, and far less to copy.
fn stripped(name: &str, dir: &Path) -> PathBuf {
    let out = dir.join(name);
    let status = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(bin(name))
        .arg(&out)
        .status()
        .expect("objcopy (binutils) is needed");
    assert!(status.success());
    out
}

fn guest_url(host_url: &str) -> String {
    host_url.replace("127.0.0.1", HOST_FROM_GUEST)
}

/// The event about this node, DesiredState and revision with this reason.
fn event(server: &Apiserver, ds: &str, reason: &str, revision: u64) -> Option<serde_json::Value> {
    server
        .node_events(NODE)
        .into_iter()
        .find(|e| e["reason"] == reason && e["revision"] == revision && e["desiredState"] == ds)
}

/// Waits for the node's report of a revision to end Healthy (baked) or Reverted, then for the
/// rollout to agree: Complete after a bake, RolledBack to the previous revision after a revert.
fn wait_outcome(server: &Apiserver, ds: &str, revision: u64) -> (String, serde_json::Value) {
    let (outcome, event) = wait_for(
        STEP,
        &format!("{ds} revision {revision} to bake or revert"),
        || {
            ["Baked", "Reverted", "Failed"]
                .into_iter()
                .find_map(|reason| {
                    event(server, ds, reason, revision).map(|e| (reason.to_string(), e))
                })
        },
    );
    assert_ne!(outcome, "Failed", "{ds} revision {revision}: {event}");
    let phase = if outcome == "Baked" {
        "Complete"
    } else {
        "RolledBack"
    };
    let rollout = wait_for(STEP, &format!("the {ds} rollout to be {phase}"), || {
        server
            .rollout(ds)
            .filter(|r| r["spec"]["revision"] == revision && r["status"]["phase"] == phase)
    });
    if outcome == "Reverted" {
        let message = event["message"].as_str().unwrap_or("");
        assert!(
            message.contains(&format!("reverted to revision {}", revision - 1)),
            "the node went back to the revision before: {message}"
        );
        assert_eq!(
            server.get(&format!("/api/v1/desiredstates/{ds}")).unwrap()["status"]
                ["lastGoodRevision"],
            revision - 1,
            "{rollout}"
        );
    }
    (outcome, event)
}

#[test]
#[ignore = "boots a VM: run scripts/vm-test (just vm-test)"]
fn in_a_vm_systemd_services_kernel_modules_and_apt_packages_upgrade_and_revert() {
    let image = Image::from_env();
    let tmp = tempfile::tempdir().unwrap();
    let server = Apiserver::start(&tmp.path().join("api"));
    let artifacts = ArtifactServer::start(&tmp.path().join("artifacts"));
    let bins = tmp.path().join("bins");
    std::fs::create_dir_all(&bins).unwrap();

    let vm = Vm::boot(&image, &tmp.path().join("vm"));
    install_nodelet(&vm, &server, &stripped("nodelet", &bins));
    service_scenario(&vm, &server, &artifacts, &stripped("demo-service", &bins));
    driver_scenario(&vm, &server, &artifacts, &image);
    package_scenario(&vm, &server, &tmp.path().join("debs"));
    vm.shutdown();
}

/// The nodelet as a systemd service of the guest, joined to the host's apiserver, the way
/// docs/install.md says: its `.deb` (scripts/deb, from this build) installed with dpkg, then
/// `nodelet install` with the join token in a file.
fn install_nodelet(vm: &Vm, server: &Apiserver, nodelet: &Path) {
    let debs = nodelet.parent().unwrap().join("own-debs");
    let built = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/deb"))
        .args(["x86_64-unknown-linux-gnu", "nodelet"])
        .env("SHOAL_DEB_BIN_DIR", nodelet.parent().unwrap())
        .env("SHOAL_DEB_OUT", &debs)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "scripts/deb: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let deb = PathBuf::from(String::from_utf8_lossy(&built.stdout).trim());
    vm.copy_in(&deb, "/root/shoal-nodelet.deb");
    vm.run(&format!(
        "dpkg -i /root/shoal-nodelet.deb >/dev/null && (umask 077; echo {JOIN} > /root/join-token) && \
         nodelet install --server http://{HOST_FROM_GUEST}:{port} --join-token-file /root/join-token \
           --name {NODE} --labels role=vm --heartbeat-seconds 1 && rm /root/join-token",
        port = server.port
    ));
    wait_for(STEP, "the VM's nodelet to register", || {
        server.get(&format!("/api/v1/nodes/{NODE}"))
    });
    let token_mode = vm.run("stat -c %a /etc/shoal/nodelet-join-token");
    assert_eq!(token_mode.trim(), "600", "the token file is root's alone");
    let command_line =
        vm.run("tr '\\0' ' ' < /proc/$(systemctl show shoal-nodelet -p MainPID --value)/cmdline");
    assert!(
        !command_line.contains(JOIN),
        "no token on the command line: {command_line}"
    );
    println!(
        "vm: nodelet from its .deb, running as {}: {} ({command_line})",
        nodelet::install::UNIT,
        vm.run("systemctl show shoal-nodelet -p ActiveState -p MainPID --value | paste -sd' '")
    );
}

/// What systemd says about the demo service, and what the service itself says.
fn service_state(vm: &Vm, port: u16) -> (String, String, String) {
    // One property per call: with several, systemd prints them in its own order.
    let show = vm.run(
        "for p in ExecStart MainPID ActiveState; do systemctl show shoal-demo.service -p $p --value; done",
    );
    let mut lines = show.lines();
    let exec = lines.next().unwrap_or("").to_string();
    let pid = lines.next().unwrap_or("").to_string();
    let active = lines.next().unwrap_or("").to_string();
    // ExecStart's path names the unpacked version: /var/lib/shoal/services/demo/<version>/bin/…
    let from_unit = exec
        .split("/services/demo/")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("?")
        .to_string();
    let served = vm
        .try_run(&format!("curl -sS -m 5 http://127.0.0.1:{port}/version"))
        .unwrap_or_else(|e| format!("(no answer: {e})"));
    println!(
        "    systemd: shoal-demo.service {active}, MainPID {pid}, ExecStart from {from_unit}; GET /version: {served}"
    );
    (active, from_unit, pid)
}

fn service_scenario(vm: &Vm, server: &Apiserver, artifacts: &ArtifactServer, demo: &Path) {
    println!(
        "\n== service through systemd: upgrade 1.0.0 -> 1.1.0 (as its own user), then 1.2.0 regresses and reverts"
    );
    let port = 18080;
    let manifest = |version: &str, fail_after: Option<u64>, bake: u64| {
        let (file, sha) = demo_tarball_of(demo, &artifacts.dir, version, fail_after);
        demo_manifest(
            "vm-svc",
            "vm",
            version,
            &guest_url(&artifacts.url_of(&file)),
            &sha,
            port,
            bake,
            2,
        )
        // Under TCG the first install (download, unpack, unit, daemon-reload) has taken
        // 28 s of the shared manifest's 30 s deadline; the driver and package scenarios
        // below give 120 s for the same reason.
        .replace("healthyDeadlineSeconds: 30", "healthyDeadlineSeconds: 120")
    };
    // 1.1.0 runs as an unprivileged user (systemd's User=/Group=); the revert back to it
    // must bring the user back too.
    // A user of its own, made as an image build would (systemd warns about `nobody`).
    vm.run("id shoal-demo || useradd --system --no-create-home --user-group shoal-demo");
    let as_its_user = |manifest: String| {
        manifest.replace(
            "startSeconds: 2}",
            "startSeconds: 2, user: shoal-demo, group: shoal-demo}",
        )
    };
    let runs_as = || {
        vm.run(
            "pid=$(systemctl show shoal-demo.service -p MainPID --value); \
             echo $(stat -c %U /proc/$pid) $(systemctl show shoal-demo.service -p User --value) \
             $(stat -c %U:%G /var/lib/shoal/services/demo/1.1.0/bin/demo-service)",
        )
        .trim()
        .to_string()
    };
    server.apply(&manifest("1.0.0", None, 3));
    let (outcome, _) = wait_outcome(server, "vm-svc", 1);
    assert_eq!(outcome, "Baked");
    println!("  before:");
    let (active, version, pid_before) = service_state(vm, port);
    assert_eq!((active.as_str(), version.as_str()), ("active", "1.0.0"));

    assert_eq!(
        vm.run("stat -c %U /proc/$(systemctl show shoal-demo.service -p MainPID --value)")
            .trim(),
        "root"
    );

    let upgrade = as_its_user(manifest("1.1.0", None, 3));
    assert!(upgrade.contains("user: shoal-demo"), "{upgrade}");
    server.apply(&upgrade);
    let (outcome, _) = wait_outcome(server, "vm-svc", 2);
    assert_eq!(outcome, "Baked");
    println!("  after the upgrade:");
    let (active, version, pid_after) = service_state(vm, port);
    assert_eq!((active.as_str(), version.as_str()), ("active", "1.1.0"));
    assert_ne!(pid_before, pid_after, "systemd restarted the service");
    let unit = vm.run("cat /etc/systemd/system/shoal-demo.service");
    assert!(
        unit.contains("/services/demo/1.1.0/bin/demo-service"),
        "{unit}"
    );
    assert_eq!(
        runs_as(),
        "shoal-demo shoal-demo shoal-demo:shoal-demo",
        "process, unit, files"
    );

    // 1.2.0 starts, then its /healthz fails after 4 s: inside the 30 s bake.
    // 1.2.0 names no user: it runs as root until it regresses.
    server.apply(&manifest("1.2.0", Some(4), 30));
    let (outcome, event) = wait_outcome(server, "vm-svc", 3);
    assert_eq!(outcome, "Reverted", "{event}");
    println!("  reverted: {}", event["message"].as_str().unwrap_or(""));
    println!("  after the revert:");
    let (active, version, _) = service_state(vm, port);
    assert_eq!((active.as_str(), version.as_str()), ("active", "1.1.0"));
    assert_eq!(
        runs_as(),
        "shoal-demo shoal-demo shoal-demo:shoal-demo",
        "the revert runs 1.1.0 as it ran"
    );
}

/// Builds shoal_demo.ko against the VM kernel's own headers, in a chroot of the image's tree.
fn build_module(image: &Image, version: &str, healthy: bool, out: &Path) -> (String, String) {
    let rootfs = image.dir.join("rootfs");
    let build = format!("/tmp/shoal_demo-{version}-{}", std::process::id());
    let dir = rootfs.join(build.trim_start_matches('/'));
    std::fs::create_dir_all(&dir).unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../vm/shoal_demo");
    for file in ["shoal_demo.c", "Kbuild"] {
        std::fs::copy(source.join(file), dir.join(file)).unwrap();
    }
    let output = Command::new("chroot")
        .arg(&rootfs)
        .args(["make", "-s", "-C"])
        .arg(format!("/lib/modules/{}/build", image.kernel_release))
        .arg(format!("M={build}"))
        .arg(format!(
            "ccflags-y=-DSHOAL_VERSION=\\\"{version}\\\" -DSHOAL_HEALTHY={}",
            u8::from(healthy)
        ))
        .arg("modules")
        .output()
        .unwrap();
    let file = format!("shoal_demo-{version}.ko");
    let built = output.status.success()
        && std::fs::copy(dir.join("shoal_demo.ko"), out.join(&file)).is_ok();
    // The cached rootfs keeps nothing of the build, failed or not.
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        built,
        "building shoal_demo {version}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let sha = sha256(&out.join(&file));
    (file, sha)
}

fn driver_manifest(version: &str, url: &str, sha: &str, bake: u64) -> String {
    format!(
        r#"apiVersion: shoal/v1
kind: DesiredState
metadata: {{name: vm-drv}}
spec:
  selector: {{matchLabels: {{role: vm}}}}
  components:
    - name: shoal-demo
      kind: driver
      version: {version}
      artifact: {{url: "{url}", sha256: "{sha}"}}
      driver: {{module: shoal_demo}}
  probes:
    - {{name: module-healthy, exec: {{command: [grep, -qx, Y, /sys/module/shoal_demo/parameters/healthy]}}, periodSeconds: 1, failureThreshold: 2}}
  rollout:
    waves: ["100%"]
    bakeSeconds: {bake}
    healthyDeadlineSeconds: 120
"#
    )
}

/// What the kernel says about the module.
fn module_state(vm: &Vm) -> String {
    let state = vm.run(
        "if [ -d /sys/module/shoal_demo ]; then echo \"$(cat /sys/module/shoal_demo/version) healthy=$(cat /sys/module/shoal_demo/parameters/healthy)\"; else echo absent; fi",
    );
    let modinfo = vm.run("modinfo -F version shoal_demo 2>/dev/null || echo none");
    println!(
        "    /sys/module/shoal_demo/version: {state}; modinfo (the .ko depmod indexes): {modinfo}"
    );
    state
}

fn driver_scenario(vm: &Vm, server: &Apiserver, artifacts: &ArtifactServer, image: &Image) {
    println!("\n== kernel module: install 1.0, upgrade to 1.1, then 1.2 regresses and reverts");
    println!("  before:");
    assert_eq!(module_state(vm), "absent");
    let mut revision = 0;
    for (version, semver, healthy) in [("1.0", "1.0.0", true), ("1.1", "1.1.0", true)] {
        let (file, sha) = build_module(image, version, healthy, &artifacts.dir);
        server.apply(&driver_manifest(
            semver,
            &guest_url(&artifacts.url_of(&file)),
            &sha,
            3,
        ));
        revision += 1;
        let (outcome, event) = wait_outcome(server, "vm-drv", revision);
        assert_eq!(outcome, "Baked", "{event}");
        println!("  after {version}:");
        assert_eq!(module_state(vm), format!("{version} healthy=Y"));
    }
    let (file, sha) = build_module(image, "1.2", false, &artifacts.dir);
    server.apply(&driver_manifest(
        "1.2.0",
        &guest_url(&artifacts.url_of(&file)),
        &sha,
        30,
    ));
    let (outcome, event) = wait_outcome(server, "vm-drv", 3);
    assert_eq!(outcome, "Reverted", "{event}");
    println!("  reverted: {}", event["message"].as_str().unwrap_or(""));
    println!("  after the revert:");
    assert_eq!(module_state(vm), "1.1 healthy=Y");
    let kernel_log = vm.run("dmesg | grep shoal_demo | tail -n 4");
    println!(
        "    kernel log:\n      {}",
        kernel_log.replace('\n', "\n      ")
    );
}

fn package_manifest(version: &str) -> String {
    format!(
        r#"apiVersion: shoal/v1
kind: DesiredState
metadata: {{name: vm-pkg}}
spec:
  selector: {{matchLabels: {{role: vm}}}}
  components:
    - name: shoal-hello
      kind: package
      version: "{version}"
  probes:
    - {{name: hello-healthy, exec: {{command: [test, -e, /usr/share/shoal-hello/healthy]}}, periodSeconds: 1, failureThreshold: 2}}
  rollout:
    waves: ["100%"]
    bakeSeconds: 3
    healthyDeadlineSeconds: 120
"#
    )
}

/// What dpkg says: status (`hi` = installed and held) and version.
fn package_state(vm: &Vm) -> String {
    let state = vm.run(
        "dpkg-query -W -f='${db:Status-Abbrev}${Version}' shoal-hello 2>/dev/null || echo absent",
    );
    let state = state.split_whitespace().collect::<Vec<_>>().join(" ");
    println!("    dpkg: shoal-hello {state}");
    state
}

fn package_scenario(vm: &Vm, server: &Apiserver, debs: &Path) {
    println!("\n== apt package from a local file repository: pin 1.0-1, upgrade to 1.1-1, downgrade to 1.0-1; 1.2-1 regresses and reverts");
    std::fs::create_dir_all(debs).unwrap();
    vm.run("mkdir -p /srv/shoal-repo && echo 'deb [trusted=yes] file:/srv/shoal-repo ./' > /etc/apt/sources.list.d/shoal.list");
    let publish = |version: &str, healthy: bool| {
        let (file, _) = deb(debs, "shoal-hello", version, healthy);
        vm.copy_in(&debs.join(&file), &format!("/srv/shoal-repo/{file}"));
        vm.run("cd /srv/shoal-repo && apt-ftparchive packages . > Packages");
    };
    publish("1.0-1", true);
    println!("  before:");
    assert_eq!(package_state(vm), "absent");

    server.apply(&package_manifest("1.0-1"));
    let (outcome, event) = wait_outcome(server, "vm-pkg", 1);
    assert_eq!(outcome, "Baked", "{event}");
    println!("  after installing 1.0-1:");
    assert_eq!(package_state(vm), "hi 1.0-1", "installed and held");

    // The pin holds against the operator's own apt: 1.1-1 is published, `apt-get upgrade` keeps 1.0-1.
    publish("1.1-1", true);
    vm.run("apt-get update -qq");
    let policy = vm.run("apt-cache policy shoal-hello");
    assert!(
        policy.contains("Candidate: 1.1-1"),
        "apt sees 1.1-1, so only the hold can keep 1.0-1: {policy}"
    );
    let upgrade = vm.run("DEBIAN_FRONTEND=noninteractive apt-get upgrade -y 2>&1");
    let summary = upgrade
        .lines()
        .find(|l| l.contains("upgraded,"))
        .unwrap_or("");
    println!("  apt-get upgrade with 1.1-1 the candidate: {summary}");
    assert!(
        summary.starts_with("0 upgraded") && summary.contains("1 not upgraded"),
        "apt-get upgrade kept shoal-hello back: {upgrade}"
    );
    assert_eq!(
        package_state(vm),
        "hi 1.0-1",
        "the pin holds against apt-get upgrade"
    );

    server.apply(&package_manifest("1.1-1"));
    let (outcome, event) = wait_outcome(server, "vm-pkg", 2);
    assert_eq!(outcome, "Baked", "{event}");
    println!("  after the upgrade:");
    assert_eq!(package_state(vm), "hi 1.1-1");

    server.apply(&package_manifest("1.0-1"));
    let (outcome, event) = wait_outcome(server, "vm-pkg", 3);
    assert_eq!(outcome, "Baked", "{event}");
    println!("  after the downgrade:");
    assert_eq!(package_state(vm), "hi 1.0-1");

    // 1.2-1 installs, but lacks the file the probe checks: a regression, reverted to 1.0-1 from apt.
    publish("1.2-1", false);
    server.apply(&package_manifest("1.2-1"));
    let (outcome, event) = wait_outcome(server, "vm-pkg", 4);
    assert_eq!(outcome, "Reverted", "{event}");
    println!("  reverted: {}", event["message"].as_str().unwrap_or(""));
    println!("  after the revert:");
    assert_eq!(package_state(vm), "hi 1.0-1");
}
