//! Artifacts: streamed download with time, size and free-space limits, SHA-256
//! verified before anything is touched, cached by hash; and tar.gz extraction
//! with caps that refuses to leave its folder.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::ffi::OsString;
use std::future::Future;
use std::io::Read;
use std::path::{Component as PathPart, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::probe::error_chain;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;
/// While streaming, free space is checked again after every this many bytes.
const SPACE_CHECK_EVERY: u64 = 8 * MIB;

/// Why an artifact could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The download failed, stalled, took too long or was too large.
    /// `reason` reads on from the URL: "failed: …", "stalled: …", "exceeds …".
    #[error("download of {url} {reason}")]
    Download {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The bytes are not the ones the manifest pinned.
    #[error("sha256 mismatch for {url}: the manifest pins {expected}, the file is {actual}; nothing was changed")]
    Mismatch {
        /// The URL.
        url: String,
        /// Pinned hash.
        expected: String,
        /// Hash of what arrived.
        actual: String,
    },
    /// The file is not of the size the manifest pinned (`artifact.size`).
    #[error("size mismatch for {url}: the manifest pins {expected} bytes, the file is {actual} bytes; nothing was changed")]
    SizeMismatch {
        /// The URL.
        url: String,
        /// Pinned size in bytes.
        expected: u64,
        /// Size of what arrived (or what the server announced).
        actual: u64,
    },
    /// Not enough free space: the caller may raise a DiskPressure condition.
    #[error("not enough free space in {path}: {free} bytes free, {needed} bytes needed (the file plus the reserve kept free); free some space, e.g. remove old artifacts and versions")]
    NoSpace {
        /// The folder whose filesystem is short of space.
        path: String,
        /// Free bytes (available to the nodelet).
        free: u64,
        /// Bytes that would have to be free.
        needed: u64,
    },
    /// The archive is unsafe, too large or unreadable.
    #[error("archive {archive}: {reason}")]
    Archive {
        /// The archive.
        archive: String,
        /// Why, and what to do.
        reason: String,
    },
    /// Local I/O.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ArtifactError + '_ {
    move |source| ArtifactError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Bytes available to an unprivileged writer on the filesystem holding `path`.
fn free_bytes(path: &Path) -> Result<u64, ArtifactError> {
    let stat = nix::sys::statvfs::statvfs(path).map_err(|errno| ArtifactError::Io {
        path: path.display().to_string(),
        source: std::io::Error::from(errno),
    })?;
    #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
    let free = (stat.blocks_available() as u64).saturating_mul(stat.fragment_size() as u64);
    Ok(free)
}

/// Fails with [`ArtifactError::NoSpace`] unless `path`'s filesystem has `needed` bytes free.
fn ensure_free(path: &Path, needed: u64) -> Result<(), ArtifactError> {
    let free = free_bytes(path)?;
    if free < needed {
        return Err(ArtifactError::NoSpace {
            path: path.display().to_string(),
            free,
            needed,
        });
    }
    Ok(())
}

/// Limits on one download. The defaults suit a board on a slow link as well as a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadLimits {
    /// Time to establish a connection; default 10 s. Applied by the HTTP client that
    /// [`DownloadLimits::client_builder`] makes (a client passed to [`ArtifactCache::new`]
    /// keeps its own); the wait for the response headers is bounded by `read_idle_timeout` anyway.
    pub connect_timeout: Duration,
    /// Longest wait for the next byte, including the wait for the response headers;
    /// default 30 s. A transfer that stalls longer fails.
    pub read_idle_timeout: Duration,
    /// Longest a whole download may take; default 30 min.
    pub total_timeout: Duration,
    /// Largest artifact accepted, in bytes; default 2 GiB. A manifest's smaller
    /// `artifact.size` lowers it for that artifact.
    pub max_bytes: u64,
    /// Bytes that must stay free on the cache's filesystem; default 64 MiB.
    pub min_free_bytes: u64,
}

impl Default for DownloadLimits {
    fn default() -> Self {
        DownloadLimits {
            connect_timeout: Duration::from_secs(10),
            read_idle_timeout: Duration::from_secs(30),
            total_timeout: Duration::from_secs(30 * 60),
            max_bytes: 2 * GIB,
            min_free_bytes: 64 * MIB,
        }
    }
}

impl DownloadLimits {
    /// An HTTP client builder with `connect_timeout` set, to which a caller can add its CA.
    pub fn client_builder(&self) -> reqwest::ClientBuilder {
        reqwest::Client::builder().connect_timeout(self.connect_timeout)
    }
}

/// The byte limit of one download, and where it comes from (for the message).
#[derive(Debug, Clone, Copy)]
enum Limit {
    Manifest(u64),
    Node(u64),
}

impl Limit {
    fn bytes(self) -> u64 {
        match self {
            Limit::Manifest(n) | Limit::Node(n) => n,
        }
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limit::Manifest(n) => write!(f, "the manifest's artifact.size of {n} bytes"),
            Limit::Node(n) => write!(f, "--max-artifact-bytes ({n} bytes)"),
        }
    }
}

/// A `.partial` file that is removed when dropped, unless disarmed: every failure,
/// and a cancelled fetch, leaves nothing behind.
struct PartialFile {
    path: PathBuf,
    armed: bool,
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Where downloaded bytes go: counted against the limit, hashed, written, and the
/// free space watched.
struct Sink<'a> {
    url: &'a str,
    dir: &'a Path,
    limit: Limit,
    min_free: u64,
    file: tokio::fs::File,
    partial: PartialFile,
    hasher: Sha256,
    written: u64,
    since_space_check: u64,
}

impl Sink<'_> {
    async fn push(&mut self, bytes: &[u8]) -> Result<(), ArtifactError> {
        let after = self.written.saturating_add(bytes.len() as u64);
        if after > self.limit.bytes() {
            return Err(ArtifactError::Download {
                url: self.url.to_string(),
                reason: format!(
                    "exceeds {} (stopped as soon as it did); fix the manifest's size or the URL",
                    self.limit
                ),
            });
        }
        self.hasher.update(bytes);
        self.file
            .write_all(bytes)
            .await
            .map_err(io(&self.partial.path))?;
        self.written = after;
        self.since_space_check += bytes.len() as u64;
        if self.since_space_check >= SPACE_CHECK_EVERY {
            self.since_space_check = 0;
            ensure_free(self.dir, self.min_free)?;
        }
        Ok(())
    }
}

/// A content-addressed cache of verified artifacts.
#[derive(Debug, Clone)]
pub struct ArtifactCache {
    dir: PathBuf,
    http: reqwest::Client,
    limits: DownloadLimits,
    /// One fetch at a time per hash (they share its `.partial` name; prune must not take a
    /// live one). Fetches of different artifacts run at once: a download that stalls in one
    /// DesiredState never holds up another's.
    busy: Arc<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

fn is_sha256(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

impl ArtifactCache {
    /// A cache in `dir` (created when needed), downloading with `http` and the default limits.
    pub fn new(dir: PathBuf, http: reqwest::Client) -> Self {
        ArtifactCache {
            dir,
            http,
            limits: DownloadLimits::default(),
            busy: Arc::default(),
        }
    }

    /// The same cache with other download limits.
    pub fn with_limits(mut self, limits: DownloadLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The download limits in force.
    pub fn limits(&self) -> &DownloadLimits {
        &self.limits
    }

    /// Where a verified artifact with this hash lives.
    pub fn path_of(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256.to_ascii_lowercase())
    }

    fn partial_of(&self, sha256: &str) -> PathBuf {
        self.dir
            .join(format!(".{}.partial", sha256.to_ascii_lowercase()))
    }

    /// The verified file for `artifact`: from the cache, or downloaded within the
    /// limits, hashed while streaming, and moved into the cache only when hash and
    /// size match. On any failure, and when the future is dropped, no `.partial`
    /// file is left behind.
    pub async fn fetch(&self, artifact: &manifests::Artifact) -> Result<PathBuf, ArtifactError> {
        let url = artifact.url.as_str();
        let expected = artifact.sha256.to_ascii_lowercase();
        if !is_sha256(&expected) {
            return Err(ArtifactError::Download {
                url: url.to_string(),
                reason: "failed: the manifest's sha256 is not 64 hexadecimal characters".into(),
            });
        }
        let lock = self
            .busy
            .lock()
            .expect("not poisoned")
            .entry(expected.clone())
            .or_default()
            .clone();
        let _busy = lock.lock().await;
        let target = self.path_of(&expected);
        match std::fs::symlink_metadata(&target) {
            Ok(meta) if meta.is_file() && artifact.size.is_none_or(|size| size == meta.len()) => {
                return Ok(target);
            }
            // A cached file of the wrong size is not the artifact: fetch it again.
            Ok(meta) if meta.is_file() => {
                std::fs::remove_file(&target).map_err(io(&target))?;
            }
            _ => {}
        }
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let partial_path = self.partial_of(&expected);
        // Left over by a crash: a fresh download starts from nothing.
        match std::fs::remove_file(&partial_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io(&partial_path)(e));
            }
            _ => {}
        }
        let limit = match artifact.size {
            Some(size) if size <= self.limits.max_bytes => Limit::Manifest(size),
            _ => Limit::Node(self.limits.max_bytes),
        };
        if let Some(size) = artifact.size {
            if size > self.limits.max_bytes {
                return Err(ArtifactError::Download {
                    url: url.to_string(),
                    reason: format!(
                        "refused: the manifest's artifact.size of {size} bytes exceeds {limit}; raise the node's limit or ship a smaller artifact"
                    ),
                });
            }
            ensure_free(&self.dir, size.saturating_add(self.limits.min_free_bytes))?;
        } else {
            // The size is not known yet (maybe later from a Content-Length): the reserve at least.
            ensure_free(&self.dir, self.limits.min_free_bytes)?;
        }
        let deadline = Instant::now() + self.limits.total_timeout;
        // Created synchronously, with its guard armed at once, so a cancelled
        // future cannot leave a file created after the guard ran.
        let partial = PartialFile {
            path: partial_path.clone(),
            armed: true,
        };
        let file = std::fs::File::create(&partial_path).map_err(io(&partial_path))?;
        let mut sink = Sink {
            url,
            dir: &self.dir,
            limit,
            min_free: self.limits.min_free_bytes,
            file: tokio::fs::File::from_std(file),
            partial,
            hasher: Sha256::new(),
            written: 0,
            since_space_check: 0,
        };
        match url.strip_prefix("file://") {
            Some(local) => {
                self.read_file(Path::new(local), artifact, &mut sink, deadline)
                    .await?
            }
            None => self.read_http(artifact, &mut sink, deadline).await?,
        }
        sink.file.sync_all().await.map_err(io(&partial_path))?;
        let Sink {
            file,
            mut partial,
            hasher,
            written,
            ..
        } = sink;
        drop(file);
        if let Some(size) = artifact.size {
            if written != size {
                return Err(ArtifactError::SizeMismatch {
                    url: url.to_string(),
                    expected: size,
                    actual: written,
                });
            }
        }
        let actual = hex::encode(hasher.finalize());
        if actual != expected {
            return Err(ArtifactError::Mismatch {
                url: url.to_string(),
                expected,
                actual,
            });
        }
        std::fs::rename(&partial_path, &target).map_err(io(&target))?;
        partial.armed = false;
        Ok(target)
    }

    /// Awaits `step` for at most the read-idle timeout and what is left before `deadline`.
    async fn within<T>(
        &self,
        url: &str,
        deadline: Instant,
        step: impl Future<Output = T>,
    ) -> Result<T, ArtifactError> {
        let left = deadline.saturating_duration_since(Instant::now());
        let idle = self.limits.read_idle_timeout;
        let total = left < idle;
        match tokio::time::timeout(if total { left } else { idle }, step).await {
            Ok(value) => Ok(value),
            Err(_) => Err(ArtifactError::Download {
                url: url.to_string(),
                reason: if total {
                    format!(
                        "took longer than {} (total timeout); try again, or raise the node's total download timeout for a slow link",
                        humantime::format_duration(self.limits.total_timeout)
                    )
                } else {
                    format!(
                        "stalled: no data for {} (read-idle timeout); check that the server is up and reachable",
                        humantime::format_duration(idle)
                    )
                },
            }),
        }
    }

    /// Checks a size known before the body (file length or Content-Length).
    fn check_announced(
        &self,
        url: &str,
        artifact: &manifests::Artifact,
        limit: Limit,
        announced: u64,
        what: &str,
    ) -> Result<(), ArtifactError> {
        if announced > limit.bytes() {
            return Err(ArtifactError::Download {
                url: url.to_string(),
                reason: format!(
                    "refused: {what} is {announced} bytes, which exceeds {limit}; nothing was downloaded"
                ),
            });
        }
        if let Some(size) = artifact.size {
            if announced != size {
                return Err(ArtifactError::SizeMismatch {
                    url: url.to_string(),
                    expected: size,
                    actual: announced,
                });
            }
        } else {
            ensure_free(
                &self.dir,
                announced.saturating_add(self.limits.min_free_bytes),
            )?;
        }
        Ok(())
    }

    async fn read_file(
        &self,
        local: &Path,
        artifact: &manifests::Artifact,
        sink: &mut Sink<'_>,
        deadline: Instant,
    ) -> Result<(), ArtifactError> {
        let url = sink.url;
        let failed = |e: std::io::Error| ArtifactError::Download {
            url: url.to_string(),
            reason: format!("failed: {e}"),
        };
        let mut source = self
            .within(url, deadline, tokio::fs::File::open(local))
            .await?
            .map_err(failed)?;
        let meta = source.metadata().await.map_err(failed)?;
        if meta.is_file() {
            self.check_announced(url, artifact, sink.limit, meta.len(), "the file")?;
        }
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = self
                .within(url, deadline, source.read(&mut buffer))
                .await?
                .map_err(failed)?;
            if n == 0 {
                return Ok(());
            }
            sink.push(&buffer[..n]).await?;
        }
    }

    async fn read_http(
        &self,
        artifact: &manifests::Artifact,
        sink: &mut Sink<'_>,
        deadline: Instant,
    ) -> Result<(), ArtifactError> {
        let url = sink.url;
        let failed = |reason: String| ArtifactError::Download {
            url: url.to_string(),
            reason: format!("failed: {reason}"),
        };
        let response = self
            .within(url, deadline, self.http.get(url).send())
            .await?
            .map_err(|e| failed(error_chain(&e)))?;
        if !response.status().is_success() {
            return Err(failed(format!("HTTP {}", response.status())));
        }
        if let Some(length) = response.content_length() {
            self.check_announced(url, artifact, sink.limit, length, "its Content-Length")?;
        }
        let mut stream = response.bytes_stream();
        while let Some(chunk) = self.within(url, deadline, stream.next()).await? {
            let chunk = chunk.map_err(|e| failed(error_chain(&e)))?;
            sink.push(&chunk).await?;
        }
        Ok(())
    }

    /// Removes every cached artifact whose sha256 is not in `keep`, and any
    /// left-over `.partial` or temporary file; returns the bytes freed. A
    /// download in progress keeps its `.partial` file.
    pub fn prune(&self, keep: &BTreeSet<String>) -> u64 {
        let keep: BTreeSet<String> = keep.iter().map(|s| s.to_ascii_lowercase()).collect();
        // Hashes being fetched right now: their `.partial` is alive.
        let live: BTreeSet<String> = {
            let mut busy = self.busy.lock().expect("not poisoned");
            busy.retain(|_, lock| Arc::strong_count(lock) > 1 || lock.try_lock().is_err());
            busy.keys().cloned().collect()
        };
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut freed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let unwanted = if is_sha256(name) {
                !keep.contains(name)
            } else {
                let leftover =
                    name.starts_with('.') && (name.ends_with(".partial") || name.ends_with(".tmp"));
                leftover && !live.iter().any(|hash| name.contains(hash.as_str()))
            };
            if unwanted && std::fs::remove_file(entry.path()).is_ok() {
                freed += meta.len();
            }
        }
        freed
    }
}

/// Caps on unpacking one archive, checked before anything is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Most bytes the entries may add up to (their header sizes); default 4 GiB.
    pub max_bytes: u64,
    /// Most entries; default 100 000.
    pub max_entries: u64,
    /// Bytes that must stay free on the destination's filesystem after unpacking; default 64 MiB.
    pub min_free_bytes: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits {
            max_bytes: 4 * GIB,
            max_entries: 100_000,
            min_free_bytes: 64 * MIB,
        }
    }
}

/// Permission bits never unpacked: setuid, setgid, sticky, and write for others.
const STRIPPED_MODE_BITS: u32 = 0o7002;
/// Symlinks followed while resolving one path, as Linux allows.
const MAX_SYMLINK_HOPS: usize = 40;
/// What tar may read beyond an entry's body before the next entry: its header and
/// extension headers (long names, pax). A larger extension header is refused
/// instead of being read into memory.
const HEADER_ALLOWANCE: u64 = MIB;

/// Counts decompressed bytes against a budget that the unpacker refills entry by
/// entry, so tar cannot be made to read an unbounded extension header.
struct Budgeted<R> {
    inner: R,
    budget: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R: Read> Read for Budgeted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.budget.get();
        if left == 0 {
            return Err(std::io::Error::other(
                "an extension header (long name or pax) is larger than 1 MiB",
            ));
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.budget.set(left - n as u64);
        Ok(n)
    }
}

type TarReader = tar::Archive<Budgeted<flate2::read::GzDecoder<std::fs::File>>>;

fn open_tar(
    archive: &Path,
) -> Result<(TarReader, std::rc::Rc<std::cell::Cell<u64>>), ArtifactError> {
    let file = std::fs::File::open(archive).map_err(io(archive))?;
    let budget = std::rc::Rc::new(std::cell::Cell::new(HEADER_ALLOWANCE));
    let reader = Budgeted {
        inner: flate2::read::GzDecoder::new(file),
        budget: budget.clone(),
    };
    Ok((tar::Archive::new(reader), budget))
}

/// What the archive has created so far, by physical path below the folder.
#[derive(Debug, Clone)]
enum Node {
    Dir,
    File,
    Symlink(PathBuf),
}

type Parts = Vec<OsString>;

fn show(parts: &[OsString]) -> String {
    if parts.is_empty() {
        return ".".into();
    }
    parts
        .iter()
        .map(|p| p.to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// An in-memory model of the tree an archive makes, so every link can be resolved
/// the way the kernel will resolve it (physically, through symlink chains) before
/// anything is written.
#[derive(Debug, Default)]
struct Model {
    nodes: HashMap<Parts, Node>,
    entries: u64,
    bytes: u64,
}

/// One archive entry, as the model sees it.
enum Kind {
    Dir,
    File,
    Symlink(PathBuf),
    HardLink(PathBuf),
    /// A pax global header: metadata, nothing to unpack.
    Skip,
}

impl Model {
    /// Counts an entry against the caps, at its header, before its body is read.
    fn count(&mut self, path: &Path, size: u64, limits: &UnpackLimits) -> Result<(), String> {
        self.entries += 1;
        self.bytes = self.bytes.saturating_add(size);
        if self.entries > limits.max_entries {
            return Err(format!(
                "more than {} entries (the unpack cap on entries), at `{}`; refusing the whole archive: ship fewer files, e.g. an archive inside the archive",
                limits.max_entries,
                path.display()
            ));
        }
        if self.bytes > limits.max_bytes {
            return Err(format!(
                "entry `{}` ({size} bytes) brings the unpacked size over {} bytes (the unpack cap on bytes); refusing the whole archive without unpacking it: ship a smaller artifact or raise the node's unpack limit",
                path.display(),
                limits.max_bytes
            ));
        }
        Ok(())
    }

    /// Adds an entry at `parts`: its folders must be real folders (not symlinks,
    /// not files), and it must not replace anything but a folder with a folder.
    fn add(&mut self, parts: &Parts, kind: &Kind) -> Result<(), String> {
        let name = show(parts);
        for end in 1..parts.len() {
            match self.nodes.get(&parts[..end]) {
                Some(Node::Dir) => {}
                Some(Node::Symlink(_)) => {
                    return Err(format!(
                        "entry `{name}` passes through the symlink `{}`; refusing the whole archive: put the entry at its real path",
                        show(&parts[..end])
                    ))
                }
                Some(Node::File) => {
                    return Err(format!(
                        "entry `{name}` is below `{}`, which is a file; refusing the whole archive",
                        show(&parts[..end])
                    ))
                }
                None => {
                    self.nodes.insert(parts[..end].to_vec(), Node::Dir);
                }
            }
        }
        let node = match kind {
            Kind::Dir => Node::Dir,
            Kind::File | Kind::HardLink(_) => Node::File,
            Kind::Symlink(target) => Node::Symlink(target.clone()),
            Kind::Skip => return Ok(()),
        };
        match (self.nodes.get(parts), &node) {
            (None, _) => {
                self.nodes.insert(parts.clone(), node);
                Ok(())
            }
            (Some(Node::Dir), Node::Dir) => Ok(()),
            (Some(_), _) => Err(format!(
                "entry `{name}` appears twice; refusing the whole archive: repack it without duplicates"
            )),
        }
    }

    /// Where `target`, read from the folder `from`, ends up: symlinks followed
    /// (at most 40 hops), `..` applied to the physical path. Err when it leaves the folder.
    fn resolve(&self, from: &[OsString], target: &Path) -> Result<Parts, String> {
        let mut current: Parts = from.to_vec();
        let mut pending = steps(target)?;
        let mut hops = 0;
        while let Some(step) = pending.pop_front() {
            let Some(name) = step else {
                if current.pop().is_none() {
                    return Err("it climbs above the folder".into());
                }
                continue;
            };
            current.push(name);
            match self.nodes.get(&current) {
                Some(Node::Symlink(next)) => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(format!(
                            "it goes through more than {MAX_SYMLINK_HOPS} symlinks (a loop?)"
                        ));
                    }
                    let via = show(&current);
                    current.pop();
                    // The link's target is read from the link's folder, then the rest follows.
                    let mut spliced = steps(next).map_err(|why| {
                        format!("it goes through `{via}` → `{}`, and {why}", next.display())
                    })?;
                    spliced.extend(pending);
                    pending = spliced;
                }
                Some(Node::File) if !pending.is_empty() => {
                    return Err(format!("it goes through the file `{}`", show(&current)));
                }
                _ => {}
            }
        }
        Ok(current)
    }
}

/// A relative path as steps: `Some(name)` goes down, `None` goes up; `.` vanishes.
fn steps(path: &Path) -> Result<VecDeque<Option<OsString>>, String> {
    let mut steps = VecDeque::new();
    for part in path.components() {
        match part {
            PathPart::CurDir => {}
            PathPart::ParentDir => steps.push_back(None),
            PathPart::Normal(name) => steps.push_back(Some(name.to_os_string())),
            PathPart::RootDir | PathPart::Prefix(_) => return Err("it is absolute".into()),
        }
    }
    Ok(steps)
}

/// An entry's path as parts below the folder, or None when it is absolute or has `..`.
fn entry_parts(path: &Path) -> Option<Parts> {
    let mut parts = Vec::new();
    for part in path.components() {
        match part {
            PathPart::Normal(name) => parts.push(name.to_os_string()),
            PathPart::CurDir => {}
            PathPart::ParentDir | PathPart::RootDir | PathPart::Prefix(_) => return None,
        }
    }
    Some(parts)
}

impl Model {
    /// Checks one entry by its header (its body is not read) and adds it to the model.
    fn entry<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        limits: &UnpackLimits,
    ) -> Result<Kind, String> {
        let path = entry
            .path()
            .map_err(|e| format!("unreadable entry name: {e}; the archive is damaged"))?
            .into_owned();
        self.count(&path, entry.size(), limits)?;
        let parts = entry_parts(&path).ok_or_else(|| {
            format!(
                "entry `{}` escapes its folder (absolute or `..`); refusing the whole archive",
                path.display()
            )
        })?;
        let header = entry.header().entry_type();
        let link = || -> Result<PathBuf, String> {
            match entry.link_name() {
                Ok(Some(target)) if !target.as_os_str().is_empty() => Ok(target.into_owned()),
                Ok(_) => Err(format!("link `{}` has no target", path.display())),
                Err(e) => Err(format!("bad link in `{}`: {e}", path.display())),
            }
        };
        let kind = if header.is_dir() {
            Kind::Dir
        } else if header.is_file() {
            Kind::File
        } else if header.is_symlink() {
            Kind::Symlink(link()?)
        } else if header.is_hard_link() {
            Kind::HardLink(link()?)
        } else if header.is_pax_global_extensions() {
            Kind::Skip
        } else {
            return Err(format!(
                "entry `{}` is a device, fifo or other special file; refusing the whole archive",
                path.display()
            ));
        };
        if parts.is_empty() && !matches!(kind, Kind::Dir | Kind::Skip) {
            return Err(format!(
                "entry `{}` has no name below the folder",
                path.display()
            ));
        }
        if let Kind::HardLink(target) = &kind {
            let points_at_file = entry_parts(target)
                .is_some_and(|target| matches!(self.nodes.get(&target), Some(Node::File)));
            if !points_at_file {
                return Err(format!(
                    "hard link `{}` → `{}` does not point at a regular file earlier in the archive; refusing the whole archive",
                    path.display(),
                    target.display()
                ));
            }
        }
        if !parts.is_empty() {
            self.add(&parts, &kind)?;
        }
        if let Kind::Symlink(target) = &kind {
            self.check_link(&parts, target)?;
        }
        Ok(kind)
    }

    fn check_link(&self, parts: &Parts, target: &Path) -> Result<(), String> {
        let from = &parts[..parts.len().saturating_sub(1)];
        self.resolve(from, target).map(|_| ()).map_err(|why| {
            format!(
                "link `{}` → `{}` points outside its folder ({why}); refusing the whole archive",
                show(parts),
                target.display()
            )
        })
    }

    /// Once the whole tree is known: a later link can redirect one that looked fine.
    fn check_all_links(&self) -> Result<(), String> {
        let mut links: Vec<(&Parts, &PathBuf)> = self
            .nodes
            .iter()
            .filter_map(|(parts, node)| match node {
                Node::Symlink(target) => Some((parts, target)),
                _ => None,
            })
            .collect();
        links.sort();
        for (parts, target) in links {
            self.check_link(parts, target)?;
        }
        Ok(())
    }
}

/// Walks the archive, checking every entry by its header. `each` sees every
/// entry that passed, and may read its body (pass 2) or not (pass 1, where tar
/// skips the body without keeping it).
fn walk(
    archive: &Path,
    limits: &UnpackLimits,
    mut each: impl FnMut(
        &mut tar::Entry<'_, Budgeted<flate2::read::GzDecoder<std::fs::File>>>,
        &Kind,
    ) -> Result<(), ArtifactError>,
    tune: impl FnOnce(&mut TarReader),
) -> Result<Model, ArtifactError> {
    let fail = |reason: String| ArtifactError::Archive {
        archive: archive.display().to_string(),
        reason,
    };
    let (mut tar, budget) = open_tar(archive)?;
    tune(&mut tar);
    let mut model = Model::default();
    let entries = tar.entries().map_err(|e| {
        fail(format!(
            "not a tar.gz ({e}); check that the artifact is a gzip-compressed tar"
        ))
    })?;
    for entry in entries {
        let mut entry = entry.map_err(|e| {
            fail(format!(
                "unreadable entry ({e}); the archive is damaged or truncated"
            ))
        })?;
        let kind = model.entry(&entry, limits).map_err(&fail)?;
        // The body, then the next headers, may be read; no more.
        budget.set(
            entry
                .size()
                .saturating_add(511)
                .saturating_add(HEADER_ALLOWANCE),
        );
        each(&mut entry, &kind)?;
    }
    model.check_all_links().map_err(fail)?;
    Ok(model)
}

/// The nearest existing folder at or above `path`, for a free-space check.
fn existing_ancestor(path: &Path) -> PathBuf {
    let mut at = path;
    loop {
        if at.is_dir() {
            return at.to_path_buf();
        }
        match at.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => at = parent,
            _ => return PathBuf::from("."),
        }
    }
}

/// Unpacks a tar.gz into `dest`, which should not exist yet.
///
/// Pass 1 writes nothing: it checks every entry by its header — absolute paths,
/// `..`, special files, caps on bytes and entries (stopping at the header that
/// crosses one, so a huge entry is not even decompressed), and every link
/// resolved through the tree the archive makes, so no symlink chain leads
/// outside — and then the free space on `dest`'s filesystem. Pass 2 unpacks
/// without ownership, with setuid, setgid, sticky and world-write bits stripped.
/// On any error `dest` is removed, so a bad archive changes nothing.
pub fn unpack_tar_gz(
    archive: &Path,
    dest: &Path,
    limits: &UnpackLimits,
) -> Result<(), ArtifactError> {
    let fail = |reason: String| ArtifactError::Archive {
        archive: archive.display().to_string(),
        reason,
    };
    let model = walk(archive, limits, |_, _| Ok(()), |_| {})?;
    let needed = model.bytes.saturating_add(limits.min_free_bytes);
    ensure_free(&existing_ancestor(dest), needed)?;
    std::fs::create_dir_all(dest).map_err(io(dest))?;
    let result = walk(
        archive,
        limits,
        |entry, kind| {
            if matches!(kind, Kind::Skip) {
                return Ok(());
            }
            let unpacked = entry.unpack_in(dest).map_err(|e| {
                fail(format!(
                    "unpacking failed ({}); nothing was kept",
                    error_chain(&e)
                ))
            })?;
            if !unpacked {
                return Err(fail("an entry would land outside the folder".into()));
            }
            Ok(())
        },
        |tar| {
            tar.set_preserve_permissions(false);
            tar.set_preserve_ownerships(false);
            tar.set_unpack_xattrs(false);
            tar.set_mask(STRIPPED_MODE_BITS);
            tar.set_overwrite(false);
        },
    );
    match result {
        Ok(_) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_dir_all(dest);
            Err(e)
        }
    }
}

/// [`unpack_tar_gz`] with the default caps.
pub fn unpack_tar_gz_default(archive: &Path, dest: &Path) -> Result<(), ArtifactError> {
    unpack_tar_gz(archive, dest, &UnpackLimits::default())
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(
        dir: &Path,
        build: impl FnOnce(&mut tar::Builder<flate2::write::GzEncoder<std::fs::File>>),
    ) -> PathBuf {
        let path = dir.join("a.tar.gz");
        let file = std::fs::File::create(&path).unwrap();
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            file,
            flate2::Compression::fast(),
        ));
        build(&mut builder);
        builder.into_inner().unwrap().finish().unwrap();
        path
    }

    fn artifact_at(url: &str, sha256: &str, size: Option<u64>) -> manifests::Artifact {
        manifests::Artifact {
            url: url.to_string(),
            sha256: sha256.to_string(),
            size,
        }
    }

    fn file_header(size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_size(size);
        header.set_mode(0o755);
        header.set_entry_type(tar::EntryType::Regular);
        header
    }

    /// Writes a raw name into the header, bypassing tar's own checks, as an attacker would.
    fn raw_name(header: &mut tar::Header, name: &str) {
        let bytes = name.as_bytes();
        let gnu = header.as_gnu_mut().unwrap();
        gnu.name[..bytes.len()].copy_from_slice(bytes);
        header.set_cksum();
    }

    #[test]
    fn unpacks_a_good_archive() {
        let tmp = tempfile::tempdir().unwrap();
        let path = archive(tmp.path(), |b| {
            let mut h = file_header(3);
            b.append_data(&mut h, "bin/tool", &b"hi\n"[..]).unwrap();
            let mut link = tar::Header::new_gnu();
            link.set_entry_type(tar::EntryType::Symlink);
            link.set_size(0);
            b.append_link(&mut link, "bin/alias", "tool").unwrap();
        });
        let dest = tmp.path().join("out");
        unpack_tar_gz_default(&path, &dest).unwrap();
        assert_eq!(
            std::fs::read_to_string(dest.join("bin/tool")).unwrap(),
            "hi\n"
        );
        assert!(dest.join("bin/alias").is_symlink());
    }

    #[test]
    fn refuses_escaping_entries_and_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        for (name, evil) in [("dotdot", "../evil"), ("absolute", "/tmp/evil")] {
            let path = archive(tmp.path(), |b| {
                let mut ok = file_header(2);
                b.append_data(&mut ok, "fine", &b"ok"[..]).unwrap();
                let mut h = file_header(4);
                raw_name(&mut h, evil);
                b.append(&h, &b"evil"[..]).unwrap();
            });
            let dest = tmp.path().join(name);
            let err = unpack_tar_gz_default(&path, &dest).unwrap_err().to_string();
            assert!(err.contains("escapes its folder"), "{err}");
            assert!(!dest.exists(), "nothing may be written for {name}");
        }
        let path = archive(tmp.path(), |b| {
            let mut link = tar::Header::new_gnu();
            link.set_entry_type(tar::EntryType::Symlink);
            link.set_size(0);
            b.append_link(&mut link, "bin/passwd", "../../etc/passwd")
                .unwrap();
        });
        let dest = tmp.path().join("link");
        let err = unpack_tar_gz_default(&path, &dest).unwrap_err().to_string();
        assert!(err.contains("points outside"), "{err}");
        assert!(!dest.exists());
    }

    #[tokio::test]
    async fn verifies_hash_before_caching() {
        let tmp = tempfile::tempdir().unwrap();
        let source = tmp.path().join("payload");
        std::fs::write(&source, b"payload").unwrap();
        let good = sha256_file(&source).unwrap();
        let cache = ArtifactCache::new(tmp.path().join("cache"), reqwest::Client::new());
        let url = format!("file://{}", source.display());
        let wrong = "0".repeat(64);
        let err = cache
            .fetch(&artifact_at(&url, &wrong, None))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("sha256 mismatch"), "{err}");
        assert!(!cache.path_of(&wrong).exists());
        let path = cache.fetch(&artifact_at(&url, &good, None)).await.unwrap();
        assert_eq!(std::fs::read(path).unwrap(), b"payload");
        // Cached by hash: the source can go away.
        std::fs::remove_file(&source).unwrap();
        assert!(cache.fetch(&artifact_at(&url, &good, None)).await.is_ok());
    }

    // ---- downloads ----

    use std::time::Instant as StdInstant;
    use tokio::net::{TcpListener, TcpStream};

    /// A test server on 127.0.0.1: every connection is handed to `handle`.
    async fn server<F, Fut>(handle: F) -> String
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(handle(stream));
            }
        });
        format!("http://{addr}/artifact.tar.gz")
    }

    /// Reads the request head, so the client is waiting for the answer.
    async fn read_request(stream: &mut TcpStream) {
        let mut seen = Vec::new();
        let mut buffer = [0u8; 1024];
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buffer[..n]),
            }
        }
    }

    fn test_cache(dir: &Path, tune: impl FnOnce(&mut DownloadLimits)) -> ArtifactCache {
        let mut limits = DownloadLimits {
            min_free_bytes: 0,
            ..DownloadLimits::default()
        };
        tune(&mut limits);
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        ArtifactCache::new(dir.join("cache"), http).with_limits(limits)
    }

    fn partials(cache: &ArtifactCache) -> Vec<String> {
        std::fs::read_dir(&cache.dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|name| name.ends_with(".partial"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The fetch's error, which must come well within `within`.
    async fn fetch_err(
        cache: &ArtifactCache,
        artifact: &manifests::Artifact,
        within: Duration,
    ) -> ArtifactError {
        tokio::time::timeout(within, cache.fetch(artifact))
            .await
            .expect("the fetch must fail in time, not hang")
            .expect_err("the fetch must fail")
    }

    const ANY_SHA: &str = "1111111111111111111111111111111111111111111111111111111111111111";

    #[tokio::test]
    async fn a_server_that_never_answers_fails_at_the_read_idle_timeout() {
        let tmp = tempfile::tempdir().unwrap();
        let url = server(|mut stream| async move {
            read_request(&mut stream).await;
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(stream);
        })
        .await;
        let cache = test_cache(tmp.path(), |l| {
            l.read_idle_timeout = Duration::from_millis(300)
        });
        let err = fetch_err(
            &cache,
            &artifact_at(&url, ANY_SHA, None),
            Duration::from_secs(10),
        )
        .await
        .to_string();
        assert!(
            err.contains(&url) && err.contains("read-idle") && err.contains("300ms"),
            "{err}"
        );
        assert!(partials(&cache).is_empty());
    }

    #[tokio::test]
    async fn a_dripping_body_fails_at_the_read_idle_timeout() {
        let tmp = tempfile::tempdir().unwrap();
        let url = server(|mut stream| async move {
            read_request(&mut stream).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
                .await;
            loop {
                if stream.write_all(b"x").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
        .await;
        let cache = test_cache(tmp.path(), |l| {
            l.read_idle_timeout = Duration::from_millis(300)
        });
        let err = fetch_err(
            &cache,
            &artifact_at(&url, ANY_SHA, None),
            Duration::from_secs(10),
        )
        .await
        .to_string();
        assert!(
            err.contains(&url) && err.contains("stalled") && err.contains("read-idle"),
            "{err}"
        );
        assert!(partials(&cache).is_empty());

        // The same drip with a generous idle timeout runs into the total one.
        let cache = test_cache(tmp.path(), |l| {
            l.read_idle_timeout = Duration::from_secs(20);
            l.total_timeout = Duration::from_millis(500);
        });
        let err = fetch_err(
            &cache,
            &artifact_at(&url, ANY_SHA, None),
            Duration::from_secs(10),
        )
        .await
        .to_string();
        assert!(err.contains(&url) && err.contains("total timeout"), "{err}");
        assert!(partials(&cache).is_empty());
    }

    #[tokio::test]
    async fn an_endless_body_stops_at_max_bytes_and_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let url = server(|mut stream| async move {
            read_request(&mut stream).await;
            let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
            if stream.write_all(head).await.is_err() {
                return;
            }
            let mut chunk = b"10000\r\n".to_vec();
            chunk.extend(std::iter::repeat_n(b'z', 0x10000));
            chunk.extend_from_slice(b"\r\n");
            while stream.write_all(&chunk).await.is_ok() {}
        })
        .await;
        let cache = test_cache(tmp.path(), |l| l.max_bytes = MIB);
        let err = fetch_err(
            &cache,
            &artifact_at(&url, ANY_SHA, None),
            Duration::from_secs(20),
        )
        .await
        .to_string();
        assert!(
            err.contains("--max-artifact-bytes (1048576 bytes)"),
            "{err}"
        );
        assert!(partials(&cache).is_empty());
        assert!(!cache.path_of(ANY_SHA).exists());
    }

    #[tokio::test]
    async fn a_content_length_over_the_limit_is_refused_before_the_body() {
        let tmp = tempfile::tempdir().unwrap();
        // Announces 10 GB and never sends a byte of it: reading the body would stall.
        let url = server(|mut stream| async move {
            read_request(&mut stream).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000000\r\n\r\n")
                .await;
            tokio::time::sleep(Duration::from_secs(3600)).await;
        })
        .await;
        let cache = test_cache(tmp.path(), |l| {
            l.read_idle_timeout = Duration::from_secs(60)
        });
        let err = fetch_err(
            &cache,
            &artifact_at(&url, ANY_SHA, None),
            Duration::from_secs(10),
        )
        .await
        .to_string();
        assert!(
            err.contains("Content-Length") && err.contains("--max-artifact-bytes"),
            "{err}"
        );
        let err = fetch_err(
            &cache,
            &artifact_at(&url, ANY_SHA, Some(1000)),
            Duration::from_secs(10),
        )
        .await
        .to_string();
        assert!(err.contains("artifact.size of 1000 bytes"), "{err}");
        assert!(partials(&cache).is_empty());
    }

    #[tokio::test]
    async fn a_file_of_another_size_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let source = tmp.path().join("payload");
        std::fs::write(&source, b"payload").unwrap();
        let sha = sha256_file(&source).unwrap();
        let url = format!("file://{}", source.display());
        let cache = test_cache(tmp.path(), |_| {});
        // Larger than pinned: stopped at the pinned size.
        let err = fetch_err(
            &cache,
            &artifact_at(&url, &sha, Some(5)),
            Duration::from_secs(10),
        )
        .await;
        assert!(
            err.to_string().contains("artifact.size of 5 bytes"),
            "{err}"
        );
        // Smaller than pinned.
        let err = fetch_err(
            &cache,
            &artifact_at(&url, &sha, Some(9)),
            Duration::from_secs(10),
        )
        .await;
        assert!(
            matches!(
                err,
                ArtifactError::SizeMismatch {
                    expected: 9,
                    actual: 7,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("size mismatch"), "{err}");
        assert!(!cache.path_of(&sha).exists());
        assert!(partials(&cache).is_empty());

        // Over HTTP without a Content-Length: the size is known only at the end.
        let url = server(|mut stream| async move {
            read_request(&mut stream).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\npayload\r\n0\r\n\r\n")
                .await;
        })
        .await;
        let err = fetch_err(
            &cache,
            &artifact_at(&url, &sha, Some(9)),
            Duration::from_secs(10),
        )
        .await;
        assert!(
            matches!(err, ArtifactError::SizeMismatch { actual: 7, .. }),
            "{err}"
        );
        let err = fetch_err(
            &cache,
            &artifact_at(&url, &sha, Some(6)),
            Duration::from_secs(10),
        )
        .await;
        assert!(
            err.to_string().contains("artifact.size of 6 bytes"),
            "{err}"
        );
        assert!(partials(&cache).is_empty());
        // The right size is accepted.
        let path = cache
            .fetch(&artifact_at(&url, &sha, Some(7)))
            .await
            .unwrap();
        assert_eq!(std::fs::read(path).unwrap(), b"payload");
    }

    #[tokio::test]
    async fn dev_zero_is_refused_at_the_limit() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = test_cache(tmp.path(), |l| l.max_bytes = MIB);
        let err = fetch_err(
            &cache,
            &artifact_at("file:///dev/zero", ANY_SHA, None),
            Duration::from_secs(10),
        )
        .await
        .to_string();
        assert!(
            err.contains("--max-artifact-bytes (1048576 bytes)"),
            "{err}"
        );
        let err = fetch_err(
            &cache,
            &artifact_at("file:///dev/zero", ANY_SHA, Some(4096)),
            Duration::from_secs(10),
        )
        .await
        .to_string();
        assert!(err.contains("artifact.size of 4096 bytes"), "{err}");
        assert!(partials(&cache).is_empty());
    }

    #[tokio::test]
    async fn a_cancelled_fetch_leaves_no_partial_file() {
        let tmp = tempfile::tempdir().unwrap();
        let url = server(|mut stream| async move {
            read_request(&mut stream).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n")
                .await;
            let _ = stream.write_all(&[7u8; 65536]).await;
            tokio::time::sleep(Duration::from_secs(3600)).await;
        })
        .await;
        let cache = test_cache(tmp.path(), |l| {
            l.read_idle_timeout = Duration::from_secs(60)
        });
        let partial = cache.partial_of(ANY_SHA);
        let task = tokio::spawn({
            let cache = cache.clone();
            let artifact = artifact_at(&url, ANY_SHA, None);
            async move { cache.fetch(&artifact).await }
        });
        let deadline = StdInstant::now() + Duration::from_secs(10);
        while std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0) == 0 {
            assert!(StdInstant::now() < deadline, "the download never started");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        assert!(!partial.exists(), "the guard removes the .partial file");
    }

    #[tokio::test]
    async fn stale_partials_and_wrong_sized_cache_entries_are_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let source = tmp.path().join("payload");
        std::fs::write(&source, b"payload").unwrap();
        let sha = sha256_file(&source).unwrap();
        let url = format!("file://{}", source.display());
        let cache = test_cache(tmp.path(), |_| {});
        std::fs::create_dir_all(&cache.dir).unwrap();
        std::fs::write(cache.partial_of(&sha), b"left by a crash").unwrap();
        std::fs::write(cache.path_of(&sha), b"truncated").unwrap();
        let path = cache
            .fetch(&artifact_at(&url, &sha, Some(7)))
            .await
            .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"payload");
        assert!(partials(&cache).is_empty());
    }

    #[tokio::test]
    async fn too_little_free_space_is_its_own_error() {
        let tmp = tempfile::tempdir().unwrap();
        let source = tmp.path().join("payload");
        std::fs::write(&source, b"payload").unwrap();
        let sha = sha256_file(&source).unwrap();
        let url = format!("file://{}", source.display());
        let cache = test_cache(tmp.path(), |l| l.min_free_bytes = u64::MAX / 2);
        let err = fetch_err(
            &cache,
            &artifact_at(&url, &sha, None),
            Duration::from_secs(10),
        )
        .await;
        assert!(matches!(err, ArtifactError::NoSpace { .. }), "{err}");
        assert!(
            err.to_string().contains(&cache.dir.display().to_string()),
            "{err}"
        );
        assert!(partials(&cache).is_empty());
    }

    #[test]
    fn prune_keeps_what_is_asked() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = test_cache(tmp.path(), |_| {});
        std::fs::create_dir_all(&cache.dir).unwrap();
        let (a, b, c) = ("a".repeat(64), "b".repeat(64), "c".repeat(64));
        std::fs::write(cache.path_of(&a), b"aaaa").unwrap();
        std::fs::write(cache.path_of(&b), b"bbbbbb").unwrap();
        std::fs::write(cache.path_of(&c), b"cc").unwrap();
        std::fs::write(cache.partial_of(&a), b"xyz").unwrap();
        let keep = BTreeSet::from([a.to_ascii_uppercase(), c.clone()]);
        assert_eq!(cache.prune(&keep), 6 + 3);
        assert!(cache.path_of(&a).exists() && cache.path_of(&c).exists());
        assert!(!cache.path_of(&b).exists());
        assert!(partials(&cache).is_empty());
        assert_eq!(cache.prune(&keep), 0);
    }

    // ---- unpacking ----

    fn symlink(
        b: &mut tar::Builder<flate2::write::GzEncoder<std::fs::File>>,
        path: &str,
        target: &str,
    ) {
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_size(0);
        b.append_link(&mut link, path, target).unwrap();
    }

    fn dir(b: &mut tar::Builder<flate2::write::GzEncoder<std::fs::File>>, path: &str, mode: u32) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(mode);
        h.set_size(0);
        b.append_data(&mut h, path, std::io::empty()).unwrap();
    }

    fn refused(path: &Path, dest: &Path, limits: &UnpackLimits, needle: &str) {
        let started = StdInstant::now();
        let err = unpack_tar_gz(path, dest, limits).unwrap_err();
        assert!(matches!(err, ArtifactError::Archive { .. }), "{err}");
        let err = err.to_string();
        assert!(err.contains(needle), "expected `{needle}` in: {err}");
        assert!(
            !dest.exists(),
            "nothing may be left for a refused archive: {err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "refusing took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_huge_entry_is_refused_at_its_header() {
        let tmp = tempfile::tempdir().unwrap();
        // An 8 GiB entry whose body is not even there: refused without reading it.
        let path = tmp.path().join("fake.tar.gz");
        let mut gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&path).unwrap(),
            flate2::Compression::fast(),
        );
        let mut h = file_header(8 * GIB);
        h.set_path("big").unwrap();
        h.set_cksum();
        std::io::Write::write_all(&mut gz, h.as_bytes()).unwrap();
        std::io::Write::write_all(&mut gz, &[0u8; 4096]).unwrap();
        gz.finish().unwrap();
        refused(
            &path,
            &tmp.path().join("fake"),
            &UnpackLimits::default(),
            "over 4294967296 bytes (the unpack cap on bytes)",
        );

        // A real bomb: 32 MiB of zeros squeezed into a few KiB, under an 8 MiB cap.
        let path = archive(tmp.path(), |b| {
            let mut ok = file_header(2);
            b.append_data(&mut ok, "fine", &b"ok"[..]).unwrap();
            let mut h = file_header(32 * MIB);
            b.append_data(&mut h, "zeros", std::io::repeat(0).take(32 * MIB))
                .unwrap();
        });
        assert!(std::fs::metadata(&path).unwrap().len() < MIB);
        let limits = UnpackLimits {
            max_bytes: 8 * MIB,
            ..UnpackLimits::default()
        };
        refused(
            &path,
            &tmp.path().join("bomb"),
            &limits,
            "entry `zeros` (33554432 bytes)",
        );
    }

    #[test]
    fn too_many_entries_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = archive(tmp.path(), |b| {
            for i in 0..20 {
                let mut h = file_header(1);
                b.append_data(&mut h, format!("f{i}"), &b"x"[..]).unwrap();
            }
        });
        let limits = UnpackLimits {
            max_entries: 10,
            ..UnpackLimits::default()
        };
        refused(
            &path,
            &tmp.path().join("many"),
            &limits,
            "more than 10 entries",
        );
        unpack_tar_gz_default(&path, &tmp.path().join("fine")).unwrap();
    }

    #[test]
    fn too_little_free_space_refuses_before_unpacking() {
        let tmp = tempfile::tempdir().unwrap();
        let path = archive(tmp.path(), |b| {
            let mut h = file_header(2);
            b.append_data(&mut h, "fine", &b"ok"[..]).unwrap();
        });
        let dest = tmp.path().join("full");
        let limits = UnpackLimits {
            min_free_bytes: u64::MAX / 2,
            ..UnpackLimits::default()
        };
        let err = unpack_tar_gz(&path, &dest, &limits).unwrap_err();
        assert!(matches!(err, ArtifactError::NoSpace { .. }), "{err}");
        assert!(!dest.exists());
    }

    #[test]
    fn special_mode_bits_are_stripped() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let path = archive(tmp.path(), |b| {
            for (name, mode) in [
                ("setuid", 0o4755),
                ("setgid", 0o2755),
                ("open", 0o777),
                ("plain", 0o755),
            ] {
                let mut h = file_header(1);
                h.set_mode(mode);
                b.append_data(&mut h, name, &b"x"[..]).unwrap();
            }
            dir(b, "shared", 0o1777);
        });
        let dest = tmp.path().join("out");
        unpack_tar_gz_default(&path, &dest).unwrap();
        let mode = |name: &str| {
            std::fs::metadata(dest.join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("setuid"), 0o755);
        assert_eq!(mode("setgid"), 0o755);
        assert_eq!(mode("open"), 0o775);
        assert_eq!(mode("plain"), 0o755);
        assert_eq!(mode("shared"), 0o775);
    }

    #[test]
    fn symlink_chains_cannot_leave_the_folder() {
        let tmp = tempfile::tempdir().unwrap();
        for (name, target) in [
            ("short", "a/a/../../../etc"),
            ("lexically-fine", "a/a/a/../../../etc"),
        ] {
            let path = archive(tmp.path(), |b| {
                symlink(b, "a", ".");
                symlink(b, "esc", target);
            });
            refused(
                &path,
                &tmp.path().join(name),
                &UnpackLimits::default(),
                "points outside",
            );
        }
        // Through a directory symlink: `sub/up` is the folder itself, so
        // `sub/up/sub/up/..` climbs out although it looks four levels deep.
        let path = archive(tmp.path(), |b| {
            dir(b, "sub", 0o755);
            symlink(b, "sub/up", "..");
            symlink(b, "x", "sub/up/sub/up/..");
        });
        refused(
            &path,
            &tmp.path().join("via-dir"),
            &UnpackLimits::default(),
            "link `x`",
        );
        // A link that looked fine until a later entry redirected its folder.
        let path = archive(tmp.path(), |b| {
            dir(b, "d", 0o755);
            symlink(b, "l", "d/x/../..");
            symlink(b, "d/x", "..");
        });
        refused(
            &path,
            &tmp.path().join("later"),
            &UnpackLimits::default(),
            "link `l`",
        );
        // An entry written through a symlink.
        let path = archive(tmp.path(), |b| {
            dir(b, "sub", 0o755);
            symlink(b, "d", "sub");
            let mut h = file_header(1);
            b.append_data(&mut h, "d/file", &b"x"[..]).unwrap();
        });
        refused(
            &path,
            &tmp.path().join("through"),
            &UnpackLimits::default(),
            "passes through the symlink `d`",
        );
        // Hard links only to regular files already in the archive.
        for (name, target) in [
            ("hard-missing", "nowhere"),
            ("hard-to-link", "s"),
            ("hard-up", "../etc/passwd"),
        ] {
            let path = archive(tmp.path(), |b| {
                symlink(b, "s", "file");
                let mut h = file_header(1);
                b.append_data(&mut h, "file", &b"x"[..]).unwrap();
                let mut link = tar::Header::new_gnu();
                link.set_entry_type(tar::EntryType::Link);
                link.set_size(0);
                b.append_link(&mut link, "hard", target).unwrap();
            });
            refused(
                &path,
                &tmp.path().join(name),
                &UnpackLimits::default(),
                "hard link `hard`",
            );
        }
    }

    #[test]
    fn links_that_stay_inside_still_work() {
        let tmp = tempfile::tempdir().unwrap();
        let path = archive(tmp.path(), |b| {
            // Links before what they point at, as archives often have them.
            symlink(b, "lib/libfoo.so", "libfoo.so.1");
            symlink(b, "lib/libfoo.so.1", "libfoo.so.1.2");
            let mut h = file_header(3);
            b.append_data(&mut h, "lib/libfoo.so.1.2", &b"elf"[..])
                .unwrap();
            symlink(b, "current", "lib");
            symlink(b, "bin/lib", "../current");
            symlink(b, "bin/foo", "lib/libfoo.so");
            let mut link = tar::Header::new_gnu();
            link.set_entry_type(tar::EntryType::Link);
            link.set_size(0);
            b.append_link(&mut link, "bin/hard", "lib/libfoo.so.1.2")
                .unwrap();
        });
        let dest = tmp.path().join("out");
        unpack_tar_gz_default(&path, &dest).unwrap();
        assert_eq!(std::fs::read(dest.join("bin/foo")).unwrap(), b"elf");
        assert_eq!(std::fs::read(dest.join("bin/hard")).unwrap(), b"elf");
        assert_eq!(
            std::fs::read(dest.join("current/libfoo.so")).unwrap(),
            b"elf"
        );
    }

    #[test]
    fn a_huge_long_name_is_not_read_into_memory() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("longname.tar.gz");
        let mut gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&path).unwrap(),
            flate2::Compression::fast(),
        );
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_size(8 * MIB);
        raw_name(&mut h, "././@LongLink");
        std::io::Write::write_all(&mut gz, h.as_bytes()).unwrap();
        std::io::copy(&mut std::io::repeat(b'a').take(8 * MIB), &mut gz).unwrap();
        gz.finish().unwrap();
        refused(
            &path,
            &tmp.path().join("out"),
            &UnpackLimits::default(),
            "larger than 1 MiB",
        );
    }

    #[test]
    fn archives_made_from_dot_unpack() {
        let tmp = tempfile::tempdir().unwrap();
        let path = archive(tmp.path(), |b| {
            dir(b, "./", 0o755);
            dir(b, "./bin/", 0o755);
            let mut h = file_header(3);
            b.append_data(&mut h, "./bin/tool", &b"hi\n"[..]).unwrap();
            symlink(b, "./tool", "bin/./tool");
        });
        let dest = tmp.path().join("out");
        unpack_tar_gz_default(&path, &dest).unwrap();
        assert_eq!(std::fs::read(dest.join("tool")).unwrap(), b"hi\n");
    }
}
