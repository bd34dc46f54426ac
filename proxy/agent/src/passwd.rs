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

/// Finds an account by name, or by numeric uid when `spec` is a number (like `docker exec
/// -u 1000`). A numeric uid without a passwd entry still works, with gid = uid, home `/`.
pub(crate) fn find_account(passwd: &Path, spec: &str) -> io::Result<Option<Account>> {
    let text = read_optional(passwd)?;
    let accounts: Vec<Account> = text.lines().filter_map(parse_passwd_line).collect();
    if let Some(a) = accounts.iter().find(|a| a.name == spec) {
        return Ok(Some(a.clone()));
    }
    let Ok(uid) = spec.parse::<u32>() else {
        return Ok(None);
    };
    Ok(Some(
        accounts
            .into_iter()
            .find(|a| a.uid == uid)
            .unwrap_or_else(|| Account {
                name: uid.to_string(),
                uid,
                gid: uid,
                home: "/".to_owned(),
                shell: DEFAULT_SHELL.to_owned(),
            }),
    ))
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
}
