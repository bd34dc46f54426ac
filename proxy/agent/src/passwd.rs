//! Reads `/etc/passwd` and `/etc/group` directly. The agent runs in arbitrary images and
//! is linked statically, so glibc's NSS (`getpwnam`) is neither available nor wanted.
//! The files are read on every spawn: users inside the container may add accounts.

use std::io;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
}

const DEFAULT_SHELL: &str = "/bin/sh";

fn parse_passwd_line(line: &str) -> Option<Account> {
    if line.starts_with('#') {
        return None;
    }
    let f: Vec<&str> = line.split(':').collect();
    if f.len() < 7 {
        return None;
    }
    let shell = if f[6].is_empty() { DEFAULT_SHELL } else { f[6] };
    Some(Account {
        name: f[0].to_owned(),
        uid: f[2].parse().ok()?,
        gid: f[3].parse().ok()?,
        home: if f[5].is_empty() {
            "/".to_owned()
        } else {
            f[5].to_owned()
        },
        shell: shell.to_owned(),
    })
}

fn read_optional(path: &Path) -> io::Result<String> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e),
    }
}

/// Finds an account by name, or by numeric `uid[:gid]` (like `docker exec -u 1000:1000`).
/// A numeric uid without a passwd entry still works, with gid = uid unless given, home `/`.
pub(crate) fn find_account(passwd: &Path, spec: &str) -> io::Result<Option<Account>> {
    let text = read_optional(passwd)?;
    let accounts: Vec<Account> = text.lines().filter_map(parse_passwd_line).collect();
    if let Some(a) = accounts.iter().find(|a| a.name == spec) {
        return Ok(Some(a.clone()));
    }
    let (uid, gid) = match spec.split_once(':') {
        Some((uid, gid)) => (uid.parse::<u32>(), gid.parse::<u32>().map(Some)),
        None => (spec.parse::<u32>(), Ok(None)),
    };
    let (Ok(uid), Ok(gid)) = (uid, gid) else {
        return Ok(None);
    };
    let mut account = accounts
        .into_iter()
        .find(|a| a.uid == uid)
        .unwrap_or_else(|| Account {
            name: uid.to_string(),
            uid,
            gid: uid,
            home: "/".to_owned(),
            shell: DEFAULT_SHELL.to_owned(),
        });
    if let Some(gid) = gid {
        account.gid = gid;
    }
    Ok(Some(account))
}

/// Makes the passwd and group files name `want` (its user, and a group of the same name and
/// gid), replacing entries of that name that say otherwise; other entries are kept as they
/// are. Returns the account as the passwd file now lists it (an existing entry's shell is
/// kept). The files are rewritten in place, not renamed over, because an image may have
/// them bind-mounted.
pub(crate) fn ensure_account(
    passwd: &Path,
    group: &Path,
    want: &crate::protocol::Account,
) -> io::Result<Account> {
    let text = read_optional(passwd)?;
    let existing = text
        .lines()
        .filter_map(parse_passwd_line)
        .find(|a| a.name == want.name);
    let shell = existing
        .as_ref()
        .map_or(DEFAULT_SHELL.to_owned(), |a| a.shell.clone());
    let account = Account {
        name: want.name.clone(),
        uid: want.uid,
        gid: want.gid,
        home: want.home.clone(),
        shell,
    };
    if existing.as_ref() != Some(&account) {
        let line = format!(
            "{}:x:{}:{}::{}:{}",
            account.name, account.uid, account.gid, account.home, account.shell
        );
        std::fs::write(passwd, replace_entry(&text, &account.name, &line))?;
    }
    let groups = read_optional(group)?;
    let line = format!("{}:x:{}:", want.name, want.gid);
    let current = groups
        .lines()
        .find(|l| l.split(':').next() == Some(want.name.as_str()));
    if current.is_none_or(|l| l.split(':').nth(2) != Some(want.gid.to_string().as_str())) {
        std::fs::write(group, replace_entry(&groups, &want.name, &line))?;
    }
    Ok(account)
}

/// `text` without the lines whose first field is `name`, with `line` at the end.
fn replace_entry(text: &str, name: &str, line: &str) -> String {
    let mut out: String = text
        .lines()
        .filter(|l| l.split(':').next() != Some(name))
        .flat_map(|l| [l, "\n"])
        .collect();
    out.push_str(line);
    out.push('\n');
    out
}

/// Hands a home that is still root's (a new volume) to its user: the directory and, for a
/// home used before sessions had their own uid, everything in it. Symbolic links are
/// changed themselves, never followed. A home that is already someone else's is left alone.
pub(crate) fn hand_over_home(home: &Path, uid: u32, gid: u32) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::symlink_metadata(home) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() || meta.uid() != 0 || uid == 0 {
        return Ok(());
    }
    chown_tree(home, uid, gid)
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// The account for a uid, synthesised when the passwd file does not list it.
pub(crate) fn account_for_uid(passwd: &Path, uid: u32, gid: u32) -> io::Result<Account> {
    let text = read_optional(passwd)?;
    Ok(text
        .lines()
        .filter_map(parse_passwd_line)
        .find(|a| a.uid == uid)
        .unwrap_or_else(|| Account {
            name: if uid == 0 {
                "root".to_owned()
            } else {
                uid.to_string()
            },
            uid,
            gid,
            home: if uid == 0 {
                "/root".to_owned()
            } else {
                "/".to_owned()
            },
            shell: DEFAULT_SHELL.to_owned(),
        }))
}

/// The primary gid followed by every group that lists `user` as a member.
pub(crate) fn group_list(group: &Path, user: &str, primary: u32) -> io::Result<Vec<u32>> {
    let text = read_optional(group)?;
    let mut gids = vec![primary];
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 {
            continue;
        }
        let Ok(gid) = f[2].parse::<u32>() else {
            continue;
        };
        if f[3].split(',').any(|m| m.trim() == user) && !gids.contains(&gid) {
            gids.push(gid);
        }
    }
    Ok(gids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_and_groups_parse_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let passwd = dir.path().join("passwd");
        let group = dir.path().join("group");
        std::fs::write(
            &passwd,
            "root:x:0:0:root:/root:/bin/bash\n# comment\nbroken line\nalice:x:1000:1001::/home/alice:\n",
        )
        .unwrap();
        std::fs::write(
            &group,
            "root:x:0:\nalice:x:1001:\nwheel:x:10:bob,alice\nother:x:11:bob\n",
        )
        .unwrap();

        let alice = find_account(&passwd, "alice").unwrap().unwrap();
        assert_eq!(
            (
                alice.uid,
                alice.gid,
                alice.home.as_str(),
                alice.shell.as_str()
            ),
            (1000, 1001, "/home/alice", "/bin/sh")
        );
        assert_eq!(
            find_account(&passwd, "1000").unwrap().unwrap().name,
            "alice"
        );
        let anon = find_account(&passwd, "4242").unwrap().unwrap();
        assert_eq!((anon.uid, anon.gid, anon.home.as_str()), (4242, 4242, "/"));
        assert_eq!(find_account(&passwd, "nobody-here").unwrap(), None);
        assert_eq!(account_for_uid(&passwd, 0, 0).unwrap().shell, "/bin/bash");
        assert_eq!(group_list(&group, "alice", 1001).unwrap(), vec![1001, 10]);
        assert_eq!(
            find_account(&dir.path().join("missing"), "x").unwrap(),
            None
        );
    }

    #[test]
    fn numeric_uid_and_gid_need_no_entry() {
        let dir = tempfile::tempdir().unwrap();
        let passwd = dir.path().join("passwd");
        std::fs::write(&passwd, "alice:x:1000:1000::/home/alice:/bin/bash\n").unwrap();
        let a = find_account(&passwd, "1000:2000").unwrap().unwrap();
        assert_eq!((a.name.as_str(), a.uid, a.gid), ("alice", 1000, 2000));
        let b = find_account(&passwd, "3000:3001").unwrap().unwrap();
        assert_eq!((b.name.as_str(), b.uid, b.gid), ("3000", 3000, 3001));
        assert_eq!(find_account(&passwd, "3000:x").unwrap(), None);
    }

    #[test]
    fn ensure_account_replaces_a_conflicting_entry_once() {
        let dir = tempfile::tempdir().unwrap();
        let passwd = dir.path().join("passwd");
        let group = dir.path().join("group");
        std::fs::write(
            &passwd,
            "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/bash\nbob:x:1001:1001::/home/bob:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(&group, "root:x:0:\nalice:x:1000:\n").unwrap();
        let want = crate::protocol::Account {
            name: "alice".into(),
            uid: 200_001,
            gid: 200_001,
            home: "/home/alice".into(),
        };
        let account = ensure_account(&passwd, &group, &want).unwrap();
        assert_eq!(
            (account.uid, account.shell.as_str()),
            (200_001, "/bin/bash")
        );
        let expected_passwd = "root:x:0:0:root:/root:/bin/sh\nbob:x:1001:1001::/home/bob:/bin/sh\nalice:x:200001:200001::/home/alice:/bin/bash\n";
        let expected_group = "root:x:0:\nalice:x:200001:\n";
        assert_eq!(std::fs::read_to_string(&passwd).unwrap(), expected_passwd);
        assert_eq!(std::fs::read_to_string(&group).unwrap(), expected_group);
        // The second session finds it as it left it, and writes nothing.
        ensure_account(&passwd, &group, &want).unwrap();
        assert_eq!(std::fs::read_to_string(&passwd).unwrap(), expected_passwd);
        assert_eq!(std::fs::read_to_string(&group).unwrap(), expected_group);
    }

    #[test]
    fn a_roots_home_is_handed_over_without_following_links() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("alice");
        std::fs::create_dir_all(home.join("sub")).unwrap();
        std::fs::write(home.join("sub/file"), "x").unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "root's").unwrap();
        std::os::unix::fs::symlink(&outside, home.join("link")).unwrap();
        hand_over_home(&home, 200_001, 200_002).unwrap();
        for path in [&home, &home.join("sub"), &home.join("sub/file")] {
            let meta = std::fs::metadata(path).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (200_001, 200_002), "{path:?}");
        }
        assert_eq!(
            std::fs::symlink_metadata(home.join("link")).unwrap().uid(),
            200_001
        );
        assert_eq!(
            std::fs::metadata(&outside).unwrap().uid(),
            0,
            "the link's target is untouched"
        );
        // A home that is already someone's stays theirs.
        std::os::unix::fs::lchown(&home, Some(300), Some(300)).unwrap();
        hand_over_home(&home, 200_001, 200_001).unwrap();
        assert_eq!(std::fs::metadata(&home).unwrap().uid(), 300);
    }
}
