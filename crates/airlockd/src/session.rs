//! Session folders: one per call, named by a fresh UUID, mode 0700, owned by the call's
//! worker, removed when the call ends.
//!
//! Each folder is a tmpfs of its own, mounted by the daemon on the host: its size is
//! bounded (`limits.session_size_mib`; what a script writes is also charged to its
//! memory cgroup), it never touches the disk Postgres lives on, and removing it is one
//! unmount however many files the script left.

use std::{
    fs, io,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
};

use uuid::Uuid;

use crate::config::Config;

/// The directory holding every session folder: root-owned, mode 0711, so a worker can
/// reach its own folder by name but cannot list the others.
pub fn sessions_root(config: &Config) -> PathBuf {
    config.state_dir.join("sessions")
}

/// Held for the daemon's lifetime. A second daemon on the same state directory would
/// sweep this one's live session folders and cgroups, so it must not start.
pub struct StateLock {
    _lock: nix::fcntl::Flock<fs::File>,
}

/// Takes the state directory's lock (`airlockd.lock`), creating the directory if needed.
pub fn lock_state_dir(config: &Config) -> io::Result<StateLock> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::create_dir_all(&config.state_dir)?;
    let path = config.state_dir.join("airlockd.lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(StateLock { _lock: lock }),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!(
                "another airlockd is using the state directory {} (it holds {})",
                config.state_dir.display(),
                path.display()
            ),
        )),
        Err((_, e)) => Err(e.into()),
    }
}

/// Creates the state directory layout; sweeps session folders a crashed daemon left.
pub fn prepare_state_dir(config: &Config) -> io::Result<()> {
    fs::create_dir_all(&config.state_dir)?;
    fs::set_permissions(&config.state_dir, fs::Permissions::from_mode(0o711))?;
    let root = crate::runtime::root_mountpoint(config);
    fs::create_dir_all(&root)?;
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755))?;
    let sessions = sessions_root(config);
    fs::create_dir_all(&sessions)?;
    fs::set_permissions(&sessions, fs::Permissions::from_mode(0o711))?;
    for entry in fs::read_dir(&sessions)? {
        let path = entry?.path();
        tracing::warn!(path = %path.display(), "removing session folder left by an earlier run");
        unmount(&path);
        // A folder that cannot be removed must not keep the daemon from starting; it is
        // logged and left for an operator.
        if let Err(e) = remove_tree(&path) {
            tracing::error!(path = %path.display(), error = %e, "cannot remove leftover session folder");
        }
    }
    Ok(())
}

fn remove_tree(path: &Path) -> io::Result<()> {
    // A script may have removed its own write permission on subfolders; root can still
    // remove them, and remove_dir_all never follows symlinks out of the tree.
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// A session folder that is removed on drop.
pub struct SessionDir {
    path: PathBuf,
}

/// Detaches a session tmpfs (EINVAL: it was not mounted; nothing to do).
fn unmount(path: &Path) {
    match nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "cannot unmount session folder")
        }
    }
}

impl SessionDir {
    pub fn create(config: &Config, id: Uuid, uid: u32) -> io::Result<SessionDir> {
        let path = sessions_root(config).join(id.to_string());
        fs::DirBuilder::new().mode(0o700).create(&path)?;
        let dir = SessionDir { path };
        let gid = config.workers.gid;
        let options = format!(
            "size={}m,nr_inodes={},mode=0700,uid={uid},gid={gid}",
            config.limits.session_size_mib,
            // One inode per 16 KiB of space: plenty of small files, no inode flood.
            config.limits.session_size_mib * 64,
        );
        nix::mount::mount(
            Some("airlock-session"),
            &dir.path,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some(options.as_str()),
        )
        .map_err(io::Error::from)?;
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unmounts and removes the folder here and now, instead of on the blocking pool
    /// as a drop does.
    pub fn remove_now(mut self) {
        remove(std::mem::take(&mut self.path));
    }
}

fn remove(path: PathBuf) {
    unmount(&path);
    if let Err(e) = remove_tree(&path) {
        tracing::error!(path = %path.display(), error = %e, "cannot remove session folder");
    }
}

impl Drop for SessionDir {
    fn drop(&mut self) {
        let path = std::mem::take(&mut self.path);
        if path.as_os_str().is_empty() {
            return; // removed by remove_now
        }
        // A script may leave many files.
        crate::off_event_loop(move || remove(path));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_daemon_cannot_take_the_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::parse(
            Path::new("t.toml"),
            &format!(
                "socket_path = \"/run/x.sock\"\nallowed_peer_uids = [101]\nstate_dir = \"{}\"\n[workers]\nfirst_uid = 61000\ncount = 1\ngid = 61000\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let first = lock_state_dir(&config).unwrap();
        let e = lock_state_dir(&config)
            .err()
            .expect("second lock must fail");
        assert!(e.to_string().contains("another airlockd"), "{e}");
        drop(first);
        lock_state_dir(&config).expect("free again once the first daemon is gone");
    }
}
