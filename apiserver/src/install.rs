//! `apiserver install` and `apiserver uninstall`: the apiserver as a systemd service.
//!
//! What an install writes (docs/install.md):
//! - `/etc/shoal/apiserver.env` (0600): the settings, read from the environment at start
//!   (with `--store`, the database URL and its password are in it; hence 0600);
//! - `/etc/shoal/apiserver-tokens.yaml` (0600): the tokens file, copied;
//! - `/etc/shoal/apiserver-tls.crt` (0644) and `apiserver-tls.key` (0600), with TLS: copied;
//! - `/var/lib/shoal/apiserver` (0700): the data folder;
//! - `/etc/systemd/system/shoal-apiserver.service`, then `daemon-reload`, `enable`, `restart`.

use std::path::{Path, PathBuf};

use shoal_install::{env_line, render_unit, Step, Unit};

/// The apiserver's unit.
pub const UNIT: &str = "shoal-apiserver.service";
/// The settings the unit's `EnvironmentFile=` names.
pub const ENV_FILE: &str = "/etc/shoal/apiserver.env";
/// The tokens file, root-only.
pub const TOKENS_FILE: &str = "/etc/shoal/apiserver-tokens.yaml";
/// The TLS certificate chain.
pub const TLS_CERT: &str = "/etc/shoal/apiserver-tls.crt";
/// The TLS private key, root-only.
pub const TLS_KEY: &str = "/etc/shoal/apiserver-tls.key";
/// The default data folder.
pub const DATA_DIR: &str = "/var/lib/shoal/apiserver";

/// What `apiserver install` was asked for, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallOptions {
    /// `--listen`.
    pub listen: std::net::SocketAddr,
    /// The tokens file's text (parsed already).
    pub tokens: Vec<u8>,
    /// Certificate chain and key (PEM), with TLS.
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
    /// `--store` (a PostgreSQL URL), when the store is not the data folder.
    pub store: Option<String>,
    /// The apiserver binary the unit starts.
    pub exe: PathBuf,
}

/// The unit. The apiserver only serves HTTP, writes its data folder and runs `git` for git
/// sync, so it runs with every protection systemd offers that allows that: the whole file
/// system read-only but the data folder, no capabilities but binding a low port, no devices,
/// no kernel tunables.
pub fn unit(exe: &Path) -> Unit {
    let line = |l: &str, why: &str| (l.to_string(), why.to_string());
    Unit {
        description: "shoal apiserver: stores DesiredStates, rolls them out, serves the API".into(),
        // What the .deb ships (scripts/deb); docs/install.md in the repository.
        documentation: "file:/usr/share/doc/shoal-apiserver/install.md".into(),
        environment_file: ENV_FILE.into(),
        exec_start: exe.to_path_buf(),
        service: vec![
            line(
                "TimeoutStopSec=30",
                "a clean stop flushes the store; kill -9 is safe too, but replays",
            ),
            line(
                "LimitNOFILE=65536",
                "one connection per node, and a fleet has thousands",
            ),
            line("ProtectSystem=strict", "nothing of the system is written…"),
            line(
                &format!("ReadWritePaths={DATA_DIR}"),
                "…but the data folder",
            ),
            line(
                "ProtectHome=yes",
                "git sync needs no home folder (HOME is the data folder's)",
            ),
            line("PrivateTmp=yes", "git's temporary files stay private"),
            line("PrivateDevices=yes", "no device is needed"),
            line(
                "NoNewPrivileges=yes",
                "nothing it runs (git) gains privileges",
            ),
            line(
                "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
                "root without root's powers: only binding a port below 1024 (443)",
            ),
            line("ProtectKernelTunables=yes", "no sysctl"),
            line("ProtectKernelModules=yes", "no modules"),
            line("ProtectKernelLogs=yes", "no kernel log"),
            line("ProtectControlGroups=yes", "no cgroup changes"),
            line("ProtectClock=yes", "no clock changes"),
            line("ProtectHostname=yes", "no hostname changes"),
            line(
                "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
                "HTTP, PostgreSQL and git only",
            ),
            line("RestrictNamespaces=yes", "no namespaces"),
            line("RestrictRealtime=yes", "no real-time scheduling"),
            line("RestrictSUIDSGID=yes", "no setuid files"),
            line("LockPersonality=yes", "no other execution domain"),
            line("MemoryDenyWriteExecute=yes", "no code written at run time"),
            line(
                "SystemCallArchitectures=native",
                "no other ABI's system calls",
            ),
            line(
                &format!("Environment=HOME={DATA_DIR}"),
                "git reads its settings from HOME",
            ),
        ],
    }
}

/// The environment file.
pub fn env_file(options: &InstallOptions) -> Result<String, String> {
    let mut out = String::from(
        "# Written by `apiserver install`: the apiserver's settings (see `apiserver --help`).\n",
    );
    out += &env_line("SHOAL_DATA", DATA_DIR)?;
    out += &env_line("SHOAL_LISTEN", &options.listen.to_string())?;
    out += &env_line("SHOAL_TOKENS", TOKENS_FILE)?;
    if options.tls.is_some() {
        out += &env_line("SHOAL_TLS_CERT", TLS_CERT)?;
        out += &env_line("SHOAL_TLS_KEY", TLS_KEY)?;
    }
    if let Some(store) = &options.store {
        out += &env_line("SHOAL_STORE", store)?;
    }
    out += &env_line("RUST_LOG", "info")?;
    Ok(out)
}

/// Everything an install does, in order. `start`: enable and (re)start the unit.
pub fn plan_install(options: &InstallOptions, start: bool) -> Result<Vec<Step>, String> {
    let mut steps = vec![
        Step::Dir {
            path: "/etc/shoal".into(),
            mode: 0o755,
        },
        Step::Dir {
            path: DATA_DIR.into(),
            mode: 0o700,
        },
        Step::File {
            path: TOKENS_FILE.into(),
            contents: options.tokens.clone(),
            mode: 0o600,
        },
    ];
    match &options.tls {
        Some((cert, key)) => {
            steps.push(Step::File {
                path: TLS_CERT.into(),
                contents: cert.clone(),
                mode: 0o644,
            });
            steps.push(Step::File {
                path: TLS_KEY.into(),
                contents: key.clone(),
                mode: 0o600,
            });
        }
        None => {
            steps.push(Step::Remove {
                path: TLS_CERT.into(),
            });
            steps.push(Step::Remove {
                path: TLS_KEY.into(),
            });
        }
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

/// Everything an uninstall does; `purge` removes the data folder (every DesiredState,
/// revision, node and event) too.
pub fn plan_uninstall(purge: bool) -> Vec<Step> {
    let mut steps = shoal_install::unit_removal_steps(UNIT);
    for file in [ENV_FILE, TOKENS_FILE, TLS_CERT, TLS_KEY] {
        steps.push(Step::Remove { path: file.into() });
    }
    if purge {
        steps.push(Step::RemoveTree {
            path: DATA_DIR.into(),
        });
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `.deb` ships `packaging/shoal-apiserver.service` (scripts/deb): exactly what an install
    /// from the package writes.
    #[test]
    fn the_packaged_unit_is_what_install_writes() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/shoal-apiserver.service");
        let rendered = render_unit(&unit(Path::new("/usr/bin/apiserver")));
        shoal_install::check_packaged_unit(&path, &rendered).unwrap();
    }

    fn options() -> InstallOptions {
        InstallOptions {
            listen: "0.0.0.0:7070".parse().unwrap(),
            tokens: b"tokens: []\n".to_vec(),
            tls: Some((b"CERT".to_vec(), b"KEY".to_vec())),
            store: None,
            exe: "/usr/bin/apiserver".into(),
        }
    }

    fn mode_of(steps: &[Step], path: &str) -> Option<u32> {
        steps.iter().find_map(|s| match s {
            Step::File { path: p, mode, .. } if p == Path::new(path) => Some(*mode),
            _ => None,
        })
    }

    #[test]
    fn secrets_are_root_only_and_the_settings_name_them() {
        let steps = plan_install(&options(), true).unwrap();
        assert_eq!(mode_of(&steps, TOKENS_FILE), Some(0o600));
        assert_eq!(mode_of(&steps, TLS_KEY), Some(0o600));
        assert_eq!(mode_of(&steps, TLS_CERT), Some(0o644));
        assert_eq!(mode_of(&steps, ENV_FILE), Some(0o600));
        let env = env_file(&options()).unwrap();
        for line in [
            "SHOAL_DATA=\"/var/lib/shoal/apiserver\"",
            "SHOAL_LISTEN=\"0.0.0.0:7070\"",
            "SHOAL_TOKENS=\"/etc/shoal/apiserver-tokens.yaml\"",
            "SHOAL_TLS_KEY=\"/etc/shoal/apiserver-tls.key\"",
        ] {
            assert!(env.contains(line), "{line} missing from {env}");
        }
    }

    #[test]
    fn the_unit_writes_only_the_data_folder() {
        let unit = render_unit(&unit(Path::new("/usr/bin/apiserver")));
        assert!(unit.contains("ProtectSystem=strict\n"), "{unit}");
        assert!(unit.contains("ReadWritePaths=/var/lib/shoal/apiserver\n"));
        assert!(unit.contains("CapabilityBoundingSet=CAP_NET_BIND_SERVICE\n"));
    }

    #[test]
    fn without_tls_old_certificates_are_removed_and_purge_removes_the_data() {
        let mut plain = options();
        plain.tls = None;
        let steps = plan_install(&plain, false).unwrap();
        assert!(steps.contains(&Step::Remove {
            path: TLS_KEY.into()
        }));
        assert!(!env_file(&plain).unwrap().contains("SHOAL_TLS"));
        assert!(!plan_uninstall(false)
            .iter()
            .any(|s| matches!(s, Step::RemoveTree { .. })));
        assert!(plan_uninstall(true).contains(&Step::RemoveTree {
            path: DATA_DIR.into()
        }));
    }
}
