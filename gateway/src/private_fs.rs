//! Files and directories only the gateway's user may read: the data
//! directory (0700), the SQLite database with its `-wal` and `-shm` files
//! and the webhook key (0600), whatever the process umask. A umask can only
//! take permissions away, so creating with these modes is enough for new
//! files; existing ones that are wider (made by an older version, or by
//! hand) are narrowed, with a warning if that is not allowed.

use std::io;
use std::path::Path;

/// Create `dir` and any missing parents with mode 0700, and narrow `dir`
/// itself to 0700 if it exists with more.
pub fn create_dir(dir: &Path) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)?;
    narrow(dir, 0o700);
    Ok(())
}

/// Make sure the SQLite database at `path` is private before SQLite opens
/// it: its directory 0700, the file created empty with 0600 if missing
/// (SQLite gives its `-wal` and `-shm` files the database file's mode), and
/// existing files narrowed to 0600.
pub fn prepare_sqlite(path: &Path) -> io::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir(parent)?;
    }
    let mut options = std::fs::OpenOptions::new();
    // Never truncates: an existing database is only opened.
    options.write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    drop(options.open(path)?);
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        narrow(Path::new(&p), 0o600);
    }
    Ok(())
}

/// Take group and other permissions off `path` (to at most `mode`) if it
/// exists and has any; a failure is a warning, not an error: the file may
/// belong to someone else (a mounted volume) and still be usable.
fn narrow(path: &Path, mode: u32) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        let current = meta.permissions().mode() & 0o777;
        if current & !mode == 0 {
            return;
        }
        if let Err(e) =
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(current & mode))
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot make this private to the gateway's user; chmod it");
        }
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn new_and_existing_paths_end_private() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("a/b/data");
        let db = data.join("vendgate.db");
        prepare_sqlite(&db).unwrap();
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(data.parent().unwrap()), 0o700);
        assert_eq!(mode(&db), 0o600);

        // Wider ones from before are narrowed; contents are kept.
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(&db, b"keep").unwrap();
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
        let wal = data.join("vendgate.db-wal");
        std::fs::write(&wal, b"").unwrap();
        std::fs::set_permissions(&wal, std::fs::Permissions::from_mode(0o664)).unwrap();
        prepare_sqlite(&db).unwrap();
        assert_eq!((mode(&data), mode(&db), mode(&wal)), (0o700, 0o600, 0o600));
        assert_eq!(std::fs::read(&db).unwrap(), b"keep");
    }
}
