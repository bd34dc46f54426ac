//! Load-test users: their keys on disk and their records in envgate.
//!
//! Key directory layout (written by `envgate-loadtest users`, read by
//! `sweep --users N --key-dir DIR`):
//! - `DIR/users.txt`: one user name per line, in the order clients use them;
//! - `DIR/<user>`: the user's OpenSSH ed25519 private key (mode 0600);
//! - `DIR/<user>.pub`: its public key line.
//!
//! Generated names are `<prefix><NNNN>`, numbered from 0001 (`lt0001`, …).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use envgate_proto::admin::v1::admin_client::AdminClient;
use envgate_proto::admin::v1::{PutUserRequest, User};
use ring::rand::{SecureRandom, SystemRandom};
use russh::keys::PrivateKey;
use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::Ed25519Keypair;
use tonic::metadata::MetadataValue;

use crate::client::Credential;

/// The list of users in a key directory.
pub const USERS_FILE: &str = "users.txt";

#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the private key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("invalid user name {name:?}: {message}")]
    Name { name: String, message: String },
    #[error("{path} lists {available} users, {wanted} wanted")]
    TooFew {
        path: PathBuf,
        available: usize,
        wanted: usize,
    },
    #[error("the system random generator failed")]
    Random,
    #[error("admin token file {path}: {message}")]
    Token { path: PathBuf, message: String },
    #[error("cannot reach the admin API at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("creating user {user}: {status}")]
    Admin {
        user: String,
        status: Box<tonic::Status>,
    },
    #[error("creating user {user}: no answer within {timeout:?}")]
    Timeout { user: String, timeout: Duration },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> UsersError + '_ {
    move |source| UsersError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Loads an OpenSSH private key (unencrypted) for the russh client.
pub fn load_key(path: &Path) -> Result<Arc<PrivateKey>, UsersError> {
    russh::keys::load_secret_key(path, None)
        .map(Arc::new)
        .map_err(|e| UsersError::Key {
            path: path.to_owned(),
            message: e.to_string(),
        })
}

/// One user with one key.
pub fn credential(user: &str, key_path: &Path) -> Result<Credential, UsersError> {
    Ok(Credential {
        user: user.to_owned(),
        key_path: key_path.to_owned(),
        key: load_key(key_path)?,
    })
}

/// The first `count` users of a key directory.
pub fn credentials_from_dir(dir: &Path, count: usize) -> Result<Vec<Credential>, UsersError> {
    let list = dir.join(USERS_FILE);
    let text = std::fs::read_to_string(&list).map_err(io(&list))?;
    let names: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    if names.len() < count {
        return Err(UsersError::TooFew {
            path: list,
            available: names.len(),
            wanted: count,
        });
    }
    names[..count]
        .iter()
        .map(|name| credential(name, &dir.join(name)))
        .collect()
}

/// The same keys, logging in as `user` everywhere (the comparison endpoint's
/// fixed local user).
pub fn as_user(credentials: &[Credential], user: &str) -> Vec<Credential> {
    credentials
        .iter()
        .map(|c| Credential {
            user: user.to_owned(),
            ..c.clone()
        })
        .collect()
}

/// The generated name of user `number` (1-based).
pub fn user_name(prefix: &str, number: usize) -> String {
    format!("{prefix}{number:04}")
}

/// Writes `DIR/<user>` and `DIR/<user>.pub` unless the private key exists
/// already (re-running keeps keys stable); returns the public key line.
pub fn ensure_key(dir: &Path, user: &str) -> Result<String, UsersError> {
    let path = dir.join(user);
    let key = if path.exists() {
        load_key(&path)?.as_ref().clone()
    } else {
        let mut seed = [0u8; 32];
        SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| UsersError::Random)?;
        let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
        key.set_comment(format!("{user}@envgate-loadtest"));
        let text = key
            .to_openssh(LineEnding::LF)
            .map_err(|e| UsersError::Key {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))?;
        file.write_all(text.as_bytes()).map_err(io(&path))?;
        key
    };
    let public = key.public_key().to_openssh().map_err(|e| UsersError::Key {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let pub_path = dir.join(format!("{user}.pub"));
    std::fs::write(&pub_path, format!("{public}\n")).map_err(io(&pub_path))?;
    Ok(public)
}

/// Generates keys for `count` users named `<prefix>0001…` in `dir` and
/// writes `users.txt`. Returns the names and public key lines.
pub fn generate(
    dir: &Path,
    prefix: &str,
    count: usize,
) -> Result<Vec<(String, String)>, UsersError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    let mut users = Vec::with_capacity(count);
    for number in 1..=count {
        let name = user_name(prefix, number);
        envgate_proto::names::validate_user(&name).map_err(|e| UsersError::Name {
            name: name.clone(),
            message: e.to_string(),
        })?;
        let public = ensure_key(dir, &name)?;
        users.push((name, public));
    }
    let list = dir.join(USERS_FILE);
    let text: String = users.iter().map(|(name, _)| format!("{name}\n")).collect();
    std::fs::write(&list, text).map_err(io(&list))?;
    Ok(users)
}

/// Reads an admin token file (the token is the trimmed contents).
pub fn read_admin_token(path: &Path) -> Result<String, UsersError> {
    let text = std::fs::read_to_string(path).map_err(|e| UsersError::Token {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let token = text.trim().to_owned();
    if token.is_empty() {
        return Err(UsersError::Token {
            path: path.to_owned(),
            message: "the file is empty".into(),
        });
    }
    Ok(token)
}

/// Creates (or replaces) each user through the admin API with its key as the
/// only authorized key. `ca` (PEM) verifies an https:// control plane.
pub async fn create_users(
    admin_url: &str,
    ca: Option<&[u8]>,
    admin_token: &str,
    users: &[(String, String)],
    environment: Option<&str>,
    timeout: Duration,
) -> Result<(), UsersError> {
    let connect_err = |message: String| UsersError::Connect {
        url: admin_url.to_owned(),
        message,
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(admin_url.to_owned())
        .map_err(|e| connect_err(e.to_string()))?
        .connect_timeout(timeout)
        .timeout(timeout);
    if admin_url.starts_with("https://") {
        let ca = ca.ok_or_else(|| connect_err("an https:// admin URL needs --admin-ca".into()))?;
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca));
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| connect_err(e.to_string()))?;
    }
    let channel = tokio::time::timeout(timeout, endpoint.connect())
        .await
        .map_err(|_| connect_err(format!("no connection within {timeout:?}")))?
        .map_err(|e| connect_err(e.to_string()))?;
    let bearer: MetadataValue<_> = format!("Bearer {admin_token}")
        .parse()
        .map_err(|_| connect_err("the admin token is not valid metadata".into()))?;
    let mut client = AdminClient::new(channel);
    for (name, public) in users {
        let mut request = tonic::Request::new(PutUserRequest {
            user: Some(User {
                name: name.clone(),
                authorized_keys: vec![public.clone()],
                default_environment: environment.unwrap_or_default().to_owned(),
                ..User::default()
            }),
            password: String::new(),
            clear_password: false,
        });
        request
            .metadata_mut()
            .insert(envgate_proto::metadata::AUTHORIZATION, bearer.clone());
        tokio::time::timeout(timeout, client.put_user(request))
            .await
            .map_err(|_| UsersError::Timeout {
                user: name.clone(),
                timeout,
            })?
            .map_err(|status| UsersError::Admin {
                user: name.clone(),
                status: Box::new(status),
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_load_and_match_their_public_lines() {
        let dir = tempfile::tempdir().unwrap();
        let users = generate(dir.path(), "lt", 3).unwrap();
        let names: Vec<&str> = users.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["lt0001", "lt0002", "lt0003"]);
        let list = std::fs::read_to_string(dir.path().join(USERS_FILE)).unwrap();
        assert_eq!(list, "lt0001\nlt0002\nlt0003\n");
        let creds = credentials_from_dir(dir.path(), 2).unwrap();
        assert_eq!(creds.len(), 2);
        for (cred, (_, public)) in creds.iter().zip(&users) {
            assert!(public.starts_with("ssh-ed25519 "));
            assert_eq!(&cred.key.public_key().to_openssh().unwrap(), public);
            let mode = std::fs::metadata(&cred.key_path)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_ne!(users[0].1, users[1].1, "each user has its own key");
        // Running again keeps the keys.
        let again = generate(dir.path(), "lt", 3).unwrap();
        assert_eq!(again, users);
        assert!(matches!(
            credentials_from_dir(dir.path(), 4),
            Err(UsersError::TooFew { available: 3, .. })
        ));
        assert!(matches!(
            generate(dir.path(), "Bad Name", 1),
            Err(UsersError::Name { .. })
        ));
        let compare = as_user(&creds, "root");
        assert!(compare.iter().all(|c| c.user == "root"));
    }

    #[test]
    fn admin_token_is_trimmed_and_required() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  s3cret\n").unwrap();
        assert_eq!(read_admin_token(&path).unwrap(), "s3cret");
        std::fs::write(&path, "\n").unwrap();
        assert!(read_admin_token(&path).is_err());
    }
}
