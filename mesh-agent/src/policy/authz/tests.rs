//! Evaluation cases, after Istio's builder test data: each allowed case
//! has a mirror that is denied.

use super::*;

fn policies(yaml: &str) -> Vec<Arc<Policy>> {
    let mut out = crate::documents::Parsed::default();
    crate::documents::parse_file(std::path::Path::new("ap.yaml"), yaml.as_bytes(), &mut out);
    let problems = crate::documents::check::documents(&out);
    if let Some(p) = problems
        .iter()
        .find(|p| p.severity == crate::istio::Severity::Error)
    {
        panic!("{p}");
    }
    out.documents
        .iter()
        .filter_map(|d| match d {
            crate::documents::Document::Istio(r) => Policy::from_resource(r).map(Arc::new),
            _ => None,
        })
        .collect()
}

fn web() -> Workload {
    Workload::for_tests("web", "default", &[("app", "web")])
}

fn plan(yaml: &str) -> WorkloadAuthz {
    WorkloadAuthz::for_workload(&policies(yaml), &web(), "istio-system")
}

/// A request: `who` is `ns/sa` (or "" for plaintext), from 10.0.0.1 to
/// 10.0.0.2:8080.
struct Req {
    principal: Option<String>,
    namespace: Option<String>,
    ip: IpAddr,
    port: u16,
    method: &'static str,
    path: &'static str,
    host: &'static str,
    headers: http::HeaderMap,
    auth: Option<Authenticated>,
    http: bool,
}

fn req(who: &str) -> Req {
    let (principal, namespace) = match who.split_once('/') {
        Some((ns, sa)) => (
            Some(format!("cluster.local/ns/{ns}/sa/{sa}")),
            Some(ns.to_owned()),
        ),
        None => (None, None),
    };
    Req {
        principal,
        namespace,
        ip: "10.0.0.1".parse().unwrap(),
        port: 8080,
        method: "GET",
        path: "/",
        host: "web.default.svc.cluster.local:8080",
        headers: http::HeaderMap::new(),
        auth: None,
        http: true,
    }
}

impl Req {
    fn decide<'p>(&self, p: &'p WorkloadAuthz) -> Verdict<'p> {
        let h = HttpAttributes {
            method: self.method,
            authority: self.host,
            path: self.path,
            headers: &self.headers,
            auth: self.auth.as_ref(),
        };
        let a = Attributes {
            principal: self.principal.as_deref(),
            namespace: self.namespace.as_deref(),
            source_ip: self.ip,
            remote_ip: self.ip,
            destination: SocketAddr::new("10.0.0.2".parse().unwrap(), self.port),
            http: self.http.then_some(&h),
        };
        p.decide(&a)
    }

    fn allowed(&self, p: &WorkloadAuthz) -> bool {
        self.decide(p).allowed
    }
    fn path(mut self, p: &'static str) -> Self {
        self.path = p;
        self
    }
    fn method(mut self, m: &'static str) -> Self {
        self.method = m;
        self
    }
    fn port(mut self, p: u16) -> Self {
        self.port = p;
        self
    }
    fn ip(mut self, ip: &str) -> Self {
        self.ip = ip.parse().unwrap();
        self
    }
    fn header(mut self, k: &'static str, v: &'static str) -> Self {
        self.headers.append(k, v.parse().unwrap());
        self
    }
    fn tcp(mut self) -> Self {
        self.http = false;
        self
    }
    fn jwt(mut self, claims: serde_json::Value) -> Self {
        let s = |k: &str| claims[k].as_str().unwrap_or_default().to_owned();
        self.auth = Some(Authenticated {
            principal: format!("{}/{}", s("iss"), s("sub")),
            audiences: claims["aud"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
            presenter: claims["azp"].as_str().map(String::from),
            claims,
        });
        self
    }
}

const HEAD: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n";

fn ap(name: &str, ns: &str, spec: &str) -> String {
    format!("---\n{HEAD}metadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n")
}

#[test]
fn no_policy_allows_and_empty_allow_denies_everything() {
    let none = plan("");
    assert!(req("").allowed(&none));
    let deny_all = plan(&ap("deny-all", "default", "  {}"));
    let v = req("x/y").decide(&deny_all);
    assert!(!v.allowed);
    assert_eq!(v.action, Some(Action::Allow));
    assert!(v.policy.is_none(), "no ALLOW policy matched");
    let allow_all = plan(&ap("allow-all", "default", "  rules: [{}]"));
    assert!(req("").allowed(&allow_all));
}

#[test]
fn principals_namespaces_and_service_accounts() {
    let p = plan(&ap(
        "a",
        "default",
        "  rules:\n  - from:\n    - source: {principals: [\"cluster.local/ns/client/sa/*\"]}\n    - source: {namespaces: [\"team-*\"]}\n    - source: {serviceAccounts: [\"ops/admin\"]}",
    ));
    assert!(req("client/any").allowed(&p));
    assert!(!req("other/any").allowed(&p));
    assert!(req("team-a/x").allowed(&p));
    assert!(!req("teama/x").allowed(&p));
    assert!(req("ops/admin").allowed(&p));
    assert!(!req("ops/viewer").allowed(&p));
    assert!(!req("").allowed(&p), "plaintext has no principal");
    let not = plan(&ap(
        "a",
        "default",
        "  rules:\n  - from:\n    - source: {notPrincipals: [\"cluster.local/ns/client/sa/bad\"]}",
    ));
    assert!(req("client/good").allowed(&not));
    assert!(!req("client/bad").allowed(&not));
    let any = plan(&ap(
        "a",
        "default",
        "  rules:\n  - from:\n    - source: {principals: [\"*\"]}",
    ));
    assert!(req("a/b").allowed(&any));
    assert!(!req("").allowed(&any), "`*` needs an authenticated peer");
}

#[test]
fn ip_blocks_and_ports() {
    let p = plan(&ap(
        "a",
        "default",
        "  rules:\n  - from:\n    - source: {ipBlocks: [\"10.0.0.0/24\"], notIpBlocks: [\"10.0.0.9\"]}\n    to:\n    - operation: {ports: [\"8080\"]}",
    ));
    assert!(req("").allowed(&p));
    assert!(!req("").ip("10.0.1.1").allowed(&p));
    assert!(!req("").ip("10.0.0.9").allowed(&p));
    assert!(!req("").port(9090).allowed(&p));
    let remote = plan(&ap(
        "a",
        "default",
        "  rules:\n  - from:\n    - source: {remoteIpBlocks: [\"10.0.0.1\"]}",
    ));
    assert!(req("").allowed(&remote));
    assert!(!req("").ip("10.0.0.3").allowed(&remote));
}

#[test]
fn methods_paths_hosts() {
    let p = plan(&ap(
        "a",
        "default",
        "  rules:\n  - to:\n    - operation: {methods: [GET], paths: [\"/api/*\", \"/exact\", \"*.png\", \"/books/{*}/pages/{**}\"], notPaths: [\"/api/private\"]}\n    - operation: {hosts: [\"admin.example.com\"], methods: [POST]}",
    ));
    for ok in ["/api/x", "/exact", "/img/a.png", "/books/1/pages/2/3"] {
        assert!(req("").path(ok).allowed(&p), "{ok}");
    }
    for no in [
        "/api",
        "/exact/",
        "/api/private",
        "/books/1/2/pages/3",
        "/other",
    ] {
        assert!(!req("").path(no).allowed(&p), "{no}");
    }
    assert!(!req("").path("/api/x").method("POST").allowed(&p));
    let mut admin = req("").method("POST");
    admin.host = "Admin.Example.com:443";
    assert!(admin.allowed(&p));
    let mut other = req("").method("POST");
    other.host = "web:80";
    assert!(!other.allowed(&p));
}

#[test]
fn when_conditions() {
    let p = plan(&ap(
        "a",
        "default",
        "  rules:\n  - when:\n    - key: request.headers[X-Version]\n      values: [\"v1\", \"v2*\"]\n    - key: source.ip\n      values: [\"10.0.0.0/8\"]\n    - key: destination.port\n      notValues: [\"9090\"]",
    ));
    assert!(req("").header("x-version", "v1").allowed(&p));
    assert!(req("").header("x-version", "v2-beta").allowed(&p));
    assert!(!req("").header("x-version", "v3").allowed(&p));
    assert!(!req("").allowed(&p), "a header condition needs the header");
    assert!(
        !req("")
            .header("x-version", "v1")
            .ip("192.168.0.1")
            .allowed(&p)
    );
    assert!(!req("").header("x-version", "v1").port(9090).allowed(&p));
    let ns = plan(&ap(
        "a",
        "default",
        "  rules:\n  - when:\n    - key: source.namespace\n      values: [prod]\n    - key: source.principal\n      notValues: [\"cluster.local/ns/prod/sa/bad\"]\n    - key: destination.ip\n      values: [\"10.0.0.2\"]\n    - key: source.serviceAccount\n      notValues: [\"prod/robot\"]",
    ));
    assert!(req("prod/good").allowed(&ns));
    assert!(!req("prod/robot").allowed(&ns), "source.serviceAccount");
    assert!(!req("prod/bad").allowed(&ns));
    assert!(!req("dev/good").allowed(&ns));
}

#[test]
fn jwt_claims_and_request_principals() {
    let p = plan(&ap(
        "a",
        "default",
        "  rules:\n  - from:\n    - source: {requestPrincipals: [\"https://issuer/*\"]}\n    when:\n    - key: request.auth.claims[groups]\n      values: [admins]\n    - key: request.auth.claims[org][team]\n      values: [blue]\n    - key: request.auth.audiences\n      values: [web]\n    - key: request.auth.presenter\n      values: [cli]",
    ));
    let good = serde_json::json!({"iss": "https://issuer", "sub": "alice", "groups": ["dev", "admins"], "org": {"team": "blue"}, "aud": ["web"], "azp": "cli"});
    assert!(req("").jwt(good.clone()).allowed(&p));
    let mut not_admin = good.clone();
    not_admin["groups"] = serde_json::json!(["dev"]);
    assert!(!req("").jwt(not_admin).allowed(&p));
    let mut other_team = good.clone();
    other_team["org"]["team"] = "red".into();
    assert!(!req("").jwt(other_team).allowed(&p));
    let mut other_issuer = good.clone();
    other_issuer["iss"] = "https://evil".into();
    assert!(!req("").jwt(other_issuer).allowed(&p));
    assert!(!req("").allowed(&p), "no token, no request principal");
}

#[test]
fn deny_beats_allow_and_custom_comes_first() {
    let p = plan(&format!(
        "{}{}{}",
        ap("allow-all", "default", "  rules: [{}]"),
        ap(
            "deny-admin",
            "default",
            "  action: DENY\n  rules:\n  - to:\n    - operation: {paths: [\"/admin*\"]}"
        ),
        ap(
            "ext",
            "default",
            "  action: CUSTOM\n  provider: {name: authz}\n  rules:\n  - to:\n    - operation: {paths: [\"/ext\"]}"
        ),
    ));
    let v = req("").path("/admin/x").decide(&p);
    assert!(!v.allowed);
    assert_eq!(
        (v.action, v.policy.map(|p| p.id.as_str())),
        (Some(Action::Deny), Some("default/deny-admin"))
    );
    let v = req("").path("/x").decide(&p);
    assert_eq!(
        (v.allowed, v.policy.map(|p| p.id.as_str())),
        (true, Some("default/allow-all"))
    );
    let attrs_path = |path: &'static str| {
        let r = req("").path(path);
        let h = HttpAttributes {
            method: r.method,
            authority: r.host,
            path: r.path,
            headers: &r.headers,
            auth: None,
        };
        let a = Attributes {
            principal: None,
            namespace: None,
            source_ip: r.ip,
            remote_ip: r.ip,
            destination: SocketAddr::new(r.ip, 80),
            http: Some(&h),
        };
        p.custom(&a).map(|p| p.provider.clone())
    };
    assert_eq!(attrs_path("/ext"), Some(Some("authz".into())));
    assert_eq!(attrs_path("/x"), None);
    // On TCP the authorizer cannot be asked: a matching CUSTOM denies.
    assert!(p.per_request);
    let v = req("").tcp().decide(&p);
    assert_eq!(
        (v.allowed, v.action, v.policy.map(|p| p.id.as_str())),
        (false, Some(Action::Custom), Some("default/ext"))
    );
}

#[test]
fn http_fields_on_tcp_allow_never_deny_ignores() {
    let allow = plan(&ap(
        "a",
        "default",
        "  rules:\n  - to:\n    - operation: {methods: [GET]}",
    ));
    assert!(req("").allowed(&allow));
    assert!(
        !req("").tcp().allowed(&allow),
        "ALLOW with HTTP fields never matches TCP"
    );
    let deny = plan(&ap(
        "d",
        "default",
        "  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: [bad]}\n    to:\n    - operation: {paths: [\"/admin\"]}",
    ));
    assert!(
        !req("bad/x").tcp().allowed(&deny),
        "DENY ignores the HTTP fields on TCP"
    );
    assert!(
        req("good/x").tcp().allowed(&deny),
        "its other fields still decide"
    );
    assert!(
        req("bad/x").path("/other").allowed(&deny),
        "on HTTP, the path decides"
    );
    assert!(allow.per_request && deny.per_request);
    let l4 = plan(&ap(
        "a",
        "default",
        "  rules:\n  - to:\n    - operation: {ports: [\"80\"]}",
    ));
    assert!(!l4.per_request);
}

#[test]
fn unsupported_conditions_fail_closed() {
    let allow = plan(&ap(
        "a",
        "default",
        "  rules:\n  - when:\n    - key: experimental.envoy.filters.network.mysql_proxy[db.table]\n      values: [x]\n  - from:\n    - source: {namespaces: [ok]}",
    ));
    assert!(!req("bad/x").allowed(&allow));
    assert!(req("ok/x").allowed(&allow), "the other rule still applies");
    assert_eq!(
        allow.policies[0].problems.len(),
        1,
        "{:?}",
        allow.policies[0].problems
    );
    let deny = plan(&ap(
        "d",
        "default",
        "  action: DENY\n  rules:\n  - when:\n    - key: experimental.envoy.filters.network.mysql_proxy[db.table]\n      values: [x]",
    ));
    assert!(
        !req("any/x").allowed(&deny),
        "a DENY that cannot be applied denies"
    );
}

#[test]
fn scope_root_namespace_and_selectors() {
    let all = policies(&format!(
        "{}{}{}{}",
        ap(
            "mesh",
            "istio-system",
            "  action: DENY\n  rules:\n  - to:\n    - operation: {paths: [\"/mesh\"]}"
        ),
        ap(
            "root-sel",
            "istio-system",
            "  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules:\n  - to:\n    - operation: {paths: [\"/root-sel\"]}"
        ),
        ap("other-ns", "other", "  action: DENY\n  rules: [{}]"),
        ap(
            "other-app",
            "default",
            "  selector: {matchLabels: {app: api}}\n  action: DENY\n  rules: [{}]"
        ),
    ));
    let p = WorkloadAuthz::for_workload(&all, &web(), "istio-system");
    let ids: Vec<&str> = p.policies.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["istio-system/mesh", "istio-system/root-sel"]);
    assert!(!req("").path("/mesh").allowed(&p));
    assert!(!req("").path("/root-sel").allowed(&p));
    assert!(req("").path("/x").allowed(&p));
}

#[test]
fn dry_run_and_audit_do_not_change_the_decision() {
    let p = plan(&format!(
        "{}{}",
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: dry\n  namespace: default\n  annotations: {istio.io/dry-run: \"true\"}\nspec:\n  action: DENY\n  rules:\n  - to:\n    - operation: {paths: [\"/dry\"]}\n",
        ap(
            "audit",
            "default",
            "  action: AUDIT\n  rules:\n  - to:\n    - operation: {paths: [\"/audited\"]}"
        ),
    ));
    let v = req("").path("/dry").decide(&p);
    assert!(v.allowed);
    let (would, action, by) = v.dry_run.expect("the dry run would deny");
    assert_eq!(
        (would, action, by.map(|p| p.id.as_str())),
        (false, Some(Action::Deny), Some("default/dry"))
    );
    assert!(req("").path("/x").decide(&p).dry_run.is_none());
    let v = req("").path("/audited").decide(&p);
    assert!(v.allowed);
    assert_eq!(v.audit.map(|p| p.id.as_str()), Some("default/audit"));
    assert!(req("").path("/x").decide(&p).audit.is_none());
}

#[test]
fn the_principal_index_gives_the_same_answers_as_every_rule() {
    // Exact principals (indexed), a wildcard (not), one rule naming two
    // sources, and a rule without `from`.
    let p = plan(&ap(
        "a",
        "default",
        "  rules:\n  - from:\n    - source: {principals: [\"cluster.local/ns/a/sa/x\"]}\n    to:\n    - operation: {paths: [\"/a\"]}\n  - from:\n    - source: {principals: [\"cluster.local/ns/b/*\"]}\n  - from:\n    - source: {principals: [\"cluster.local/ns/c/sa/x\"]}\n    - source: {principals: [\"cluster.local/ns/d/sa/x\"]}\n  - to:\n    - operation: {paths: [\"/open\"]}",
    ));
    assert!(req("a/x").path("/a").allowed(&p));
    assert!(!req("a/x").path("/b").allowed(&p));
    assert!(req("b/anything").allowed(&p));
    assert!(req("c/x").allowed(&p) && req("d/x").allowed(&p));
    assert!(!req("e/x").allowed(&p));
    assert!(
        req("e/x").path("/open").allowed(&p),
        "the rule without from"
    );
    assert!(!req("").allowed(&p) && req("").path("/open").allowed(&p));
    // Namespaces: indexed too, beside principals.
    let ns = plan(&ap(
        "n",
        "default",
        "  rules:\n  - from:\n    - source: {namespaces: [prod]}\n    to:\n    - operation: {paths: [\"/p\"]}\n  - from:\n    - source: {principals: [\"cluster.local/ns/dev/sa/x\"]}\n  - from:\n    - source: {namespaces: [\"qa-*\"]}",
    ));
    assert!(req("prod/any").path("/p").allowed(&ns));
    assert!(!req("prod/any").path("/q").allowed(&ns));
    assert!(req("dev/x").allowed(&ns) && !req("dev/y").allowed(&ns));
    assert!(
        req("qa-1/z").allowed(&ns),
        "a wildcard namespace: not indexed"
    );
    assert!(!req("stage/z").allowed(&ns));
}
