//! Test helpers shared with other crates through the `testkit` feature.
//!
//! Tests that need etcd start their own: a real `/usr/bin/etcd` in a temporary data directory
//! on free loopback ports, so tests never depend on a shared daemon or on each other's state.
//! It runs as the fleet's does: TLS only, with client-certificate authentication, its
//! certificates made by `pki` in its own directory. [`TestPki`] makes a fleet CA, the control
//! plane's server certificate and proxy certificates the same way.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use envgate_proto::tls::TlsFiles;

use crate::pki::{self, Authority, Profile};
use crate::store::EtcdConfig;

mod webhook;
pub use webhook::WebhookServer;

/// How long `Etcd::start` waits for the new etcd to answer a read.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on each connect/get attempt while waiting.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Free ports are picked by binding port 0 and releasing it, which another process may grab
/// before etcd binds it; a start that loses that race is retried with fresh ports.
const START_ATTEMPTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum EtcdStartError {
    #[error("etcd binary {0} not found")]
    BinaryMissing(PathBuf),
    #[error("I/O error while starting etcd: {0}")]
    Io(#[from] std::io::Error),
    #[error("etcd did not start: {0}")]
    NotReady(String),
    #[error("making etcd's certificates failed: {0}")]
    Pki(#[from] pki::PkiError),
    #[error("reading etcd's certificates failed: {0}")]
    Tls(#[from] envgate_proto::tls::TlsError),
}

/// A private etcd server for one test, started by the fleet launcher (`envgate_fleet`, the
/// one `deploy/local/fleet` and the e2e harness use) as a one-member cluster. Killed (and its
/// data directory removed) on drop.
pub struct Etcd {
    launcher: envgate_fleet::Launcher,
    endpoint: String,
    /// The etcd CA and a client certificate it issued (the control plane's).
    client_tls: TlsFiles,
    // Held so the data directory lives exactly as long as the server.
    data_dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts `/usr/bin/etcd` and returns once a client can read from it.
    pub async fn start() -> Result<Etcd, EtcdStartError> {
        Self::start_with_binary(Path::new("/usr/bin/etcd")).await
    }

    pub async fn start_with_binary(binary: &Path) -> Result<Etcd, EtcdStartError> {
        if !binary.exists() {
            return Err(EtcdStartError::BinaryMissing(binary.to_path_buf()));
        }
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            match Self::start_once(binary).await {
                Ok(etcd) => return Ok(etcd),
                Err(EtcdStartError::NotReady(reason)) => last_error = reason,
                Err(other) => return Err(other),
            }
        }
        Err(EtcdStartError::NotReady(last_error))
    }

    async fn start_once(binary: &Path) -> Result<Etcd, EtcdStartError> {
        let data_dir = tempfile::Builder::new().prefix("envgate-etcd-").tempdir()?;
        let mut spec =
            envgate_fleet::Spec::new("testkit", data_dir.path().to_path_buf(), PathBuf::new());
        spec.etcd_binary = binary.to_path_buf();
        spec.wait = START_TIMEOUT;
        // The certificates the launcher's etcd expects, made here rather than by the
        // `envgate-controlplane pki` binary, which this crate's own tests may not have yet.
        let pki_dir = spec.pki_dir();
        let ca = Authority::ensure(&pki_dir, "etcd")?;
        let sans = Profile::Peer {
            sans: vec!["127.0.0.1".into(), "localhost".into()],
        };
        ca.issue(&pki_dir, "etcd-server", &sans)?;
        ca.issue(
            &pki_dir,
            envgate_fleet::keys::ETCD_CLIENT,
            &Profile::Client {
                common_name: "etcd-client".into(),
            },
        )?;
        let (ca_path, client_cert, client_key) = spec.etcd_client_files();
        let client_tls = TlsFiles::load(&client_cert, &client_key, &ca_path)?;
        let not_ready = |e: envgate_fleet::Error| EtcdStartError::NotReady(e.to_string());
        let mut launcher = envgate_fleet::Launcher::new(spec).map_err(not_ready)?;
        launcher.start_etcd().await.map_err(not_ready)?;
        let endpoint = launcher.etcd_endpoints()[0].clone();
        Ok(Etcd {
            launcher,
            endpoint,
            client_tls,
            data_dir,
        })
    }

    /// The client URL, e.g. `https://127.0.0.1:41234`.
    pub fn endpoint(&self) -> String {
        self.endpoint.clone()
    }

    /// How the control plane reaches it: the endpoint, the etcd CA and a client certificate.
    pub fn config(&self) -> EtcdConfig {
        EtcdConfig {
            endpoints: vec![self.endpoint.clone()],
            tls: Some(self.client_tls.clone()),
        }
    }

    /// The files of `config()`, as `envgate-controlplane --etcd-ca/--etcd-cert/--etcd-key`
    /// take them: (CA, certificate, key).
    pub fn client_files(&self) -> (PathBuf, PathBuf, PathBuf) {
        self.launcher.spec().etcd_client_files()
    }

    /// Where its certificates are, to make more (e.g. a client certificate from another CA).
    pub fn pki_dir(&self) -> PathBuf {
        self.data_dir.path().join("pki")
    }

    /// Stops the server now (SIGKILL) and reaps it; a later drop does nothing more.
    pub fn kill(&mut self) {
        self.launcher.kill(&envgate_fleet::etcd_name(0));
    }
}

/// A raw etcd client with the test etcd's client certificate, for tests that read or write
/// records directly.
pub async fn client(config: &EtcdConfig) -> Result<etcd_client::Client, etcd_client::Error> {
    let mut options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(PROBE_TIMEOUT)
        .with_timeout(Duration::from_secs(5));
    if let Some(tls) = &config.tls {
        options = options.with_tls(
            etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(&tls.ca))
                .identity(etcd_client::Identity::from_pem(&tls.cert, &tls.key)),
        );
    }
    etcd_client::Client::connect(&config.endpoints, Some(options)).await
}

/// A fleet CA in a temporary directory, the control plane's server certificate (for
/// 127.0.0.1 and localhost) and proxy certificates on demand.
pub struct TestPki {
    dir: PathBuf,
    /// The temporary directory `new` made (`open` uses one that exists).
    _temporary: Option<tempfile::TempDir>,
    ca: Authority,
}

impl TestPki {
    pub fn new() -> Result<Self, pki::PkiError> {
        let dir = tempfile::Builder::new()
            .prefix("envgate-pki-")
            .tempdir()
            .map_err(|source| pki::PkiError::Io {
                path: std::env::temp_dir(),
                source,
            })?;
        let mut pki = Self::open(dir.path())?;
        pki.ca.issue(
            dir.path(),
            "controlplane",
            &Profile::Server {
                sans: vec!["127.0.0.1".into(), "localhost".into()],
            },
        )?;
        pki._temporary = Some(dir);
        Ok(pki)
    }

    /// The fleet CA in `dir` (made there if missing), e.g. the one `envgate-controlplane pki`
    /// made for a fleet the launcher started, with the control plane's certificate in it.
    pub fn open(dir: &Path) -> Result<Self, pki::PkiError> {
        Ok(Self {
            dir: dir.to_path_buf(),
            _temporary: None,
            ca: Authority::ensure(dir, "fleet")?,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ca_path(&self) -> PathBuf {
        self.ca.cert_path().to_owned()
    }

    /// The control plane's files: (certificate, key, fleet CA).
    pub fn server_files(&self) -> (PathBuf, PathBuf, PathBuf) {
        let (cert, key) = pki::paths(&self.dir, "controlplane");
        (cert, key, self.ca_path())
    }

    pub fn server_tls(&self) -> TlsFiles {
        let (cert, key, ca) = self.server_files();
        TlsFiles::load(&cert, &key, &ca).expect("the test PKI's server files load")
    }

    /// Issues (or reuses) the certificate of proxy `id`: (certificate, key).
    pub fn proxy_files(&self, id: &str) -> (PathBuf, PathBuf) {
        let name = format!("proxy-{id}");
        self.ca
            .issue(&self.dir, &name, &Profile::Proxy { id: id.into() })
            .expect("a test proxy certificate");
        pki::paths(&self.dir, &name)
    }

    /// Proxy `id`'s TLS identity with the fleet CA, as a proxy loads it.
    pub fn proxy_tls(&self, id: &str) -> TlsFiles {
        let (cert, key) = self.proxy_files(id);
        TlsFiles::load(&cert, &key, &self.ca_path()).expect("the test proxy's files load")
    }

    /// A channel to a control plane at `addr`, as proxy `id`.
    pub async fn proxy_channel(&self, addr: &str, id: &str) -> tonic::transport::Channel {
        self.connect(addr, Some(id)).await.expect("connected")
    }

    /// A channel to `addr` that verifies the server but presents no client certificate (an
    /// operator's grpcurl, or an attacker who can reach the port).
    pub async fn anonymous_channel(&self, addr: &str) -> tonic::transport::Channel {
        self.connect(addr, None).await.expect("connected")
    }

    /// Connects to the control plane at `addr` (verified against the fleet CA as
    /// `localhost`), as proxy `proxy` or without a client certificate.
    pub async fn connect(
        &self,
        addr: &str,
        proxy: Option<&str>,
    ) -> Result<tonic::transport::Channel, String> {
        let ca = std::fs::read(self.ca_path()).map_err(|e| e.to_string())?;
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .domain_name("localhost");
        if let Some(id) = proxy {
            let identity = self.proxy_tls(id);
            tls = tls.identity(tonic::transport::Identity::from_pem(
                identity.cert,
                identity.key,
            ));
        }
        let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
            .map_err(|e| e.to_string())?
            .tls_config(tls)
            .map_err(|e| e.to_string())?
            .connect_timeout(PROBE_TIMEOUT * 5);
        tokio::time::timeout(PROBE_TIMEOUT * 10, endpoint.connect())
            .await
            .map_err(|_| format!("connecting {addr} timed out"))?
            .map_err(|e| format!("connecting {addr}: {e}"))
    }
}

/// The suffix of a test directory; its entries live under it.
pub const LDAP_SUFFIX: &str = "dc=envgate,dc=test";
/// The test directory's administrator (its rootDN), for changes made while it runs.
pub const LDAP_ADMIN_DN: &str = "cn=admin,dc=envgate,dc=test";
pub const LDAP_ADMIN_PASSWORD: &str = "admin-secret";
/// The service account envgate searches with (read access to everything but passwords).
pub const LDAP_SERVICE_DN: &str = "cn=envgate,dc=envgate,dc=test";
pub const LDAP_SERVICE_PASSWORD: &str = "service-secret";

#[derive(Debug, thiserror::Error)]
pub enum SlapdStartError {
    #[error("slapd not found: install the Debian packages slapd and ldap-utils")]
    Missing,
    #[error("I/O error while starting slapd: {0}")]
    Io(#[from] std::io::Error),
    #[error("seeding the directory failed: {0}")]
    Seed(String),
    #[error("slapd did not start: {0}")]
    NotReady(String),
    #[error("making slapd's certificate failed: {0}")]
    Pki(#[from] pki::PkiError),
}

/// A private OpenLDAP server for one test: Debian's `slapd` on a free loopback port, its
/// cn=config and database in a temporary directory, seeded with `slapadd` before it starts.
/// It offers StartTLS with a certificate from its own CA ([`Slapd::ca_path`]). Killed (and
/// its directory removed) on drop.
pub struct Slapd {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Slapd {
    /// Starts slapd with the base entries (the suffix, `ou=people`, `ou=groups`, the service
    /// account) and then `entries` (LDIF, records separated by blank lines).
    pub async fn start(entries: &str) -> Result<Slapd, SlapdStartError> {
        if !Path::new("/usr/sbin/slapd").exists() || !Path::new("/usr/sbin/slapadd").exists() {
            return Err(SlapdStartError::Missing);
        }
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            match Self::start_once(entries).await {
                Ok(slapd) => return Ok(slapd),
                Err(SlapdStartError::NotReady(reason)) => last_error = reason,
                Err(other) => return Err(other),
            }
        }
        Err(SlapdStartError::NotReady(last_error))
    }

    async fn start_once(entries: &str) -> Result<Slapd, SlapdStartError> {
        let dir = tempfile::Builder::new()
            .prefix("envgate-slapd-")
            .tempdir()?;
        let (config_dir, data_dir) = (dir.path().join("config"), dir.path().join("data"));
        std::fs::create_dir_all(&config_dir)?;
        std::fs::create_dir_all(&data_dir)?;
        let ca = Authority::ensure(dir.path(), "ldap")?;
        ca.issue(
            dir.path(),
            "slapd",
            &Profile::Server {
                sans: vec!["127.0.0.1".into(), "localhost".into()],
            },
        )?;
        let (cert, key) = pki::paths(dir.path(), "slapd");
        let config = envgate_fleet::ldap::slapd_config(&envgate_fleet::ldap::SlapdConfig {
            dir: dir.path(),
            suffix: LDAP_SUFFIX,
            root_dn: LDAP_ADMIN_DN,
            root_password: LDAP_ADMIN_PASSWORD,
            tls: Some((ca.cert_path(), &cert, &key)),
            password_access: "read",
        });
        let base = format!(
            "dn: {LDAP_SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: envgate\n\
             o: envgate tests\n\n\
             dn: ou=people,{LDAP_SUFFIX}\nobjectClass: organizationalUnit\nou: people\n\n\
             dn: ou=groups,{LDAP_SUFFIX}\nobjectClass: organizationalUnit\nou: groups\n\n\
             dn: {LDAP_SERVICE_DN}\nobjectClass: organizationalRole\n\
             objectClass: simpleSecurityObject\ncn: envgate\nuserPassword: {LDAP_SERVICE_PASSWORD}\n\n\
             {entries}\n"
        );
        for (database, ldif) in [("0", config), ("1", base)] {
            let path = dir.path().join(format!("seed-{database}.ldif"));
            std::fs::write(&path, ldif)?;
            let out = Command::new("/usr/sbin/slapadd")
                .args(["-q", "-n", database, "-F"])
                .arg(&config_dir)
                .arg("-l")
                .arg(&path)
                .stdin(Stdio::null())
                .output()?;
            if !out.status.success() {
                return Err(SlapdStartError::Seed(
                    String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                ));
            }
        }
        let port = free_port()?;
        let log_path = dir.path().join("slapd.log");
        let log = std::fs::File::create(&log_path)?;
        // -d keeps it in the foreground (a child to kill); 0 logs nothing more.
        let child = Command::new("/usr/sbin/slapd")
            .arg("-h")
            .arg(format!("ldap://127.0.0.1:{port}/"))
            .arg("-F")
            .arg(&config_dir)
            .args(["-d", "0"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut slapd = Slapd {
            child: Some(child),
            port,
            dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(child) = slapd.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(SlapdStartError::NotReady(format!(
                    "slapd exited with {status}: {}",
                    log.lines().last().unwrap_or_default()
                )));
            }
            if std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                PROBE_TIMEOUT,
            )
            .is_ok()
            {
                return Ok(slapd);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        slapd.kill();
        Err(SlapdStartError::NotReady(format!(
            "port {port} not open within {} s",
            START_TIMEOUT.as_secs()
        )))
    }

    /// `ldap://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("ldap://127.0.0.1:{}", self.port)
    }

    /// The CA that issued slapd's certificate (PEM), for StartTLS.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ldap-ca.crt")
    }

    /// Applies `ldif` (changetype records) as the directory's administrator, with the real
    /// `ldapmodify`.
    pub fn modify(&self, ldif: &str) -> Result<(), String> {
        use std::io::Write;
        let mut child = Command::new("ldapmodify")
            .args([
                "-x",
                "-H",
                &self.url(),
                "-D",
                LDAP_ADMIN_DN,
                "-w",
                LDAP_ADMIN_PASSWORD,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("ldapmodify: {e}"))?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(ldif.as_bytes())
            .map_err(|e| e.to_string())?;
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the server: it keeps its port and accepts
    /// connections (the kernel does), but answers nothing, like a directory that hangs.
    pub fn freeze(&self, frozen: bool) {
        if let Some(child) = &self.child {
            let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
            // SAFETY: kill(2) on our own child's pid, which is not reaped while `child` lives.
            unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        }
    }

    /// Stops the server now (SIGKILL) and reaps it; a later drop does nothing more.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> std::io::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn etcd_answers_and_stops_on_kill() {
        let mut etcd = Etcd::start().await.expect("etcd starts");
        let mut client = super::client(&etcd.config()).await.expect("connect");
        client.put("k", "v", None).await.expect("put");
        let got = client.get("k", None).await.expect("get");
        assert_eq!(got.kvs()[0].value(), b"v");
        etcd.kill();
        let after = tokio::time::timeout(Duration::from_secs(5), async {
            let mut c = super::client(&etcd.config()).await?;
            c.get("k", None).await
        })
        .await;
        assert!(!matches!(after, Ok(Ok(_))), "etcd still answers after kill");
    }

    #[tokio::test]
    async fn etcd_refuses_plaintext_and_foreign_certificates() {
        let etcd = Etcd::start().await.expect("etcd starts");
        // Plaintext to the TLS port.
        let plain = etcd.endpoint().replace("https://", "http://");
        let plaintext = tokio::time::timeout(Duration::from_secs(5), async {
            let mut c = etcd_client::Client::connect([plain], None).await?;
            c.get("k", None).await
        })
        .await;
        assert!(!matches!(plaintext, Ok(Ok(_))), "plaintext etcd answered");
        // TLS without a client certificate.
        let anonymous = EtcdConfig {
            tls: etcd.config().tls.map(|t| TlsFiles {
                cert: Vec::new(),
                key: Vec::new(),
                ..t
            }),
            ..etcd.config()
        };
        let no_cert = tokio::time::timeout(Duration::from_secs(5), async {
            let mut options = etcd_client::ConnectOptions::new();
            let tls = anonymous.tls.as_ref().unwrap();
            options = options.with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(&tls.ca)),
            );
            let mut c = etcd_client::Client::connect(&anonymous.endpoints, Some(options)).await?;
            c.get("k", None).await
        })
        .await;
        assert!(
            !matches!(no_cert, Ok(Ok(_))),
            "etcd answered without a client certificate"
        );
        // A client certificate from another CA: the fleet CA's proxy certificate.
        let fleet = TestPki::new().unwrap();
        let proxy = fleet.proxy_tls("p1");
        let foreign = EtcdConfig {
            tls: Some(TlsFiles {
                ca: etcd.config().tls.unwrap().ca,
                ..proxy
            }),
            ..etcd.config()
        };
        let foreign = tokio::time::timeout(Duration::from_secs(5), async {
            let mut c = super::client(&foreign).await?;
            c.get("k", None).await
        })
        .await;
        assert!(
            !matches!(foreign, Ok(Ok(_))),
            "etcd answered a proxy's certificate"
        );
    }
}
