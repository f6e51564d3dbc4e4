//! Istio security policy the agent enforces, built from validated
//! resources of the configuration snapshot: PeerAuthentication (who may
//! send plaintext), AuthorizationPolicy (who may do what) and
//! RequestAuthentication (JWT), all decided by the destination's agent.

pub mod authz;
pub mod ext_authz;
pub mod jwks;
pub mod jwt;
pub mod peer_auth;
pub mod rate_limit;

pub use peer_auth::{MtlsMode, PeerAuthentications};
