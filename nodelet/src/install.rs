//! `nodelet install` and `nodelet uninstall`: the nodelet as a systemd service.
//!
//! What an install writes (docs/install.md):
//! - `/etc/shoal/nodelet.env` (0600): the settings, read by the nodelet from its environment;
//! - `/etc/shoal/nodelet-join-token` (0600): the join token, copied from the file given;
//! - `/etc/shoal/nodelet-ca.pem` (0644), with `--ca-file`: the CA bundle, copied;
//! - `/var/lib/shoal/nodelet` (0700): the state folder (the node token, the journal);
//! - `/etc/systemd/system/shoal-nodelet.service`: the unit, then `systemctl daemon-reload`
//!   and `systemctl enable --now`.
//!
//! The plan is a pure function of the options ([`plan_install`], [`plan_uninstall`]); the
//! command checks the inputs (the token file, the CA bundle, the URLs) before anything is
//! written, so a bad option changes nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use shoal_install::{env_line, render_unit, Step, Unit};

/// The nodelet's unit (a managed service is `shoal-<name>.service`: the manifest refuses a
/// service component named `nodelet`, so the two never collide).
pub const UNIT: &str = "shoal-nodelet.service";
/// The settings the unit's `EnvironmentFile=` names.
pub const ENV_FILE: &str = "/etc/shoal/nodelet.env";
/// The join token, root-only.
pub const TOKEN_FILE: &str = "/etc/shoal/nodelet-join-token";
/// The CA bundle, when one was given.
pub const CA_FILE: &str = "/etc/shoal/nodelet-ca.pem";
/// The state folder.
pub const STATE_DIR: &str = "/var/lib/shoal/nodelet";

/// What `nodelet install` was asked for, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallOptions {
    /// apiserver URLs (replicas), already split and checked.
    pub servers: Vec<String>,
    /// The join token itself (read from the file given).
    pub join_token: String,
    /// The CA bundle's PEM text, when `--ca-file` was given.
    pub ca_pem: Option<Vec<u8>>,
    /// `--labels`, checked.
    pub labels: BTreeMap<String, String>,
    /// `--name`, when given (otherwise the hostname, at each start).
    pub name: Option<String>,
    /// `--heartbeat-seconds`, when given.
    pub heartbeat_seconds: Option<u64>,
    /// The nodelet binary the unit starts (the one running `install`).
    pub exe: PathBuf,
}

/// The unit: what systemd needs to keep the nodelet running, and only the protections the
/// backends tolerate — the nodelet installs packages (dpkg writes /usr, /etc, /var, runs
/// maintainer scripts as root), loads kernel modules and starts units, so `ProtectSystem`,
/// `ProtectKernelModules`, `NoNewPrivileges` (setuid helpers in maintainer scripts) and
/// `PrivateTmp` (maintainer scripts that hand files to services) are deliberately absent.
pub fn unit(exe: &Path) -> Unit {
    let line = |l: &str, why: &str| (l.to_string(), why.to_string());
    Unit {
        description: "shoal nodelet: keeps this node at its DesiredStates, reverts on regression"
            .into(),
        // What the .deb ships (scripts/deb); docs/install.md in the repository.
        documentation: "file:/usr/share/doc/shoal-nodelet/install.md".into(),
        environment_file: ENV_FILE.into(),
        exec_start: exe.to_path_buf(),
        service: vec![
            line(
                "KillMode=mixed",
                "SIGTERM to the nodelet only, so it stops what it runs in order; managed services are units of their own and keep running",
            ),
            line(
                "TimeoutStopSec=60",
                "a dpkg step in flight is let finish (the journal makes an interrupted one safe, but slower to recover)",
            ),
            line(
                "OOMScoreAdjust=-500",
                "under memory pressure the agent that can revert is the last thing the kernel kills",
            ),
            line("LimitNOFILE=65536", "probes, downloads and supervised services' log files"),
            line("ProtectHostname=yes", "the nodelet never sets the hostname"),
            line("ProtectClock=yes", "nor the clock"),
            line("RestrictRealtime=yes", "nor real-time scheduling"),
            line("LockPersonality=yes", "nor the execution domain"),
            line("SystemCallArchitectures=native", "no other ABI's system calls"),
        ],
    }
}

/// The environment file: every setting the nodelet reads at start.
pub fn env_file(options: &InstallOptions) -> Result<String, String> {
    let mut out = String::from(
        "# Written by `nodelet install`: the nodelet's settings (see `nodelet --help`).\n",
    );
    out += &env_line("SHOAL_SERVER", &options.servers.join(","))?;
    out += &env_line("SHOAL_JOIN_TOKEN_FILE", TOKEN_FILE)?;
    if options.ca_pem.is_some() {
        out += &env_line("SHOAL_CA_FILE", CA_FILE)?;
    }
    if !options.labels.is_empty() {
        let labels: Vec<String> = options
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        out += &env_line("SHOAL_LABELS", &labels.join(","))?;
    }
    if let Some(name) = &options.name {
        out += &env_line("SHOAL_NODE_NAME", name)?;
    }
    if let Some(seconds) = options.heartbeat_seconds {
        out += &env_line("SHOAL_HEARTBEAT_SECONDS", &seconds.to_string())?;
    }
    out += &env_line("RUST_LOG", "info")?;
    Ok(out)
}

/// Everything an install does, in order. `start`: enable and start the unit.
pub fn plan_install(options: &InstallOptions, start: bool) -> Result<Vec<Step>, String> {
    let mut steps = vec![
        Step::Dir {
            path: "/etc/shoal".into(),
            mode: 0o755,
        },
        // Services that run as users of their own reach their folders through it (an
        // earlier install left it 0700).
        Step::Dir {
            path: "/var/lib/shoal".into(),
            mode: 0o755,
        },
        Step::Dir {
            path: STATE_DIR.into(),
            mode: 0o700,
        },
        Step::File {
            path: TOKEN_FILE.into(),
            contents: format!("{}\n", options.join_token).into_bytes(),
            mode: 0o600,
        },
    ];
    match &options.ca_pem {
        Some(pem) => steps.push(Step::File {
            path: CA_FILE.into(),
            contents: pem.clone(),
            mode: 0o644,
        }),
        // An install again without --ca-file trusts the platform's roots only.
        None => steps.push(Step::Remove {
            path: CA_FILE.into(),
        }),
    }
    steps.push(Step::File {
        path: ENV_FILE.into(),
        contents: env_file(options)?.into_bytes(),
        mode: 0o600,
    });
    steps.extend(shoal_install::unit_steps(
        UNIT,
        render_unit(&unit(&options.exe)),
        start,
    ));
    Ok(steps)
}

/// Everything an uninstall does. `purge`: the state folder goes too (the node token and the
/// journal: the node must join again, and forgets what it installed). What the nodelet
/// installed — services, packages, drivers — stays where it is either way.
pub fn plan_uninstall(purge: bool) -> Vec<Step> {
    let mut steps = shoal_install::unit_removal_steps(UNIT);
    for file in [ENV_FILE, TOKEN_FILE, CA_FILE] {
        steps.push(Step::Remove { path: file.into() });
    }
    if purge {
        steps.push(Step::RemoveTree {
            path: STATE_DIR.into(),
        });
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `.deb` ships `packaging/shoal-nodelet.service` (scripts/deb): exactly what an install
    /// from the package writes.
    #[test]
    fn the_packaged_unit_is_what_install_writes() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/shoal-nodelet.service");
        let rendered = render_unit(&unit(Path::new("/usr/bin/nodelet")));
        shoal_install::check_packaged_unit(&path, &rendered).unwrap();
    }

    fn options() -> InstallOptions {
        InstallOptions {
            servers: vec![
                "https://a.example:7070".into(),
                "https://b.example:7070".into(),
            ],
            join_token: "join-0123456789".into(),
            ca_pem: None,
            labels: BTreeMap::from([("site".to_string(), "north".to_string())]),
            name: None,
            heartbeat_seconds: None,
            exe: "/usr/bin/nodelet".into(),
        }
    }

    fn file<'a>(steps: &'a [Step], path: &str) -> Option<(&'a [u8], u32)> {
        steps.iter().find_map(|s| match s {
            Step::File {
                path: p,
                contents,
                mode,
            } if p == Path::new(path) => Some((contents.as_slice(), *mode)),
            _ => None,
        })
    }

    #[test]
    fn the_token_is_root_only_and_never_on_a_command_line() {
        let steps = plan_install(&options(), true).unwrap();
        let (token, mode) = file(&steps, TOKEN_FILE).unwrap();
        assert_eq!((token, mode), (&b"join-0123456789\n"[..], 0o600));
        let (env, mode) = file(&steps, ENV_FILE).unwrap();
        let env = String::from_utf8_lossy(env);
        assert_eq!(mode, 0o600);
        assert!(!env.contains("join-0123456789"), "{env}");
        assert!(env.contains("SHOAL_JOIN_TOKEN_FILE=\"/etc/shoal/nodelet-join-token\""));
        assert!(env.contains("SHOAL_SERVER=\"https://a.example:7070,https://b.example:7070\""));
        assert!(env.contains("SHOAL_LABELS=\"site=north\""));
        let (unit, _) = file(&steps, "/etc/systemd/system/shoal-nodelet.service").unwrap();
        let unit = String::from_utf8_lossy(unit);
        assert!(unit.contains("ExecStart=/usr/bin/nodelet\n"), "{unit}");
        assert!(!unit.contains("join-0123456789"));
        assert!(steps.contains(&Step::Dir {
            path: STATE_DIR.into(),
            mode: 0o700
        }));
        assert!(steps.contains(&Step::Dir {
            path: "/var/lib/shoal".into(),
            mode: 0o755
        }));
    }

    #[test]
    fn start_enables_and_restarts_after_a_reload() {
        let steps = plan_install(&options(), true).unwrap();
        let calls: Vec<String> = steps
            .iter()
            .filter(|s| matches!(s, Step::Systemctl(_)))
            .map(Step::describe)
            .collect();
        assert_eq!(
            calls,
            [
                "systemctl daemon-reload",
                "systemctl enable shoal-nodelet.service",
                "systemctl restart shoal-nodelet.service"
            ]
        );
        let quiet = plan_install(&options(), false).unwrap();
        assert!(!quiet
            .iter()
            .any(|s| matches!(s, Step::Systemctl(a) if a[0] != "daemon-reload")));
    }

    #[test]
    fn a_ca_bundle_is_copied_and_named_and_dropped_when_no_longer_given() {
        let mut with = options();
        with.ca_pem = Some(b"-----BEGIN CERTIFICATE-----\n".to_vec());
        let steps = plan_install(&with, true).unwrap();
        assert_eq!(file(&steps, CA_FILE).unwrap().1, 0o644);
        let env = String::from_utf8_lossy(file(&steps, ENV_FILE).unwrap().0).into_owned();
        assert!(env.contains("SHOAL_CA_FILE=\"/etc/shoal/nodelet-ca.pem\""));
        let without = plan_install(&options(), true).unwrap();
        assert!(without.contains(&Step::Remove {
            path: CA_FILE.into()
        }));
    }

    #[test]
    fn uninstall_keeps_the_state_unless_purged() {
        let keep = plan_uninstall(false);
        assert!(!keep.iter().any(|s| matches!(s, Step::RemoveTree { .. })));
        assert_eq!(
            keep[0].describe(),
            "systemctl disable --now shoal-nodelet.service"
        );
        let purge = plan_uninstall(true);
        assert!(purge.contains(&Step::RemoveTree {
            path: STATE_DIR.into()
        }));
    }
}
