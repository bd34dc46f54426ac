//! The fleet's keys and certificates, made once and kept (every step is idempotent).
//!
//! Two CAs, made by `envgate-controlplane pki` in `pki/`: the fleet CA (the control planes'
//! server certificate, the proxies' client certificates, what operators' grpcurl trusts) and
//! the etcd CA (the members' certificate, the control planes' client certificate), apart so
//! that no proxy certificate opens etcd (docs/security.md).

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{Error, Spec};

/// The etcd client certificate the control planes present.
pub const ETCD_CLIENT: &str = "etcd-client-controlplane";

impl Spec {
    pub fn pki_dir(&self) -> PathBuf {
        self.dir.join("pki")
    }

    pub fn host_key(&self) -> PathBuf {
        self.dir.join("host_ed25519")
    }

    pub fn token_key(&self) -> PathBuf {
        self.dir.join("token.key")
    }

    pub fn admin_token_file(&self) -> PathBuf {
        self.dir.join("admin.token")
    }

    pub fn admin_tokens(&self) -> PathBuf {
        self.dir.join("admin-tokens")
    }

    pub fn fleet_ca(&self) -> PathBuf {
        self.pki_dir().join("fleet-ca.crt")
    }

    /// The etcd CA, the control planes' client certificate and its key.
    pub fn etcd_client_files(&self) -> (PathBuf, PathBuf, PathBuf) {
        let pki = self.pki_dir();
        (
            pki.join("etcd-ca.crt"),
            pki.join(format!("{ETCD_CLIENT}.crt")),
            pki.join(format!("{ETCD_CLIENT}.key")),
        )
    }

    /// The admin token operators present (`authorization: Bearer …`).
    pub fn admin_token(&self) -> Result<String, Error> {
        let path = self.admin_token_file();
        Ok(std::fs::read_to_string(&path)
            .map_err(Error::io(format!("read {}", path.display())))?
            .trim()
            .to_owned())
    }

    /// `envgate-controlplane pki --dir pki/ ARGS` (idempotent).
    pub fn pki(&self, args: &[&str]) -> Result<(), Error> {
        let binary = self.bin_dir.join("envgate-controlplane");
        let output = Command::new(&binary)
            .arg("pki")
            .arg("--dir")
            .arg(self.pki_dir())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(Error::io(format!("run {} pki", binary.display())))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(Error::Failed(format!(
                "envgate-controlplane pki {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            )))
        }
    }

    /// Directories, the SSH host key, the token-signing key, the admin token (and the hash of
    /// it the control planes hold), and the certificates of everything but the proxies.
    pub fn ensure_keys(&self) -> Result<(), Error> {
        for dir in [&self.dir, &self.logs, &self.run] {
            std::fs::create_dir_all(dir).map_err(Error::io(format!("mkdir {}", dir.display())))?;
        }
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
            .map_err(Error::io(format!("chmod {}", self.dir.display())))?;
        ssh_keygen(&self.host_key(), "envgate-fleet-host")?;
        write_new_secret(&self.token_key(), &random_hex(32)?)?;
        write_new_secret(&self.admin_token_file(), &random_hex(32)?)?;
        let digest = ring::digest::digest(&ring::digest::SHA256, self.admin_token()?.as_bytes());
        write_secret(
            &self.admin_tokens(),
            &format!("{} sha256:{}\n", self.admin_name, hex::encode(digest)),
        )?;
        self.pki(&[
            "server",
            "--ca",
            "fleet",
            "--name",
            "controlplane",
            "--san",
            "127.0.0.1,localhost",
        ])?;
        self.pki(&[
            "peer",
            "--ca",
            "etcd",
            "--name",
            "etcd-server",
            "--san",
            "127.0.0.1,localhost",
        ])?;
        self.pki(&["client", "--ca", "etcd", "--name", ETCD_CLIENT])
    }

    /// Proxy `id`'s certificate (issued if missing): (certificate, key).
    pub fn proxy_certificate(&self, id: &str) -> Result<(PathBuf, PathBuf), Error> {
        self.pki(&["proxy", "--ca", "fleet", "--id", id])?;
        let pki = self.pki_dir();
        Ok((
            pki.join(format!("proxy-{id}.crt")),
            pki.join(format!("proxy-{id}.key")),
        ))
    }
}

/// An Ed25519 key pair at `path` (and `path.pub`), unless one is there.
pub fn ssh_keygen(path: &Path, comment: &str) -> Result<(), Error> {
    if path.exists() {
        return Ok(());
    }
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .map_err(Error::io("run ssh-keygen"))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Failed(format!(
            "ssh-keygen {} failed: {status}",
            path.display()
        )))
    }
}

/// `bytes` random bytes in hex.
pub fn random_hex(bytes: usize) -> Result<String, Error> {
    let mut buffer = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buffer))
        .map_err(Error::io("read /dev/urandom"))?;
    Ok(hex::encode(buffer))
}

fn write_new_secret(path: &Path, text: &str) -> Result<(), Error> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() > 0) {
        return Ok(());
    }
    write_secret(path, text)
}

/// Writes `text` to `path`, readable by its owner only.
fn write_secret(path: &Path, text: &str) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(Error::io(format!("write {}", path.display())))
}
