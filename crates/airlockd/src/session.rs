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
}

impl Drop for SessionDir {
    fn drop(&mut self) {
        let path = std::mem::take(&mut self.path);
        let remove = move || {
            unmount(&path);
            if let Err(e) = remove_tree(&path) {
                tracing::error!(path = %path.display(), error = %e, "cannot remove session folder");
            }
        };
        // A script may leave many files; removing them must not stall the event loop
        // that serves every other call.
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => drop(handle.spawn_blocking(remove)),
            Err(_) => remove(),
        }
    }
}
