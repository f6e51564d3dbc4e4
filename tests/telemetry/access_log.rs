//! Access logs: Telemetry `accessLogging` (providers, scope precedence,
//! `disabled`, CEL filters), MeshConfig providers (text and JSON formats,
//! the legacy `accessLogFile`), live changes, TCP connection records.

use super::*;

const CLIENT_CLUSTER: &str = "outbound|80||web.default.svc.cluster.local";
const SERVER_CLUSTER: &str = "inbound|9000||";
const CLIENT_SAN: &str = "spiffe://cluster.local/ns/default/sa/client-sa";
const WEB_SAN: &str = "spiffe://cluster.local/ns/default/sa/web-sa";

fn providers(dir: &std::path::Path, json_labels: &str) -> String {
    format!(
        "extensionProviders:
- name: file
  envoyFileAccessLog:
    path: {dir}/access.log
    logFormat:
      text: '%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %UPSTREAM_CLUSTER% id=%REQ(X-REQUEST-ID)% peer=%DOWNSTREAM_PEER_URI_SAN% up=%UPSTREAM_PEER_URI_SAN%'
- name: json
  envoyFileAccessLog:
    path: {dir}/access.json
    logFormat:
      labels: {json_labels}
",
        dir = dir.display()
    )
}

const LABELS: &str = "{code: '%RESPONSE_CODE%', path: '%REQ(:PATH)%', cluster: '%UPSTREAM_CLUSTER%', sent: '%BYTES_SENT%'}";
const LABELS_WITH_PROTOCOL: &str = "{code: '%RESPONSE_CODE%', path: '%REQ(:PATH)%', cluster: '%UPSTREAM_CLUSTER%', sent: '%BYTES_SENT%', proto: '%PROTOCOL%'}";

#[test]
fn telemetry_selects_providers_filters_and_formats_and_changes_apply_live() {
    let m = Mesh::start("tel-access-log", &|dir| providers(dir, LABELS), true);
    let (text, json) = (
        m.c.env.dir.join("access.log"),
        m.c.env.dir.join("access.json"),
    );
    // No Telemetry and no accessLogFile: nothing is logged.
    assert_eq!(m.get("/before", &[]), 200);

    // Mesh-wide: the `file` provider, both sides.
    m.telemetry(&[telemetry(
        "istio-system/mesh-default",
        json!({"accessLogging": [{"providers": [{"name": "file"}]}]}),
    )]);
    assert_eq!(m.get("/one", &["x-request-id: test-id-1"]), 200);
    assert_eq!(m.get("/generated", &[]), 200);
    let both = |path: &str| {
        let l = lines_with(&text, &format!("GET {path} "));
        l.iter().any(|l| l.contains(CLIENT_CLUSTER)) && l.iter().any(|l| l.contains(SERVER_CLUSTER))
    };
    assert!(
        wait_until(Duration::from_secs(5), || both("/one")
            && both("/generated")),
        "no client and server lines for /one and /generated in {}:\n{}\n{}",
        text.display(),
        std::fs::read_to_string(&text).unwrap_or_default(),
        m.agent_a.log()
    );
    let one = lines_with(&text, "GET /one ");
    let client = one.iter().find(|l| l.contains(CLIENT_CLUSTER)).unwrap();
    let server = one.iter().find(|l| l.contains(SERVER_CLUSTER)).unwrap();
    assert_eq!(
        client,
        &format!("GET /one 200 - {CLIENT_CLUSTER} id=test-id-1 peer=- up={WEB_SAN}")
    );
    assert_eq!(
        server,
        &format!("GET /one 200 - {SERVER_CLUSTER} id=test-id-1 peer={CLIENT_SAN} up=-")
    );
    // A request without an id gets one at the source, and the destination
    // logs the same.
    let ids: Vec<String> = lines_with(&text, "GET /generated ")
        .iter()
        .map(|l| {
            l.split("id=")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_eq!(ids[0], ids[1]);
    assert_eq!(ids[0].len(), 36, "not a UUID: {}", ids[0]);
    assert!(
        lines_with(&text, "/before").is_empty(),
        "logged with no Telemetry"
    );

    // The namespace names `json` instead, with a filter: `file` leaves the
    // scope, and only requests the filter accepts are written.
    m.telemetry(&[
        telemetry(
            "istio-system/mesh-default",
            json!({"accessLogging": [{"providers": [{"name": "file"}]}]}),
        ),
        telemetry(
            "default/ns",
            json!({"accessLogging": [{"providers": [{"name": "json"}],
                   "filter": {"expression": "request.headers['x-debug'] == 'true'"}}]}),
        ),
    ]);
    assert_eq!(m.get("/quiet", &[]), 200);
    assert_eq!(m.get("/debug", &["x-debug: true"]), 200);
    assert!(
        wait_until(Duration::from_secs(5), || lines_with(&json, "/debug").len()
            == 2),
        "no JSON lines for /debug:\n{}",
        std::fs::read_to_string(&json).unwrap_or_default()
    );
    for l in lines_with(&json, "/debug") {
        let v: Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["code"], 200, "{l}");
        assert!(v["sent"].as_u64().unwrap() > 0, "{l}");
        assert!(v.get("proto").is_none(), "{l}");
    }
    assert!(
        lines_with(&json, "/quiet").is_empty(),
        "the filter let /quiet through"
    );
    assert!(
        lines_with(&text, "/debug").is_empty(),
        "`file` is out of scope"
    );

    // The workload disables logging on its side only.
    m.telemetry(&[
        telemetry(
            "default/ns",
            json!({"accessLogging": [{"providers": [{"name": "json"}]}]}),
        ),
        telemetry(
            "default/web-off",
            json!({"selector": {"matchLabels": {"app": "web"}},
                   "accessLogging": [{"disabled": true}]}),
        ),
    ]);
    assert_eq!(m.get("/disabled", &[]), 200);
    assert!(
        wait_until(Duration::from_secs(5), || !lines_with(&json, "/disabled")
            .is_empty()),
        "the client's line for /disabled is missing"
    );

    // The MeshConfig changes the JSON labels: applied live, both agents.
    let applied = |a: &Agent| a.log().matches("mesh config applied").count();
    let before = (applied(&m.agent_a), applied(&m.agent_b));
    write_text(
        &m.mesh_config,
        &providers(&m.c.env.dir, LABELS_WITH_PROTOCOL),
    );
    assert!(
        wait_until(Duration::from_secs(5), || applied(&m.agent_a) > before.0
            && applied(&m.agent_b) > before.1),
        "mesh config change not applied:\n{}",
        m.agent_a.log()
    );
    assert_eq!(m.get("/after-change", &[]), 200);
    assert!(
        wait_until(Duration::from_secs(5), || !lines_with(
            &json,
            "/after-change"
        )
        .is_empty()),
        "no line for /after-change"
    );
    let l = &lines_with(&json, "/after-change")[0];
    assert_eq!(
        serde_json::from_str::<Value>(l).unwrap()["proto"],
        "HTTP/1.1",
        "{l}"
    );
    // Only the client logged /disabled: b's agent, which writes within
    // milliseconds, had several round trips' time to write its own.
    assert_eq!(lines_with(&json, "/disabled").len(), 1);

    // A bad MeshConfig is refused; the last good one keeps logging.
    write_text(
        &m.mesh_config,
        &providers(&m.c.env.dir, "{code: '%NOT_AN_OPERATOR%'}"),
    );
    let rejected = |a: &Agent| {
        a.metrics()
            .value("mesh_config_rejected_total", &[("source", "mesh-config")])
    };
    assert!(
        wait_until(Duration::from_secs(5), || rejected(&m.agent_a) == 1.0
            && rejected(&m.agent_b) == 1.0),
        "the bad mesh config was not refused:\n{}",
        m.agent_a.log()
    );
    assert!(
        m.agent_a.log().contains("NOT_AN_OPERATOR"),
        "{}",
        m.agent_a.log()
    );
    assert_eq!(m.get("/after-bad", &[]), 200);
    assert!(
        wait_until(Duration::from_secs(5), || lines_with(&json, "/after-bad")
            .iter()
            .any(|l| l.contains("\"proto\":\"HTTP/1.1\""))),
        "the last good format stopped logging"
    );
}

#[test]
fn the_legacy_file_logs_requests_and_tcp_connections_in_istios_json() {
    let m = Mesh::start(
        "tel-legacy-log",
        &|dir| {
            format!(
                "accessLogFile: {}/legacy.log\naccessLogEncoding: JSON\n",
                dir.display()
            )
        },
        false,
    );
    let log = m.c.env.dir.join("legacy.log");
    assert_eq!(m.get("/legacy", &["user-agent: legacy-test"]), 200);
    let web = &m.c.servers[0];
    assert!(
        m.c.client
            .run_app(&["connect", &web.v4(9100), "0123456789"])
            .ok()
    );
    let records = || -> Vec<Value> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    };
    let tcp = |v: &Value| v["response_code"] == 0 && v["bytes_received"] == 10;
    assert!(
        wait_until(Duration::from_secs(5), || {
            let r = records();
            r.iter().any(|v| v["path"] == "/legacy") && r.iter().filter(|v| tcp(v)).count() >= 2
        }),
        "missing records in {}:\n{}\n{}",
        log.display(),
        std::fs::read_to_string(&log).unwrap_or_default(),
        m.agent_a.log()
    );
    let r = records();
    let client = r
        .iter()
        .find(|v| v["path"] == "/legacy" && v["upstream_cluster"] == CLIENT_CLUSTER)
        .expect("the client's request record");
    assert_eq!(client["response_code"], 200);
    assert_eq!(client["method"], "GET");
    assert_eq!(client["protocol"], "HTTP/1.1");
    assert_eq!(client["user_agent"], "legacy-test");
    assert_eq!(client["authority"], format!("{VIP}:80"));
    assert_eq!(client["route_name"], "default");
    assert_eq!(client["downstream_local_address"], format!("{VIP}:80"));
    assert_eq!(
        client["downstream_remote_address"]
            .as_str()
            .unwrap()
            .split(':')
            .next(),
        Some(m.c.client.ip4.to_string().as_str())
    );
    assert_eq!(client.as_object().unwrap().len(), 24, "{client}");
    // (b's agent relays port 9000 without reading requests, so its record
    // of the request is a TCP one, written when the source's pooled
    // connection closes.)
    // The echo connection, both sides, as TCP records.
    let tcp_records: Vec<&Value> = r.iter().filter(|v| tcp(v)).collect();
    assert!(
        tcp_records
            .iter()
            .any(|v| v["upstream_cluster"] == "inbound|9100||" && v["bytes_sent"] == 10),
        "{tcp_records:?}"
    );
    assert!(
        tcp_records
            .iter()
            .any(|v| v["upstream_host"] == web.v4(9100)
                && v["upstream_cluster"] == "PassthroughCluster"
                && v["downstream_remote_address"]
                    .as_str()
                    .is_some_and(|a| a.starts_with(&format!("{}:", m.c.client.ip4)))
                && v["method"] == "-"
                && v["protocol"] == "-"),
        "{tcp_records:?}"
    );
}
