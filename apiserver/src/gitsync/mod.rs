//! Git sync: apply every manifest under a path of a branch, with commit provenance, and prune.
//!
//! The git binary does the work (fetch into a bare repository in the data
//! directory, then `ls-tree` and `show` at the fetched commit). Why not
//! gitoxide: the git binary speaks every transport and credential helper an
//! operator already configured (SSH agents, HTTPS tokens, proxies), its
//! behaviour is what the operator sees on their own machine, and nothing is
//! ever checked out, so no working tree can be left half-written by a crash.
//! Arguments go through the command runner as vectors, never a shell string.
//!
//! A commit is applied whole or not at all: if any manifest under the path is
//! invalid, nothing is applied, the last good commit stays in force, and the
//! status (`GET /api/v1/gitsync`) shows the commit, the file, the line and the error.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use manifests::wire::{EventType, RevisionSource};
use manifests::Diagnostic;
use serde::Serialize;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::server::controller::{ApplyInput, Controller};
use crate::server::error::ApiError;

/// The annotation that marks objects created by git sync (prune removes only those).
pub const MANAGED_BY: &str = "shoal/managed-by";
/// Its value.
pub const GIT_SYNC: &str = "git-sync";

/// Where to sync from.
#[derive(Debug, Clone)]
pub struct GitConfig {
    /// Repository URL or local path.
    pub repo: String,
    /// Branch.
    pub branch: String,
    /// Folder inside the repository (`.` for all).
    pub path: String,
    /// Poll interval.
    pub interval: Duration,
    /// Webhook secret (GitHub HMAC key, GitLab token).
    pub webhook_secret: Option<String>,
}

/// What the last sync did, as `GET /api/v1/gitsync` shows it.
#[derive(Debug, Clone, Default, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GitSyncStatus {
    /// Repository.
    pub repo: String,
    /// Branch.
    pub branch: String,
    /// Path.
    pub path: String,
    /// The commit in force (last one applied).
    pub applied_commit: Option<String>,
    /// The newest commit seen.
    pub head_commit: Option<String>,
    /// Why the newest commit was not applied.
    pub error: Option<String>,
    /// Every problem of the newest commit's manifests, with file and line.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<Diagnostic>,
}

/// Syncs one repository into the controller.
pub struct GitSync {
    config: GitConfig,
    bare: PathBuf,
    controller: Arc<Controller>,
    status: Mutex<GitSyncStatus>,
    /// One sync at a time; a webhook and the poll never interleave.
    running: tokio::sync::Mutex<()>,
}

const GIT_LIMIT: Duration = Duration::from_secs(300);

/// Largest manifest file git sync reads, bytes: the apiserver's default body limit.
const MAX_FILE_BYTES: u64 = crate::server::DEFAULT_MAX_BODY as u64;

async fn git(dir: &Path, args: &[&str]) -> Result<String, String> {
    let mut all = vec!["-C", dir.to_str().unwrap_or(".")];
    all.extend_from_slice(args);
    crate::command::run("git", &all, GIT_LIMIT).await
}

impl GitSync {
    /// A syncer keeping its bare repository under `data/git`.
    pub fn new(config: GitConfig, data: &Path, controller: Arc<Controller>) -> Self {
        let status = GitSyncStatus {
            repo: config.repo.clone(),
            branch: config.branch.clone(),
            path: config.path.clone(),
            ..Default::default()
        };
        GitSync {
            config,
            bare: data.join("git"),
            controller,
            status: Mutex::new(status),
            running: tokio::sync::Mutex::new(()),
        }
    }

    /// The status.
    pub fn status(&self) -> GitSyncStatus {
        self.status.lock().expect("not poisoned").clone()
    }

    /// True when the request carries a valid GitHub signature or GitLab token (constant time).
    pub fn verify_webhook(
        &self,
        body: &[u8],
        github_signature: Option<&str>,
        gitlab_token: Option<&str>,
    ) -> bool {
        let Some(secret) = &self.config.webhook_secret else {
            return false;
        };
        if let Some(signature) = github_signature {
            let Some(hex_digest) = signature.strip_prefix("sha256=") else {
                return false;
            };
            let Ok(given) = hex::decode(hex_digest) else {
                return false;
            };
            let mut mac =
                <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).expect("any key length");
            mac.update(body);
            return mac.verify_slice(&given).is_ok();
        }
        if let Some(token) = gitlab_token {
            return bool::from(token.as_bytes().ct_eq(secret.as_bytes()));
        }
        false
    }

    /// Fetches the branch and applies its head if it is new.
    pub async fn sync(&self) -> Result<(), String> {
        let _one = self.running.lock().await;
        if !self.bare.join("HEAD").exists() {
            std::fs::create_dir_all(&self.bare).map_err(|e| e.to_string())?;
            git(&self.bare, &["init", "--quiet", "--bare"]).await?;
        }
        let refspec = format!("+refs/heads/{0}:refs/heads/{0}", self.config.branch);
        git(
            &self.bare,
            &["fetch", "--quiet", "--no-tags", &self.config.repo, &refspec],
        )
        .await?;
        let sha = git(
            &self.bare,
            &["rev-parse", &format!("refs/heads/{}", self.config.branch)],
        )
        .await?
        .trim()
        .to_string();
        {
            let status = self.status.lock().expect("not poisoned");
            if status.head_commit.as_deref() == Some(sha.as_str()) {
                return Ok(());
            }
        }
        // The head commit is published only together with its outcome (its problems, or the
        // applied commit): a reader that sees a new head sees what became of it, never the
        // problems of the commit before. A commit that could not be read or applied for a
        // passing reason (git or the store failing) is not recorded, so the next poll retries it.
        let info = git(&self.bare, &["log", "-1", "--format=%an <%ae>%x00%s", &sha]).await?;
        let (author, subject) = info
            .trim_end()
            .split_once('\0')
            .unwrap_or((info.trim(), ""));
        let path = self.config.path.trim_matches('/');
        let mut args = vec!["ls-tree", "-r", "--name-only", sha.as_str()];
        if !path.is_empty() && path != "." {
            args.extend(["--", path]);
        }
        let listing = git(&self.bare, &args).await?;
        let files: Vec<&str> = listing
            .lines()
            .filter(|f| f.ends_with(".yaml") || f.ends_with(".yml") || f.ends_with(".json"))
            .filter(|f| !f.split('/').any(|part| part.starts_with('.')))
            .collect();
        let short = &sha[..sha.len().min(12)];
        let mut problems = Vec::new();
        let mut inputs = Vec::new();
        let mut names = std::collections::BTreeSet::new();
        for file in &files {
            let object = format!("{sha}:{file}");
            // The size first: a huge file in the repository must not be read into memory.
            let size: u64 = git(&self.bare, &["cat-file", "-s", &object])
                .await?
                .trim()
                .parse()
                .unwrap_or(u64::MAX);
            if size > MAX_FILE_BYTES {
                problems.push(Diagnostic {
                    file: format!("{file}@{short}"),
                    line: 1,
                    column: 1,
                    field: String::new(),
                    message: format!(
                        "the file is {size} bytes, more than the {MAX_FILE_BYTES} a manifest file may have"
                    ),
                    hint: Some("split it into several files".into()),
                });
                continue;
            }
            let text = git(&self.bare, &["show", &object]).await?;
            let name = format!("{file}@{short}");
            // Parsing takes CPU in proportion to the text: the blocking pool, not a worker.
            let loaded = tokio::task::spawn_blocking(move || manifests::parse_str(&name, &text))
                .await
                .map_err(|e| format!("parsing {file} failed: {e}"))?;
            problems.extend(loaded.diagnostics);
            for parsed in loaded.objects {
                if !names.insert(parsed.object.metadata.name.clone()) {
                    problems.push(Diagnostic {
                        file: parsed.file.clone(),
                        line: parsed.line,
                        column: 1,
                        field: "metadata.name".into(),
                        message: format!(
                            "DesiredState `{}` is defined twice in this commit",
                            parsed.object.metadata.name
                        ),
                        hint: Some("names are unique per kind".into()),
                    });
                    continue;
                }
                let mut object = parsed.object;
                object
                    .metadata
                    .annotations
                    .insert(MANAGED_BY.into(), GIT_SYNC.into());
                object.metadata.resource_version = None;
                let source = RevisionSource {
                    kind: "git".into(),
                    actor: Some("git-sync".into()),
                    commit: Some(sha.clone()),
                    author: Some(author.to_string()),
                    subject: Some(subject.to_string()),
                    file: Some(file.to_string()),
                };
                inputs.push(ApplyInput { object, source });
            }
        }
        if !problems.is_empty() {
            let first = problems
                .iter()
                .take(5)
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("\n");
            let message = format!("commit {short} ({subject}) not applied: {} problem(s); commit {} stays in force\n{first}", problems.len(), self.status().applied_commit.as_deref().map_or("none", |c| &c[..c.len().min(12)]));
            let controller = self.controller.clone();
            let event_message = message.clone();
            let _ = controller
                .record_event(
                    std::time::SystemTime::now(),
                    EventType::Warning,
                    "GitSyncFailed",
                    "gitsync/repository",
                    event_message,
                    None,
                    None,
                    None,
                )
                .await;
            let mut status = self.status.lock().expect("not poisoned");
            status.head_commit = Some(sha.clone());
            status.error = Some(message.clone());
            status.problems = problems;
            return Err(message);
        }
        let controller = self.controller.clone();
        let keep = names.clone();
        let result = async move {
            controller.apply(inputs, false).await?;
            // Prune: objects git sync created that this commit no longer has.
            for state in controller.list_desired_states()? {
                let ours = state
                    .metadata
                    .annotations
                    .get(MANAGED_BY)
                    .map(String::as_str)
                    == Some(GIT_SYNC);
                if ours && !keep.contains(&state.metadata.name) {
                    controller
                        .delete_desired_state(&state.metadata.name, None)
                        .await?;
                }
            }
            Ok::<(), ApiError>(())
        }
        .await;
        let mut status = self.status.lock().expect("not poisoned");
        match result {
            Ok(()) => {
                status.head_commit = Some(sha.clone());
                status.applied_commit = Some(sha);
                status.error = None;
                status.problems.clear();
                Ok(())
            }
            Err(e) => {
                status.error = Some(format!("commit {short}: {e}"));
                Err(e.to_string())
            }
        }
    }

    /// Polls every interval, and at once when `wake` is notified (the webhook).
    pub async fn run(self: Arc<Self>, wake: Arc<tokio::sync::Notify>) {
        loop {
            // With replicas on one store, the leader alone syncs (a webhook that reaches a
            // follower waits for the leader's next poll).
            if self.controller.leader_epoch().is_some() {
                if let Err(e) = self.sync().await {
                    tracing::warn!(error = %e, repo = %self.config.repo, "git sync did not apply");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.interval) => {}
                _ = wake.notified() => {}
            }
        }
    }
}
