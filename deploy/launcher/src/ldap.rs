//! `fleet up --ldap`: a slapd of the fleet's own, seeded once from an LDIF file, and the
//! `--ldap-*` flags that make the control planes check passwords in it (docs/identity.md).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{Error, Spec};

pub const SUFFIX: &str = "dc=envgate,dc=local";
/// What the service account's password file holds.
const SERVICE_PASSWORD: &str = "envgate-service-password";

/// What [`slapd_config`] needs to know.
pub struct SlapdConfig<'a> {
    /// Holds the pid file; the database is in `data/` below it.
    pub dir: &'a Path,
    pub suffix: &'a str,
    pub root_dn: &'a str,
    pub root_password: &'a str,
    /// The CA, certificate and key for StartTLS/LDAPS, if any.
    pub tls: Option<(&'a Path, &'a Path, &'a Path)>,
    /// What a user may do with their own `userPassword`: "read" or "write".
    pub password_access: &'a str,
}

/// cn=config for a private slapd (the fleet's, and the tests' in `envgate_controlplane::testkit`):
/// the standard schemas, one mdb database, users may read the directory and bind, nobody
/// reads cn=config.
pub fn slapd_config(c: &SlapdConfig) -> String {
    let tls = c
        .tls
        .map(|(ca, cert, key)| {
            format!(
                "olcTLSCACertificateFile: {}\nolcTLSCertificateFile: {}\n\
                 olcTLSCertificateKeyFile: {}\n",
                ca.display(),
                cert.display(),
                key.display()
            )
        })
        .unwrap_or_default();
    format!(
        "dn: cn=config\nobjectClass: olcGlobal\ncn: config\nolcPidFile: {dir}/slapd.pid\n{tls}\n\
         dn: cn=module{{0}},cn=config\nobjectClass: olcModuleList\ncn: module{{0}}\n\
         olcModulePath: /usr/lib/ldap\nolcModuleLoad: back_mdb\n\n\
         dn: cn=schema,cn=config\nobjectClass: olcSchemaConfig\ncn: schema\n\n\
         include: file:///etc/ldap/schema/core.ldif\n\n\
         include: file:///etc/ldap/schema/cosine.ldif\n\n\
         include: file:///etc/ldap/schema/nis.ldif\n\n\
         include: file:///etc/ldap/schema/inetorgperson.ldif\n\n\
         dn: olcDatabase={{-1}}frontend,cn=config\nobjectClass: olcDatabaseConfig\n\
         objectClass: olcFrontendConfig\nolcDatabase: {{-1}}frontend\n\n\
         dn: olcDatabase={{0}}config,cn=config\nobjectClass: olcDatabaseConfig\n\
         olcDatabase: {{0}}config\nolcAccess: {{0}}to * by * none\n\n\
         dn: olcDatabase={{1}}mdb,cn=config\nobjectClass: olcDatabaseConfig\n\
         objectClass: olcMdbConfig\nolcDatabase: {{1}}mdb\nolcSuffix: {suffix}\n\
         olcRootDN: {root_dn}\nolcRootPW: {root_password}\n\
         olcDbDirectory: {dir}/data\nolcDbMaxSize: 16777216\n\
         olcAccess: {{0}}to attrs=userPassword by self {access} by anonymous auth by * none\n\
         olcAccess: {{1}}to * by users read by * none\n",
        dir = c.dir.display(),
        suffix = c.suffix,
        root_dn = c.root_dn,
        root_password = c.root_password,
        access = c.password_access,
    )
}

/// The fleet's directory server.
pub struct Directory {
    /// cn=config, the mdb database, the service password, the `enabled` and `seeded` marks.
    pub dir: PathBuf,
    pub port: u16,
}

impl Directory {
    pub fn of(spec: &Spec, port: u16) -> Directory {
        Directory {
            dir: spec.dir.join("ldap"),
            port,
        }
    }

    pub fn url(&self) -> String {
        format!("ldap://127.0.0.1:{}", self.port)
    }

    /// `up --ldap` was asked for since the last `down`.
    pub fn enabled(&self) -> bool {
        self.dir.join("enabled").exists()
    }

    pub fn enable(&self, on: bool) -> Result<(), Error> {
        let mark = self.dir.join("enabled");
        if on {
            std::fs::create_dir_all(&self.dir)
                .map_err(Error::io(format!("mkdir {}", self.dir.display())))?;
            std::fs::write(&mark, "").map_err(Error::io(format!("write {}", mark.display())))
        } else {
            match std::fs::remove_file(&mark) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(Error::io(format!("remove {}", mark.display()))(e))
                }
                _ => Ok(()),
            }
        }
    }

    /// The control planes' flags for this directory.
    pub fn controlplane_args(&self) -> Vec<String> {
        vec![
            "--ldap-url".into(),
            self.url(),
            "--ldap-base-dn".into(),
            SUFFIX.into(),
            "--ldap-bind-dn".into(),
            format!("cn=envgate,{SUFFIX}"),
            "--ldap-bind-password-file".into(),
            self.dir.join("service.password").display().to_string(),
            "--ldap-disabled-filter".into(),
            "(shadowExpire=1)".into(),
        ]
    }

    /// Configures and seeds the directory the first time (cn=config and an mdb database,
    /// loaded with slapadd from `ldif`).
    pub fn ensure_seeded(&self, ldif: &Path) -> Result<(), Error> {
        let dir = &self.dir;
        if dir.join("seeded").exists() {
            return Ok(());
        }
        for sub in ["config", "data"] {
            let path = dir.join(sub);
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path)
                .map_err(Error::io(format!("mkdir {}", path.display())))?;
        }
        let config = slapd_config(&SlapdConfig {
            dir,
            suffix: SUFFIX,
            root_dn: &format!("cn=admin,{SUFFIX}"),
            root_password: "admin-password",
            tls: None,
            password_access: "write",
        });
        let config_ldif = dir.join("config.ldif");
        std::fs::write(&config_ldif, config)
            .map_err(Error::io(format!("write {}", config_ldif.display())))?;
        slapadd("0", &dir.join("config"), &config_ldif)?;
        slapadd("1", &dir.join("config"), ldif)?;
        let password = dir.join("service.password");
        std::fs::write(&password, SERVICE_PASSWORD)
            .map_err(Error::io(format!("write {}", password.display())))?;
        std::fs::write(dir.join("seeded"), "").map_err(Error::io("write the seeded mark"))
    }

    /// slapd in the foreground (`-d 0`), like every other part of the fleet.
    pub fn command(&self) -> Command {
        let mut command = Command::new("/usr/sbin/slapd");
        command
            .arg("-h")
            .arg(format!("{}/", self.url()))
            .arg("-F")
            .arg(self.dir.join("config"))
            .args(["-d", "0"]);
        command
    }

    /// `Ok` when slapd answers a bind of the service account.
    pub fn ready(&self) -> Result<(), String> {
        let status = Command::new("ldapwhoami")
            .args(["-x", "-o", "nettimeout=2", "-H", &self.url(), "-D"])
            .arg(format!("cn=envgate,{SUFFIX}"))
            .arg("-y")
            .arg(self.dir.join("service.password"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("ldapwhoami: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("ldapwhoami against {}: {status}", self.url()))
        }
    }
}

fn slapadd(database: &str, config: &Path, ldif: &Path) -> Result<(), Error> {
    let output = Command::new("/usr/sbin/slapadd")
        .args(["-q", "-n", database, "-F"])
        .arg(config)
        .arg("-l")
        .arg(ldif)
        .stdin(Stdio::null())
        .output()
        .map_err(Error::io("run slapadd"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::Failed(format!(
            "slapadd {}: {}",
            ldif.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}
