//! The network user containers are on: a Docker bridge with inter-container traffic off, so
//! one user's container cannot reach another's, and (with the host firewall on) an `INPUT`
//! rule that drops whatever comes from that bridge to the host, so no container reaches the
//! host's own services (etcd, the control plane, the Docker API, the proxies' ops ports),
//! whatever address they listen on. Outbound traffic to other networks is left as Docker
//! routes it.

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::models::NetworkCreateRequest;
use bollard::query_parameters::InspectNetworkOptions;

use super::{classify, is_not_found, within};
use crate::types::{RuntimeError, labels};

/// The network's name unless configured otherwise.
pub const DEFAULT_NETWORK: &str = "envgate-users";
const ICC: &str = "com.docker.network.bridge.enable_icc";
const BRIDGE_NAME: &str = "com.docker.network.bridge.name";
/// Bound on one `iptables` call (`-w` waits for the xtables lock within it).
const IPTABLES_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the control plane keeps containers away from the host with a firewall rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HostFirewall {
    /// An `iptables` rule dropping traffic from the bridge to the host (the default).
    Iptables,
    /// None: the operator's own firewall (or Kubernetes NetworkPolicy) must do it.
    Off,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserNetwork {
    pub name: String,
    pub host_firewall: HostFirewall,
}

impl Default for UserNetwork {
    fn default() -> Self {
        Self {
            name: DEFAULT_NETWORK.to_owned(),
            host_firewall: HostFirewall::Iptables,
        }
    }
}

impl UserNetwork {
    /// Makes the network if it is missing, checks that it isolates containers, and puts the
    /// host firewall rule in place. Idempotent, and safe for several control planes at once.
    pub(super) async fn ensure(&self, docker: &Docker) -> Result<(), RuntimeError> {
        let bridge = match self.inspect(docker).await? {
            Some(bridge) => bridge,
            None => {
                let request = NetworkCreateRequest {
                    name: self.name.clone(),
                    driver: Some("bridge".to_owned()),
                    options: Some(HashMap::from([
                        (ICC.to_owned(), "false".to_owned()),
                        (BRIDGE_NAME.to_owned(), bridge_name(&self.name)),
                    ])),
                    labels: Some(HashMap::from([(
                        labels::MANAGED_BY.to_owned(),
                        labels::MANAGED_BY_VALUE.to_owned(),
                    )])),
                    ..NetworkCreateRequest::default()
                };
                match within("create network", docker.create_network(request)).await? {
                    Ok(_) => tracing::info!(network = %self.name, "user network created"),
                    // Another control plane made it first.
                    Err(BollardError::DockerResponseServerError {
                        status_code: 409, ..
                    }) => {}
                    Err(e) => return Err(classify(e)),
                }
                self.inspect(docker).await?.ok_or_else(|| {
                    RuntimeError::Failed(format!("network {} vanished after creation", self.name))
                })?
            }
        };
        if self.host_firewall == HostFirewall::Iptables {
            drop_to_host(&bridge).await?;
        }
        Ok(())
    }

    /// The network's bridge interface, if it exists and keeps containers apart.
    async fn inspect(&self, docker: &Docker) -> Result<Option<String>, RuntimeError> {
        let network = match within(
            "inspect network",
            docker.inspect_network(&self.name, None::<InspectNetworkOptions>),
        )
        .await?
        {
            Ok(network) => network,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(classify(e)),
        };
        let options = network.options.unwrap_or_default();
        if network.driver.as_deref() != Some("bridge")
            || options.get(ICC).map(String::as_str) != Some("false")
        {
            return Err(RuntimeError::Failed(format!(
                "network {} lets containers reach each other: user containers need a bridge \
                 network with {ICC}=false (remove it and envgate makes one, or name another \
                 with --docker-network)",
                self.name
            )));
        }
        let id = network.id.unwrap_or_default();
        Ok(Some(options.get(BRIDGE_NAME).cloned().unwrap_or_else(
            || format!("br-{}", id.get(..12).unwrap_or(&id)),
        )))
    }
}

/// A Linux interface name (at most 15 bytes) that says whose it is.
fn bridge_name(network: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, network.as_bytes());
    format!("eg-{}", hex::encode(&digest.as_ref()[..6]))
}

/// `iptables -I INPUT -i BRIDGE -j DROP`, unless the rule is there already.
async fn drop_to_host(bridge: &str) -> Result<(), RuntimeError> {
    let rule = ["INPUT", "-i", bridge, "-j", "DROP"];
    if iptables("-C", &rule).await?.is_ok() {
        return Ok(());
    }
    iptables("-I", &rule).await?.map_err(|stderr| {
        RuntimeError::Failed(format!(
            "cannot keep user containers away from the host's services: iptables -I {}: {stderr} \
             (run the control plane as root with iptables installed, or pass \
             --host-firewall off and firewall the bridge {bridge} yourself)",
            rule.join(" ")
        ))
    })?;
    tracing::info!(
        bridge,
        "host firewall: traffic from user containers to this host is dropped"
    );
    Ok(())
}

/// Runs `iptables -w 5 OP RULE…`: `Ok(Ok)` when it succeeded, `Ok(Err(stderr))` when it
/// answered no, `Err` when it could not be run at all.
async fn iptables(op: &str, rule: &[&str]) -> Result<Result<(), String>, RuntimeError> {
    let run = tokio::process::Command::new("iptables")
        .args(["-w", "5", op])
        .args(rule)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(IPTABLES_TIMEOUT, run)
        .await
        .map_err(|_| RuntimeError::Failed("iptables took longer than 10 s".into()))?
        .map_err(|e| {
            RuntimeError::Failed(format!(
                "cannot run iptables to keep user containers away from the host's services: {e} \
                 (install iptables, or pass --host-firewall off and firewall the bridge yourself)"
            ))
        })?;
    Ok(if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_names_fit_an_interface_name() {
        let name = bridge_name(DEFAULT_NETWORK);
        assert!(name.len() <= 15 && name.starts_with("eg-"), "{name}");
        assert_ne!(name, bridge_name("envgate-other"));
    }
}
