//! A port's application protocol, the way Istio decides it: Kubernetes
//! `appProtocol` first, then the port name's prefix (`http-web`,
//! `grpc`, `tcp-db`…); a ServiceEntry port says it outright. Anything else
//! is left to detection (and carried as TCP until detection lands).

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    GrpcWeb,
    Https,
    Tls,
    Tcp,
    Mongo,
    Redis,
    Mysql,
    Udp,
    /// Not declared: detect from the first bytes.
    Unknown,
}

impl Protocol {
    /// Istio's protocol names (case-insensitive), as in `ServiceEntry`
    /// ports and port-name prefixes.
    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "http" => Self::Http,
            "http2" => Self::Http2,
            "grpc" => Self::Grpc,
            "grpc-web" => Self::GrpcWeb,
            "https" => Self::Https,
            "tls" => Self::Tls,
            "tcp" => Self::Tcp,
            "mongo" => Self::Mongo,
            "redis" => Self::Redis,
            "mysql" => Self::Mysql,
            "udp" => Self::Udp,
            _ => return None,
        })
    }

    /// A Kubernetes service port's protocol: `appProtocol` (including the
    /// `kubernetes.io/h2c`, `ws` and `wss` values) wins over the name.
    pub fn of_kubernetes_port(name: &str, app_protocol: Option<&str>) -> Self {
        if let Some(p) = app_protocol {
            match p {
                "kubernetes.io/h2c" => return Self::Http2,
                "kubernetes.io/ws" => return Self::Http,
                "kubernetes.io/wss" => return Self::Https,
                _ => {
                    if let Some(p) = Self::from_name(p) {
                        return p;
                    }
                }
            }
        }
        // `grpc-web` is itself a name with a dash: try it whole first.
        if name.len() >= 8 && name[..8].eq_ignore_ascii_case("grpc-web") {
            return Self::GrpcWeb;
        }
        let prefix = name.split('-').next().unwrap_or_default();
        Self::from_name(prefix).unwrap_or(Self::Unknown)
    }

    /// Whether the agent may terminate it as HTTP.
    pub fn is_http(self) -> bool {
        matches!(self, Self::Http | Self::Http2 | Self::Grpc | Self::GrpcWeb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_istio_port_naming() {
        let k = Protocol::of_kubernetes_port;
        assert_eq!(k("http", None), Protocol::Http);
        assert_eq!(k("http-web", None), Protocol::Http);
        assert_eq!(k("HTTP2-api", None), Protocol::Http2);
        assert_eq!(k("grpc", None), Protocol::Grpc);
        assert_eq!(k("grpc-web", None), Protocol::GrpcWeb);
        assert_eq!(k("grpc-web-ui", None), Protocol::GrpcWeb);
        assert_eq!(k("tcp-db", None), Protocol::Tcp);
        assert_eq!(
            k("httpx", None),
            Protocol::Unknown,
            "a prefix ends at a dash"
        );
        assert_eq!(k("web", None), Protocol::Unknown);
        assert_eq!(k("tcp", Some("http")), Protocol::Http, "appProtocol wins");
        assert_eq!(k("web", Some("kubernetes.io/h2c")), Protocol::Http2);
        assert_eq!(k("http", Some("custom.example/x")), Protocol::Http);
        assert!(Protocol::Grpc.is_http() && !Protocol::Tls.is_http());
    }
}
