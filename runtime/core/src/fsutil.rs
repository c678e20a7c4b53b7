//! Atomic file writes: write a temporary file beside the target, fsync it, rename over the target, fsync the
//! directory. A crash leaves either the old file or the new one, never a torn file; an interrupted process
//! (Ctrl-C) removes the temporary files it was writing through [`remove_pending`].
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Temporary files being written, and renamed under this lock, so that an interrupt handler removing them never
/// races a rename.
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn pending() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    PENDING.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes every temporary file an atomic write of this process has not renamed yet, and keeps the lock so that
/// none is renamed afterwards: for a handler that then ends the process. Returns how many were removed.
pub fn remove_pending() -> usize {
    let mut list = pending();
    let n = list.iter().filter(|p| std::fs::remove_file(p).is_ok()).count();
    list.clear();
    std::mem::forget(list);
    n
}

/// edgepack's cache directory (measurements kept between processes: the `Device::Auto` choice, the GPU's tuned
/// tiles): `$EDGEPACK_CACHE_DIR`, else `$XDG_CACHE_HOME/edgepack`, else `~/.cache/edgepack`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("EDGEPACK_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("edgepack"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("edgepack"))
}

/// The JSON map `name` (`device-choice.json`…) in [`cache_dir`]: empty when absent or unreadable.
pub fn read_cached_map<T: serde::de::DeserializeOwned>(name: &str) -> std::collections::BTreeMap<String, T> {
    let bytes = cache_dir().and_then(|d| std::fs::read(d.join(name)).ok());
    bytes.and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

/// Changes the JSON map `name` in [`cache_dir`] as `change` says and writes it back atomically. A cache that
/// cannot be written only costs a measurement next time, so failures are ignored.
pub fn update_cached_map<T: serde::Serialize + serde::de::DeserializeOwned>(
    name: &str,
    change: impl FnOnce(&mut std::collections::BTreeMap<String, T>),
) {
    let Some(dir) = cache_dir() else { return };
    let mut map = read_cached_map(name);
    change(&mut map);
    if let Ok(bytes) = serde_json::to_vec_pretty(&map) {
        let _ = std::fs::create_dir_all(&dir).and_then(|_| write_atomic(&dir.join(name), &bytes));
    }
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

fn temp_path(path: &Path) -> std::io::Result<(PathBuf, PathBuf)> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| std::io::Error::other("path has no file name"))?;
    Ok((dir.to_path_buf(), dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()))))
}

/// Writes the temporary file of `path` (registered for [`remove_pending`]) and returns its path.
fn write_temp(path: &Path, fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> std::io::Result<PathBuf> {
    let (_, tmp) = temp_path(path)?;
    pending().push(tmp.clone());
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        fill(&mut f)?;
        f.sync_all()?;
        // Fault injection for the interruption tests: hold the written temporary file before its rename.
        if let Some(ms) = std::env::var("EDGEPACK_SLOW_WRITES_MS").ok().and_then(|v| v.parse::<u64>().ok()) {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        Ok(())
    })();
    if let Err(e) = result {
        discard(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

fn discard(tmp: &Path) {
    let _ = std::fs::remove_file(tmp);
    pending().retain(|p| p != tmp);
}

/// Renames the temporary files over their targets (under the lock), then syncs the folders.
fn commit(pairs: &[(PathBuf, &Path)]) -> std::io::Result<()> {
    {
        let mut list = pending();
        for (tmp, path) in pairs {
            std::fs::rename(tmp, path)?;
            list.retain(|p| p != tmp);
        }
    }
    for (_, path) in pairs {
        if let Ok((dir, _)) = temp_path(path)
            && let Ok(d) = std::fs::File::open(dir)
        {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Like [`write_atomic`], streaming the content through `fill`.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let tmp = write_temp(path, fill)?;
    commit(&[(tmp.clone(), path)]).inspect_err(|_| discard(&tmp))
}

/// Writes several files as one: every temporary file is written before any is renamed, so an error or an
/// interrupt while writing leaves none of them (a model without its report, say).
pub fn write_atomic_all(files: &[(&Path, &[u8])]) -> std::io::Result<()> {
    let mut temps: Vec<(PathBuf, &Path)> = Vec::with_capacity(files.len());
    for (path, bytes) in files {
        match write_temp(path, |f| f.write_all(bytes)) {
            Ok(tmp) => temps.push((tmp, path)),
            Err(e) => {
                temps.iter().for_each(|(t, _)| discard(t));
                return Err(e);
            }
        }
    }
    commit(&temps).inspect_err(|_| temps.iter().for_each(|(t, _)| discard(t)))
}

/// Fails early (before a long job) when `path` could not be written: its folder missing, not a folder, or not
/// writable (probed by creating and removing a temporary file there).
pub fn check_writable(path: &Path) -> std::io::Result<()> {
    let (dir, tmp) = temp_path(path)?;
    if !dir.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("folder {} does not exist", dir.display()),
        ));
    }
    if path.is_dir() {
        return Err(std::io::Error::other(format!("{} is a folder", path.display())));
    }
    let probe = tmp.with_file_name(format!(".edgepack-probe-{}", std::process::id()));
    std::fs::File::create(&probe)
        .map_err(|e| std::io::Error::new(e.kind(), format!("folder {} is not writable: {e}", dir.display())))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_write_leaves_all_files_or_none() {
        let d = std::env::temp_dir().join(format!("edgepack-fsutil-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let (a, b) = (d.join("a.bin"), d.join("missing").join("b.bin"));
        assert!(write_atomic_all(&[(&a, b"1"), (&b, b"2")]).is_err());
        assert!(!a.exists(), "the first file must not appear when the second fails");
        let b = d.join("b.bin");
        write_atomic_all(&[(&a, b"1"), (&b, b"2")]).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"1");
        assert_eq!(std::fs::read(&b).unwrap(), b"2");
        let left: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(left.is_empty(), "temporary files left: {left:?}");
        assert!(check_writable(&d.join("c.bin")).is_ok());
        assert!(check_writable(&d.join("nope").join("c.bin")).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
