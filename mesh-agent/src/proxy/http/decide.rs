//! Where a request goes: the first VirtualService `http` route whose match
//! takes it, then a weighted draw among the route's destinations; without
//! a VirtualService, the service the client addressed.

use http::{Request, StatusCode};
use hyper::body::Incoming;

use super::{Conn, LocalReply, actions};
use crate::snapshot::compile::{CompiledDestination, CompiledHttpRoute, RequestView};

/// Where `decide` sends a request.
pub(super) struct Decision<'a> {
    /// The VirtualService route that took it (`None`: no VirtualService,
    /// the service's default route).
    pub route: Option<&'a CompiledHttpRoute>,
    /// Which of the route's match blocks matched.
    pub matched: Option<usize>,
    /// The destination drawn by weight, and its index in the route.
    pub dest: Option<(usize, CompiledDestination)>,
}

impl Conn {
    /// Where `req` goes: the first VirtualService route that takes it,
    /// then a weighted draw among its destinations; without a
    /// VirtualService, the service itself.
    pub(super) fn decide(&self, req: &Request<Incoming>) -> Result<Decision<'_>, LocalReply> {
        let vss = self.snap.routes.virtual_services_for(&self.svc.hostname);
        if vss.iter().all(|vs| vs.http.is_empty()) {
            return Ok(Decision {
                route: None,
                matched: None,
                dest: Some((
                    0,
                    CompiledDestination {
                        host: self.svc.hostname.clone(),
                        subset: String::new(),
                        port: None,
                    },
                )),
            });
        }
        let authority = actions::authority(req.uri(), req.headers());
        let view = RequestView {
            path: req.uri().path(),
            query: req.uri().query(),
            method: req.method().as_str(),
            authority: &authority,
            headers: req.headers(),
            port: self.port.port,
            source_labels: &self.pod.workload.labels,
            source_namespace: &self.pod.workload.namespace,
        };
        let (route, matched) = vss
            .iter()
            .flat_map(|vs| vs.http.iter())
            .find_map(|r| {
                if r.matches.is_empty() {
                    return Some((r, None));
                }
                r.matches
                    .iter()
                    .position(|m| m.matches(&view))
                    .map(|i| (r, Some(i)))
            })
            .ok_or_else(|| LocalReply::new(StatusCode::NOT_FOUND, "NR", "no route matched"))?;
        let dest = route
            .pick(fastrand::u32(0..100))
            .and_then(|i| Some((i, route.destinations.get(i)?.clone())));
        Ok(Decision {
            route: Some(route),
            matched,
            dest,
        })
    }
}
