//! Installing shoal's daemons (`nodelet install`, `apiserver install`) as systemd services.
//!
//! An install is planned first, as a list of [`Step`]s computed by pure functions (what
//! files with which modes, which `systemctl` calls), then carried out by [`apply`]. The plan
//! is what the unit tests check; `apply` is exercised by the daemons' own tests under a
//! sandbox root and, with a real systemd, by the VM test.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where systemd looks for units an administrator installed.
pub const UNIT_DIR: &str = "/etc/systemd/system";

/// One thing an install or uninstall does.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)] // the fields say what they are: paths, bytes, modes
pub enum Step {
    /// A folder (and its parents) with this mode; an existing one gets the mode.
    Dir { path: PathBuf, mode: u32 },
    /// A file written whole (atomically: a temp file renamed over it) with this mode.
    File {
        path: PathBuf,
        contents: Vec<u8>,
        mode: u32,
    },
    /// A file removed; missing is fine.
    Remove { path: PathBuf },
    /// A folder removed with everything in it; missing is fine.
    RemoveTree { path: PathBuf },
    /// `systemctl ARGS…`; skipped (and said so) without a running systemd or under a
    /// sandbox root.
    Systemctl(Vec<String>),
}

impl Step {
    /// A line for the operator: what this step does.
    pub fn describe(&self) -> String {
        match self {
            Step::Dir { path, mode } => format!("folder {} (mode {mode:04o})", path.display()),
            Step::File { path, mode, .. } => format!("file {} (mode {mode:04o})", path.display()),
            Step::Remove { path } => format!("remove {}", path.display()),
            Step::RemoveTree { path } => format!("remove {} and what is in it", path.display()),
            Step::Systemctl(args) => format!("systemctl {}", args.join(" ")),
        }
    }
}

/// What a unit file says. Rendered by [`render_unit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    /// `Description=`.
    pub description: String,
    /// Where the operator reads more (`Documentation=`).
    pub documentation: String,
    /// `EnvironmentFile=`: the daemon's settings (clap reads them from the environment).
    pub environment_file: PathBuf,
    /// `ExecStart=`: the binary, with no arguments (everything is in the environment file, so
    /// no secret and no setting is on a command line `ps` shows).
    pub exec_start: PathBuf,
    /// `[Service]` lines beyond the common ones, each with the comment that says why.
    pub service: Vec<(String, String)>,
}

/// The unit file's text.
pub fn render_unit(unit: &Unit) -> String {
    let mut out = String::new();
    let program = unit
        .exec_start
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "# `{program} install` configures (and writes) this unit, `{program} uninstall` removes it."
    );
    let _ = writeln!(out, "[Unit]");
    let _ = writeln!(out, "Description={}", unit.description);
    let _ = writeln!(out, "Documentation={}", unit.documentation);
    let _ = writeln!(out, "Wants=network-online.target");
    let _ = writeln!(out, "After=network-online.target");
    let _ = writeln!(out);
    let _ = writeln!(out, "[Service]");
    let _ = writeln!(out, "Type=simple");
    let _ = writeln!(out, "EnvironmentFile={}", unit.environment_file.display());
    let _ = writeln!(
        out,
        "ExecStart={}",
        systemd_quote(&unit.exec_start.to_string_lossy())
    );
    let _ = writeln!(out, "Restart=always");
    let _ = writeln!(out, "RestartSec=2");
    for (line, why) in &unit.service {
        let _ = writeln!(out, "# {why}");
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "[Install]");
    let _ = writeln!(out, "WantedBy=multi-user.target");
    out
}

/// A word for a unit file's command line: quoted when it holds anything but plain path
/// characters (systemd splits on spaces and reads `\`, `"`, `'`, `$` and `%` specially).
pub fn systemd_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:,=@".contains(c));
    if plain {
        return word.to_string();
    }
    let mut out = String::from("\"");
    for c in word.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '$' => out.push_str("$$"),
            '%' => out.push_str("%%"),
            _ => out.push(c),
        }
    }
    out.push('"');
    out
}

/// One `KEY=value` line of an environment file (systemd's `EnvironmentFile=`), the value
/// double-quoted with `\` and `"` escaped. A value with a line break cannot be written:
/// that is an error for the operator, not something to mangle.
pub fn env_line(key: &str, value: &str) -> Result<String, String> {
    if value.contains(['\n', '\r', '\0']) {
        return Err(format!(
            "{key}: a value with a line break or NUL cannot go into an environment file"
        ));
    }
    let escaped: String = value
        .chars()
        .flat_map(|c| match c {
            '"' | '\\' => vec!['\\', c],
            _ => vec![c],
        })
        .collect();
    Ok(format!("{key}=\"{escaped}\"\n"))
}

/// Whether systemd runs this machine (what `sd_booted()` checks).
pub fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// `path` under `root`: how a sandbox install (tests, image builds) places absolute paths.
pub fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Carries out `steps` in order under `root` (`/` for a real install). `systemctl` runs only
/// when `root` is `/` and systemd is running; otherwise each call is reported as skipped.
/// Returns one line per step for the operator; stops at the first step that fails, naming it.
pub fn apply(steps: &[Step], root: &Path) -> Result<Vec<String>, String> {
    let real = root == Path::new("/");
    let mut done = Vec::new();
    for step in steps {
        let what = step.describe();
        match step {
            Step::Dir { path, mode } => {
                let path = under(root, path);
                // The folders above get the usual 0755: a recursive DirBuilder would give
                // them the leaf's mode, and a 0700 /var/lib/shoal locks out every service
                // that runs as a user of its own.
                if let Some(parent) = path.parent() {
                    // One by one, so each folder made here gets 0755 whatever the umask.
                    let missing: Vec<&Path> =
                        parent.ancestors().take_while(|p| !p.exists()).collect();
                    for folder in missing.into_iter().rev() {
                        std::fs::create_dir(folder)
                            .and_then(|()| {
                                std::fs::set_permissions(
                                    folder,
                                    std::fs::Permissions::from_mode(0o755),
                                )
                            })
                            .map_err(|e| format!("{what}: {}: {e}", folder.display()))?;
                    }
                }
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(*mode)
                    .create(&path)
                    .and_then(|()| {
                        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))
                    })
                    .map_err(|e| format!("{what}: {e}"))?;
            }
            Step::File {
                path,
                contents,
                mode,
            } => write_file(&under(root, path), contents, *mode)
                .map_err(|e| format!("{what}: {e}"))?,
            Step::Remove { path } => match std::fs::remove_file(under(root, path)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("{what}: {e}")),
            },
            Step::RemoveTree { path } => match std::fs::remove_dir_all(under(root, path)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("{what}: {e}")),
            },
            Step::Systemctl(args) => {
                if !real || !systemd_running() {
                    done.push(format!(
                        "skipped: {what} ({})",
                        if real {
                            "systemd is not running on this machine"
                        } else {
                            "a sandbox root"
                        }
                    ));
                    continue;
                }
                let out = Command::new("systemctl")
                    .args(args)
                    .output()
                    .map_err(|e| format!("{what}: cannot run systemctl: {e}"))?;
                if !out.status.success() {
                    return Err(format!(
                        "{what}: {}: {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
            }
        }
        done.push(what);
    }
    Ok(done)
}

/// Writes `contents` to a temp file beside `path` with `mode` from the start (a secret is
/// never readable by others, not even for a moment), syncs it and renames it over `path`.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = path.with_file_name(format!(".{name}.install-tmp"));
    let _ = std::fs::remove_file(&temp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temp)?;
    file.write_all(contents)?;
    // The umask may have taken bits away from `mode`; a secret's mode must be exact.
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temp, path)
}

/// What `systemd-analyze verify` says about a unit file: `None` when the tool is not
/// installed; otherwise `Err` with its complaints (an unknown key is only a warning to
/// systemd, which then ignores the line: here it is an error).
pub fn verify_unit(path: &Path) -> Option<Result<(), String>> {
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(path)
        .output()
        .ok()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("systemd-analyze verify {}: {said}", path.display()))
    })
}

/// The last steps of every install: the unit file `name` with `text`, `daemon-reload`, and
/// with `start` also `enable` and `restart` (restart, not start: an install again, with a new
/// setting, takes effect).
pub fn unit_steps(name: &str, text: String, start: bool) -> Vec<Step> {
    let mut steps = vec![
        Step::File {
            path: Path::new(UNIT_DIR).join(name),
            contents: text.into_bytes(),
            mode: 0o644,
        },
        Step::Systemctl(vec!["daemon-reload".into()]),
    ];
    if start {
        steps.push(Step::Systemctl(vec!["enable".into(), name.into()]));
        steps.push(Step::Systemctl(vec!["restart".into(), name.into()]));
    }
    steps
}

/// The first steps of every uninstall: stop and disable unit `name`, remove its file, reload.
pub fn unit_removal_steps(name: &str) -> Vec<Step> {
    vec![
        Step::Systemctl(vec!["disable".into(), "--now".into(), name.into()]),
        Step::Remove {
            path: Path::new(UNIT_DIR).join(name),
        },
        Step::Systemctl(vec!["daemon-reload".into()]),
    ]
}

/// For the tests that keep `packaging/*.service` (what the `.deb` ships) equal to what an
/// install renders: `Err` naming the command that rewrites the file when it differs;
/// `SHOAL_BLESS=1` rewrites it.
pub fn check_packaged_unit(path: &Path, rendered: &str) -> Result<(), String> {
    if std::env::var_os("SHOAL_BLESS").is_some() {
        std::fs::write(path, rendered).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let packaged = std::fs::read_to_string(path).unwrap_or_default();
    if packaged == rendered {
        Ok(())
    } else {
        Err(format!(
            "{} is stale: run SHOAL_BLESS=1 cargo test packaged_unit",
            path.display()
        ))
    }
}

/// A word for the operator when the unit is about to start a binary from somewhere that is
/// not a place for programs (a home folder, a download folder): the unit breaks when that
/// file moves.
pub fn exe_note(exe: &Path) -> Option<String> {
    let settled = ["/usr/", "/opt/"].iter().any(|p| exe.starts_with(p));
    (!settled).then(|| {
        format!(
            "note: the unit starts {}; keep the binary there, or copy it to /usr/local/bin and install again from there",
            exe.display()
        )
    })
}

/// Reads a secret from a file for an install: trimmed, not empty, one line.
pub fn read_secret(path: &Path, what: &str) -> Result<String, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(format!("{what} {} is empty", path.display()));
    }
    if secret.contains(['\n', '\r']) {
        return Err(format!(
            "{what} {} holds more than one line; it must hold the token alone",
            path.display()
        ));
    }
    Ok(secret.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_keeps_plain_paths_and_escapes_the_rest() {
        assert_eq!(systemd_quote("/usr/bin/nodelet"), "/usr/bin/nodelet");
        assert_eq!(
            systemd_quote("/opt/my app/nodelet"),
            "\"/opt/my app/nodelet\""
        );
        assert_eq!(systemd_quote("/a$b%c\"d"), "\"/a$$b%%c\\\"d\"");
        assert_eq!(systemd_quote(""), "\"\"");
    }

    #[test]
    fn environment_lines_are_quoted_and_refuse_line_breaks() {
        assert_eq!(
            env_line("SHOAL_SERVER", "https://a:7070,https://b:7070").unwrap(),
            "SHOAL_SERVER=\"https://a:7070,https://b:7070\"\n"
        );
        assert_eq!(env_line("K", "a\"b\\c").unwrap(), "K=\"a\\\"b\\\\c\"\n");
        assert!(env_line("K", "a\nb").unwrap_err().contains("line break"));
    }

    #[test]
    fn a_unit_names_its_environment_file_and_carries_no_arguments() {
        let unit = render_unit(&Unit {
            description: "d".into(),
            documentation: "man:x".into(),
            environment_file: "/etc/shoal/nodelet.env".into(),
            exec_start: "/usr/bin/nodelet".into(),
            service: vec![("KillMode=mixed".into(), "why".into())],
        });
        assert!(unit.contains("EnvironmentFile=/etc/shoal/nodelet.env\n"));
        assert!(unit.contains("ExecStart=/usr/bin/nodelet\n"));
        assert!(unit.contains("# why\nKillMode=mixed\n"));
        assert!(unit.contains("WantedBy=multi-user.target"));
    }

    #[test]
    fn apply_under_a_sandbox_root_writes_exact_modes_and_skips_systemctl() {
        let root = tempfile::tempdir().unwrap();
        let steps = vec![
            Step::Dir {
                path: "/var/lib/shoal/x".into(),
                mode: 0o700,
            },
            Step::File {
                path: "/etc/x/token".into(),
                contents: b"secret".to_vec(),
                mode: 0o600,
            },
            Step::Systemctl(vec!["daemon-reload".into()]),
        ];
        let done = apply(&steps, root.path()).unwrap();
        assert!(
            done[2].starts_with("skipped: systemctl daemon-reload"),
            "{done:?}"
        );
        let mode = |p: &str| {
            std::fs::metadata(root.path().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("var/lib/shoal/x"), 0o700);
        assert_eq!(
            mode("var/lib/shoal"),
            0o755,
            "a folder above keeps the usual mode"
        );
        assert_eq!(mode("etc/x/token"), 0o600);
        assert_eq!(
            std::fs::read(root.path().join("etc/x/token")).unwrap(),
            b"secret"
        );
        // Removing what is not there is fine; removing twice is fine.
        let undo = vec![
            Step::Remove {
                path: "/etc/x/token".into(),
            },
            Step::Remove {
                path: "/etc/x/token".into(),
            },
            Step::RemoveTree {
                path: "/var/lib/x".into(),
            },
        ];
        apply(&undo, root.path()).unwrap();
        assert!(!root.path().join("etc/x/token").exists());
        assert!(!root.path().join("var/lib/x").exists());
    }

    #[test]
    fn a_binary_outside_the_program_folders_gets_a_note() {
        assert!(exe_note(Path::new("/usr/local/bin/nodelet")).is_none());
        assert!(exe_note(Path::new("/opt/shoal/nodelet")).is_none());
        assert!(exe_note(Path::new("/home/ada/nodelet"))
            .unwrap()
            .contains("/usr/local/bin"));
    }

    #[test]
    fn a_secret_file_must_hold_one_non_empty_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t");
        std::fs::write(&file, "  tok-en \n").unwrap();
        assert_eq!(read_secret(&file, "join token").unwrap(), "tok-en");
        std::fs::write(&file, "\n").unwrap();
        assert!(read_secret(&file, "join token")
            .unwrap_err()
            .contains("is empty"));
        std::fs::write(&file, "a\nb\n").unwrap();
        assert!(read_secret(&file, "join token")
            .unwrap_err()
            .contains("more than one line"));
        assert!(read_secret(&dir.path().join("missing"), "join token").is_err());
    }
}
