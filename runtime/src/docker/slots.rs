//! Home slots: how a warm container, started before anyone claimed it, gets its user's home.
//!
//! Docker cannot add a mount to a running container, and a warm container is started before
//! its user is known. So each warm container gets a per-container host directory
//! `<root>/<instance>/<suffix>/home`, bind-mounted at `/home` with `rslave` propagation, under
//! a root that is a shared mount. On a claim the control plane (root, on the Docker host, in
//! dockerd's mount namespace) bind-mounts the user's volume at `<slot>/home/<user>`, and the
//! kernel propagates that mount into the running container: the user's home appears at
//! `/home/<user>` and nothing else does. `rslave` means nothing the container does propagates
//! back to the host.
//!
//! DATA-LOSS HAZARD: a slot holds a mount of a user's home volume. Removing a slot first
//! unmounts it and then refuses to delete anything while a mount point is still under the slot
//! (a recursive delete would go through the mount into the volume). See `release`.

use std::collections::HashSet;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the slot's `home` directory appears in the container.
const HOME_IN_CONTAINER: &str = "/home";
/// The file in a slot naming the user whose home is mounted there, written before the mount
/// so a crash between the two still lets `release` find it.
const USER_FILE: &str = "user";

/// The prepared root of every slot of this host (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HomeSlots {
    root: PathBuf,
}

impl HomeSlots {
    /// Makes `root` (created if missing) a shared mount, unless it already sits on one, so
    /// the containers' `rslave` binds below it receive the home mounts made later. Idempotent
    /// and safe for several control planes starting at once on one host (a lock file
    /// serialises them). `Err` says why warm pools cannot work on this host.
    pub fn prepare(root: &Path) -> Result<HomeSlots, String> {
        if !root.is_absolute() {
            return Err(format!("{} is not an absolute path", root.display()));
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("the control plane does not run as root, so it cannot mount homes".into());
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(|e| format!("cannot create {}: {e}", root.display()))?;
        let root = std::fs::canonicalize(root)
            .map_err(|e| format!("cannot resolve {}: {e}", root.display()))?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join(".lock"))
            .map_err(|e| format!("cannot open {}/.lock: {e}", root.display()))?;
        // SAFETY: a valid open descriptor; the lock is released when `lock` is closed.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
            return Err(format!(
                "cannot lock {}/.lock: {}",
                root.display(),
                io::Error::last_os_error()
            ));
        }
        let mounts = mount_points().map_err(|e| format!("cannot read mountinfo: {e}"))?;
        let containing = mounts
            .iter()
            .filter(|m| root.starts_with(&m.path))
            // The longest mount point holding `root`; of mounts stacked on one point, the last.
            .max_by_key(|m| m.path.as_os_str().len());
        match containing {
            Some(m) if m.shared => {}
            Some(m) if m.path == root => mount(None, &root, libc::MS_SHARED | libc::MS_REC)
                .map_err(|e| format!("cannot make {} a shared mount: {e}", root.display()))?,
            _ => {
                mount(Some(&root), &root, libc::MS_BIND | libc::MS_REC)
                    .map_err(|e| format!("cannot bind-mount {} on itself: {e}", root.display()))?;
                mount(None, &root, libc::MS_SHARED | libc::MS_REC)
                    .map_err(|e| format!("cannot make {} a shared mount: {e}", root.display()))?;
            }
        }
        Ok(HomeSlots { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/<instance>/<the container name's random suffix>`: a claimed container is
    /// renamed but keeps its suffix, so both names find the same slot. `None` for a name that
    /// envgate did not make (the suffix must be hex, so it can never be `..`).
    pub fn container_dir(&self, instance: &str, container_name: &str) -> Option<PathBuf> {
        let suffix = crate::types::name_suffix(container_name);
        let ok = !suffix.is_empty()
            && suffix.bytes().all(|b| b.is_ascii_hexdigit())
            && envgate_proto::names::validate_environment(instance).is_ok();
        ok.then(|| self.root.join(instance).join(suffix))
    }

    /// Makes the slot's empty `home` directory; returns the Docker bind that shows it at
    /// `/home` in the container, with `rslave` propagation.
    pub fn create(&self, dir: &Path) -> io::Result<String> {
        let home = dir.join("home");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        std::fs::DirBuilder::new().mode(0o755).create(&home)?;
        Ok(format!("{}:{HOME_IN_CONTAINER}:rslave", home.display()))
    }

    /// Bind-mounts `source` (the user's volume on the host) at `<dir>/home/<user>`, which
    /// the running container sees as `/home/<user>`.
    pub fn mount_home(&self, dir: &Path, user: &str, source: &Path) -> io::Result<()> {
        if envgate_proto::names::validate_user(user).is_err() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{user:?} is not a valid user name"),
            ));
        }
        let home = dir.join("home");
        if !std::fs::symlink_metadata(&home)?.is_dir() {
            return Err(io::Error::other(format!(
                "{} is not a directory",
                home.display()
            )));
        }
        std::fs::write(dir.join(USER_FILE), user)?;
        let target = home.join(user);
        match std::fs::DirBuilder::new().mode(0o755).create(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        // A symlink planted here would redirect the mount; the slot is fresh, but check.
        if !std::fs::symlink_metadata(&target)?.is_dir() {
            return Err(io::Error::other(format!(
                "{} is not a directory",
                target.display()
            )));
        }
        mount(Some(source), &target, libc::MS_BIND)
    }

    /// Removes the slots of `instance` that are not in `live` (the live containers' slots) and
    /// are older than `grace` (their container may be being created right now).
    pub fn sweep(&self, instance: &str, live: &HashSet<PathBuf>, grace: Duration) {
        let stale = match crate::types::stale_dirs(&self.root.join(instance), live, grace) {
            Ok(stale) => stale,
            Err(e) => {
                tracing::warn!(root = %self.root.display(), error = %e, "reading home slots failed");
                return;
            }
        };
        for path in stale {
            tracing::info!(dir = %path.display(), "removing the home slot of a container that is gone");
            release(&path);
        }
    }
}

/// Unmounts the home mounted in slot `dir` (if any), then deletes the slot, but only if no
/// mount point is left anywhere under it: a home volume's files are never deleted through a
/// mount. Best effort; what cannot be removed is logged and left for the next sweep.
pub fn release(dir: &Path) {
    if let Err(e) = try_release(dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "releasing a home slot failed; it is left in place");
    }
}

fn try_release(dir: &Path) -> io::Result<()> {
    match std::fs::read_to_string(dir.join(USER_FILE)) {
        Ok(user) if envgate_proto::names::validate_user(user.trim()).is_ok() => {
            let target = dir.join("home").join(user.trim());
            // NOFOLLOW: whatever the container made under /home must not redirect this.
            match umount(&target, libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) {
                Ok(()) => {}
                // EINVAL: not a mount point (never mounted, or already unmounted).
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let dir = match std::fs::canonicalize(dir) {
        Ok(dir) => dir,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if let Some(m) = mount_points()?
        .into_iter()
        .find(|m| m.path.starts_with(&dir))
    {
        return Err(io::Error::other(format!(
            "{} is still a mount point; not deleting anything under it",
            m.path.display()
        )));
    }
    // No mount point below `dir` (checked just above), and remove_dir_all does not follow
    // symlinks: this deletes only the slot's own files.
    std::fs::remove_dir_all(&dir)
}

/// One line of /proc/self/mountinfo, as far as slots care.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MountPoint {
    path: PathBuf,
    shared: bool,
}

fn mount_points() -> io::Result<Vec<MountPoint>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// Fields: id, parent, major:minor, root, mount point, options, optional fields…, "-", ….
fn parse_mountinfo(text: &str) -> Vec<MountPoint> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let path = PathBuf::from(unescape(fields.get(4)?));
            let optional = fields.get(6..)?.iter().take_while(|f| **f != "-");
            let shared = optional.clone().any(|f| f.starts_with("shared:"));
            Some(MountPoint { path, shared })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            out.push(u8::try_from(value).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn mount(source: Option<&Path>, target: &Path, flags: libc::c_ulong) -> io::Result<()> {
    let source = source.map(c_path).transpose()?;
    let target = c_path(target)?;
    // SAFETY: NUL-terminated strings that outlive the call; null fstype and data are allowed
    // for bind and propagation changes.
    let rc = unsafe {
        libc::mount(
            source.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn umount(target: &Path, flags: libc::c_int) -> io::Result<()> {
    let target = c_path(target)?;
    // SAFETY: a NUL-terminated string that outlives the call.
    if unsafe { libc::umount2(target.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_give_the_mount_point_and_whether_it_is_shared() {
        let text = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
42 27 254:0 /var/lib/docker /var/lib/docker rw,relatime shared:1 - ext4 /dev/vda rw
43 27 254:0 /x /srv/with\\040space rw master:3 shared:7 - ext4 /dev/vda rw
garbage";
        assert_eq!(
            parse_mountinfo(text),
            [
                MountPoint {
                    path: "/".into(),
                    shared: false
                },
                MountPoint {
                    path: "/var/lib/docker".into(),
                    shared: true
                },
                MountPoint {
                    path: "/srv/with space".into(),
                    shared: true
                },
            ]
        );
    }

    #[test]
    fn a_slot_is_found_from_either_name_of_its_container() {
        let slots = HomeSlots {
            root: "/var/lib/envgate/slots".into(),
        };
        let dir = slots.container_dir("i1", "envgate-i1-pool-busybox-0a1b2c3d");
        assert_eq!(
            dir,
            slots.container_dir("i1", "envgate-i1-alice-busybox-0a1b2c3d")
        );
        assert_eq!(dir, Some("/var/lib/envgate/slots/i1/0a1b2c3d".into()));
        assert_eq!(slots.container_dir("i1", "envgate-i1-x-.."), None);
        assert_eq!(slots.container_dir("i1", "foreign"), None);
        assert_eq!(slots.container_dir("../etc", "envgate-i1-x-0a1b2c3d"), None);
    }

    #[test]
    fn a_slot_with_no_mount_is_removed_and_a_missing_one_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let slot = dir.path().join("i1/0a1b2c3d");
        let slots = HomeSlots {
            root: dir.path().to_owned(),
        };
        slots.create(&slot).unwrap();
        std::fs::write(slot.join("home/junk"), b"made in the container").unwrap();
        release(&slot);
        assert!(!slot.exists());
        release(&slot);
    }
}
