//! HAProxy in front of the proxies: its configuration, and which of its servers are up.

use std::path::Path;

use crate::probe::haproxy_ask;

/// The backend of the main SSH frontend.
pub const BACKEND: &str = "envgate_proxies";

/// One frontend on 127.0.0.1:`port` and its backend of `servers`.
pub struct Route {
    pub frontend: String,
    pub backend: String,
    pub port: u16,
    pub servers: Vec<Server>,
}

/// A proxy's listener, health-checked on its ops port (`GET /readyz`).
pub struct Server {
    pub name: String,
    pub listen: String,
    pub ops_port: u16,
}

/// haproxy.cfg: mode tcp, leastconn, PROXY v2 headers to the proxies, `/readyz` checks, and
/// a stats socket that hands the listening sockets to the next process on a soft reload.
pub fn config(stats_socket: &Path, routes: &[Route]) -> String {
    let mut cfg = format!(
        "# Written by envgate-fleet; rewritten on every start and scale.\n\
         global\n    maxconn 4096\n    \
         stats socket {} mode 600 level admin expose-fd listeners\n    stats timeout 30s\n\n\
         defaults\n    mode tcp\n    timeout connect 2s\n    \
         # SSH sessions may sit idle for long; the SSH layer has its own keep-alives.\n    \
         timeout client 8h\n    timeout server 8h\n    \
         timeout client-fin 30s\n    timeout server-fin 30s\n    timeout check 1s\n    \
         # A proxy that died between health checks refuses the connection: try another one.\n    \
         retries 3\n    option redispatch 1\n",
        stats_socket.display()
    );
    for route in routes {
        cfg.push_str(&format!(
            "\nfrontend {}\n    bind 127.0.0.1:{}\n    default_backend {}\n\n\
             backend {}\n    balance leastconn\n    option httpchk GET /readyz\n    \
             http-check expect status 200\n    \
             default-server inter 500ms fall 2 rise 1 send-proxy-v2\n",
            route.frontend, route.port, route.backend, route.backend
        ));
        for server in &route.servers {
            cfg.push_str(&format!(
                "    server {} {} check port {}\n",
                server.name, server.listen, server.ops_port
            ));
        }
    }
    cfg
}

/// The pid of the HAProxy process answering on `socket` (`show info`).
pub async fn pid(socket: &Path) -> Option<u32> {
    haproxy_ask(socket, "show info")
        .await?
        .lines()
        .find_map(|l| l.strip_prefix("Pid: "))
        .and_then(|pid| pid.trim().parse().ok())
}

/// Health-check status of each server of `backend` (`UP`, `DOWN`, `UP 1/2` while a check is
/// failing, …), from `show stat`.
pub async fn statuses(socket: &Path, backend: &str) -> Option<Vec<(String, String)>> {
    let stat = haproxy_ask(socket, "show stat").await?;
    let mut lines = stat.lines();
    let header: Vec<&str> = lines.next()?.trim_start_matches("# ").split(',').collect();
    let column = |name: &str| header.iter().position(|h| *h == name);
    let (pxname, svname, status) = (column("pxname")?, column("svname")?, column("status")?);
    Some(
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| {
                f.get(pxname) == Some(&backend)
                    && !matches!(f.get(svname), Some(&"BACKEND") | Some(&"FRONTEND"))
            })
            .filter_map(|f| Some((f.get(svname)?.to_string(), f.get(status)?.to_string())))
            .collect(),
    )
}
