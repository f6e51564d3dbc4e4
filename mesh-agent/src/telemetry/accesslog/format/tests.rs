use super::*;

fn text(f: &str, r: &Record) -> String {
    Format::text(f).unwrap().render(r, false)
}

#[test]
fn istio_default_text_line() {
    let r = Record::sample();
    let line = Format::istio_default(false).render(&r, false);
    assert_eq!(
        line,
        "[2023-11-14T22:13:20.123Z] \"GET /ratings/1?x=y HTTP/1.1\" 503 UF - - \"-\" 12 91 7 - \"-\" \
\"curl/8\" \"r-1\" \"ratings:9080\" \"10.10.2.2:9080\" outbound|9080||ratings.default.svc.cluster.local \
- 10.96.0.5:9080 10.10.1.2:40000 - default\n"
    );
}

#[test]
fn a_tcp_record_prints_dashes_and_code_zero() {
    let mut r = Record::sample();
    r.http = None;
    r.flags.clear();
    assert_eq!(
        text(
            "\"%REQ(:METHOD)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_SENT%",
            &r
        ),
        "\"- -\" 0 - 91\n"
    );
}

#[test]
fn operators_with_alternatives_lengths_and_times() {
    let mut r = Record::sample();
    r.http
        .as_mut()
        .unwrap()
        .request_headers
        .insert("x-envoy-original-path", "/orig".parse().unwrap());
    assert_eq!(text("%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%", &r), "/orig\n");
    assert_eq!(text("%REQ(X-MISSING?USER-AGENT)%", &r), "curl/8\n");
    assert_eq!(text("%REQ(USER-AGENT):3%", &r), "cur\n");
    assert_eq!(text("%START_TIME(%s)%", &r), "1700000000\n");
    assert_eq!(
        text("%START_TIME(%Y/%m/%d %H:%M:%E6S)% 100%%", &r),
        "2023/11/14 22:13:20.123000 100%\n"
    );
    assert_eq!(
        text(
            "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %UPSTREAM_PEER_URI_SAN%",
            &r
        ),
        "10.10.1.2 spiffe://cluster.local/ns/default/sa/ratings\n"
    );
    assert_eq!(text("%DYNAMIC_METADATA(istio.mixer:status)%", &r), "-\n");
    assert_eq!(
        Format::text("%REQ(USER-AGENT)%").unwrap().render(
            &{
                let mut r = Record::sample();
                r.http = None;
                r
            },
            true
        ),
        "\n"
    );
}

#[test]
fn json_labels_keep_numbers_and_mark_absent_values() {
    let r = Record::sample();
    let f = Format::json([
        ("code", "%RESPONSE_CODE%"),
        ("ua", "%REQ(USER-AGENT)%"),
        ("missing", "%REQ(X-NONE)%"),
        ("mixed", "%REQ(:METHOD)% %RESPONSE_CODE%"),
    ])
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&f.render(&r, false)).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"code": 503, "ua": "curl/8", "missing": "-", "mixed": "GET 503"})
    );
    let v: serde_json::Value = serde_json::from_str(&f.render(&r, true)).unwrap();
    assert!(v.get("missing").is_none(), "{v}");
    let d: serde_json::Value =
        serde_json::from_str(&Format::istio_default(true).render(&r, false)).unwrap();
    assert_eq!(d["response_code"], 503);
    assert_eq!(
        d["upstream_cluster"],
        "outbound|9080||ratings.default.svc.cluster.local"
    );
    assert_eq!(d.as_object().unwrap().len(), ISTIO_JSON.len());
}

#[test]
fn bad_format_strings_are_refused_with_the_reason() {
    for (f, why) in [
        ("%NOPE%", "not an Envoy command operator"),
        ("%REQ%", "needs a header name"),
        ("%REQ(A", "unterminated"),
        ("%PROTOCOL(x)%", "takes no argument"),
        ("%REQ(A):x%", "not a number"),
        ("%START_TIME(%Q)%", "not supported"),
    ] {
        let e = Format::text(f).unwrap_err().to_string();
        assert!(e.contains(why), "{f}: {e}");
    }
}

#[test]
fn pseudo_headers_by_their_own_names() {
    let r = Record::sample();
    assert_eq!(
        text(
            "%START_TIME(%H:%M:%S)% %REQ(:METHOD)% %REQ(:PATH)% %REQ(:AUTHORITY)%",
            &r
        ),
        "22:13:20 GET /ratings/1?x=y ratings:9080\n"
    );
}
