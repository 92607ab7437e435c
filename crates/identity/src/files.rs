//! Secrets at rest: directories holding keys or tokens are 0700, the files 0600. Checked at
//! start, so a store or key that others can read is refused instead of used.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A secret's file or directory is readable by others, or cannot be checked.
#[derive(Debug, thiserror::Error)]
pub enum FileModeError {
    /// Group or others have access.
    #[error(
        "{path}: mode {mode:04o} lets group or others read it; it holds secrets (keys or tokens) and must be owner-only: chmod {want:o} {path}"
    )]
    Open {
        /// The file or directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// What it should be.
        want: u32,
    },
    /// Reading metadata, creating or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> FileModeError + '_ {
    move |source| FileModeError::Io {
        path: path.into(),
        source,
    }
}

/// Fails if `path` exists and group or others have any access to it.
pub fn check_private(path: &Path) -> Result<(), FileModeError> {
    match std::fs::metadata(path) {
        Ok(m) => {
            let mode = m.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                return Err(FileModeError::Open {
                    path: path.into(),
                    mode,
                    want: if m.is_dir() { 0o700 } else { 0o600 },
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path)(e)),
    }
}

/// Creates `dir` (and missing parents) mode 0700, or checks that the existing one is
/// owner-only.
pub fn private_dir(dir: &Path) -> Result<(), FileModeError> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
    }
    check_private(dir)
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename), mode 0600.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), FileModeError> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    // An older file of that name may have been created with other bits.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Makes an existing file owner-only (0600).
pub fn restrict(path: &Path) -> Result<(), FileModeError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_created_and_checked() {
        let dir = std::env::temp_dir().join(format!("trellis-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let inner = dir.join("a/b");
        private_dir(&inner).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&inner), 0o700);
        let f = inner.join("key");
        write_private(&f, b"secret").unwrap();
        assert_eq!(mode(&f), 0o600);
        check_private(&f).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = check_private(&f).unwrap_err().to_string();
        assert!(e.contains("0644") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(
            private_dir(&inner)
                .unwrap_err()
                .to_string()
                .contains("chmod 700")
        );
        // Missing files are fine (created later, owner-only).
        check_private(&inner.join("none")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
