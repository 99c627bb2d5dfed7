//! Artifacts: streamed download, SHA-256 verified before anything is touched,
//! cached by hash; and tar.gz extraction that refuses to leave its folder.

use std::io::Read;
use std::path::{Component as PathPart, Path, PathBuf};

use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// Why an artifact could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The download failed.
    #[error("download of {url} failed: {reason}")]
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
    /// The archive is unsafe or unreadable.
    #[error("archive {archive}: {reason}")]
    Archive {
        /// The archive.
        archive: String,
        /// Why.
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

/// A content-addressed cache of verified artifacts.
#[derive(Debug, Clone)]
pub struct ArtifactCache {
    dir: PathBuf,
    http: reqwest::Client,
}

impl ArtifactCache {
    /// A cache in `dir` (created when needed).
    pub fn new(dir: PathBuf, http: reqwest::Client) -> Self {
        ArtifactCache { dir, http }
    }

    /// Where a verified artifact with this hash lives.
    pub fn path_of(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256.to_ascii_lowercase())
    }

    /// The verified file for (`url`, `sha256`): from the cache, or downloaded,
    /// hashed while streaming, and moved into the cache only when the hash matches.
    pub async fn fetch(&self, url: &str, sha256: &str) -> Result<PathBuf, ArtifactError> {
        let expected = sha256.to_ascii_lowercase();
        let target = self.path_of(&expected);
        if target.exists() {
            return Ok(target);
        }
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(io(&self.dir))?;
        let partial = self.dir.join(format!(".{expected}.partial"));
        let mut file = tokio::fs::File::create(&partial)
            .await
            .map_err(io(&partial))?;
        let mut hasher = Sha256::new();
        let download = |reason: String| ArtifactError::Download {
            url: url.to_string(),
            reason,
        };
        if let Some(local) = url.strip_prefix("file://") {
            let mut source = tokio::fs::File::open(local)
                .await
                .map_err(|e| download(e.to_string()))?;
            let mut buffer = vec![0u8; 64 * 1024];
            loop {
                let n = tokio::io::AsyncReadExt::read(&mut source, &mut buffer)
                    .await
                    .map_err(|e| download(e.to_string()))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buffer[..n]);
                file.write_all(&buffer[..n]).await.map_err(io(&partial))?;
            }
        } else {
            let response = self
                .http
                .get(url)
                .send()
                .await
                .map_err(|e| download(e.to_string()))?;
            if !response.status().is_success() {
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(download(format!("HTTP {}", response.status())));
            }
            let mut stream = response.bytes_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = match chunk {
                    Ok(chunk) => chunk,
                    Err(e) => {
                        let _ = tokio::fs::remove_file(&partial).await;
                        return Err(download(e.to_string()));
                    }
                };
                hasher.update(&chunk);
                file.write_all(&chunk).await.map_err(io(&partial))?;
            }
        }
        file.sync_all().await.map_err(io(&partial))?;
        drop(file);
        let actual = hex::encode(hasher.finalize());
        if actual != expected {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(ArtifactError::Mismatch {
                url: url.to_string(),
                expected,
                actual,
            });
        }
        tokio::fs::rename(&partial, &target)
            .await
            .map_err(io(&target))?;
        Ok(target)
    }
}

/// Checks that an archive path stays inside the folder: relative, no `..`.
fn inside(path: &Path) -> bool {
    path.components()
        .all(|part| matches!(part, PathPart::Normal(_) | PathPart::CurDir))
}

/// Unpacks a tar.gz into `dest`, which must not exist yet. Every entry is
/// checked first: absolute paths, `..`, and links pointing outside are refused,
/// and on any error `dest` is removed, so a bad archive changes nothing.
pub fn unpack_tar_gz(archive: &Path, dest: &Path) -> Result<(), ArtifactError> {
    let fail = |reason: String| ArtifactError::Archive {
        archive: archive.display().to_string(),
        reason,
    };
    // Pass 1: validate every entry before writing anything.
    {
        let file = std::fs::File::open(archive).map_err(io(archive))?;
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
        for entry in tar
            .entries()
            .map_err(|e| fail(format!("not a tar.gz: {e}")))?
        {
            let entry = entry.map_err(|e| fail(format!("unreadable entry: {e}")))?;
            let path = entry
                .path()
                .map_err(|e| fail(format!("bad entry name: {e}")))?
                .into_owned();
            if !inside(&path) {
                return Err(fail(format!(
                    "entry `{}` escapes its folder (absolute or `..`); refusing the whole archive",
                    path.display()
                )));
            }
            let kind = entry.header().entry_type();
            if kind.is_symlink() || kind.is_hard_link() {
                let target = entry
                    .link_name()
                    .map_err(|e| fail(format!("bad link in `{}`: {e}", path.display())))?
                    .ok_or_else(|| fail(format!("link `{}` has no target", path.display())))?
                    .into_owned();
                // A symlink resolves from its own folder, a hard link from the archive root.
                let resolved = if kind.is_symlink() {
                    path.parent().unwrap_or(Path::new("")).join(&target)
                } else {
                    target.clone()
                };
                if target.is_absolute() || !stays_inside(&resolved) {
                    return Err(fail(format!(
                        "link `{}` → `{}` points outside its folder; refusing the whole archive",
                        path.display(),
                        target.display()
                    )));
                }
            } else if !(kind.is_file() || kind.is_dir()) {
                return Err(fail(format!(
                    "entry `{}` is a device, fifo or other special file",
                    path.display()
                )));
            }
        }
    }
    // Pass 2: unpack into a fresh folder; remove it on any failure.
    std::fs::create_dir_all(dest).map_err(io(dest))?;
    let result = (|| {
        let file = std::fs::File::open(archive).map_err(io(archive))?;
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
        tar.set_preserve_permissions(true);
        tar.set_overwrite(false);
        for entry in tar.entries().map_err(|e| fail(e.to_string()))? {
            let mut entry = entry.map_err(|e| fail(e.to_string()))?;
            let unpacked = entry.unpack_in(dest).map_err(|e| fail(e.to_string()))?;
            if !unpacked {
                return Err(fail("an entry would land outside the folder".into()));
            }
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(dest);
    }
    result
}

/// True when a relative path, with `..` applied lexically, never climbs above its start.
fn stays_inside(path: &Path) -> bool {
    let mut depth: i64 = 0;
    for part in path.components() {
        match part {
            PathPart::Normal(_) => depth += 1,
            PathPart::CurDir => {}
            PathPart::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            PathPart::RootDir | PathPart::Prefix(_) => return false,
        }
    }
    true
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
        unpack_tar_gz(&path, &dest).unwrap();
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
            let err = unpack_tar_gz(&path, &dest).unwrap_err().to_string();
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
        let err = unpack_tar_gz(&path, &dest).unwrap_err().to_string();
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
        let err = cache.fetch(&url, &wrong).await.unwrap_err().to_string();
        assert!(err.contains("sha256 mismatch"), "{err}");
        assert!(!cache.path_of(&wrong).exists());
        let path = cache.fetch(&url, &good).await.unwrap();
        assert_eq!(std::fs::read(path).unwrap(), b"payload");
        // Cached by hash: the source can go away.
        std::fs::remove_file(&source).unwrap();
        assert!(cache.fetch(&url, &good).await.is_ok());
    }
}
